"""Bytes an object really holds, found by walking its tensors: the one measure every cache in this package (and every
peer a benchmark compares it with) is reported by.

The rule: every tensor reachable from the object (attributes, dicts, lists, tuples, sets, dataclasses, nested plain
objects, tensor subclasses unwrapped through `__tensor_flatten__`) is collected; tensors sharing an untyped storage
count once, at the full size of that storage (a small view of a big buffer holds the whole buffer alive). The walk
does not enter `nn.Module`s (the model's weights are not the cache's memory), weak references, functions, classes or
modules. Storages reachable from `exclude` are left out (e.g. factors a cache shares with other caches through the
model, reported apart).
"""

from __future__ import annotations

import dataclasses
import types
import weakref
from collections.abc import Iterator

import torch

__all__ = ["held_tensor_bytes", "storage_bytes", "tensor_storages"]

_ATOMS = (str, bytes, bytearray, int, float, complex, bool, torch.dtype, torch.device, torch.Size, type(None))
_OPAQUE = (
    torch.nn.Module, weakref.ReferenceType, weakref.ProxyType, types.FunctionType, types.BuiltinFunctionType,
    types.MethodType, types.ModuleType, type, torch.Generator,
)


def _children(obj) -> Iterator:
    if isinstance(obj, dict):
        yield from obj.keys()
        yield from obj.values()
    elif isinstance(obj, (list, tuple, set, frozenset)):
        yield from obj
    else:
        if dataclasses.is_dataclass(obj):
            for f in dataclasses.fields(obj):
                yield getattr(obj, f.name, None)
        state = getattr(obj, "__dict__", None)
        if isinstance(state, dict):
            yield from state.values()
        for cls in type(obj).__mro__:
            for slot in getattr(cls, "__slots__", ()):
                if isinstance(slot, str) and slot not in ("__dict__", "__weakref__") and hasattr(obj, slot):
                    yield getattr(obj, slot)


def _plain_tensors(t: torch.Tensor) -> Iterator[torch.Tensor]:
    """A tensor subclass that wraps inner tensors (optimum-quanto's QTensor) yields those; a plain tensor itself."""
    if type(t) is not torch.Tensor and type(t) is not torch.nn.Parameter and hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        for name in names:
            yield from _plain_tensors(getattr(t, name))
    else:
        yield t


def tensor_storages(obj) -> dict[tuple[str, int], int]:
    """{(device, storage data_ptr): storage bytes} of every storage reachable from `obj` (see the module docstring)."""
    found: dict[tuple[str, int], int] = {}
    seen: set[int] = set()
    stack = [obj]
    while stack:
        item = stack.pop()
        if isinstance(item, _ATOMS) or id(item) in seen:
            continue
        seen.add(id(item))
        if isinstance(item, torch.Tensor):
            for t in _plain_tensors(item):
                storage = t.untyped_storage()
                if storage.nbytes():
                    found[(str(t.device), storage.data_ptr())] = storage.nbytes()
            continue
        if isinstance(item, _OPAQUE) or callable(item) and not hasattr(item, "__dict__"):
            continue
        stack.extend(_children(item))
    return found


def storage_bytes(obj, exclude=None) -> int:
    """Bytes of every distinct storage reachable from `obj`, each at its full size, minus those reachable from
    `exclude`."""
    held = tensor_storages(obj)
    if exclude is not None:
        for key in tensor_storages(exclude):
            held.pop(key, None)
    return sum(held.values())


def held_tensor_bytes(obj) -> int:
    """Alias of `storage_bytes(obj)` kept for existing callers."""
    return storage_bytes(obj)
