"""DAS history: per-problem suffix tries over each problem's recent rollouts, windowed by sightings of the problem,
with memory caps and sorted response-length estimates. Used by `hf_fastslow.generation.das`."""

from __future__ import annotations

import bisect
import itertools
import threading
from collections import OrderedDict, deque
from collections.abc import Hashable, Iterable

from .suffix_trie import SuffixTrie, _check_tokens

__all__ = ["SuffixHistory"]


class _Problem:
    """One problem's trie, its rollouts grouped by sighting (oldest first) and its response-length estimate."""

    __slots__ = ("length", "num_rollouts", "sightings", "trie")

    def __init__(self, max_depth: int):
        self.trie = SuffixTrie(max_depth)
        self.sightings: deque[tuple[int, list[Hashable]]] = deque()  # (round, rollout ids)
        self.num_rollouts = 0
        self.length: float | None = None


class SuffixHistory:
    """Per-problem suffix tries over each problem's recent rollouts (thread-safe).

    The window counts *sightings* of a problem, not training steps: a sighting is every rollout of the problem
    finished within one round, and a round is one generate call of a `DASDrafter` (one TRL generation batch under
    `das_rollout_func`, which opens one round for all its generate calls; `begin_step` / `DASWindowCallback` also start
    one). GRPO siblings therefore form one sighting and every pass over the dataset (epoch) adds one, however many
    training steps lie between two passes. A problem keeps the rollouts of its `window_sightings` most recent sightings;
    the older sighting is dropped when the first rollout of a new one arrives, so a returning prompt still drafts from
    all `window_sightings` earlier sightings until its first sibling finishes.

    Memory is bounded by `max_rollouts_per_problem` (FIFO within a problem) and, optionally, `max_problems` (the least
    recently sighted problem leaves first). A problem that leaves takes its length estimate with it.

    Args:
        max_depth (`int`): trie depth D.
        window_steps (`int`, *optional*): also drop rollouts produced `window_steps` or more steps ago (`begin_step`);
            off by default, since steps say nothing about when a prompt returns.
        max_rollouts_per_problem (`int`): FIFO cap per problem.
        length_ema (`float`): smoothing of the per-problem response-length estimate used by the budget policy.
        window_sightings (`int`): how many of a problem's most recent sightings are kept (the running one included).
        max_problems (`int`, *optional*): most problems kept (least recently sighted evicted first).
    """

    def __init__(
        self, max_depth: int = 24, window_steps: int | None = None, max_rollouts_per_problem: int = 32,
        length_ema: float = 0.5, *, window_sightings: int = 2, max_problems: int | None = None,
    ):
        if window_steps is not None and window_steps < 1:
            raise ValueError(f"`window_steps` must be >= 1 or None, got {window_steps}.")
        if window_sightings < 1:
            raise ValueError(f"`window_sightings` must be >= 1, got {window_sightings}.")
        if max_rollouts_per_problem < 1:
            raise ValueError(f"`max_rollouts_per_problem` must be >= 1, got {max_rollouts_per_problem}.")
        if max_problems is not None and max_problems < 1:
            raise ValueError(f"`max_problems` must be >= 1 or None, got {max_problems}.")
        SuffixTrie(max_depth)  # validates max_depth
        self.max_depth = max_depth
        self.window_steps = window_steps
        self.window_sightings = window_sightings
        self.max_rollouts_per_problem = max_rollouts_per_problem
        self.max_problems = max_problems
        self.length_ema = length_ema
        self.step = 0
        self.round = 0
        self._problems: OrderedDict[Hashable, _Problem] = OrderedDict()  # least recently sighted first
        self._rollouts: dict[Hashable, tuple[Hashable, tuple[int, ...], int]] = {}
        # Length estimates of the problems in the history, kept sorted so quantiles cost O(1); the version changes
        # whenever one of them does (budget policies cache their cut-offs on it).
        self._sorted_lengths: list[float] = []
        self.lengths_version = 0
        self._ids = itertools.count()
        self.lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._rollouts)

    @property
    def problems(self) -> list[Hashable]:
        return list(self._problems)

    def tree(self, problem_id: Hashable) -> SuffixTrie | None:
        prob = self._problems.get(problem_id)
        return None if prob is None else prob.trie

    def rollouts(self, problem_id: Hashable | None = None) -> dict[Hashable, tuple[int, ...]]:
        """rollout id -> tokens, for one problem or all."""
        with self.lock:
            return {r: toks for r, (p, toks, _) in self._rollouts.items() if problem_id is None or p == problem_id}

    def sightings(self, problem_id: Hashable) -> list[list[Hashable]]:
        """The rollout ids of each kept sighting of a problem, oldest first."""
        with self.lock:
            prob = self._problems.get(problem_id)
            return [] if prob is None else [list(ids) for _, ids in prob.sightings]

    def begin_round(self) -> int:
        """Start a new round: the next rollout of every problem opens a new sighting of it. Returns the round."""
        with self.lock:
            self.round += 1
            return self.round

    def add_rollout(
        self, problem_id: Hashable, tokens: Iterable[int], rollout_id: Hashable | None = None,
        response_length: int | None = None,
    ) -> Hashable:
        """Index a finished rollout (prompt + response tokens) under `problem_id` in the current round's sighting."""
        seq = tuple(_check_tokens(tokens))
        with self.lock:
            if rollout_id is None:
                rollout_id = ("rollout", next(self._ids))
            if rollout_id in self._rollouts:
                raise ValueError(f"rollout id {rollout_id!r} is already in the history; use unique ids per rollout.")
            prob = self._problems.get(problem_id)
            if prob is None:
                prob = self._problems[problem_id] = _Problem(self.max_depth)
            self._problems.move_to_end(problem_id)
            if not prob.sightings or prob.sightings[-1][0] != self.round:
                prob.sightings.append((self.round, []))
                while len(prob.sightings) > self.window_sightings:
                    for rid in list(prob.sightings[0][1]):
                        self._remove(rid, drop_empty_problem=False)
            prob.trie.add(seq)
            self._rollouts[rollout_id] = (problem_id, seq, self.step)
            prob.sightings[-1][1].append(rollout_id)
            prob.num_rollouts += 1
            while prob.num_rollouts > self.max_rollouts_per_problem:
                self._remove(prob.sightings[0][1][0], drop_empty_problem=False)
            if response_length is not None:
                a = self.length_ema
                old = prob.length
                self._set_length(prob, float(response_length) if old is None else a * response_length + (1 - a) * old)
            if self.max_problems is not None:
                while len(self._problems) > self.max_problems:
                    self._drop_problem(next(iter(self._problems)))
        return rollout_id

    def remove_rollout(self, rollout_id: Hashable) -> None:
        with self.lock:
            self._remove(rollout_id)

    def _remove(self, rollout_id: Hashable, drop_empty_problem: bool = True) -> None:
        with self.lock:
            if rollout_id not in self._rollouts:
                raise KeyError(f"unknown rollout id {rollout_id!r}")
            problem_id, seq, _ = self._rollouts.pop(rollout_id)
            prob = self._problems[problem_id]
            prob.trie.remove(seq)
            prob.num_rollouts -= 1
            for k, (_, ids) in enumerate(prob.sightings):
                if rollout_id in ids:
                    ids.remove(rollout_id)
                    if not ids:
                        del prob.sightings[k]
                    break
            if prob.num_rollouts == 0 and drop_empty_problem:
                self._drop_problem(problem_id)

    def _drop_problem(self, problem_id: Hashable) -> None:
        prob = self._problems.pop(problem_id)
        for _, ids in prob.sightings:
            for rid in ids:
                del self._rollouts[rid]
        self._set_length(prob, None)

    def _set_length(self, prob: _Problem, value: float | None) -> None:
        if prob.length is not None:
            del self._sorted_lengths[bisect.bisect_left(self._sorted_lengths, prob.length)]
        prob.length = value
        if value is not None:
            bisect.insort(self._sorted_lengths, value)
        self.lengths_version += 1

    def begin_step(self, step: int) -> int:
        """Move to training step `step` (a new round). With `window_steps`, rollouts from steps <= step - window_steps
        are evicted. Returns the number evicted."""
        with self.lock:
            if step < self.step:
                raise ValueError(f"steps must not go backwards (at {self.step}, got {step}).")
            self.step = step
            self.begin_round()
            if self.window_steps is None:
                return 0
            stale = [r for r, (_, _, s) in self._rollouts.items() if s <= step - self.window_steps]
            for r in stale:
                self.remove_rollout(r)
            return len(stale)

    def advance_window(self, steps: int = 1) -> int:
        """`begin_step(step + steps)`: call at a step (or epoch) boundary."""
        return self.begin_step(self.step + steps)

    def predicted_length(self, problem_id: Hashable) -> float | None:
        prob = self._problems.get(problem_id)
        return None if prob is None else prob.length

    def known_lengths(self) -> list[float]:
        """Length estimates of the problems in the history, sorted."""
        with self.lock:
            return list(self._sorted_lengths)

    def clear(self) -> None:
        with self.lock:
            self._problems.clear()
            self._rollouts.clear()
            self._sorted_lengths.clear()
            self.lengths_version += 1
