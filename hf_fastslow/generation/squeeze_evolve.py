"""Squeeze Evolve (arXiv 2604.07725): multi-model, verifier-free evolutionary inference over the backend layer.

Loop 0: the most expensive tier samples the population (N answers to the problem). Each later loop draws M groups of
K members, scores every group with a zero-cost fitness — the group's mean token confidence (DeepConf: LSE minus the
mean of the top-k logits, from the log-probs the tiers return while generating, or from a scorer prefilling each
candidate) or its answer diversity — and routes it by this problem's percentile thresholds: unsure / split groups to
the expensive tier, sure / unanimous groups to the cheap one (or, with `lite_fraction`, to a plain vote). Each routed
group is recombined into one child by its tier (one batched call per tier and loop); the children replace (or join)
the population. The answer is the majority vote of the final population, through `evaluation.answers`.

Accounting comes from each backend's `Ledger` (tokens, wall and CPU seconds per call) and the prices on each `Tier`;
see `squeeze_evolve_config`. Baselines on the same records: `evolution_baselines.RSA` (one model recombines every
group) and `evolution_baselines.MajorityVote`.

    from hf_fastslow.backends.hf_local import HFLocalBackend
    cheap, strong = HFLocalBackend(small, tok), HFLocalBackend(big, tok2)
    se = SqueezeEvolve([Tier(cheap, "cheap", 0.1, 0.4), Tier(strong, "strong", 1.0, 4.0)],
                       SqueezeEvolveConfig(population=8, group_size=4, loops=3, percentiles=(25.0,)))
    res = se.run("What is 17 + 25? Put the final answer in \\\\boxed{}.")
    res.answer, res.cost, [rec.routes for rec in res.per_loop]
"""

from __future__ import annotations

import math
import random
import re
import time
from collections.abc import Callable, Sequence
from typing import Any

from ..backends.base import Backend, Completion, Messages, Usage
from ..evaluation.answers import extract_answer
from .evolution_fitness import (
    LITE,
    assign_tiers,
    confidence_from_top_logprobs,
    fill_missing,
    group_confidence,
    group_diversity,
    percentile_thresholds,
    select_groups,
    trajectory_confidence,
)
from .squeeze_evolve_config import SCORING, Candidate, EvolveResult, LoopRecord, SqueezeEvolveConfig, Tier
from .v1_baselines import majority_vote

__all__ = ["SqueezeEvolve", "as_messages", "call_tier", "generation_kwargs", "recombination_messages", "strip_think",
           "vote"]

_THINK_RE = re.compile(r"<think>.*?</think>\s*", flags=re.DOTALL)

RecombinationPrompt = Callable[[str, Sequence[str]], "Messages | str"]


def strip_think(text: str) -> str:
    """The text without `<think>...</think>` blocks (and an unclosed `<think>` tail)."""
    text = _THINK_RE.sub("", text)
    return text.split("<think>")[0].strip() if "<think>" in text else text


def recombination_messages(problem: str, candidates: Sequence[str]) -> Messages:
    """r(q, g): the problem itself (no candidates), a refine prompt (one) or an aggregate prompt (several).

    "Combine them into one correct solution" (RSA's aggregation wording), not "improve": asked to improve, the
    default 135M model changed right, unanimous answers (SmolLM2 kept a unanimous right sum in 9/24 samples with
    "improve", 15/24 with "combine", on two-digit sums)."""
    if not candidates:
        return [{"role": "user", "content": problem}]
    if len(candidates) == 1:
        body = (f"{problem}\n\nHere is a candidate solution (it may be wrong):\n\n{candidates[0].strip()}\n\n"
                "Check it and write one correct solution. End with the final answer in the format the problem asks.")
    else:
        blocks = "\n\n".join(f"Solution {i + 1}:\n{c.strip()}" for i, c in enumerate(candidates))
        body = (f"{problem}\n\nHere are candidate solutions (some may be wrong):\n\n{blocks}\n\n"
                "Combine them into one correct solution. End with the final answer in the format the problem asks.")
    return [{"role": "user", "content": body}]


def vote(population: Sequence[Candidate], extract: Callable[[str], str | None]) -> int:
    """Index of the first member carrying the most frequent extracted answer (the package's `majority_vote`)."""
    return majority_vote([c.text for c in population], extract=extract).index


def generation_kwargs(config: SqueezeEvolveConfig, tier: Tier) -> dict[str, Any]:
    kwargs = {"max_new_tokens": config.max_new_tokens, "temperature": config.temperature, "top_p": config.top_p}
    kwargs.update(tier.generation)
    return {k: v for k, v in kwargs.items() if v is not None}


