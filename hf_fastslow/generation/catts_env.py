"""Environments and the episode runner for CATTS and its baselines (`hf_fastslow.generation.catts`).

An `Environment` is a small protocol: `reset(episode) -> messages`, `parse_action(text) -> action | None`,
`step(action) -> Transition`, `max_steps`. `RunningTotalEnv` is the card's multi-step task generated in code: keep a
running total while numbers arrive one per step; the observation shows the agent's OWN last total, so a wrong step
carries into the next ones (errors compound like a web task's), and an episode succeeds only if every step is right.

`run_episode(policy, env, episode=, seed=)` records per step the action, whether the environment judged it right,
the vote statistics and whether the arbiter ran; tokens and seconds come from the backends' ledgers. `summarize`
aggregates episodes into success, per-step accuracy (with 95 % Wilson intervals), tokens, arbiter calls and the
paper's "overriding a consensus hurts" check.

`ReplayBackend` lets the arms of a benchmark share work: identical calls (same conversation and options, hence the
same seed) are run once by the wrapped backend and replayed to every arm with the cost the first call measured, so
each arm's ledger reads as if it had run alone (the wrapped backends are deterministic given a seed).
"""

from __future__ import annotations

import copy
import json
import math
import random
import re
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from hf_fastslow.backends.base import Backend, CallMeter, Capabilities, Completion, Messages, Usage
from hf_fastslow.evaluation.answers import extract_answer
from hf_fastslow.evaluation.intervals import wilson_interval
from hf_fastslow.generation.catts import StepFailed, parse_json_action

__all__ = [
    "Environment",
    "EpisodeResult",
    "ReplayBackend",
    "RunningTotalEnv",
    "StepRecord",
    "Transition",
    "episode_seed",
    "run_episode",
    "summarize",
]


@dataclass
class Transition:
    """What `Environment.step` returns: the next observation (None when done), whether the episode is over, whether
    it succeeded (final when done), whether this step's action was right (None if the environment cannot tell)."""

    observation: Messages | None
    done: bool
    success: bool
    correct: bool | None = None
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Environment(Protocol):
    """A multi-step task with a programmatic success check."""

    max_steps: int

    def reset(self, episode: int) -> Messages:
        """Start episode `episode` (the same index gives the same episode) and return the first observation."""

    def parse_action(self, text: str) -> Any | None:
        """The structured action of a reply, or None when it is not a valid action."""

    def step(self, action: Any) -> Transition:
        """Apply a valid action."""


class RunningTotalEnv:
    """Keep a running total: start from a number in [start_low, start_high], then add one number in [low, high] per
    step for `n_steps` steps. The action is `{"action": "add", "value": <new total>}`; a reply may give it as that
    JSON object or as plain text: the number after its last "=", "equals" or "answer is", or a bare number (prose
    without one is an invalid sample) — SmolLM2-135M cannot write the JSON form (0 of 20 valid replies when asked),
    but restates the sum, "14 + 8 = 22".

    Defaults (single digits, 3 steps) keep SmolLM2-135M-Instruct in a useful band (`benchmarks/catts.py --quick`:
    greedy right on 50 % of steps and 1 of 6 episodes, majority of 6 samples on 61 % and 2 of 6); starting from
    10-19 instead, every arm solved 0 of 6 episodes (the card's 10-49 over 5 steps is harder still).
    `stop_on_error=True` ends an episode at its first wrong step (cheaper, but an agent could not know).
    """

    def __init__(self, n_steps: int = 3, low: int = 1, high: int = 9, start_low: int = 1, start_high: int = 9, *,
                 seed: int = 0, stop_on_error: bool = False, system: str | None = None):
        if n_steps < 1:
            raise ValueError(f"n_steps must be >= 1, got {n_steps}")
        if low > high or start_low > start_high:
            raise ValueError(f"empty number range: [{low}, {high}] / start [{start_low}, {start_high}]")
        self.max_steps = n_steps
        self.low, self.high, self.start_low, self.start_high = low, high, start_low, start_high
        self.seed = seed
        self.stop_on_error = stop_on_error
        self.system = system
        self.numbers: list[int] = []
        self._t = 0
        self._shown = 0
        self._all_right = True

    def numbers_of(self, episode: int) -> list[int]:
        """The start value and the addends of `episode` (deterministic in `seed` and `episode`)."""
        rng = random.Random(self.seed * 1_000_003 + episode)
        return [rng.randint(self.start_low, self.start_high)] + [
            rng.randint(self.low, self.high) for _ in range(self.max_steps)]

    def observation_text(self) -> str:
        total, x = self._shown, self.numbers[self._t + 1]
        return f"The running total is {total}. Add {x} to it. What is {total} + {x}? Reply with just the number."

    def _observation(self) -> Messages:
        messages = [{"role": "user", "content": self.observation_text()}]
        return ([{"role": "system", "content": self.system}] if self.system else []) + messages

    def reset(self, episode: int) -> Messages:
        self.numbers = self.numbers_of(episode)
        self._t, self._shown, self._all_right = 0, self.numbers[0], True
        return self._observation()

    def parse_action(self, text: str) -> dict | None:
        obj = parse_json_action(text)
        if obj is not None:
            value = obj.get("value")
            if isinstance(value, bool) or not isinstance(value, int | float | str):
                return None
            answer = extract_answer(str(value))
        else:  # the number after the last "=" / "equals" / "answer is", or a bare number; other prose is no action
            stated = re.findall(r"(?:=|\bequals\b|\banswer\s*(?:is|:))\s*(-?[\d,]+(?:\.\d+)?)", text, re.IGNORECASE)
            bare = re.fullmatch(r"\s*(-?[\d,]+(?:\.\d+)?)\s*\.?\s*", text)
            answer = extract_answer(stated[-1]) if stated else extract_answer(bare.group(1)) if bare else None
        if answer is None or not re.fullmatch(r"-?\d+", answer):
            return None
        return {"action": "add", "value": int(answer)}

    def step(self, action: Any) -> Transition:
        if not self.numbers:
            raise RuntimeError("RunningTotalEnv.step before reset")
        if self._t >= self.max_steps:
            raise RuntimeError("RunningTotalEnv.step after the episode ended")
        if not isinstance(action, dict) or action.get("action") != "add" or not isinstance(action.get("value"), int):
            raise ValueError(f"RunningTotalEnv actions are {{'action': 'add', 'value': int}}, got {action!r}")
        expected = self._shown + self.numbers[self._t + 1]
        correct = action["value"] == expected
        self._all_right &= correct
        self._shown = action["value"]
        self._t += 1
        done = self._t >= self.max_steps or (self.stop_on_error and not correct)
        info = {"expected": expected, "true_total": sum(self.numbers[: self._t + 1])}
        return Transition(None if done else self._observation(), done, done and self._all_right, correct, info)


