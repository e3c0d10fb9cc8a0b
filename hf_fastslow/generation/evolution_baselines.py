"""The baselines Squeeze Evolve is measured against, on the same backends, prompts and `EvolveResult` records:

- `RSA`: single-model recursive self-aggregation (population -> K-subsets -> recombination, every group by the one
  model, no fitness and no routing) — the "single-model evolution" of the paper.
- `MajorityVote`: self-consistency, N samples and a vote over their extracted answers (no recombination).

Both make exactly the calls Squeeze Evolve makes in the matching reduced setting (one tier; zero loops) with the same
seeds, which the tests check.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable

from ..backends.base import Backend
from ..evaluation.answers import extract_answer
from .evolution_fitness import select_groups
from .squeeze_evolve import (
    RecombinationPrompt,
    as_messages,
    call_tier,
    generation_kwargs,
    recombination_messages,
    strip_think,
    vote,
)
from .squeeze_evolve_config import Candidate, EvolveResult, LoopRecord, SqueezeEvolveConfig, Tier

__all__ = ["RSA", "MajorityVote"]


def _as_tier(tier: Tier | Backend) -> Tier:
    if isinstance(tier, Tier):
        return tier
    if isinstance(tier, Backend):
        return Tier(tier, tier.name)
    raise TypeError(f"expected a Tier or a Backend, got {type(tier).__name__}")


class _Baseline:
    method = "baseline"

    def __init__(self, tier: Tier | Backend, config: SqueezeEvolveConfig | None = None, *,
                 answer_extractor: Callable[[str], str | None] = extract_answer,
                 recombination_prompt: RecombinationPrompt = recombination_messages):
        self.tier = _as_tier(tier)
        self.config = config or SqueezeEvolveConfig()
        self.extract = answer_extractor
        self.recombination_prompt = recombination_prompt

    def _sample(self, prompts, n: int, loop: int) -> tuple[list[Candidate], LoopRecord]:
        wall, cpu = time.perf_counter(), time.process_time()
        rows, usage = call_tier(self.tier, prompts, n=n, seed=self.config.seed + loop,
                                kwargs=generation_kwargs(self.config, self.tier))
        made = [Candidate(c.text, self.extract(c.text), p, self.tier.name, loop) for p, row in zip(prompts, rows)
                for c in row]
        rec = LoopRecord(loop=loop, usage={self.tier.name: usage}, cost={self.tier.name: self.tier.cost(usage)})
        rec.seconds, rec.cpu_seconds = time.perf_counter() - wall, time.process_time() - cpu
        return made, rec

    def _result(self, population: list[Candidate], records: list[LoopRecord], note: str) -> EvolveResult:
        for rec in records:
            rec.answers = rec.answers or [c.answer for c in population]
        best = population[vote(population, self.extract)]
        return EvolveResult(self.method, best.answer, best.text, population, records, [self.tier.name], note)


class MajorityVote(_Baseline):
    """Self-consistency: `samples` answers to the problem from one tier (default `config.population`), one call,
    and the most frequent extracted answer (first member carrying it)."""

    method = "majority_vote"

    def __init__(self, tier: Tier | Backend, config: SqueezeEvolveConfig | None = None, *, samples: int | None = None,
                 answer_extractor: Callable[[str], str | None] = extract_answer):
        super().__init__(tier, config, answer_extractor=answer_extractor)
        self.samples = self.config.population if samples is None else samples
        if not isinstance(self.samples, int) or self.samples < 1:
            raise ValueError(f"samples must be an integer >= 1, got {self.samples!r}")

    def run(self, problem: str) -> EvolveResult:
        if not isinstance(problem, str) or not problem.strip():
            raise ValueError("problem must be a non-empty string")
        population, rec = self._sample([as_messages(self.recombination_prompt(problem, []))], self.samples, 0)
        return self._result(population, [rec], "majority vote over extracted answers (no recombination)")


class RSA(_Baseline):
    """Single-model recursive self-aggregation: loop 0 samples `config.population` answers; each of `config.loops`
    loops recombines `config.groups` uniform K-subsets with the same tier (one batched call per loop)."""

    method = "rsa"

    def run(self, problem: str) -> EvolveResult:
        if not isinstance(problem, str) or not problem.strip():
            raise ValueError("problem must be a non-empty string")
        cfg = self.config
        rng = random.Random(cfg.seed)
        population, rec = self._sample([as_messages(self.recombination_prompt(problem, []))], cfg.population, 0)
        rec.answers = [c.answer for c in population]
        records = [rec]
        for loop in range(1, cfg.loops + 1):
            groups = select_groups(len(population), cfg.group_size, cfg.groups, rng)
            texts = [[strip_think(population[i].text) if cfg.strip_think else population[i].text for i in g]
                     for g in groups]
            prompts = [as_messages(self.recombination_prompt(problem, t)) for t in texts]
            children, rec = self._sample(prompts, 1, loop)
            population = children if cfg.update == "replace" else population + children
            rec.groups, rec.routes, rec.answers = groups, [0] * len(groups), [c.answer for c in population]
            records.append(rec)
        return self._result(population, records, "single-model evolution: every group recombined by one tier")
