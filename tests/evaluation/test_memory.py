"""The storage walk every cache is measured by: views count at their storage size, shared storages count once,
nested containers are entered, models and weak references are not."""

import weakref
from dataclasses import dataclass

import pytest
import torch

from hf_fastslow.evaluation.memory import storage_bytes, tensor_storages
from hf_fastslow.kernels.quantize import quantize_pack


def test_a_view_counts_its_whole_storage():
    big = torch.zeros(100)
    assert storage_bytes(big[:10]) == 400
    assert storage_bytes({"a": big[:10], "b": big[50:]}) == 400  # one storage, counted once
    assert storage_bytes([big[:10].clone()]) == 40  # a copy owns only what it holds


def test_nested_containers_dataclasses_slots_and_plain_objects():
    @dataclass
    class Box:
        inner: object

    class Slotted:
        __slots__ = ("t",)

        def __init__(self, t):
            self.t = t

    class Plain:
        def __init__(self):
            self.items = (torch.zeros(3), [Box({"k": torch.zeros(5, dtype=torch.float64)})])
            self.slotted = Slotted(torch.zeros(2, dtype=torch.int32))

    assert storage_bytes(Plain()) == 3 * 4 + 5 * 8 + 2 * 4


def test_quantized_tensor_counts_codes_scales_and_minima():
    q = quantize_pack(torch.randn(4, 64), 2, 32)
    assert storage_bytes(q) == q.packed.numel() + 2 * q.scale.numel() * 2 == 4 * 16 + 4 * 2 * 2 * 2


def test_models_weakrefs_and_cycles_are_not_entered():
    lin = torch.nn.Linear(8, 8)
    t = torch.zeros(10)

    class Holder:
        pass

    h = Holder()
    h.model, h.ref, h.me, h.t = lin, weakref.ref(lin), h, t
    assert storage_bytes(h) == 40
    # a parameter reached without going through its module is a tensor like any other
    assert storage_bytes({"w": lin.weight}) == 8 * 8 * 4


def test_exclude_leaves_out_shared_storages():
    shared = torch.zeros(16)
    own = torch.zeros(4)
    assert storage_bytes({"s": shared[:2], "o": own}, exclude=[shared]) == 16
    assert set(tensor_storages([shared, own])) == {
        (str(shared.device), shared.untyped_storage().data_ptr()),
        (str(own.device), own.untyped_storage().data_ptr()),
    }


def test_tensor_subclasses_are_unwrapped():
    """optimum-quanto's packed tensors (a wrapper around a wrapper around uint8 codes) count at their packed size."""
    quanto = pytest.importorskip("optimum.quanto")
    x = torch.randn(32, 64)
    scale, shift = quanto.MaxOptimizer()(x, quanto.qint4, 0, 32)
    q = quanto.quantize_weight(x, quanto.qint4, 0, scale, shift, 32)
    assert type(q) is not torch.Tensor
    codes = 32 * 64 // 2  # 4-bit codes, two per byte
    scales_and_shifts = 2 * (32 * 64 // 32) * 4  # fp32 scale and shift per group of 32
    assert storage_bytes(q) == codes + scales_and_shifts