# ----------------------------------------------------------------------------------------------------------------------
# Episodes
# ----------------------------------------------------------------------------------------------------------------------
def episode_seed(seed: int, episode: int, step: int) -> int:
    """The sampling seed of a step: distinct per (seed, episode, step) and spaced 4096 apart, so a step's fan-out
    seeds (seed + i) and its retries never reach the next step's."""
    return ((seed * 100_003 + episode) * 1_009 + step) * 4096 % (2**31 - 4096)


@dataclass
class StepRecord:
    action: Any
    correct: bool | None
    arbitrated: bool
    overrode_majority: bool
    arbiter_fallback: bool
    uncertainty: float
    margin: float
    entropy_norm: float
    clusters: int
    invalid_samples: int
    sampler_usage: Usage
    arbiter_usage: Usage


@dataclass
class EpisodeResult:
    episode: int
    seed: int
    success: bool
    steps: list[StepRecord]
    failed: str | None = None  # a StepFailed message: the episode ended there, unsuccessful

    @property
    def sampler_usage(self) -> Usage:
        return sum((s.sampler_usage for s in self.steps), Usage())

    @property
    def arbiter_usage(self) -> Usage:
        return sum((s.arbiter_usage for s in self.steps), Usage())

    @property
    def arbiter_calls(self) -> int:
        """Arbitrations (one decision each; a scoring arbiter makes one `score` request per option label)."""
        return sum(s.arbitrated for s in self.steps)

    @property
    def tokens(self) -> int:
        return self.sampler_usage.total_tokens + self.arbiter_usage.total_tokens


def run_episode(policy, env: Environment, *, episode: int = 0, seed: int = 0,
                max_steps: int | None = None) -> EpisodeResult:
    """Run `policy` (anything with `.step(messages, seed=) -> StepDecision`) on episode `episode` of `env`."""
    limit = env.max_steps if max_steps is None else max_steps
    observation = env.reset(episode)
    steps: list[StepRecord] = []
    for t in range(limit):
        try:
            d = policy.step(observation, seed=episode_seed(seed, episode, t))
        except StepFailed as err:
            steps.append(StepRecord(None, False, False, False, False, math.nan, math.nan, math.nan, 0,
                                    len(err.samples), err.usage, Usage()))
            return EpisodeResult(episode, seed, False, steps, failed=str(err))
        tr = env.step(d.action)
        steps.append(StepRecord(d.action, tr.correct, d.arbitrated, d.overrode_majority, d.arbiter_fallback,
                                d.uncertainty, d.stats.margin, d.stats.entropy_norm, len(d.stats.keys),
                                d.invalid_samples, d.sampler_usage, d.arbiter_usage))
        if tr.done:
            return EpisodeResult(episode, seed, tr.success, steps)
        observation = tr.observation
    return EpisodeResult(episode, seed, False, steps, failed=f"no end within {limit} steps")


