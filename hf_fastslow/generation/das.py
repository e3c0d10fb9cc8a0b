"""DAS drafting (Shao et al., "Beat the long tail: Distribution-Aware Speculative Decoding for RL Training", arXiv
2511.13841): per-problem suffix trees over recent rollouts, a live per-request tree, and length-aware draft budgets.

Pieces (this module re-exports them all):

* `SuffixTrie` (`suffix_trie.py`) - every suffix (truncated to `max_depth`) of every inserted sequence, with
  occurrence counts; O(depth) per appended token, exact removal for the sliding window, and SuffixDecoding's proposal
  rule (best score over all match lengths, probability cut-off `min_token_prob`, draft cap
  `max_spec_factor * match_length + offset`).
* `SuffixHistory` (`das_history.py`) - one trie per problem (hash of the templated prompt ids) over the rollouts of
  the problem's last `window_sightings` sightings (a sighting: the problem's rollouts within one round, e.g. one
  epoch's GRPO siblings), with per-problem and optional global caps; it also tracks response lengths (sorted, for
  O(1) quantiles).
* `LengthAwareBudget` (`das_budget.py`) - Long/Medium/Short classes from the problem's predicted response length (with
  promotion while a request runs), the paper's closed-form budget, and the research code's per-round quota split.
* `OnlineRoundCost` / `LinearRoundCost`, `DraftAcceptanceModel`, `choose_verify_width` (`das_budget.py`) - cost-aware
  drafting: verify a draft only as far as its expected accepted tokens pay for the wider target pass on the hardware
  at hand.
* `DASDrafter` (here) - the `Drafter` that ties them together. `das_rollout_func` / `DASWindowCallback`
  (`hf_fastslow.trainers.das_rollout`; deprecated re-exports here) plug it into TRL's `GRPOTrainer` so rollouts draft
  from earlier epochs' rollouts of the same prompt.
"""

from __future__ import annotations

import contextlib
import importlib
import itertools
import time
from collections.abc import Hashable
from typing import Any

import torch

from .das_budget import DraftAcceptanceModel, LengthAwareBudget, LinearRoundCost, OnlineRoundCost, choose_verify_width
from .das_history import SuffixHistory
from .drafter import DraftContext, Drafter, DraftFeedback
from .suffix_trie import SuffixTrie, TrieDraft

# The TRL glue (`das_rollout_func`, `DASWindowCallback`) lives in hf_fastslow.trainers.das_rollout, a floor above
# generation/. Deprecated here: these names still resolve from this module for one release, on first use, so
# importing generation/ never imports trainers/. Import them from `hf_fastslow.trainers`.
_TRAINER_MODULES = {
    "DASWindowCallback": "hf_fastslow.trainers.das_rollout",
    "das_rollout_func": "hf_fastslow.trainers.das_rollout",
}

__all__ = [
    "DASDrafter",
    "StagedRollouts",
    "DraftAcceptanceModel",
    "LengthAwareBudget",
    "LinearRoundCost",
    "OnlineRoundCost",
    "SuffixHistory",
    "SuffixTrie",
    "TrieDraft",
    "choose_verify_width",
] + list(_TRAINER_MODULES)


