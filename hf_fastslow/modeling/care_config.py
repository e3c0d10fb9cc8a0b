"""CARE settings and per-layer rank allocation (Zhou et al., "CARE: Covariance-Aware and Rank-Enhanced Decomposition
for Enabling Multi-Head Latent Attention", ICLR 2026, arXiv 2603.17946).

Allocation spreads a total latent width `rank * num_layers` (for K, and separately for V) over the layers by greedy
water-filling on each layer's whitened spectrum sigma_1 >= sigma_2 >= ...; giving a layer its (r+1)-th latent channel
removes sigma_{r+1}^2 of its activation error. The rules differ in how that gain is scored:

- `"uniform"`: every layer gets `rank`.
- `"paper"` (the paper's Eq. 1): sigma_{r+1}^2 / sum_{m>r} sigma_m^2, the share of the layer's *remaining* tail. It
  tends to 1 as a layer nears full rank, so greedy filling runs away to winner-take-all profiles.
- `"energy"`: sigma_{r+1}^2 / sum_m sigma_m^2, the gain normalised by the layer's *total* energy. The objective (sum of
  the layers' relative activation errors) is separable and concave in the ranks, so greedy is optimal for it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch

ALLOCATIONS = ("uniform", "paper", "energy")


@dataclass
class CAREConfig:
    """How `convert_gqa_to_mla` factorises K and V.

    Parameters:
        rank: the mean latent width per layer, for K and for V each (`num_key_value_heads * head_dim` is the KV
            width: at that rank the model is reproduced exactly; at half of it the cache holds half the bytes).
            A rank at or above the width is clamped to it (with a warning); below 1 is an error.
        allocation: `"uniform"`, `"paper"` or `"energy"` (module docstring). Default `"uniform"`: the best
            measured on the default model at 50% KV width (docs/attention.md, CARE table); validate per model.
        rank_min, rank_max: bounds of a layer's rank under allocation (defaults `max(1, rank // 2)` and
            `min(2 * rank, width)`, the paper's). A budget `rank * L` outside `[L * rank_min, L * rank_max]` is an
            error.
        damping: `C + damping * mean(diag C) * I` before the square root (the calibration moments of a short
            calibration set are rank-deficient; exact reconstruction at full rank does not depend on it).
    """

    rank: int
    allocation: str = "uniform"
    rank_min: int | None = None
    rank_max: int | None = None
    damping: float = 0.01

    def __post_init__(self):
        if isinstance(self.rank, bool) or not isinstance(self.rank, int):
            raise TypeError(f"CAREConfig.rank must be an int, got {self.rank!r}.")
        if self.rank < 1:
            raise ValueError(f"CAREConfig.rank must be >= 1 (the latent width per layer), got {self.rank}.")
        if self.allocation not in ALLOCATIONS:
            raise ValueError(f"CAREConfig.allocation must be one of {ALLOCATIONS}, got {self.allocation!r}.")
        if self.rank_min is not None and self.rank_min < 1:
            raise ValueError(f"CAREConfig.rank_min must be >= 1, got {self.rank_min}.")
        if self.rank_max is not None and self.rank_min is not None and self.rank_max < self.rank_min:
            raise ValueError(f"CAREConfig.rank_max ({self.rank_max}) is below rank_min ({self.rank_min}).")
        if not self.damping >= 0:
            raise ValueError(f"CAREConfig.damping must be >= 0, got {self.damping}.")

    def to_dict(self) -> dict:
        return asdict(self)


def clamp_rank(rank: int, width: int) -> int:
    """`rank` clamped to `width` (a warning when it was at or above: no cache saving at that rank)."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}.")
    if rank >= width:
        warnings.warn(f"CARE rank {rank} >= KV width {width}: clamped to {width} (the layer is reproduced exactly and "
                      "its cache is not smaller).", stacklevel=3)
        return width
    return rank


def allocate_ranks(
    spectra: Sequence[torch.Tensor], rank: int, rule: str = "energy", rank_min: int | None = None,
    rank_max: int | None = None,
) -> list[int]:
    """Per-layer ranks summing to `rank * len(spectra)` under `rule`, each in `[rank_min, rank_max]`.

    `spectra[l]` holds layer l's singular values (descending) of the whitened weight; its length bounds the layer's
    rank. Deterministic: under `"energy"`, equal gains go to the layer with the lower rank, then the earlier layer;
    under `"paper"`, to the earlier layer.
    """
    if rule not in ALLOCATIONS:
        raise ValueError(f"rule must be one of {ALLOCATIONS}, got {rule!r}.")
    n = len(spectra)
    if n == 0:
        raise ValueError("allocate_ranks: no layers.")
    width = min(len(s) for s in spectra)
    budget = rank * n
    if rule == "uniform":
        lo, hi = rank_min or 1, width if rank_max is None else min(rank_max, width)
    else:
        lo = max(1, rank // 2) if rank_min is None else rank_min
        hi = min(2 * rank, width) if rank_max is None else min(rank_max, width)
    if lo > hi or not (lo * n <= budget <= hi * n):
        raise ValueError(
            f"CARE budget {budget} (= rank {rank} x {n} layers) cannot be met with per-layer ranks in [{lo}, {hi}]: "
            f"it needs {lo * n} <= budget <= {hi * n}."
        )
    if rule == "uniform":
        return [rank] * n
    energy = [s.double().pow(2) for s in spectra]
    ranks = [lo] * n
    if rule == "energy":
        # marginal gains are non-increasing in r, so greedy = the largest normalised gains over all layers
        gains = []
        for layer, e in enumerate(energy):
            total = e.sum().clamp_min(1e-300)
            for r in range(lo, hi):
                gains.append((-(e[r] / total).item(), r, layer))
        gains.sort()  # equal gains: the lower rank first, then the earlier layer (round robin over tied layers)
        for _, _, layer in gains[: budget - lo * n]:
            ranks[layer] += 1
        return ranks
    # "paper": the score changes with the tail left, so take one step at a time
    tails = [torch.flip(torch.cumsum(torch.flip(e, [0]), 0), [0]) for e in energy]  # tails[l][r] = sum_{m>=r} e_m

    def score(layer: int) -> float:
        r = ranks[layer]
        if r >= hi:
            return -1.0
        return (energy[layer][r] / tails[layer][r].clamp_min(1e-300)).item()

    scores = [score(layer) for layer in range(n)]
    for _ in range(budget - lo * n):
        best = max(range(n), key=lambda layer: (scores[layer], -layer))
        ranks[best] += 1
        scores[best] = score(best)
    return ranks
