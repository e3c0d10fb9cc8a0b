"""Zero-cost fitness signals and routing of Squeeze Evolve (arXiv 2604.07725): token / trajectory / group confidence
(the DeepConf statistic), group answer diversity, per-problem percentile thresholds and the tier assignment, plus the
K-subset selection. Pure functions on numbers, so the routing rules are tested without any model.

Confidence of one generated token i with top-k set T_i (k values of the model's raw log-probs):

    C_i = -(1/k) * sum_{j in T_i} log p_i(j) = LSE(z_i) - mean_{j in T_i} z_{i,j}

(shift-invariant in the logits; higher = a more peaked distribution). It is defined over exactly k values; the
reference averages whatever its server returns (k or k+1 entries per position), which is close but not equal.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import torch

__all__ = [
    "LITE",
    "assign_tiers",
    "check_percentiles",
    "confidence_from_top_logprobs",
    "fill_missing",
    "group_confidence",
    "group_diversity",
    "percentile",
    "percentile_thresholds",
    "select_groups",
    "token_confidence",
    "trajectory_confidence",
]

LITE = -1
"""Route of a group settled by a majority vote over its members' answers, with no model call."""


def token_confidence(logits: torch.Tensor, k: int) -> torch.Tensor:
    """C_i = LSE(z_i) - mean of the k largest z_i, per row of `logits` [..., V] (fp32 math; same leading shape)."""
    if k < 1 or k > logits.shape[-1]:
        raise ValueError(f"k must be in [1, vocab size {logits.shape[-1]}], got {k}")
    z = logits.float()
    return torch.logsumexp(z, dim=-1) - z.topk(k, dim=-1).values.mean(dim=-1)


def confidence_from_top_logprobs(top_logprobs: Sequence[Sequence[float]], k: int) -> list[float]:
    """C_i per generated token from a backend's top-k log-probs (`Completion.top_logprobs`): -mean of the k largest.

    A position that holds fewer than k values means the backend was asked for a smaller k than the fitness uses:
    that is an error, not a silently different statistic.
    """
    out = []
    for i, row in enumerate(top_logprobs):
        if len(row) < k:
            raise ValueError(f"token {i} carries {len(row)} top log-probs, fewer than top_k={k}")
        top = sorted(row, reverse=True)[:k]
        out.append(-sum(top) / k)
    return out


def trajectory_confidence(token_confidences: Sequence[float]) -> float | None:
    """C(tau) = mean of the token confidences; None for an empty (failed) generation (see `fill_missing`)."""
    return sum(token_confidences) / len(token_confidences) if len(token_confidences) else None


def fill_missing(confidences: Sequence[float | None]) -> list[float]:
    """Confidences with each None (a failed generation) replaced by one below every known value (min - 1; 0.0 when
    none is known), so the groups holding it lean to the expensive tier. The reference uses 0.0, the lowest
    possible DeepConf C; "below the rest" also holds for a scorer's log-likelihood, which is <= 0."""
    known = [c for c in confidences if c is not None]
    floor = min(known) - 1.0 if known else 0.0
    return [floor if c is None else c for c in confidences]


def group_confidence(confidences: Sequence[float], group: Sequence[int]) -> float:
    """GC(g) = mean of C(tau) over the members of `group` (indices into `confidences`)."""
    if not group:
        raise ValueError("a group needs at least one member")
    return sum(confidences[i] for i in group) / len(group)


def group_diversity(answers: Sequence[str | None], group: Sequence[int]) -> int:
    """D(g) = number of distinct answers in the group (higher = harder). Members without an extractable answer each
    count as distinct: a member that says nothing checkable agrees with no one."""
    if not group:
        raise ValueError("a group needs at least one member")
    found = [answers[i] for i in group]
    return len({a for a in found if a is not None}) + sum(a is None for a in found)


def check_percentiles(percentiles: Sequence[float]) -> tuple[float, ...]:
    """The percentiles as a tuple, each in [0, 100] and strictly ascending (else ValueError)."""
    ps = tuple(float(p) for p in percentiles)
    for p in ps:
        if not (0.0 <= p <= 100.0) or math.isnan(p):
            raise ValueError(f"percentiles must lie in [0, 100], got {p}")
    if any(b <= a for a, b in zip(ps, ps[1:])):
        raise ValueError(f"percentiles must be strictly ascending, got {list(ps)}")
    return ps


