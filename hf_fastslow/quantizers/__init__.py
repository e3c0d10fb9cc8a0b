"""Cache classes that quantize what they hold."""

from .qvg import QVGCache, QVGLayer, attach_qvg, detach_qvg, qvg_cache_factory
from .qvg_codec import PackedPRQ, prq_compress, prq_decompress, prq_decompress_many
from .qvg_config import QVGConfig
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
    "QVGCache",
    "QVGConfig",
    "QVGLayer",
    "attach_qvg",
    "detach_qvg",
    "qvg_cache_factory",
    "XQuantCache",
    "XQuantConfig",
    "XQuantLayer",
    "attach_xquant",
    "compute_xquant_factors",
    "detach_xquant",
    "prq_compress",
    "prq_decompress",
    "prq_decompress_many",
    "release_xquant_factors",
    "xquant_cache_factory",
    "xquant_cl_cache_factory",
    "xquant_factor_nbytes",
]
