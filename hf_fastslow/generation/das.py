"""DAS drafting (Shao et al., "Beat the long tail: Distribution-Aware Speculative Decoding for RL Training", arXiv
2511.13841): per-problem suffix trees over recent rollouts, a live per-request tree, and length-aware draft budgets.

Pieces:

* `SuffixTrie` - every suffix (truncated to `max_depth`) of every inserted sequence, with occurrence counts; O(depth)
  per appended token, exact removal for the sliding window, and SuffixDecoding's proposal rule (best score over all
  match lengths, probability cut-off `min_token_prob`, draft cap `max_spec_factor * match_length + offset`).
* `SuffixHistory` - one trie per problem (hash of the templated prompt ids), rollouts tagged with the step they were
  produced in, a sliding window of `window_steps` steps and a per-problem cap; it also tracks response lengths.
* `LengthAwareBudget` - Long/Medium/Short classes from the problem's predicted response length (with promotion
  while a request runs), the paper's closed-form budget, and the research code's per-round quota split.
* `DASDrafter` - the `Drafter` that ties them together; `das_rollout_func` / `DASWindowCallback` plug it into TRL's
  `GRPOTrainer` so rollouts draft from earlier steps' rollouts of the same prompt.
"""

from __future__ import annotations

import itertools
import math
import threading
from collections import deque
from collections.abc import Callable, Hashable, Iterable, Sequence
from typing import Any

import torch

from .drafter import DraftContext, Drafter, DraftFeedback

__all__ = [
    "DASDrafter",
    "DASWindowCallback",
    "LengthAwareBudget",
    "SuffixHistory",
    "SuffixTrie",
    "das_rollout_func",
]


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
        if budget < 0:
            raise ValueError(f"`budget` must be >= 0, got {budget}.")
        if len(context) == 0:
            raise ValueError("`context` must contain at least one token.")
        stop = set(stop_tokens)
        best: list[int] = []
        best_score = 0.0
        if budget == 0:
            return best, best_score
        t = len(context)
        for m in range(1, min(t, self.max_depth - 1) + 1):
            node = self.find(context[t - m :])
            if node is None:
                break  # a longer suffix contains this one, so it cannot match either
            cap = min(budget, math.floor(max_spec_factor * m + max_spec_offset))
            prob, score, draft = 1.0, 0.0, []
            while len(draft) < cap and node.best is not None:
                child = node.best
                prob *= child.count / node.count
                if prob < min_token_prob:
                    break
                draft.append(child.token)
                score += prob
                node = child
                if child.token in stop:
                    break
            if draft and score >= best_score:
                best, best_score = draft, score
        return best, best_score


class _TrieAppender:
    """Open suffixes of a sequence being written into a `SuffixTrie` (at most max_depth - 1 of them)."""

    __slots__ = ("active", "length", "trie")

    def __init__(self, trie: SuffixTrie):
        self.trie = trie
        self.active: list[_Node] = []
        self.length = 0

    def append(self, token: int) -> None:
        trie = self.trie
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


