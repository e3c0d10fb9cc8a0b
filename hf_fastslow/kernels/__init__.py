"""Triton kernels, each beside its PyTorch reference, behind one dispatch layer (see `dispatch`)."""

from .dispatch import KernelBackend, current_backend, force_backend, kernel, triton_available, use_triton

__all__ = ["KernelBackend", "current_backend", "force_backend", "kernel", "triton_available", "use_triton"]
