"""Kernel dispatch: Triton on CUDA, the PyTorch reference elsewhere, with a switch to force either.

`HF_FASTSLOW_KERNELS=auto|triton|torch` sets the default; `force_backend(...)` overrides it in a block (thread-local).
Forcing Triton on a CPU tensor needs `TRITON_INTERPRET=1` set before the kernel module is first imported (the test
suite does this); otherwise it raises instead of silently falling back.
"""

from __future__ import annotations

import contextlib
import enum
import functools
import importlib
import os
import threading
from collections.abc import Callable

import torch


class KernelBackend(str, enum.Enum):
    AUTO = "auto"
    TRITON = "triton"
    TORCH = "torch"


_local = threading.local()


def _env_backend() -> KernelBackend:
    value = os.environ.get("HF_FASTSLOW_KERNELS", "auto").strip().lower()
    try:
        return KernelBackend(value)
    except ValueError as err:
        raise ValueError(f"HF_FASTSLOW_KERNELS must be one of auto, triton, torch; got {value!r}.") from err


def current_backend() -> KernelBackend:
    return getattr(_local, "backend", None) or _env_backend()


@contextlib.contextmanager
def force_backend(backend: str | KernelBackend):
    """Run the block with every dispatched kernel on `backend` ("triton", "torch" or "auto")."""
    backend = KernelBackend(backend)
    previous = getattr(_local, "backend", None)
    _local.backend = backend
    try:
        yield
    finally:
        _local.backend = previous


def interpreter_enabled() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def triton_available() -> bool:
    try:
        importlib.import_module("triton")
    except Exception:  # noqa: BLE001 - any import failure means "no triton"
        return False
    return True


def use_triton(*tensors: torch.Tensor) -> bool:
    """Whether a dispatched call on `tensors` should take the Triton path."""
    backend = current_backend()
    if backend is KernelBackend.TORCH:
        return False
    on_cuda = all(t.is_cuda for t in tensors if isinstance(t, torch.Tensor))
    if backend is KernelBackend.TRITON:
        if not triton_available():
            raise RuntimeError(
                "HF_FASTSLOW_KERNELS=triton but triton is not installed: `pip install 'hf_fastslow[kernels]'`."
            )
        if not on_cuda and not interpreter_enabled():
            raise RuntimeError(
                "Triton kernels on CPU tensors need TRITON_INTERPRET=1 (set before importing the kernels)."
            )
        return True
    return on_cuda and triton_available()


def _tensor_args(values) -> list[torch.Tensor]:
    # Containers such as QuantizedTensor carry their tensors as dataclass fields: look one level inside.
    found = []
    for value in values:
        if isinstance(value, torch.Tensor):
            found.append(value)
        elif hasattr(value, "__dataclass_fields__"):
            found.extend(v for v in vars(value).values() if isinstance(v, torch.Tensor))
    return found


def kernel(reference: Callable, triton_impl: str | Callable | None = None, name: str | None = None) -> Callable:
    """Build a dispatcher that calls `triton_impl` when `use_triton(tensor args)` holds, else `reference`.

    `triton_impl` may be a dotted "module:function" path, imported lazily so that importing the package never
    imports triton (and so that TRITON_INTERPRET is read when the kernel is first needed).
    """

    def _resolve() -> Callable:
        if callable(triton_impl):
            return triton_impl
        module, _, attr = triton_impl.partition(":")
        return getattr(importlib.import_module(module), attr)

    @functools.wraps(reference)
    def dispatcher(*args, **kwargs):
        tensors = _tensor_args(list(args) + list(kwargs.values()))
        if triton_impl is not None and tensors and use_triton(*tensors):
            return _resolve()(*args, **kwargs)
        return reference(*args, **kwargs)

    dispatcher.reference = reference
    dispatcher.triton = _resolve if triton_impl is not None else None
    dispatcher.kernel_name = name or reference.__name__
    return dispatcher
