"""DAS drafting (Shao et al., "Beat the long tail: Distribution-Aware Speculative Decoding for RL Training", arXiv
2511.13841): per-problem suffix trees over recent rollouts, a live per-request tree, and length-aware draft budgets.

Pieces:

* `SuffixTrie` - every suffix (truncated to `max_depth`) of every inserted sequence, with occurrence counts; O(depth)
  per appended token, exact removal for the sliding window, and SuffixDecoding's proposal rule (best score over all
  match lengths, probability cut-off `min_token_prob`, draft cap `max_spec_factor * match_length + offset`).
* `SuffixHistory` - one trie per problem (hash of the templated prompt ids) over the rollouts of the problem's last
  `window_sightings` sightings (a sighting: the problem's rollouts within one round, e.g. one epoch's GRPO siblings),
  with per-problem and optional global caps; it also tracks response lengths (sorted, for O(1) quantiles).
* `LengthAwareBudget` - Long/Medium/Short classes from the problem's predicted response length (with promotion
  while a request runs), the paper's closed-form budget, and the research code's per-round quota split.
* `OnlineRoundCost` / `LinearRoundCost`, `DraftAcceptanceModel`, `choose_verify_width` - cost-aware drafting: verify a
  draft only as far as its expected accepted tokens pay for the wider target pass on the hardware at hand.
* `DASDrafter` - the `Drafter` that ties them together. `das_rollout_func` / `DASWindowCallback`
  (`hf_fastslow.trainers.das_rollout`; deprecated re-exports here) plug it into TRL's `GRPOTrainer` so rollouts draft
  from earlier epochs' rollouts of the same prompt.
"""

from __future__ import annotations

import bisect
import contextlib
import importlib
import itertools
import math
import statistics
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any, NamedTuple

import torch

from .drafter import DraftContext, Drafter, DraftFeedback

# The TRL glue (`das_rollout_func`, `DASWindowCallback`) lives in hf_fastslow.trainers.das_rollout, a floor above
# generation/. Deprecated here: these names still resolve from this module for one release, on first use, so
# importing generation/ never imports trainers/. Import them from `hf_fastslow.trainers`.
_TRAINER_MODULES = {
    "DASWindowCallback": "hf_fastslow.trainers.das_rollout",
    "das_rollout_func": "hf_fastslow.trainers.das_rollout",
}

