"""Triton kernels, each beside its PyTorch reference, behind one dispatch layer (see `dispatch`).

The ops a user calls directly are re-exported here; the others live in their modules (`quantize`, `prq`, `iha`)."""

from .dispatch import KernelBackend, current_backend, force_backend, kernel, triton_available, use_triton
from .ear import EARInfo, EARState, ear_attention
from .kmeans import KMeansResult, kmeans
from .lse_merge import lse_merge

__all__ = [
    "EARInfo",
    "EARState",
    "KMeansResult",
    "KernelBackend",
    "current_backend",
    "ear_attention",
    "force_backend",
    "kernel",
    "kmeans",
    "lse_merge",
    "triton_available",
    "use_triton",
]
