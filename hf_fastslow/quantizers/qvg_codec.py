"""The QVG codec: semantic-aware smoothing + progressive residual quantization (PRQ) of one chunk of vectors
(Xi et al., "Quant VideoGen: Auto-Regressive Long Video Generation via 2-Bit KV-Cache Quantization",
arXiv 2602.02958, §3).

`prq_compress(x)` takes x of shape (..., N, D) and treats every leading index (e.g. batch x head) as its own set of N
vectors: stage t runs k-means with C centroids on the current residual, stores the centroids and each vector's
centroid id, and subtracts the centroid; after S stages the small residual is quantized per token in blocks of
`block_size` channels (symmetric by default, min/max asymmetric on request). `prq_decompress` returns
codes * scale (+ zero) + sum_t centroids_t[ids_t].

Scales are bfloat16, clamped to the smallest normal float and rounded up (see `kernels/prq.py`): bf16 has fp32's
exponent range, so a scale never underflows or becomes zero, and rounding up never clips a value. This costs 16 bits
per block where the paper's FP8 E4M3 costs 8 (0.125 bit per value more at block 64); the method card measured FP8
scales underflowing on SmolLM2's value cache.

Storage (`PackedPRQ`): centroids (S, ..., C, D) in `centroid_dtype` (bf16 by default), ids uint8 (S, ..., N)
(so C <= 256), codes uint8 (..., N, D * nbits / 8), scales bf16 (..., N, D / block_size), zero points the same
(asymmetric only). `nbytes()` is the storage those tensors hold; each owns its storage.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from ..kernels.kmeans import kmeans
from ..kernels.prq import PRQ_BITS, check_prq_args, prq_decode, prq_encode

__all__ = ["MAX_CENTROIDS", "PRQ_BITS", "PackedPRQ", "prq_compress", "prq_decompress", "prq_decompress_many"]

MAX_CENTROIDS = 256  # ids are stored as uint8


@dataclass
class PackedPRQ:
    """One compressed chunk: every tensor below owns its storage (no views of larger buffers)."""

    centroids: torch.Tensor  # (S, *lead, C, D) centroid_dtype
    labels: torch.Tensor  # (S, *lead, N) uint8
    codes: torch.Tensor  # (*lead, N, D * nbits // 8) uint8
    scales: torch.Tensor  # (*lead, N, D // block_size) bfloat16
    zeros: torch.Tensor | None  # like scales (asymmetric) or None (symmetric)
    nbits: int
    block_size: int
    dim: int

    @property
    def shape(self) -> tuple[int, ...]:
        """Shape of the decompressed tensor: (*lead, N, D)."""
        return (*self.codes.shape[:-1], self.dim)

    @property
    def num_tokens(self) -> int:
        return self.codes.shape[-2]

    @property
    def num_stages(self) -> int:
        return self.centroids.shape[0]

    @property
    def num_centroids(self) -> int:
        return self.centroids.shape[-2]

    @property
    def asymmetric(self) -> bool:
        return self.zeros is not None

    def tensors(self) -> list[torch.Tensor]:
        return [t for t in (self.centroids, self.labels, self.codes, self.scales, self.zeros) if t is not None]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors())

    def _map(self, lead_fn, token_fn=None) -> PackedPRQ:
        """A new PackedPRQ whose tensors are `lead_fn` applied along the leading dims (own storage, never views)."""
        stage = 1  # centroids and labels carry the stage dim first
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, torch.Tensor):
                out[f.name] = v
                continue
            offset = stage if f.name in ("centroids", "labels") else 0
            v = lead_fn(v, offset)
            if token_fn is not None and f.name != "centroids":
                # the token axis: last dim of labels, second to last of codes/scales/zeros
                v = token_fn(v, -1 if f.name == "labels" else -2)
            out[f.name] = v.clone(memory_format=torch.contiguous_format)
        return PackedPRQ(**out)

    def index_select(self, dim: int, index: torch.Tensor) -> PackedPRQ:
        """Select along a leading dim `dim` of the decompressed shape (e.g. the batch for a beam reorder)."""
        lead = len(self.shape) - 2
        if dim < 0:
            dim += len(self.shape)
        if not 0 <= dim < lead:
            raise ValueError(f"index_select works on the leading dims 0..{lead - 1} only, got {dim}.")
        return self._map(lambda t, off: t.index_select(dim + off, index.to(t.device)))

    def first_tokens(self, n: int) -> PackedPRQ:
        """The first `n` tokens (0 < n <= N), losslessly: same centroids, codes and ids of those tokens."""
        if not 0 < n <= self.num_tokens:
            raise ValueError(f"first_tokens needs 0 < n <= {self.num_tokens}, got {n}.")
        return self._map(lambda t, off: t, lambda t, axis: t.narrow(axis, 0, n))

    def to(self, device) -> PackedPRQ:
        return self._map(lambda t, off: t.to(device))


def _check_input(x: torch.Tensor, nbits: int, block_size: int, num_stages: int, num_centroids: int) -> None:
    if not isinstance(x, torch.Tensor) or x.dim() < 2:
        raise ValueError(f"prq_compress expects x of shape (..., N, D); got {getattr(x, 'shape', type(x))}.")
    if not x.is_floating_point():
        raise TypeError(f"prq_compress expects a floating-point tensor; got {x.dtype}.")
    if x.shape[-2] == 0:
        raise ValueError("prq_compress got an empty chunk (N = 0 tokens).")
    if x.numel() == 0:
        raise ValueError(f"prq_compress got an empty tensor of shape {tuple(x.shape)}.")
    check_prq_args(x.shape[-1], nbits, block_size)
    if x.shape[-1] % 8:
        raise ValueError(f"the head dim must be a multiple of 8 to pack the codes, got {x.shape[-1]}.")
    if not isinstance(num_stages, int) or num_stages < 0:
        raise ValueError(f"num_stages must be an int >= 0, got {num_stages!r}.")
    if not isinstance(num_centroids, int) or num_centroids < 1:
        raise ValueError(f"num_centroids must be an int >= 1, got {num_centroids!r}.")
    if num_centroids > MAX_CENTROIDS:
        raise ValueError(f"num_centroids must be <= {MAX_CENTROIDS} (ids are stored as uint8), got {num_centroids}.")


def prq_compress(
    x: torch.Tensor,
    *,
    nbits: int,
    block_size: int,
    num_stages: int,
    num_centroids: int,
    kmeans_iters: int = 10,
    seed: int = 0,
    asymmetric: bool = False,
    centroid_dtype: torch.dtype = torch.bfloat16,
) -> PackedPRQ:
    """Compress x (..., N, D): `num_stages` k-means stages with min(num_centroids, N) centroids each (per leading
    index), then `nbits` block quantization of the residual. Stage t's k-means is seeded with (seed, t).

    `num_stages=0` is plain per-token block quantization (no smoothing). Raises ValueError on bits outside
    `PRQ_BITS`, `D % block_size != 0`, an empty chunk, or more than 256 centroids; `x` is never modified.
    """
    _check_input(x, nbits, block_size, num_stages, num_centroids)
    if kmeans_iters < 0:
        raise ValueError(f"kmeans_iters must be >= 0, got {kmeans_iters}.")
    lead, n, d = tuple(x.shape[:-2]), x.shape[-2], x.shape[-1]
    x2 = x.detach().reshape(-1, n, d)
    rows = x2.shape[0]
    c = min(num_centroids, n)
    residual = x2.float()
    stage_centroids, stage_labels = [], []
    for t in range(num_stages):
        result = kmeans(residual, c, iters=kmeans_iters, seed=seed * 1_000_003 + t)
        stored = result.centroids.to(centroid_dtype)
        # The next stage clusters what is left after the *stored* (rounded) centroids, so that the identity
        # x = sum_t c_t[l_t] + r holds for what is kept.
        chosen = torch.gather(stored.float(), -2, result.labels.unsqueeze(-1).expand(rows, n, d))
        residual = residual - chosen
        stage_centroids.append(stored)
        stage_labels.append(result.labels.to(torch.uint8))
    if num_stages:
        centroids = torch.stack(stage_centroids)
        labels = torch.stack(stage_labels)
    else:
        centroids = torch.zeros((0, rows, 1, d), dtype=centroid_dtype, device=x.device)
        labels = torch.zeros((0, rows, n), dtype=torch.uint8, device=x.device)
    codes, scales, zeros = prq_encode(x2, centroids, labels, nbits, block_size, bool(asymmetric))
    return PackedPRQ(
        centroids=centroids.reshape(num_stages, *lead, centroids.shape[-2], d).contiguous(),
        labels=labels.reshape(num_stages, *lead, n).contiguous(),
        codes=codes.reshape(*lead, n, codes.shape[-1]).contiguous(),
        scales=scales.reshape(*lead, n, scales.shape[-1]).contiguous(),
        zeros=None if zeros is None else zeros.reshape(*lead, n, zeros.shape[-1]).contiguous(),
        nbits=nbits,
        block_size=block_size,
        dim=d,
    )


def prq_decompress(packed: PackedPRQ, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Rebuild (..., N, D) in `dtype`: dequantized residual + every stage's centroid (one fused kernel on GPU)."""
    shape = packed.shape
    lead, n = shape[:-2], shape[-2]
    s = packed.num_stages
    rows = 1
    for v in lead:
        rows *= v
    out = prq_decode(
        packed.codes.reshape(rows, n, packed.codes.shape[-1]),
        packed.scales.reshape(rows, n, packed.scales.shape[-1]),
        None if packed.zeros is None else packed.zeros.reshape(rows, n, packed.zeros.shape[-1]),
        packed.centroids.reshape(s, rows, packed.centroids.shape[-2], packed.dim),
        packed.labels.reshape(s, rows, n),
        packed.nbits,
        dtype,
    )
    return out.reshape(shape)


