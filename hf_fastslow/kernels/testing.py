"""Test helper: run a dispatched kernel's Triton path (natively on CUDA, or under TRITON_INTERPRET=1 on the CPU)
and compare it with its PyTorch reference."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .dispatch import interpreter_enabled, triton_available


def triton_runnable(device: str | torch.device = "cpu") -> bool:
    """True when Triton kernels can run on `device` here (CUDA, or the interpreter on the CPU)."""
    if not triton_available():
        return False
    return torch.device(device).type == "cuda" or interpreter_enabled()


def _compare(a: Any, b: Any, atol: float, rtol: float, path: str = "out") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor), f"{path}: tensor vs {type(b)}"
        assert a.shape == b.shape, f"{path}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
        assert a.dtype == b.dtype, f"{path}: dtype {a.dtype} vs {b.dtype}"
        if a.dtype in (torch.uint8, torch.int8, torch.int32, torch.int64, torch.bool):
            assert torch.equal(a, b), f"{path}: integer outputs differ in {(a != b).sum().item()} places"
        else:
            torch.testing.assert_close(a.float(), b.float(), atol=atol, rtol=rtol, msg=lambda m: f"{path}: {m}")
    elif isinstance(a, (tuple, list)):
        assert len(a) == len(b), f"{path}: length {len(a)} vs {len(b)}"
        for i, (x, y) in enumerate(zip(a, b)):
            _compare(x, y, atol, rtol, f"{path}[{i}]")
    elif hasattr(a, "__dataclass_fields__"):
        for field in a.__dataclass_fields__:
            _compare(getattr(a, field), getattr(b, field), atol, rtol, f"{path}.{field}")
    else:
        assert a == b, f"{path}: {a!r} vs {b!r}"


def assert_matches_reference(dispatcher: Callable, *args, atol: float = 1e-5, rtol: float = 1e-5, **kwargs):
    """Call the Triton implementation and the reference of `dispatcher` on the same inputs and compare outputs."""
    if dispatcher.triton is None:
        raise ValueError(f"{dispatcher.kernel_name} has no Triton implementation")
    expected = dispatcher.reference(*args, **kwargs)
    got = dispatcher.triton()(*args, **kwargs)
    _compare(got, expected, atol, rtol)
    return got, expected