def call_tier(tier: Tier, conversations: Sequence[Messages], *, n: int, seed: int,
              kwargs: dict[str, Any]) -> tuple[list[list[Completion]], Usage]:
    """One batched `chat_batch` on the tier's backend and the usage its ledger recorded for it."""
    mark = tier.backend.ledger.mark()
    out = tier.backend.chat_batch(list(conversations), n=n, seed=seed, **kwargs)
    return out, tier.backend.ledger.since(mark)


def as_messages(prompt: Messages | str) -> Messages:
    return [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)


class SqueezeEvolve:
    """Evolution over `tiers` (cheapest first, most expensive last). `scorer` (a Backend or priced Tier with
    `score()`, e.g. an HFLocalBackend next to a server without log-probs) prefills each candidate under the prompt
    that produced it; without it, fitness="confidence" reads the top-k log-probs the tiers return while generating.
    """

    method = "squeeze_evolve"

    def __init__(self, tiers: Sequence[Tier], config: SqueezeEvolveConfig | None = None, *,
                 scorer: Backend | Tier | None = None, answer_extractor: Callable[[str], str | None] = extract_answer,
                 recombination_prompt: RecombinationPrompt = recombination_messages):
        self.tiers = list(tiers)
        self.config = config or SqueezeEvolveConfig()
        if not self.tiers or not all(isinstance(t, Tier) for t in self.tiers):
            raise TypeError("tiers must be a non-empty list of Tier(backend, name, ...), cheapest first")
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names) or SCORING in names:
            raise ValueError(f"tier names must be distinct and not {SCORING!r}, got {names}")
        n_tiers, ps = len(self.tiers), self.config.percentiles
        if n_tiers > 1 and ps and len(ps) != n_tiers - 1:
            raise ValueError(f"{len(ps)} percentiles for {n_tiers} tiers: give len(tiers) - 1 = {n_tiers - 1} "
                             "(or none: every group to the cheapest tier)")
        self.percentiles = ps if n_tiers > 1 else ()  # one tier: no boundary to place
        self.extract = answer_extractor
        self.recombination_prompt = recombination_prompt
        self.scorer = self._scorer_tier(scorer)
        self.routes_groups = n_tiers > 1 or self.config.lite_fraction > 0
        self.fitness_source = self._check_fitness()

    def _scorer_tier(self, scorer: Backend | Tier | None) -> Tier | None:
        if scorer is None or isinstance(scorer, Tier):
            return scorer
        if not isinstance(scorer, Backend):
            raise TypeError(f"scorer must be a Backend or a Tier, got {type(scorer).__name__}")
        same = next((t for t in self.tiers if t.backend is scorer), None)  # scoring on a tier's model: its prices
        return Tier(scorer, SCORING, same.price_in, same.price_out, same.price_cpu_second) if same else \
            Tier(scorer, SCORING)

    def _check_fitness(self) -> str:
        cfg = self.config
        if not self.routes_groups:
            return "one tier: every group recombined by it (no routing, no fitness)"
        if cfg.fitness == "diversity":
            return "diversity: number of distinct answers per group, routed on -D (split groups go expensive)"
        if self.scorer is not None:
            caps = self.scorer.backend.capabilities
            if not caps.prompt_scoring:
                raise ValueError(f"scorer {self.scorer.backend.name} cannot score continuations (prompt_scoring is "
                                 'False): pass an HFLocalBackend as scorer, or use fitness="diversity"')
            return (f"confidence: mean log-prob of each candidate's tokens, prefilled by the scorer "
                    f"{self.scorer.backend.name} (its own tokenizer) under the prompt that produced the candidate")
        for tier in self.tiers:
            caps = tier.backend.capabilities
            if not caps.logprobs or caps.max_top_logprobs < cfg.top_k:
                have = "none" if not caps.logprobs else f"at most {caps.max_top_logprobs}"
                raise ValueError(
                    f'fitness="confidence" needs top-{cfg.top_k} log-probs from every tier, and tier {tier.name!r} '
                    f"({tier.backend.name}) returns {have}"
                    '. Use fitness="diversity", or pass scorer=HFLocalBackend(...) (a local model that scores '
                    "candidates with its own tokenizer), or lower top_k.")
        return (f"confidence: DeepConf token confidence over the top-{cfg.top_k} log-probs each tier returned while "
                "generating")

    # ----- one loop's pieces ---------------------------------------------------------------------------------------
    def _generate(self, tier: Tier, prompts: Sequence[Messages], n: int, loop: int) -> tuple[list[Candidate], Usage]:
        cfg = self.config
        kwargs = generation_kwargs(cfg, tier)
        from_generation = self.routes_groups and cfg.fitness == "confidence" and self.scorer is None
        if from_generation:
            kwargs.update(logprobs=True, top_logprobs=cfg.top_k)
        rows, usage = call_tier(tier, prompts, n=n, seed=cfg.seed + loop, kwargs=kwargs)
        out = []
        for prompt, row in zip(prompts, rows):
            for c in row:
                conf = None
                if from_generation:
                    if c.top_logprobs is None and c.completion_tokens:
                        raise RuntimeError(f"{tier.backend.name} returned no top log-probs although asked for them")
                    conf = trajectory_confidence(confidence_from_top_logprobs(c.top_logprobs or [], cfg.top_k))
                out.append(Candidate(c.text, self.extract(c.text), prompt, tier.name, loop, conf))
        return out, usage

    def _score_population(self, population: list[Candidate]) -> Usage:
        """Prefill-score members not scored yet (each once, under the prompt that produced it)."""
        backend = self.scorer.backend
        mark = backend.ledger.mark()
        for member in population:
            if member.confidence is None:
                text = strip_think(member.text) if self.config.strip_think else member.text
                logps = backend.score(member.prompt, text) if text.strip() else []
                member.confidence = sum(logps) / len(logps) if logps else None
        return backend.ledger.since(mark)

    def _group_fitness(self, population: list[Candidate], groups: list[list[int]]) -> list[float]:
        if self.config.fitness == "diversity":
            answers = [c.answer for c in population]
            return [-float(group_diversity(answers, g)) for g in groups]
        confidences = fill_missing([c.confidence for c in population])
        return [group_confidence(confidences, g) for g in groups]

    def _selection_weights(self, population: list[Candidate]) -> list[float] | None:
        if self.config.selection != "weighted":
            return None
        conf = fill_missing([c.confidence for c in population])
        z = [c / self.config.selection_temperature for c in conf]
        top = max(z)
        return [math.exp(v - top) for v in z]

    def _texts(self, population: list[Candidate], group: list[int]) -> list[str]:
        return [strip_think(population[i].text) if self.config.strip_think else population[i].text for i in group]

    # ----- the loop ------------------------------------------------------------------------------------------------
    def run(self, problem: str) -> EvolveResult:
        if not isinstance(problem, str) or not problem.strip():
            raise ValueError("problem must be a non-empty string")
        cfg = self.config
        rng = random.Random(cfg.seed)
        wall, cpu = time.perf_counter(), time.process_time()
        seed_tier = self.tiers[-1]
        population, usage = self._generate(seed_tier, [as_messages(self.recombination_prompt(problem, []))],
                                           cfg.population, loop=0)
        records = [self._record(0, population, {seed_tier.name: usage}, wall, cpu)]
        for loop in range(1, cfg.loops + 1):
            wall, cpu = time.perf_counter(), time.process_time()
            usages: dict[str, Usage] = {}
            if self.routes_groups and cfg.fitness == "confidence" and self.scorer is not None:
                usages[SCORING] = self._score_population(population)
            groups = select_groups(len(population), cfg.group_size, cfg.groups, rng,
                                   self._selection_weights(population))
            fitness, thresholds, routes = [], [], [0] * len(groups)
            if self.routes_groups:
                fitness = self._group_fitness(population, groups)
                thresholds = percentile_thresholds(fitness, self.percentiles) if self.percentiles else []
                routes = assign_tiers(fitness, thresholds, len(self.tiers), cfg.lite_fraction)
            children: list[Candidate | None] = [None] * len(groups)
            for index, tier in enumerate(self.tiers):
                routed = [g for g, r in enumerate(routes) if r == index]
                if not routed:
                    continue
                prompts = [as_messages(self.recombination_prompt(problem, self._texts(population, groups[g])))
                           for g in routed]
                made, usages[tier.name] = self._generate(tier, prompts, 1, loop)
                for g, child in zip(routed, made):
                    children[g] = child
            for g, r in enumerate(routes):
                if r == LITE:
                    members = [population[i] for i in groups[g]]
                    pick = members[vote(members, self.extract)]
                    children[g] = Candidate(pick.text, pick.answer, pick.prompt, "vote", loop, pick.confidence)
            population = children if cfg.update == "replace" else population + children
            rec = self._record(loop, population, usages, wall, cpu)
            rec.groups, rec.routes, rec.fitness, rec.thresholds = groups, routes, fitness, thresholds
            records.append(rec)
        return self._result(population, records)

    def _record(self, loop: int, population: list[Candidate], usages: dict[str, Usage], wall: float,
                cpu: float) -> LoopRecord:
        prices = {t.name: t for t in self.tiers}
        if self.scorer is not None:
            prices[SCORING] = self.scorer
        return LoopRecord(loop=loop, usage=usages, cost={k: prices[k].cost(u) for k, u in usages.items()},
                          seconds=time.perf_counter() - wall, cpu_seconds=time.process_time() - cpu,
                          answers=[c.answer for c in population])

    def _result(self, population: list[Candidate], records: list[LoopRecord]) -> EvolveResult:
        best = population[vote(population, self.extract)]
        return EvolveResult(self.method, best.answer, best.text, population, records,
                            [t.name for t in self.tiers], self.fitness_source)