__all__ = [
    "DASDrafter",
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


def _check_tokens(tokens: Iterable[Any]) -> list[int]:
    if isinstance(tokens, torch.Tensor):
        if tokens.dtype.is_floating_point or tokens.dtype == torch.bool:
            raise ValueError(f"token ids must be integers, got a {tokens.dtype} tensor.")
        return tokens.reshape(-1).tolist()
    out = []
    for t in tokens:
        if isinstance(t, bool) or not isinstance(t, int):
            if isinstance(t, torch.Tensor) and t.numel() == 1 and not t.dtype.is_floating_point:
                t = int(t)
            else:
                raise ValueError(f"token ids must be integers, got {t!r} ({type(t).__name__}).")
        out.append(t)
    return out


class TrieDraft(NamedTuple):
    """A trie proposal: tokens, score (sum of path probabilities) and, per token, the count of the node it continues
    and the token's frequency after that node (what the acceptance estimate is keyed on)."""

    tokens: list[int]
    score: float
    counts: list[int]
    freqs: list[float]


class _Node:
    # Most nodes of a trie over fresh text sit on a single-child chain, so `kids` holds None, the only child itself,
    # or a dict once a node branches: about 4x less memory than a dict per node.
    __slots__ = ("best", "count", "depth", "kids", "token")

    def __init__(self, token: int, depth: int):
        self.token = token
        self.count = 0
        self.depth = depth
        self.kids: None | _Node | dict[int, _Node] = None
        # The child with the highest count (ties: the one that got there first); proposals follow it.
        self.best: _Node | None = None

    def child(self, token: int) -> _Node | None:
        kids = self.kids
        if kids is None:
            return None
        if type(kids) is _Node:
            return kids if kids.token == token else None
        return kids.get(token)

    @property
    def children(self) -> dict[int, _Node]:
        """token -> child (a fresh dict; for inspection and tests)."""
        kids = self.kids
        if kids is None:
            return {}
        if type(kids) is _Node:
            return {kids.token: kids}
        return dict(kids)

    def _add_child(self, child: _Node) -> None:
        kids = self.kids
        if kids is None:
            self.kids = child
        elif type(kids) is _Node:
            self.kids = {kids.token: kids, child.token: child}
        else:
            kids[child.token] = child

    def _remove_child(self, token: int) -> None:
        kids = self.kids
        if type(kids) is _Node:
            self.kids = None
        else:
            del kids[token]
            if len(kids) == 1:
                self.kids = next(iter(kids.values()))


class SuffixTrie:
    """Bounded-depth suffix trie with counts: node v at depth d stands for a d-token string s and `count(s)` is the
    number of its occurrences in the inserted sequences (as a start of a stored suffix, each truncated to
    `max_depth` tokens). Equivalent to a suffix tree for proposals, without path compression.

    Args:
        max_depth (`int`): D, the longest stored substring (>= 2).
    """

    def __init__(self, max_depth: int = 32):
        if isinstance(max_depth, bool) or not isinstance(max_depth, int) or max_depth < 2:
            raise ValueError(f"`max_depth` must be an integer >= 2, got {max_depth!r}.")
        self.max_depth = max_depth
        self.root = _Node(-1, 0)
        self.num_nodes = 0
        self.version = 0  # changes with every insertion or removal (cached match nodes are then stale)

    # -- updates ------------------------------------------------------------------------------------------------------
    def _bump(self, node: _Node, token: int, delta: int) -> _Node | None:
        child = node.child(token)
        if child is None:
            if delta < 0:
                raise KeyError("removing a sequence that was never inserted")
            child = _Node(token, node.depth + 1)
            node._add_child(child)
            self.num_nodes += 1
        child.count += delta
        if delta > 0:
            if node.best is None or child.count > node.best.count:
                node.best = child
        else:
            if child.count == 0:
                node._remove_child(token)
                self.num_nodes -= 1 + self._subtree_size(child)
            if node.best is child or child.count == 0:
                node.best = max(node.children.values(), key=lambda c: c.count, default=None)
            if child.count == 0:
                return None
        return child

    def _subtree_size(self, node: _Node) -> int:
        return sum(1 + self._subtree_size(c) for c in node.children.values())

    def appender(self) -> _TrieAppender:
        """An incremental writer: `append(token)` inserts the new suffixes ending at that token in O(max_depth)."""
        return _TrieAppender(self)

    def add(self, tokens: Iterable[int]) -> None:
        """Insert every suffix of `tokens` (each truncated to `max_depth`)."""
        app = self.appender()
        for t in _check_tokens(tokens):
            app.append(t)

    def remove(self, tokens: Iterable[int]) -> None:
        """Undo a previous `add(tokens)` exactly (counts decremented, empty nodes freed)."""
        seq = _check_tokens(tokens)
        d = self.max_depth
        self.version += 1
        for start in range(len(seq)):
            node = self.root
            for tok in seq[start : start + d]:
                node = self._bump(node, tok, -1)
                if node is None:
                    break

    # -- queries ------------------------------------------------------------------------------------------------------
    def find(self, tokens: Sequence[int]) -> _Node | None:
        node = self.root
        for tok in tokens:
            node = node.child(tok)
            if node is None:
                return None
        return node

    def count(self, tokens: Sequence[int]) -> int:
        """Occurrences of `tokens` (length <= max_depth) in the inserted sequences."""
        node = self.find(tokens)
        return 0 if node is None else node.count

    def speculate(
        self,
        context: Sequence[int],
        budget: int,
        max_spec_factor: float = 1.0,
        max_spec_offset: float = 0.0,
        min_token_prob: float = 0.1,
        stop_tokens: Iterable[int] = (),
    ) -> tuple[list[int], float]:
        """Best draft continuing `context`: for every match length m (1 .. D-1) follow the most frequent child while
        the path probability stays >= `min_token_prob`, at most `min(budget, floor(factor * m + offset))` tokens;
        keep the draft with the highest score (sum of path probabilities; longer matches win ties). Returns
        `(draft, score)`; the draft ends at the first stop token."""
        draft = self.speculate_draft(context, budget, max_spec_factor, max_spec_offset, min_token_prob, stop_tokens)
        return draft.tokens, draft.score

    def speculate_draft(
        self,
        context: Sequence[int],
        budget: int,
        max_spec_factor: float = 1.0,
        max_spec_offset: float = 0.0,
        min_token_prob: float = 0.1,
        stop_tokens: Iterable[int] = (),
    ) -> TrieDraft:
        """`speculate`, also giving per draft token the count of the node it continues and its frequency there."""
        if budget < 0:
            raise ValueError(f"`budget` must be >= 0, got {budget}.")
        if len(context) == 0:
            raise ValueError("`context` must contain at least one token.")
        if budget == 0:
            return TrieDraft([], 0.0, [], [])
        stop = stop_tokens if isinstance(stop_tokens, (set, frozenset, tuple)) else set(stop_tokens)
        return self.draft_from(self.match_nodes(context), budget, max_spec_factor, max_spec_offset, min_token_prob,
                               stop)

    def match_nodes(self, context: Sequence[int]) -> list[_Node]:
        """Nodes of the suffixes of `context` (up to D-1 tokens) found in the trie, longest first. A suffix found
        implies every shorter one is, so these are lengths M, M-1, ..., 1."""
        out = []
        t = len(context)
        for m in range(1, min(t, self.max_depth - 1) + 1):
            node = self.find(context[t - m :])
            if node is None:
                break  # a longer suffix contains this one, so it cannot match either
            out.append(node)
        out.reverse()
        return out

    def advance_matches(self, matches: Sequence[_Node], token: int) -> list[_Node]:
        """`match_nodes(context + [token])` from `match_nodes(context)` in O(D); valid while the trie is unchanged
        (`version`)."""
        nxt = []
        limit = self.max_depth - 1
        for node in matches:
            if node.depth < limit:
                child = node.child(token)
                if child is not None:
                    nxt.append(child)
        first = self.root.child(token)
        if first is not None:
            nxt.append(first)
        return nxt

    def draft_from(
        self, matches: Sequence[_Node], budget: int, max_spec_factor: float, max_spec_offset: float,
        min_token_prob: float, stop: Any,
    ) -> TrieDraft:
        """The proposal rule over precomputed `matches` (longest first). Longer matches win ties; once a match length's
        cap cannot beat the best score (scores are sums of probabilities, at most one per token, and caps shrink with
        the match length), the shorter ones are skipped."""
        best = TrieDraft([], 0.0, [], [])
        for node in matches:
            cap = min(budget, math.floor(max_spec_factor * node.depth + max_spec_offset))
            if cap <= best.score:
                break
            prob, score, draft, counts, freqs = 1.0, 0.0, [], [], []
            while len(draft) < cap and node.best is not None:
                child = node.best
                freq = child.count / node.count
                prob *= freq
                if prob < min_token_prob:
                    break
                draft.append(child.token)
                counts.append(node.count)
                freqs.append(freq)
                score += prob
                node = child
                if child.token in stop:
                    break
            if draft and score > best.score:
                best = TrieDraft(draft, score, counts, freqs)
        return best


class _TrieAppender:
    """Open suffixes of a sequence being written into a `SuffixTrie` (at most max_depth - 1 of them)."""

    __slots__ = ("active", "length", "trie")

    def __init__(self, trie: SuffixTrie):
        self.trie = trie
        self.active: list[_Node] = []
        self.length = 0

    def append(self, token: int) -> None:
        trie = self.trie
        trie.version += 1
        nxt = []
        for node in itertools.chain(self.active, (trie.root,)):
            child = trie._bump(node, token, +1)
            if child.depth < trie.max_depth:
                nxt.append(child)
        self.active = nxt
        self.length += 1

    def extend(self, tokens: Iterable[int]) -> None:
        for t in tokens:
            self.append(t)


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


class LengthAwareBudget:
    """DAS's length-aware speculation policy: long trajectories get longer draft budgets.

    A request's predicted length is max(the problem's response-length estimate, tokens generated so far), so a running
    request is promoted when it outgrows its class. It is Long when that reaches the `thresholds[0]` quantile of the
    known problems' lengths, Medium from the `thresholds[1]` quantile, Short below; with fewer than `min_problems`
    known problems (cold start, or plain generate without history) every request gets `default_class`.

    Args:
        classes (`dict`): draft budget per class (`"long"`, `"medium"`, `"short"`); the paper does not draft short
            requests (budget 0).
        thresholds (`tuple`): (long quantile, medium quantile), 1 >= long >= medium >= 0.
        default_class (`str`): class used without enough history.
        min_problems (`int`): history size needed before classes are assigned.
    """

    CLASSES = ("long", "medium", "short")

    def __init__(
        self,
        classes: dict[str, int] | None = None,
        thresholds: tuple[float, float] = (0.75, 0.25),
        default_class: str = "medium",
        min_problems: int = 4,
    ):
        classes = dict(classes if classes is not None else {"long": 16, "medium": 8, "short": 0})
        if set(classes) != set(self.CLASSES):
            raise ValueError(f"`classes` must give a budget for exactly {self.CLASSES}, got {sorted(classes)}.")
        for name, b in classes.items():
            if isinstance(b, bool) or not isinstance(b, int) or b < 0:
                raise ValueError(f"budget of class {name!r} must be an integer >= 0, got {b!r}.")
        hi, lo = thresholds
        if not (0.0 <= lo <= hi <= 1.0):
            raise ValueError(f"`thresholds` must satisfy 0 <= medium <= long <= 1, got {thresholds}.")
        if default_class not in self.CLASSES:
            raise ValueError(f"`default_class` must be one of {self.CLASSES}, got {default_class!r}.")
        self.classes = classes
        self.thresholds = (hi, lo)
        self.default_class = default_class
        self.min_problems = min_problems

    @staticmethod
    def _quantile(sorted_values: Sequence[float], q: float) -> float:
        pos = q * (len(sorted_values) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(sorted_values) - 1)
        return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)

    def cutoffs(self, sorted_lengths: Sequence[float]) -> tuple[float, float] | None:
        """(long, medium) length cut-offs from the known lengths, sorted ascending; None below `min_problems`."""
        if len(sorted_lengths) < self.min_problems or not sorted_lengths:
            return None
        return self._quantile(sorted_lengths, self.thresholds[0]), self._quantile(sorted_lengths, self.thresholds[1])

    def class_of(self, predicted_length: float | None, generated: int, cutoffs: tuple[float, float] | None) -> str:
        """Class of a request from precomputed `cutoffs` (see `cutoffs`)."""
        if cutoffs is None:
            return self.default_class
        length = max(predicted_length or 0.0, float(generated))
        if length >= cutoffs[0]:
            return "long"
        if length >= cutoffs[1]:
            return "medium"
        return "short"

    def classify(self, predicted_length: float | None, generated: int, known_lengths: Sequence[float]) -> str:
        return self.class_of(predicted_length, generated, self.cutoffs(sorted(known_lengths)))

    def budget(self, predicted_length: float | None, generated: int, known_lengths: Sequence[float]) -> int:
        return self.classes[self.classify(predicted_length, generated, known_lengths)]

    @staticmethod
    def closed_form(length: float, alpha: float, k: float, n_fwd: float, b_max: int) -> int:
        """The paper's Eq. 7 as reported: b* = -(l / alpha) * ln(1 - k (1 - N_fwd / l)), the smallest budget that lets a
        request of remaining length l finish within N_fwd forwards (acceptance saturation A(b) = (l/k)(1 - e^{-alpha
        b / l})). 0 when l <= N_fwd (short requests do not draft), `b_max` when the target is unreachable."""
        if b_max < 0:
            raise ValueError(f"`b_max` must be >= 0, got {b_max}.")
        if alpha <= 0 or k <= 0 or n_fwd <= 0:
            raise ValueError("`alpha`, `k` and `n_fwd` must be > 0.")
        if length <= n_fwd:
            return 0
        arg = 1.0 - k * (1.0 - n_fwd / length)
        if arg <= 0.0:
            return b_max
        return min(b_max, max(0, math.ceil(-(length / alpha) * math.log(arg))))

    @staticmethod
    def split_quota(budgets: Sequence[int], is_long: Sequence[bool], quota: int) -> list[int]:
        """Per-round draft quota across a batch (DAS research code): long rows are served first; if they alone exceed
        the quota they are shrunk by one common ratio (>= 1 token each), otherwise the rest share what is left in
        proportion to their budgets. The result never exceeds `budgets` nor (unless the long rows outnumber it) the
        quota."""
        if quota < 0:
            raise ValueError(f"`quota` must be >= 0, got {quota}.")
        budgets = [max(0, int(b)) for b in budgets]
        if sum(budgets) <= quota:
            return budgets
        out = [0] * len(budgets)
        long_rows = [i for i, b in enumerate(budgets) if is_long[i] and b > 0]
        rest = [i for i, b in enumerate(budgets) if not is_long[i] and b > 0]
        long_total = sum(budgets[i] for i in long_rows)
        if long_total >= quota:
            ratio = quota / long_total if long_total else 0.0
            for i in long_rows:
                out[i] = min(budgets[i], max(1, int(budgets[i] * ratio)))
            return out
        for i in long_rows:
            out[i] = budgets[i]
        left = quota - long_total
        rest_total = sum(budgets[i] for i in rest)
        for i in rest:
            out[i] = min(budgets[i], int(budgets[i] * left / rest_total))
        return out