def percentile(values: Sequence[float], p: float) -> float:
    """The p-th percentile with linear interpolation between closest ranks (numpy.percentile's default method)."""
    if not len(values):
        raise ValueError("percentile of an empty sequence")
    xs = sorted(values)
    pos = (len(xs) - 1) * p / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def percentile_thresholds(fitness: Sequence[float], percentiles: Sequence[float]) -> list[float]:
    """theta_j = the p_j-th percentile of this problem's group fitnesses; p = 0 gives min - 1 (no group at or below)
    and p = 100 gives max + 1 (every group at or below), as in the reference."""
    ps = check_percentiles(percentiles)
    if not len(fitness):
        raise ValueError("no group fitness values to take percentiles of")
    lo, hi = min(fitness), max(fitness)
    return [lo - 1.0 if p <= 0 else hi + 1.0 if p >= 100 else percentile(fitness, p) for p in ps]


def assign_tiers(fitness: Sequence[float], thresholds: Sequence[float], n_tiers: int,
                 lite_fraction: float = 0.0) -> list[int]:
    """Tier index per group (0 = cheapest, n_tiers - 1 = most expensive, LITE = vote without a model call).

    tier(g) = n_tiers - 1 - j for the first threshold theta_j with f(g) <= theta_j, else 0: low fitness (an unsure or
    split group) goes expensive, and f == theta goes expensive. With fewer thresholds than n_tiers - 1 the top tiers
    are simply never reached (no thresholds: everything cheap). Departure from the reference: when all fitnesses are
    equal (zero spread, e.g. an identical population) the reference sends every group expensive; here they all go to
    tier 0, since no group is harder than another. Then the `lite_fraction` of tier-0 groups with the highest fitness
    (at least one when the fraction is > 0) become LITE.
    """
    if n_tiers < 1:
        raise ValueError(f"n_tiers must be >= 1, got {n_tiers}")
    if len(thresholds) > n_tiers - 1:
        raise ValueError(f"{len(thresholds)} thresholds for {n_tiers} tiers: at most n_tiers - 1")
    if not 0.0 <= lite_fraction <= 1.0:
        raise ValueError(f"lite_fraction must be in [0, 1], got {lite_fraction}")
    if len(fitness) and max(fitness) == min(fitness):
        tiers = [0] * len(fitness)
    else:
        tiers = []
        for f in fitness:
            j = next((j for j, theta in enumerate(thresholds) if f <= theta), None)
            tiers.append(0 if j is None else n_tiers - 1 - j)
    cheap = [g for g, t in enumerate(tiers) if t == 0]
    if lite_fraction > 0 and cheap:
        n_lite = max(1, int(lite_fraction * len(cheap)))
        for g in sorted(cheap, key=lambda g: (-fitness[g], g))[:n_lite]:
            tiers[g] = LITE
    return tiers


def select_groups(population_size: int, group_size: int, n_groups: int, rng: random.Random,
                  weights: Sequence[float] | None = None) -> list[list[int]]:
    """`n_groups` groups of `group_size` distinct member indices. Uniform: `rng.sample`. Weighted: sampling without
    replacement with probabilities proportional to `weights` (the caller passes softmax(c / zeta)). One `rng` drives
    both, so a seed reproduces either (the reference seeds two different RNGs)."""
    if group_size < 1 or n_groups < 1:
        raise ValueError(f"group_size and groups must be >= 1, got {group_size} and {n_groups}")
    if group_size > population_size:
        raise ValueError(f"group_size={group_size} is above the population size {population_size}: groups are "
                         "sampled without replacement")
    if weights is None:
        return [rng.sample(range(population_size), group_size) for _ in range(n_groups)]
    if len(weights) != population_size or any(w < 0 for w in weights) or not sum(weights) > 0:
        raise ValueError("weights must be one non-negative value per member with a positive sum")
    groups = []
    for _ in range(n_groups):
        pool, w, group = list(range(population_size)), list(weights), []
        for _ in range(group_size):
            if not sum(w) > 0:  # only zero-weight members are left: take them uniformly
                w = [1.0] * len(pool)
            pick = rng.choices(range(len(pool)), weights=w)[0]
            group.append(pool.pop(pick))
            w.pop(pick)
        groups.append(group)
    return groups