class SuffixHistory:
    """Per-problem suffix tries over the rollouts of the last `window_steps` steps (thread-safe).

    Args:
        max_depth (`int`): trie depth D.
        window_steps (`int`): rollouts produced in steps (s - W, s] are kept at step s.
        max_rollouts_per_problem (`int`): FIFO cap per problem (bounds memory).
        length_ema (`float`): smoothing of the per-problem response-length estimate used by the budget policy.
    """

    def __init__(
        self, max_depth: int = 24, window_steps: int = 4, max_rollouts_per_problem: int = 32, length_ema: float = 0.5
    ):
        if window_steps < 1:
            raise ValueError(f"`window_steps` must be >= 1, got {window_steps}.")
        if max_rollouts_per_problem < 1:
            raise ValueError(f"`max_rollouts_per_problem` must be >= 1, got {max_rollouts_per_problem}.")
        SuffixTrie(max_depth)  # validates max_depth
        self.max_depth = max_depth
        self.window_steps = window_steps
        self.max_rollouts_per_problem = max_rollouts_per_problem
        self.length_ema = length_ema
        self.step = 0
        self._trees: dict[Hashable, SuffixTrie] = {}
        self._rollouts: dict[Hashable, tuple[Hashable, tuple[int, ...], int]] = {}
        self._order: dict[Hashable, deque] = {}
        self._lengths: dict[Hashable, float] = {}
        self._ids = itertools.count()
        self.lock = threading.RLock()

    def __len__(self) -> int:
        return len(self._rollouts)

    @property
    def problems(self) -> list[Hashable]:
        return list(self._trees)

    def tree(self, problem_id: Hashable) -> SuffixTrie | None:
        return self._trees.get(problem_id)

    def rollouts(self, problem_id: Hashable | None = None) -> dict[Hashable, tuple[int, ...]]:
        """rollout id -> tokens, for one problem or all."""
        with self.lock:
            return {r: toks for r, (p, toks, _) in self._rollouts.items() if problem_id is None or p == problem_id}

    def add_rollout(
        self, problem_id: Hashable, tokens: Iterable[int], rollout_id: Hashable | None = None,
        response_length: int | None = None,
    ) -> Hashable:
        """Index a finished rollout (prompt + response tokens) under `problem_id` at the current step."""
        seq = tuple(_check_tokens(tokens))
        with self.lock:
            if rollout_id is None:
                rollout_id = ("rollout", next(self._ids))
            if rollout_id in self._rollouts:
                raise ValueError(f"rollout id {rollout_id!r} is already in the history; use unique ids per rollout.")
            tree = self._trees.get(problem_id)
            if tree is None:
                tree = self._trees[problem_id] = SuffixTrie(self.max_depth)
                self._order[problem_id] = deque()
            tree.add(seq)
            self._rollouts[rollout_id] = (problem_id, seq, self.step)
            self._order[problem_id].append(rollout_id)
            while len(self._order[problem_id]) > self.max_rollouts_per_problem:
                self.remove_rollout(self._order[problem_id][0])
            if response_length is not None:
                old = self._lengths.get(problem_id)
                a = self.length_ema
                self._lengths[problem_id] = float(response_length) if old is None else a * response_length + (1 - a) * old
        return rollout_id

    def remove_rollout(self, rollout_id: Hashable) -> None:
        with self.lock:
            if rollout_id not in self._rollouts:
                raise KeyError(f"unknown rollout id {rollout_id!r}")
            problem_id, seq, _ = self._rollouts.pop(rollout_id)
            self._trees[problem_id].remove(seq)
            self._order[problem_id].remove(rollout_id)
            if not self._order[problem_id]:
                del self._trees[problem_id], self._order[problem_id]

    def begin_step(self, step: int) -> int:
        """Move to training step `step`; rollouts from steps <= step - window_steps are evicted. Returns #evicted."""
        with self.lock:
            if step < self.step:
                raise ValueError(f"steps must not go backwards (at {self.step}, got {step}).")
            self.step = step
            stale = [r for r, (_, _, s) in self._rollouts.items() if s <= step - self.window_steps]
            for r in stale:
                self.remove_rollout(r)
            return len(stale)

    def advance_window(self, steps: int = 1) -> int:
        """`begin_step(step + steps)`: call once per training step (or epoch) boundary."""
        return self.begin_step(self.step + steps)

    def predicted_length(self, problem_id: Hashable) -> float | None:
        return self._lengths.get(problem_id)

    def known_lengths(self) -> list[float]:
        return list(self._lengths.values())

    def clear(self) -> None:
        with self.lock:
            self._trees.clear()
            self._rollouts.clear()
            self._order.clear()
            self._lengths.clear()


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
    def _quantile(values: list[float], q: float) -> float:
        s = sorted(values)
        pos = q * (len(s) - 1)
        lo = math.floor(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    def classify(self, predicted_length: float | None, generated: int, known_lengths: Sequence[float]) -> str:
        if len(known_lengths) < self.min_problems:
            return self.default_class
        length = max(predicted_length or 0.0, float(generated))
        if length >= self._quantile(list(known_lengths), self.thresholds[0]):
            return "long"
        if length >= self._quantile(list(known_lengths), self.thresholds[1]):
            return "medium"
        return "short"

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


_DEFAULT_BUDGET: Any = object()


class _LiveRequest:
    __slots__ = ("appender", "problem_id", "seen", "trie")

    def __init__(self, max_depth: int, problem_id: Hashable):
        self.trie = SuffixTrie(max_depth)
        self.appender = self.trie.appender()
        self.seen = 0
        self.problem_id = problem_id


class DASDrafter(Drafter):
    """Model-free drafter of DAS: suffix-trie drafts from the problem's recent rollouts and from the live request.

    Args:
        history (`SuffixHistory`, *optional*): shared rollout history (created if omitted). Finished generations are
            added to it when `record_rollouts=True`, so later calls on the same prompt draft from earlier ones.
        max_draft_tokens (`int`): hard cap on drafts per round (k).
        budget (`LengthAwareBudget` or `None`): per-request budget policy (default: `LengthAwareBudget()`); `None`
            lets every request draft up to `max_draft_tokens`.
        max_spec_factor / max_spec_offset (`float`): draft length <= factor * match length + offset.
        min_token_prob (`float`): tau, stop a draft when its path probability falls below it.
        use_local (`bool`): also draft from the request's own tokens (self-repetition; needed on a cold history).
        record_rollouts (`bool`): add finished generations to `history`.
        round_quota (`int`, *optional*): total draft tokens per batch round, split long-first (`split_quota`).
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
    ):
        super().__init__(max_draft_tokens)
        if not 0.0 <= min_token_prob <= 1.0:
            raise ValueError(f"`min_token_prob` must be in [0, 1], got {min_token_prob}.")
        if max_spec_factor <= 0:
            raise ValueError(f"`max_spec_factor` must be > 0, got {max_spec_factor}.")
        self.history = history if history is not None else SuffixHistory()
        if budget is _DEFAULT_BUDGET:
            budget = LengthAwareBudget()
        if budget is not None and not isinstance(budget, LengthAwareBudget):
            raise TypeError(f"`budget` must be a LengthAwareBudget or None, got {type(budget).__name__}.")
        self.budget_policy = budget
        self.max_spec_factor = max_spec_factor
        self.max_spec_offset = max_spec_offset
        self.min_token_prob = min_token_prob
        self.use_local = use_local
        self.record_rollouts = record_rollouts
        self.round_quota = round_quota
        self._live: dict[Hashable, _LiveRequest] = {}
        self._rollout_ids = itertools.count()

    def reset(self) -> None:
        self._live.clear()

    def advance_window(self, steps: int = 1) -> int:
        """Move the history window forward by `steps` training steps (evicts stale rollouts)."""
        return self.history.advance_window(steps)

    def request_budget(self, problem_id: Hashable, generated: int) -> int:
        if self.budget_policy is None:
            return self.max_draft_tokens
        with self.history.lock:
            known = self.history.known_lengths()
            predicted = self.history.predicted_length(problem_id)
        return min(self.max_draft_tokens, self.budget_policy.budget(predicted, generated, known))

    def _live_state(self, context: DraftContext, i: int) -> _LiveRequest:
        rid = context.request_ids[i]
        state = self._live.get(rid)
        if state is None:
            state = self._live[rid] = _LiveRequest(self.history.max_depth, context.problem_ids[i])
        ids = context.input_ids[i]
        if ids.shape[0] > state.seen:
            state.appender.extend(ids[state.seen :].tolist())
            state.seen = ids.shape[0]
        return state

    def propose(self, context: DraftContext) -> list[torch.LongTensor]:
        budgets = []
        for i in range(context.batch_size):
            if context.budgets[i] <= 0:
                budgets.append(0)
                continue
            generated = context.input_ids[i].shape[0] - context.prompt_lengths[i]
            budgets.append(min(context.budgets[i], self.request_budget(context.problem_ids[i], generated)))
        if self.round_quota is not None:
            long_budget = self.budget_policy.classes["long"] if self.budget_policy is not None else None
            budgets = LengthAwareBudget.split_quota(
                budgets, [b > 0 and b == long_budget for b in budgets], self.round_quota
            )
        drafts = []
        for i in range(context.batch_size):
            ids = context.input_ids[i]
            state = self._live_state(context, i) if self.use_local or self.record_rollouts else None
            b = budgets[i]
            if b <= 0:
                drafts.append(torch.empty(0, dtype=torch.long, device=ids.device))
                continue
            ctx = ids[-(self.history.max_depth - 1) :].tolist()
            best, best_score = [], 0.0
            with self.history.lock:
                tree = self.history.tree(context.problem_ids[i])
                if tree is not None:
                    best, best_score = tree.speculate(
                        ctx, b, self.max_spec_factor, self.max_spec_offset, self.min_token_prob,
                        context.eos_token_ids,
                    )
            if self.use_local and state is not None:
                local, local_score = state.trie.speculate(
                    ctx, b, self.max_spec_factor, self.max_spec_offset, self.min_token_prob, context.eos_token_ids
                )
                if local_score > best_score:
                    best = local
            drafts.append(torch.tensor(best, dtype=torch.long, device=ids.device))
        return drafts

    def observe(self, feedback: DraftFeedback) -> None:
        for i, (rid, appended, done) in enumerate(zip(feedback.request_ids, feedback.appended, feedback.finished)):
            state = self._live.get(rid)
            if state is not None and len(appended) and not done:
                # Keep the live trie current between rounds (the next context would catch up anyway).
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


def das_rollout_func(drafter: DASDrafter, batch_size: int | None = None) -> Callable[[list, Any], dict]:
    """A TRL `GRPOTrainer(rollout_func=...)` that generates rollouts with `speculative_generate` + `drafter`.

    Prompts are tokenized exactly as GRPOTrainer does (chat template, tools) and generated in left-padded batches of
    `batch_size` rows (default: all prompts at once) with the trainer's generation config, so sampling settings are
    unchanged and the result is distributed as plain GRPO rollouts. GRPO siblings share a problem id (hash of the
    prompt ids): a sibling that finishes early is indexed before the others finish. The history window follows
    `trainer.state.global_step` (one `begin_step` per new step), so rollouts older than `window_steps` steps are
    dropped. Returns `prompt_ids`, `completion_ids` (up to and including the first EOS) and `logprobs=None`, like
    TRL's transformers path.

    Set `TRL_EXPERIMENTAL_SILENCE=1` to silence TRL's experimental-API warning for `rollout_func`.
    """
    from ..integrations import trl_generation_context, trl_pad_token_id, trl_tokenize_prompts
    from .speculative import speculative_generate

    if not isinstance(drafter, DASDrafter):
        raise TypeError(f"`drafter` must be a DASDrafter, got {type(drafter).__name__}.")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")

    def rollout_func(prompts: list, trainer: Any) -> dict:
        step = int(trainer.state.global_step)
        if step > drafter.history.step:
            drafter.history.begin_step(step)
        prompt_ids = trl_tokenize_prompts(trainer, prompts, "The DAS rollout function")
        pad_id = trl_pad_token_id(trainer)
        eos_ids = trainer.generation_config.eos_token_id
        eos_ids = set([eos_ids] if isinstance(eos_ids, int) else (eos_ids or []))
        completions: list[list[int]] = []
        stack, model = trl_generation_context(trainer)
        with stack:
            device = next(model.parameters()).device
            size = batch_size or len(prompt_ids)
            for start in range(0, len(prompt_ids), size):
                chunk = prompt_ids[start : start + size]
                width = max(len(p) for p in chunk)
                ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(chunk), width), dtype=torch.long)
                for r, p in enumerate(chunk):
                    ids[r, width - len(p) :] = torch.tensor(p, dtype=torch.long)
                    mask[r, width - len(p) :] = 1
                out = model.generate(
                    input_ids=ids.to(device), attention_mask=mask.to(device),
                    generation_config=trainer.generation_config,
                    custom_generate=speculative_generate, drafter=drafter,
                )
                for row in out[:, width:].tolist():
                    cut = len(row)
                    for j, tok in enumerate(row):
                        if tok in eos_ids:
                            cut = j + 1
                            break
                    completions.append(row[:cut])
        return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": None}

    return rollout_func


def _trainer_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class DASWindowCallback(_trainer_callback_base()):
    """A `TrainerCallback` that advances a `SuffixHistory` window at every new training step.

    Only needed when rollouts are produced outside `das_rollout_func` (which follows the step itself)."""

    def __init__(self, history: SuffixHistory):
        self.history = history

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step > self.history.step:
            self.history.begin_step(state.global_step)