def _same_layout(packs: list[PackedPRQ]) -> bool:
    first = packs[0]
    key = (first.shape, first.num_stages, first.num_centroids, first.nbits, first.block_size, first.asymmetric,
           first.centroids.dtype)
    return all((p.shape, p.num_stages, p.num_centroids, p.nbits, p.block_size, p.asymmetric, p.centroids.dtype) == key
               for p in packs[1:])


def prq_decompress_many(packs: list[PackedPRQ], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Decompress consecutive chunks and join them along the token axis: (..., sum of N, D).

    Chunks of one layout (same shape, stages, centroids, bits) are decoded in one kernel call, each chunk's rows
    becoming extra rows of the batch; otherwise each is decoded on its own. Same values as decoding one by one."""
    if not packs:
        raise ValueError("prq_decompress_many needs at least one chunk.")
    if len(packs) == 1 or not _same_layout(packs):
        return torch.cat([prq_decompress(p, dtype) for p in packs], dim=-2)
    first, n_packs = packs[0], len(packs)
    lead, n, d = first.shape[:-2], first.num_tokens, first.dim
    rows = n_packs
    for v in lead:
        rows *= v
    s = first.num_stages

    def stacked(name, stage_first=False):
        t = torch.stack([getattr(p, name) for p in packs], dim=1 if stage_first else 0)
        return t.reshape(s, rows, *t.shape[-2 if name == "centroids" else -1:]) if stage_first else \
            t.reshape(rows, *t.shape[-2:])

    out = prq_decode(
        stacked("codes"), stacked("scales"), None if first.zeros is None else stacked("zeros"),
        stacked("centroids", stage_first=True), stacked("labels", stage_first=True), first.nbits, dtype,
    )
    # (packs, *lead, N, D) -> (*lead, packs * N, D)
    out = out.reshape(n_packs, *lead, n, d).movedim(0, -3)
    return out.reshape(*lead, n_packs * n, d)