def __getattr__(name: str):
    if name in _TRAINER_MODULES:
        return getattr(importlib.import_module(_TRAINER_MODULES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


_DEFAULT_BUDGET: Any = object()


class _LiveRequest:
    """A running request: its own trie (prompt + generated so far) and its match nodes in the problem's trie."""

    __slots__ = ("appender", "hist_matches", "hist_seen", "hist_trie", "hist_version", "seen", "trie")

    def __init__(self, max_depth: int, local: bool):
        self.trie = SuffixTrie(max_depth) if local else None
        self.appender = self.trie.appender() if local else None
        self.seen = 0
        self.hist_trie: SuffixTrie | None = None
        self.hist_version = -1
        self.hist_seen = 0
        self.hist_matches: list = []


class StagedRollouts:
    """Rollouts finished inside `DASDrafter.staged_recording()`: one trie per problem (drafted from at once, so an
    early sibling still helps the ones running) and the finished list, in finish order, for the caller to publish."""

    def __init__(self, max_depth: int):
        self.max_depth = max_depth
        self.tries: dict[Hashable, SuffixTrie] = {}
        self.finished: list[tuple[Hashable, tuple[int, ...], int]] = []  # (problem id, tokens, response length)

    def add(self, problem_id: Hashable, tokens, response_length: int) -> None:
        seq = tuple(int(t) for t in tokens)
        trie = self.tries.get(problem_id)
        if trie is None:
            trie = self.tries[problem_id] = SuffixTrie(self.max_depth)
        trie.add(seq)
        self.finished.append((problem_id, seq, int(response_length)))


class DASDrafter(Drafter):
    """Model-free drafter of DAS: suffix-trie drafts from the problem's recent rollouts and from the live request.

    Args:
        history (`SuffixHistory`, *optional*): shared rollout history (created if omitted). Finished generations are
            added to it when `record_rollouts=True`, so later calls on the same prompt draft from earlier ones. Each
            generate call is one round of the history window (see `SuffixHistory`; `same_round()` groups calls).
        max_draft_tokens (`int`): hard cap on drafts per round (k).
        budget (`LengthAwareBudget` or `None`): per-request budget policy (default: `LengthAwareBudget()`); `None`
            lets every request draft up to `max_draft_tokens`.
        max_spec_factor / max_spec_offset (`float`): draft length <= factor * match length + offset.
        min_token_prob (`float`): tau, stop a draft when its path probability falls below it.
        use_local (`bool`): also draft from the request's own tokens (self-repetition; needed on a cold history).
        record_rollouts (`bool`): add finished generations to `history`.
        round_quota (`int`, *optional*): total draft tokens per batch round, split long-first (`split_quota`).
        cost_aware (`bool`): verify only as many draft tokens as pay for the wider target pass: every round the width
            maximizing expected tokens per unit of cost is chosen (`choose_verify_width`) from `acceptance` and
            `cost_model`; width 1 (no draft) when nothing pays. Off: every draft is verified in full.
        cost_model (*optional*): `cost(n_tokens) -> float` and `observe(n_tokens, seconds)`; default
            `OnlineRoundCost()`, learned from the measured round times. Inject `LinearRoundCost` for fixed costs.
        acceptance (`DraftAcceptanceModel`, *optional*): the online acceptance estimate (created if omitted).
        explore_every (`int`): with `cost_aware`, every n-th round that would skip an available draft verifies one
            draft token per row instead, so acceptance estimates that fell too low can recover (0: never).
    """

    def __init__(
        self,
        history: SuffixHistory | None = None,
        max_draft_tokens: int = 16,
        budget: LengthAwareBudget | None = _DEFAULT_BUDGET,
        max_spec_factor: float = 1.0,
        max_spec_offset: float = 0.0,
        min_token_prob: float = 0.1,
        use_local: bool = True,
        record_rollouts: bool = True,
        round_quota: int | None = None,
        cost_aware: bool = True,
        cost_model: Any = None,
        acceptance: DraftAcceptanceModel | None = None,
        explore_every: int = 128,
    ):
        super().__init__(max_draft_tokens)
        if not 0.0 <= min_token_prob <= 1.0:
            raise ValueError(f"`min_token_prob` must be in [0, 1], got {min_token_prob}.")
        if max_spec_factor <= 0:
            raise ValueError(f"`max_spec_factor` must be > 0, got {max_spec_factor}.")
        if explore_every < 0:
            raise ValueError(f"`explore_every` must be >= 0, got {explore_every}.")
        self.history = history if history is not None else SuffixHistory()
        if budget is _DEFAULT_BUDGET:
            budget = LengthAwareBudget()
        if budget is not None and not isinstance(budget, LengthAwareBudget):
            raise TypeError(f"`budget` must be a LengthAwareBudget or None, got {type(budget).__name__}.")
        if cost_model is not None and not (hasattr(cost_model, "cost") and hasattr(cost_model, "observe")):
            raise TypeError("`cost_model` needs `cost(n_tokens)` and `observe(n_tokens, seconds)` methods.")
        self.budget_policy = budget
        self.max_spec_factor = max_spec_factor
        self.max_spec_offset = max_spec_offset
        self.min_token_prob = min_token_prob
        self.use_local = use_local
        self.record_rollouts = record_rollouts
        self.round_quota = round_quota
        self.cost_aware = cost_aware
        self.cost_model = cost_model if cost_model is not None else OnlineRoundCost()
        self.acceptance = acceptance if acceptance is not None else DraftAcceptanceModel()
        self.explore_every = explore_every
        # Rounds where a draft was available: verified (some width > 1) or skipped because it would not pay.
        self.drafted_rounds = 0
        self.skipped_rounds = 0
        self._live: dict[Hashable, _LiveRequest] = {}
        self._pending: dict[Hashable, list[tuple]] = {}  # request id -> acceptance cells of its verified draft
        self._rollout_ids = itertools.count()
        self._round_holds = 0
        self._cutoffs_cache: tuple[int, Any] = (-1, None)
        self._clock = time.perf_counter
        self._last_round: tuple[int, float] | None = None  # (tokens fed, start time) of the round in flight
        self._staged: StagedRollouts | None = None

    def reset(self) -> None:
        self._live.clear()
        self._pending.clear()
        self._last_round = None
        if self._round_holds == 0:
            self.history.begin_round()

    @contextlib.contextmanager
    def same_round(self):
        """Generate calls inside this block form one round of the history window (one sighting per problem), e.g. one
        batch of rollouts split over several `generate` calls."""
        self.history.begin_round()
        self._round_holds += 1
        try:
            yield self
        finally:
            self._round_holds -= 1

    @contextlib.contextmanager
    def staged_recording(self):
        """Inside this block finished rollouts are not added to `history` but staged (`StagedRollouts`, yielded): drafts
        still come from them at once, and the caller publishes them with `publish_rollouts`, e.g. every rank's
        rollouts in rank order after an all-gather, so every process's history holds the same rollouts in the same
        order (`das_rollout_func(share_across_ranks=True)`)."""
        if self._staged is not None:
            raise RuntimeError("DASDrafter.staged_recording() blocks do not nest.")
        self._staged = StagedRollouts(self.history.max_depth)
        try:
            yield self._staged
        finally:
            self._staged = None

    def publish_rollouts(self, rollouts) -> int:
        """Add `(problem_id, tokens, response_length)` rollouts to `history` in the order given; returns how many."""
        n = 0
        for problem_id, tokens, response_length in rollouts:
            self.history.add_rollout(problem_id, tokens, response_length=response_length)
            n += 1
        return n

    def advance_window(self, steps: int = 1) -> int:
        """Move the history to the next step (a new round; with `window_steps`, evicts rollouts that aged out)."""
        return self.history.advance_window(steps)

    def _length_cutoffs(self) -> tuple[float, float] | None:
        version = self.history.lengths_version
        if self._cutoffs_cache[0] != version:
            with self.history.lock:
                self._cutoffs_cache = (version, self.budget_policy.cutoffs(self.history._sorted_lengths))
        return self._cutoffs_cache[1]

    def request_budget(self, problem_id: Hashable, generated: int) -> int:
        if self.budget_policy is None:
            return self.max_draft_tokens
        cls = self.budget_policy.class_of(self.history.predicted_length(problem_id), generated, self._length_cutoffs())
        return min(self.max_draft_tokens, self.budget_policy.classes[cls])

    def _live_state(self, context: DraftContext, i: int) -> _LiveRequest:
        rid = context.request_ids[i]
        state = self._live.get(rid)
        if state is None:
            state = self._live[rid] = _LiveRequest(self.history.max_depth, self.use_local)
        if state.appender is not None:
            ids = context.input_ids[i]
            if ids.shape[0] > state.seen:
                state.appender.extend(ids[state.seen :].tolist())
                state.seen = ids.shape[0]
        return state

    def _history_matches(self, state: _LiveRequest, tree: SuffixTrie, ids: torch.Tensor) -> list:
        """Match nodes of row `ids` in the problem trie: advanced token by token while the trie is unchanged,
        recomputed (O(D^2)) when it changed (a rollout was added or evicted) or many tokens arrived."""
        n = ids.shape[0]
        depth = self.history.max_depth
        if state.hist_trie is tree and state.hist_version == tree.version and n - state.hist_seen < depth:
            matches = state.hist_matches
            for tok in ids[state.hist_seen :].tolist():
                matches = tree.advance_matches(matches, tok)
        else:
            matches = tree.match_nodes(ids[-(depth - 1) :].tolist())
        state.hist_trie, state.hist_version, state.hist_seen, state.hist_matches = tree, tree.version, n, matches
        return matches

    def _draft(self, context: DraftContext, i: int, budget: int) -> tuple[list[int], list[tuple]]:
        """Best trie draft for row i (history vs live request, higher score wins) and its acceptance cells."""
        args = (budget, self.max_spec_factor, self.max_spec_offset, self.min_token_prob, context.eos_token_ids)
        state = self._live_state(context, i)
        best, source = None, "history"
        with self.history.lock:
            tree = self.history.tree(context.problem_ids[i])
            if tree is not None:
                best = tree.draft_from(self._history_matches(state, tree, context.input_ids[i]), *args)
        staged = self._staged.tries.get(context.problem_ids[i]) if self._staged is not None else None
        if staged is not None:
            # This round's own finished siblings (not yet published): matched afresh, the trie grows within the call.
            ids = context.input_ids[i][-(self.history.max_depth - 1) :].tolist()
            draft = staged.draft_from(staged.match_nodes(ids), *args)
            if best is None or draft.score > best.score:
                best = draft
        if state.trie is not None:
            # Own tokens (prompt + generated so far): the appender's open suffixes are exactly the context's matches.
            local = state.trie.draft_from(state.appender.active, *args)
            if best is None or local.score > best.score:
                best, source = local, "local"
        if best is None or not best.tokens:
            return [], []
        cells = [self.acceptance.cell(context.do_sample, source, c, f) for c, f in zip(best.counts, best.freqs)]
        return best.tokens, cells

    def propose(self, context: DraftContext) -> list[torch.LongTensor]:
        now = self._clock()
        if self._last_round is not None:
            self.cost_model.observe(self._last_round[0], now - self._last_round[1])
        cutoffs = self._length_cutoffs() if self.budget_policy is not None else None
        budgets = []
        for i in range(context.batch_size):
            b = context.budgets[i]
            if b > 0 and self.budget_policy is not None:
                generated = context.input_ids[i].shape[0] - context.prompt_lengths[i]
                cls = self.budget_policy.class_of(self.history.predicted_length(context.problem_ids[i]), generated,
                                                  cutoffs)
                b = min(b, self.budget_policy.classes[cls])
            budgets.append(min(b, self.max_draft_tokens))
        if self.round_quota is not None:
            long_budget = self.budget_policy.classes["long"] if self.budget_policy is not None else None
            budgets = LengthAwareBudget.split_quota(
                budgets, [b > 0 and b == long_budget for b in budgets], self.round_quota
            )
        # Rows with no budget (finished, or one token left) are not touched: their tries would only be rebuilt.
        found = [self._draft(context, i, budgets[i]) if budgets[i] > 0 else ([], []) for i in range(context.batch_size)]
        width = 1 + max(len(tokens) for tokens, _ in found)
        if self.cost_aware and width > 1:
            active = [i for i in range(context.batch_size) if context.budgets[i] > 0]
            expected = [self.acceptance.expected_accepted(found[i][1]) for i in active]
            chosen = choose_verify_width(expected, context.batch_size, self.cost_model.cost)
            if chosen == 1:
                self.skipped_rounds += 1
                if self.explore_every and self.skipped_rounds % self.explore_every == 0:
                    chosen = 2
            width = chosen
        if width > 1:
            self.drafted_rounds += 1
        drafts = []
        for i, (tokens, cells) in enumerate(found):
            tokens, cells = tokens[: width - 1], cells[: width - 1]
            if cells:
                self._pending[context.request_ids[i]] = cells
            drafts.append(torch.tensor(tokens, dtype=torch.long, device=context.input_ids[i].device))
        self._last_round = (context.batch_size * width, now)
        return drafts

    def observe(self, feedback: DraftFeedback) -> None:
        for i, (rid, appended, done) in enumerate(zip(feedback.request_ids, feedback.appended, feedback.finished)):
            cells = self._pending.pop(rid, None)
            if cells:
                self.acceptance.update(cells[: len(feedback.proposed[i])], feedback.num_accepted[i])
            state = self._live.get(rid)
            if state is not None and state.appender is not None and len(appended) and not done:
                # Keep the live trie current between rounds; `seen` moves with it so no token is indexed twice.
                state.appender.extend(appended.tolist())
                state.seen += len(appended)
            if done:
                self._live.pop(rid, None)
                seq = feedback.sequences[i] if feedback.sequences is not None else None
                if self.record_rollouts and seq is not None:
                    response = len(seq) - feedback.prompt_lengths[i]
                    if self._staged is not None:
                        self._staged.add(feedback.problem_ids[i], seq, response)
                        continue
                    self.history.add_rollout(
                        feedback.problem_ids[i], seq, rollout_id=("das", next(self._rollout_ids)),
                        response_length=response,
                    )