class LinearRoundCost:
    """A fixed verify-round cost model: a target pass over n tokens (rows x width) costs `base + per_token * n` (the DAS
    paper's latency model, in any unit). Inject one (e.g. from a calibration) to make drafting decisions
    deterministic; `observe` ignores measurements."""

    def __init__(self, base: float = 1.0, per_token: float = 0.0):
        if base <= 0 or per_token < 0:
            raise ValueError(f"need base > 0 and per_token >= 0, got base={base}, per_token={per_token}.")
        self.base = float(base)
        self.per_token = float(per_token)

    def cost(self, tokens: int) -> float:
        return self.base + self.per_token * tokens

    def observe(self, tokens: int, seconds: float) -> None:
        pass


class OnlineRoundCost:
    """Verify-round cost learned from wall-clock time on the hardware at hand.

    `DASDrafter` times every round from one `propose` to the next (the target pass, the loop's bookkeeping and the
    drafter itself) and reports `(tokens fed, seconds)`. Per pass size the median of the last `memory` rounds is kept
    (a median, because on a shared machine another process's burst makes single rounds several times slower), and
    `cost(n) = base + per_token * n` is fitted to the medians by least squares weighted by their counts, with a prior
    `per_token / base = prior_token_ratio` (weight `prior_weight`, in observations of the residual
    `mean size * (per_token - ratio * base)`): until rounds of clearly different sizes are measured the curve keeps the
    prior's shape through the measured point; afterwards the measurements decide. The slope is kept within
    [0, base] (a wider pass never costs less, and one more token never costs more than the fixed part of a pass).
    Decisions only widen the pass when the current curve says it pays, and each such round corrects the curve.

    Args:
        prior_token_ratio (`float`): assumed extra cost of one more token in the pass, relative to the fixed cost.
        prior_weight (`float`): weight of that prior, in observations.
        memory (`int`): rounds remembered per pass size.
        max_sizes (`int`): pass sizes remembered (least recently seen forgotten first).
    """

    def __init__(self, prior_token_ratio: float = 0.03, prior_weight: float = 0.2, memory: int = 16,
                 max_sizes: int = 64):
        if prior_token_ratio < 0 or prior_weight <= 0 or memory < 1 or max_sizes < 2:
            raise ValueError("need prior_token_ratio >= 0, prior_weight > 0, memory >= 1 and max_sizes >= 2.")
        self.prior_token_ratio = prior_token_ratio
        self.prior_weight = prior_weight
        self.memory = memory
        self.max_sizes = max_sizes
        self._points: OrderedDict[int, deque[float]] = OrderedDict()  # tokens -> recent round times (s)
        self._coefficients: tuple[float, float] | None = None

    def observe(self, tokens: int, seconds: float) -> None:
        if tokens < 1 or not seconds > 0:
            return
        times = self._points.get(tokens)
        if times is None:
            times = self._points[tokens] = deque(maxlen=self.memory)
            if len(self._points) > self.max_sizes:
                self._points.popitem(last=False)
        else:
            self._points.move_to_end(tokens)
        times.append(seconds)
        self._coefficients = None

    def coefficients(self) -> tuple[float, float]:
        """(base, per_token) of the current fit (unit: seconds; the prior alone gives (1, prior_token_ratio))."""
        if self._coefficients is not None:
            return self._coefficients
        r = self.prior_token_ratio
        if not self._points:
            return 1.0, r
        s = sn = snn = sy = sny = 0.0
        for n, times in self._points.items():
            w, y = float(len(times)), statistics.median(times)
            s += w
            sn += w * n
            snn += w * n * n
            sy += w * y
            sny += w * n * y
        prior = self.prior_weight * (sn / s) ** 2  # the prior residual n_mean * (b - r a) is in seconds, like the data
        # Normal equations of  sum w (a + b n - y)^2 + prior (b - r a)^2.
        m11, m12, m22 = s + r * r * prior, sn - r * prior, snn + prior
        det = m11 * m22 - m12 * m12
        a = (sy * m22 - sny * m12) / det
        b = (m11 * sny - m12 * sy) / det
        if b < 0:  # a wider pass never costs less
            a, b = sy / s, 0.0
        if a <= 0 or b > a:  # keep 0 <= per_token <= base: refit the common scale with per_token = base
            a = sy / (s + sn)
            b = a
        self._coefficients = (a, b)
        return a, b

    def cost(self, tokens: int) -> float:
        a, b = self.coefficients()
        return a + b * tokens


