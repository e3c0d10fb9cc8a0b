"""Triton kernels, each beside its PyTorch reference, behind one dispatch layer (see `dispatch`).

The ops a user calls directly are re-exported here; the others live in their modules (`quantize`, `prq`, `iha`)."""

from .dispatch import KernelBackend, current_backend, force_backend, kernel, triton_available, use_triton
from .ear import EARInfo, EARState, ear_attention
from .isd_verify import isd_verify
from .kmeans import KMeansResult, kmeans
from .losa import quest_page_scores, quest_page_summaries, union_sparse_prefix_attention
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
    "isd_verify",
    "quest_page_scores",
    "quest_page_summaries",
    "union_sparse_prefix_attention",
]
