"""Configuration of the QVG cache (Xi et al., "Quant VideoGen: Auto-Regressive Long Video Generation via 2-Bit
KV-Cache Quantization", arXiv 2602.02958), in its text-LLM form."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

from ..kernels.prq import PRQ_BITS
from .qvg_codec import MAX_CENTROIDS

QVG_BITS = (*PRQ_BITS, 16)


@dataclass
class QVGConfig:
    """How a `QVGCache` compresses the KV history.

    Args:
        nbits: bits per value of the quantized residual (2, 3, 4, 8); 16 = quantization off (chunks are cut and
            stored exactly, pre-RoPE keys included, which exercises every path but the codec).
        block_size: channels per residual scale (per token); a positive multiple of 8 dividing the head dim.
        num_stages: PRQ stages (k-means + subtract); 0 = plain block quantization (no smoothing).
        num_centroids: k-means centroids per stage, head and chunk; None = chunk_tokens // 16 (the method card's
            budget for short text chunks), at least 1. Capped at the chunk length; at most 256 (uint8 ids).
        chunk_tokens: tokens compressed together, once, when they leave the full-precision window.
        keep_recent_chunks: full chunks kept exact besides the partial one (the window holds up to
            (keep_recent_chunks + 1) * chunk_tokens - 1 tokens before a chunk is compressed).
        sink_tokens: the first tokens of each sequence kept exact (attention sinks; the card measured int2
            perplexity 45.4 -> 18.7 on SmolLM2 from keeping token 0). With left padding, the exact region runs to
            the longest row's padding plus `sink_tokens`, so every row's first real tokens stay exact.
        kmeans_iters: Lloyd iterations per stage.
        asymmetric: min/max residual quantization (all 2^b levels, one more bf16 per block) instead of absmax.
        pre_rope_keys: compress keys before RoPE (RoPE undone on compression, redone on read), as the paper does.
        centroid_dtype: storage dtype of the centroids.
        compute_dtype: dtype of the exact window and of what reads return; defaults to the model's dtype.
        seed: base seed of the k-means initialisations (each layer, chunk, K/V and stage gets its own).
    """

    nbits: int = 2
    block_size: int = 64
    num_stages: int = 1
    num_centroids: int | None = None
    chunk_tokens: int = 256
    keep_recent_chunks: int = 0
    sink_tokens: int = 4
    kmeans_iters: int = 10
    asymmetric: bool = False
    pre_rope_keys: bool = True
    centroid_dtype: torch.dtype = torch.bfloat16
    compute_dtype: torch.dtype | None = None
    seed: int = 0

    def __post_init__(self):
        for name in ("centroid_dtype", "compute_dtype"):
            if isinstance(getattr(self, name), str):
                setattr(self, name, getattr(torch, getattr(self, name).replace("torch.", "")))
        if self.nbits not in QVG_BITS:
            raise ValueError(f"QVGConfig.nbits must be one of {QVG_BITS} (16 = off), got {self.nbits}.")
        if not isinstance(self.block_size, int) or self.block_size <= 0 or self.block_size % 8:
            raise ValueError(f"QVGConfig.block_size must be a positive multiple of 8, got {self.block_size}.")
        if not isinstance(self.num_stages, int) or self.num_stages < 0:
            raise ValueError(f"QVGConfig.num_stages must be an int >= 0, got {self.num_stages!r}.")
        if not isinstance(self.chunk_tokens, int) or self.chunk_tokens < 1:
            raise ValueError(f"QVGConfig.chunk_tokens must be a positive int, got {self.chunk_tokens!r}.")
        if self.num_centroids is not None and (
            not isinstance(self.num_centroids, int) or not 1 <= self.num_centroids <= MAX_CENTROIDS
        ):
            raise ValueError(
                f"QVGConfig.num_centroids must be None or an int in [1, {MAX_CENTROIDS}] (uint8 ids), "
                f"got {self.num_centroids!r}."
            )
        for name in ("keep_recent_chunks", "sink_tokens", "kmeans_iters"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"QVGConfig.{name} must be an int >= 0, got {value!r}.")
        if not isinstance(self.centroid_dtype, torch.dtype) or not self.centroid_dtype.is_floating_point:
            raise ValueError(f"QVGConfig.centroid_dtype must be a float dtype, got {self.centroid_dtype!r}.")

    @property
    def quantized(self) -> bool:
        return self.nbits != 16

    @property
    def centroids_per_stage(self) -> int:
        """Centroid budget of one stage (before the cap at the chunk length)."""
        if self.num_centroids is not None:
            return self.num_centroids
        return max(1, min(MAX_CENTROIDS, self.chunk_tokens // 16))

    def to_dict(self) -> dict:
        out = asdict(self)
        for name in ("centroid_dtype", "compute_dtype"):
            if out[name] is not None:
                out[name] = str(out[name]).replace("torch.", "")
        return out

    @classmethod
    def from_dict(cls, data: dict) -> QVGConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown QVGConfig keys: {sorted(unknown)}. Valid keys: {sorted(known)}.")
        return cls(**data)