class DraftAcceptanceModel:
    """Online estimate of the chance that a trie draft token is accepted given that the ones before it were.

    One Beta count per cell: sampling or greedy, the draft's source (the problem's history or the live request), how
    many times the trie saw the node the token continues (1, 2, 3-4, 5-8, 9+) and the trie's frequency of the token
    after it ([0, .25), [.25, .5), [.5, .75), [.75, 1), 1). The prior mean is the frequency shrunk by the count,
    `f * c / (c + 1)`, worth `prior_weight` observations; counts are halved past `max_trials` so the estimate follows
    a drifting policy.
    """

    _COUNT_EDGES = (1, 2, 4, 8)
    _COUNT_REPS = (1.0, 2.0, 3.5, 6.5, 12.0)
    _FREQ_EDGES = (0.25, 0.5, 0.75, 1.0)
    _FREQ_REPS = (0.125, 0.375, 0.625, 0.875, 1.0)

    def __init__(self, prior_weight: float = 2.0, max_trials: float = 256.0):
        if prior_weight <= 0 or max_trials <= 0:
            raise ValueError("need prior_weight > 0 and max_trials > 0.")
        self.prior_weight = prior_weight
        self.max_trials = max_trials
        self._counts: dict[tuple, list[float]] = {}  # cell -> [accepted, trials]

    @classmethod
    def cell(cls, do_sample: bool, source: str, count: int, freq: float) -> tuple:
        c = bisect.bisect_left(cls._COUNT_EDGES, count)
        f = len(cls._FREQ_EDGES) if freq >= 1.0 else bisect.bisect_right(cls._FREQ_EDGES, freq)
        return bool(do_sample), source, c, f

    def prob(self, cell: tuple) -> float:
        _, _, c, f = cell
        count = self._COUNT_REPS[c]
        prior = self._FREQ_REPS[f] * count / (count + 1.0)
        hits, trials = self._counts.get(cell, (0.0, 0.0))
        return (hits + self.prior_weight * prior) / (trials + self.prior_weight)

    def expected_accepted(self, cells: Sequence[tuple]) -> list[float]:
        """E[accepted tokens | the first k tokens are drafted], for k = 0 .. len(cells)."""
        out, run, total = [0.0], 1.0, 0.0
        for cell in cells:
            run *= self.prob(cell)
            total += run
            out.append(total)
        return out

    def update(self, cells: Sequence[tuple], num_accepted: int) -> None:
        """Drafted `cells` (in order), of which the first `num_accepted` were accepted; later ones were never judged."""
        for j, cell in enumerate(cells[: num_accepted + 1]):
            entry = self._counts.setdefault(cell, [0.0, 0.0])
            entry[0] += 1.0 if j < num_accepted else 0.0
            entry[1] += 1.0
            if entry[1] > self.max_trials:
                entry[0] *= 0.5
                entry[1] *= 0.5


def choose_verify_width(expected: Sequence[Sequence[float]], rows: int, cost: Callable[[int], float]) -> int:
    """The verify width (1 + draft tokens) that maximizes the expected tokens per unit of round cost.

    `expected[i][k]`: expected accepted tokens if active row i drafts its first k tokens (`expected[i][0] == 0`);
    every active row also emits one token of its own. `rows`: rows in the target pass (padding included, so the pass
    feeds `rows * width` tokens) and `cost(n)` the cost of a pass over n tokens. Rows are padded to a common width, so
    once a width is paid every row drafts up to it. Width 1 means no drafting. For one row this drafts k tokens only
    if E[accepted | k] > cost(k + 1) / cost(1) - 1."""
    active = len(expected)
    if active == 0:
        return 1
    best_width, best = 1, active / cost(rows)
    for width in range(2, max(len(e) for e in expected) + 1):
        gain = sum(e[min(len(e), width) - 1] for e in expected)
        value = (active + gain) / cost(rows * width)
        if value > best:
            best_width, best = width, value
    return best_width


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
                    self.history.add_rollout(
                        feedback.problem_ids[i], seq, rollout_id=("das", next(self._rollout_ids)),
                        response_length=response,
                    )
