"""Cache classes that quantize what they hold."""

from .qvg_codec import PackedPRQ, prq_compress, prq_decompress
from .xquant import (
    XQuantCache,
    XQuantLayer,
    attach_xquant,
    compute_xquant_factors,
    detach_xquant,
    release_xquant_factors,
    xquant_cache_factory,
    xquant_cl_cache_factory,
    xquant_factor_nbytes,
)
from .xquant_config import XQuantConfig

__all__ = [
    "PackedPRQ",
    "XQuantCache",
    "XQuantConfig",
    "XQuantLayer",
    "attach_xquant",
    "compute_xquant_factors",
    "detach_xquant",
    "prq_compress",
    "prq_decompress",
    "release_xquant_factors",
    "xquant_cache_factory",
    "xquant_cl_cache_factory",
    "xquant_factor_nbytes",
]