def summarize(results: Sequence[EpisodeResult], consensus_margin: float = 0.7) -> dict[str, Any]:
    """Success, per-step accuracy, tokens, arbiter calls and the override check over `results`.

    `override_*`: steps where the arbiter overrode a majority whose margin exceeded `consensus_margin` (the paper's
    Δ > 0.7), their accuracy, and the success of episodes with such an override versus without."""
    steps = [s for r in results for s in r.steps]
    judged = [s for s in steps if s.correct is not None]
    wins = sum(r.success for r in results)
    right = sum(bool(s.correct) for s in judged)
    sampler = sum((r.sampler_usage for r in results), Usage())
    arbiter = sum((r.arbiter_usage for r in results), Usage())
    overrides = [s for s in steps if s.overrode_majority and s.margin > consensus_margin]
    with_override = [r for r in results if any(s.overrode_majority and s.margin > consensus_margin for s in r.steps)]
    without = [r for r in results if r not in with_override]
    n = max(1, len(results))
    return {
        "episodes": len(results),
        "success": wins / n,
        "success_ci95": wilson_interval(wins, len(results)),
        "step_accuracy": right / max(1, len(judged)),
        "step_accuracy_ci95": wilson_interval(right, len(judged)),
        "steps": len(steps),
        "failed_steps": sum(r.failed is not None for r in results),
        "arbiter_calls": sum(r.arbiter_calls for r in results),
        "arbitrated_fraction": sum(s.arbitrated for s in steps) / max(1, len(steps)),
        "arbiter_fallbacks": sum(s.arbiter_fallback for s in steps),
        "overrides": sum(s.overrode_majority for s in steps),
        "sampler_prompt_tokens": sampler.prompt_tokens,
        "sampler_completion_tokens": sampler.completion_tokens,
        "arbiter_prompt_tokens": arbiter.prompt_tokens,
        "arbiter_completion_tokens": arbiter.completion_tokens,
        "tokens": sampler.total_tokens + arbiter.total_tokens,
        "tokens_per_episode": (sampler.total_tokens + arbiter.total_tokens) / n,
        "backend_cpu_seconds": sampler.cpu_seconds + arbiter.cpu_seconds,
        "backend_seconds": sampler.seconds + arbiter.seconds,
        "consensus_overrides": len(overrides),
        "consensus_override_step_accuracy": (sum(bool(s.correct) for s in overrides) / len(overrides)
                                             if overrides else None),
        "success_with_consensus_override": (sum(r.success for r in with_override) / len(with_override)
                                            if with_override else None),
        "success_without_consensus_override": sum(r.success for r in without) / len(without) if without else None,
    }


# ----------------------------------------------------------------------------------------------------------------------
# Shared work between the arms of a benchmark
# ----------------------------------------------------------------------------------------------------------------------
class ReplayBackend(Backend):
    """`ReplayBackend(inner, memo=None)`: `chat_batch` and `score` calls that match an earlier one exactly
    (conversation, options, seed) return copies of its results and write its measured cost (tokens, seconds, CPU
    seconds) into this backend's ledger again; new calls go to `inner`. Give each arm its own ReplayBackend over a
    shared `memo` dict: the arms then pay for identical calls once in wall time, yet each ledger holds the full cost
    the arm would have paid alone. Only sound for a deterministic `inner` (a local model with seeded calls).
    Streaming is not replayed."""

    def __init__(self, inner: Backend, memo: dict | None = None, *, name: str | None = None):
        super().__init__()
        self.inner = inner
        self.memo = memo if memo is not None else {}
        self.name = name or f"Replay({inner.name})"
        self.tokenizer = getattr(inner, "tokenizer", None)
        self.hits = 0
        self._lock = threading.Lock()

    @property
    def capabilities(self) -> Capabilities:
        return self.inner.capabilities

    def _replay(self, key: str, run) -> Any:
        with self._lock:
            if key in self.memo:
                self.hits += 1
            else:
                mark = self.inner.ledger.mark()
                value = run()
                self.memo[key] = (value, [replace(r) for r in self.inner.ledger.records[mark:]])
            value, records = self.memo[key]
        for record in records:
            self.ledger.add(replace(record, backend=self.name))
        return copy.deepcopy(value)

    def chat_batch(self, conversations: Sequence[Messages], **kwargs: Any) -> list[list[Completion]]:
        key = json.dumps(["chat", list(conversations), sorted(kwargs.items())], sort_keys=True, default=str)
        return self._replay(key, lambda: self.inner.chat_batch(conversations, **kwargs))

    def score(self, messages: Messages, continuation: str) -> list[float]:
        key = json.dumps(["score", list(messages), continuation], sort_keys=True)
        return self._replay(key, lambda: self.inner.score(messages, continuation))

    def _chat_batch(self, conversations, opts, meter: CallMeter):  # chat_batch is overridden whole
        raise NotImplementedError

    def _stream_batch(self, conversations, opts, chunk_tokens: int, meter: CallMeter):
        raise NotImplementedError(f"{self.name} does not replay streams; stream from {self.inner.name} directly")
