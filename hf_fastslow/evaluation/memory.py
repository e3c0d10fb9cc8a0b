"""Bytes a cache object really holds, found by walking its tensors (used to compare KV caches fairly)."""

from __future__ import annotations

import torch

__all__ = ["held_tensor_bytes"]


def held_tensor_bytes(obj, _seen: set | None = None, _depth: int = 0) -> int:
    """Sum of the storage of every distinct tensor reachable from `obj` through attributes, lists, tuples and dicts.

    Tensor subclasses that wrap inner tensors (optimum-quanto's QTensor, packed int tensors) are unwrapped with
    `__tensor_flatten__`, so packed codes, scales and zero-points are counted at their real size. Objects with an
    `nbytes()` method of their own (hf_fastslow caches) are trusted.
    """
    seen = set() if _seen is None else _seen
    if _depth > 12 or obj is None or isinstance(obj, (str, bytes, int, float, bool, torch.dtype, torch.device)):
        return 0
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            names, _ = obj.__tensor_flatten__()
            return sum(held_tensor_bytes(getattr(obj, n), seen, _depth + 1) for n in names)
        if isinstance(obj, torch.nn.Parameter):
            return 0
        key = ("storage", obj.untyped_storage().data_ptr()) if obj.numel() else None
        if key is not None and key in seen:
            return 0
        if key is not None:
            seen.add(key)
        return obj.numel() * obj.element_size()
    if hasattr(obj, "nbytes") and callable(obj.nbytes) and not isinstance(obj, type):
        return int(obj.nbytes())
    if isinstance(obj, torch.nn.Module):
        return 0  # weights are not cache memory
    if isinstance(obj, dict):
        return sum(held_tensor_bytes(v, seen, _depth + 1) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(held_tensor_bytes(v, seen, _depth + 1) for v in obj)
    if hasattr(obj, "__dict__"):
        return sum(held_tensor_bytes(v, seen, _depth + 1) for v in vars(obj).values())
    return 0
