"""Configuration, tiers and result records of Squeeze Evolve and its baselines (RSA, majority vote).

Every arm returns the same `EvolveResult`: the population, the voted answer and one `LoopRecord` per loop with the
routes, thresholds, and per-tier token / time usage read from each backend's ledger (this module never counts
tokens itself), so the arms of a benchmark are compared on the same figures.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..backends.base import Backend, Messages, Usage
from .evolution_fitness import LITE, check_percentiles

__all__ = ["Candidate", "EvolveResult", "LoopRecord", "SqueezeEvolveConfig", "Tier"]

SCORING = "scoring"
"""Key of the scorer's usage in `LoopRecord.usage` (prefill scoring of candidates, when a scorer is given)."""


@dataclass
class Tier:
    """One model tier: a backend and the prices the user pays for it.

    Prices are per million tokens (`price_in` for prompt tokens, `price_out` for generated ones) plus
    `price_cpu_second` per CPU-second of this process spent in the tier's calls (for local models, where compute is
    the cost). `generation` holds per-tier keyword arguments for `backend.chat` (e.g. `max_new_tokens`), on top of
    the config's.
    """

    backend: Backend
    name: str
    price_in: float = 0.0
    price_out: float = 0.0
    price_cpu_second: float = 0.0
    generation: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not isinstance(self.backend, Backend):
            raise TypeError(f"Tier {self.name!r}: backend must be a hf_fastslow.backends Backend, "
                            f"got {type(self.backend).__name__}")
        if min(self.price_in, self.price_out, self.price_cpu_second) < 0:
            raise ValueError(f"Tier {self.name!r}: prices must be >= 0")

    def cost(self, usage: Usage) -> float:
        return ((usage.prompt_tokens * self.price_in + usage.completion_tokens * self.price_out) / 1e6
                + usage.cpu_seconds * self.price_cpu_second)


