"""Bounded-depth suffix trie with counts (DAS / SuffixDecoding drafting): insertion in O(depth) per token, exact
removal, incremental matching and SuffixDecoding's proposal rule. Used by `hf_fastslow.generation.das`."""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from typing import Any, NamedTuple

import torch

__all__ = ["SuffixTrie", "TrieDraft"]


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