@dataclass
class SqueezeEvolveConfig:
    """Loop settings (the card's reference defaults, except `groups`, which defaults to the population size).

    population: N members, seeded by the most expensive tier (loop 0). group_size: K members per recombination group.
    groups: M groups per loop (default N). loops: T recombination loops (0 = self-consistency over the seeds).
    percentiles: one per tier boundary (len = tiers - 1), in [0, 100], ascending; empty = every group to the
    cheapest tier after loop 0. fitness: "confidence" (group mean of the DeepConf token confidence over `top_k`
    log-probs; needs log-probs from the tiers or a scorer) or "diversity" (number of distinct answers; routed on -D,
    so split groups go expensive). selection: "uniform" or "weighted" (softmax(confidence / selection_temperature)).
    update: "replace" (children become the population) or "accumulate" (population + children).
    lite_fraction: share of cheapest-tier groups settled by a majority vote of their members, without a model call.
    strip_think: drop `<think>...</think>` from candidates before scoring and recombining them.
    max_new_tokens / temperature / top_p: sampling settings of every call (a tier's `generation` overrides them).
    seed: seeds group selection and every backend call (loop t uses seed + t).
    """

    population: int = 16
    group_size: int = 4
    groups: int | None = None
    loops: int = 10
    percentiles: tuple[float, ...] = (10.0,)
    fitness: str = "confidence"
    top_k: int = 20
    selection: str = "uniform"
    selection_temperature: float = 1.0
    update: str = "replace"
    lite_fraction: float = 0.0
    strip_think: bool = False
    max_new_tokens: int | None = None
    temperature: float | None = 1.0
    top_p: float | None = 1.0
    seed: int = 0

    def __post_init__(self):
        for name in ("population", "group_size", "top_k"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {getattr(self, name)!r}")
        if self.groups is None:
            self.groups = self.population
        if not isinstance(self.groups, int) or self.groups < 1:
            raise ValueError(f"groups must be an integer >= 1, got {self.groups!r}")
        if not isinstance(self.loops, int) or self.loops < 0:
            raise ValueError(f"loops must be an integer >= 0, got {self.loops!r}")
        if self.group_size > self.population:
            raise ValueError(f"group_size={self.group_size} is above population={self.population}: each group "
                             "draws distinct members")
        self.percentiles = check_percentiles(self.percentiles)
        if self.fitness not in ("confidence", "diversity"):
            raise ValueError(f'fitness must be "confidence" or "diversity", got {self.fitness!r}')
        if self.selection not in ("uniform", "weighted"):
            raise ValueError(f'selection must be "uniform" or "weighted", got {self.selection!r}')
        if self.selection == "weighted" and self.fitness != "confidence":
            raise ValueError('selection="weighted" weights members by confidence: it needs fitness="confidence"')
        if not self.selection_temperature > 0:
            raise ValueError(f"selection_temperature must be > 0, got {self.selection_temperature}")
        if self.update not in ("replace", "accumulate"):
            raise ValueError(f'update must be "replace" or "accumulate", got {self.update!r}')
        if not 0.0 <= self.lite_fraction <= 1.0:
            raise ValueError(f"lite_fraction must be in [0, 1], got {self.lite_fraction}")


@dataclass
class Candidate:
    """One population member: its text, extracted answer, the conversation that produced it and which tier wrote it
    (`"vote"` for a LITE group's pick); `confidence` is C(tau) once known (None under diversity fitness)."""

    text: str
    answer: str | None
    prompt: Messages
    tier: str
    loop: int
    confidence: float | None = None


@dataclass
class LoopRecord:
    """What one loop did. Loop 0 (seeding) has no groups. `routes[g]` is the tier index of group g (LITE = vote);
    `usage` / `cost` are keyed by tier name (plus "scoring" when a scorer prefilled candidates), from the backends'
    ledgers; `seconds` / `cpu_seconds` are the whole loop's wall and process-CPU time (ledger time + routing)."""

    loop: int
    groups: list[list[int]] = field(default_factory=list)
    routes: list[int] = field(default_factory=list)
    fitness: list[float] = field(default_factory=list)
    thresholds: list[float] = field(default_factory=list)
    usage: dict[str, Usage] = field(default_factory=dict)
    cost: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    answers: list[str | None] = field(default_factory=list)

    @property
    def unique_answers(self) -> int:
        """Distinct answers in the population after this loop (the diversity-collapse curve)."""
        return len({a for a in self.answers if a is not None})


@dataclass
class EvolveResult:
    """The voted answer, the final population and the per-loop record; `fitness_source` says in words what routed
    the groups (e.g. that confidence came from a local scorer because the server returns no log-probs)."""

    method: str
    answer: str | None
    text: str
    population: list[Candidate]
    per_loop: list[LoopRecord]
    tier_names: list[str]
    fitness_source: str = ""

    @property
    def usage_by_tier(self) -> dict[str, Usage]:
        out: dict[str, Usage] = {}
        for rec in self.per_loop:
            for name, usage in rec.usage.items():
                out[name] = out[name] + usage if name in out else usage
        return out

    @property
    def cost_by_tier(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for rec in self.per_loop:
            for name, cost in rec.cost.items():
                out[name] = out.get(name, 0.0) + cost
        return out

    @property
    def cost(self) -> float:
        return sum(self.cost_by_tier.values())

    @property
    def tokens(self) -> int:
        return sum(u.prompt_tokens + u.completion_tokens for u in self.usage_by_tier.values())

    @property
    def seconds(self) -> float:
        return sum(rec.seconds for rec in self.per_loop)

    @property
    def cpu_seconds(self) -> float:
        return sum(rec.cpu_seconds for rec in self.per_loop)

    @property
    def route_counts(self) -> dict[str, int]:
        """Groups per route over all loops, keyed by tier name (and "vote" for LITE)."""
        counts: dict[str, int] = {}
        for rec in self.per_loop:
            for r in rec.routes:
                key = "vote" if r == LITE else self.tier_names[r]
                counts[key] = counts.get(key, 0) + 1
        return counts

    @property
    def fraction_cheap(self) -> float | None:
        """Share of recombination groups that did not go to the most expensive tier (None when no group was routed).
        With one tier this is 0.0: everything ran on the expensive model."""
        routes = [r for rec in self.per_loop for r in rec.routes]
        if not routes:
            return None
        return sum(r != len(self.tier_names) - 1 for r in routes) / len(routes)

    def member_accuracy(self, gold: str) -> float:
        """Mean share of final members whose answer equals `gold` (an already-extracted answer)."""
        return sum(c.answer == gold for c in self.population) / len(self.population)
