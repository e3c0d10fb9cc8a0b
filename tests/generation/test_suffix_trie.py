"""DAS suffix trie (generation/suffix_trie.py): counts against brute force, removal, speculation scoring, the
incremental matcher against the plain rule, bad input. Split out of test_das.py (pure move)."""

import math
import random

import pytest
import torch

from hf_fastslow.generation import (
    DASDrafter,
    LengthAwareBudget,
    SuffixHistory,
    SuffixTrie,
)
from hf_fastslow.generation.das import (
    LinearRoundCost,
)

FREE = LinearRoundCost(1.0, 0.0)  # verify width costs nothing: every draft is verified (deterministic tests)

torch.set_num_threads(1)


def _brute_count(seqs, sub):
    n = len(sub)
    return sum(1 for s in seqs for i in range(len(s) - n + 1) if list(s[i : i + n]) == list(sub))


def trie_structure(node):
    """Canonical form of a trie (token -> (count, children)) for structural equality."""
    return {tok: (c.count, trie_structure(c)) for tok, c in node.children.items()}


# ---------------------------------------------------------------------------------------------------------------------
# Trie
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("seed", range(6))
def test_trie_counts_match_brute_force(seed):
    rng = random.Random(seed)
    depth = rng.randint(2, 6)
    seqs = [[rng.randint(0, 3) for _ in range(rng.randint(1, 20))] for _ in range(5)]
    trie = SuffixTrie(depth)
    for s in seqs:
        trie.add(s)
    for length in range(1, depth + 1):
        for _ in range(30):
            sub = [rng.randint(0, 3) for _ in range(length)]
            assert trie.count(sub) == _brute_count(seqs, sub)
    # every stored substring is found
    for s in seqs:
        for i in range(len(s)):
            for j in range(i + 1, min(len(s), i + depth) + 1):
                assert trie.count(s[i:j]) >= 1


def test_trie_remove_restores_structure_and_appender_equals_add():
    rng = random.Random(1)
    seqs = [[rng.randint(0, 5) for _ in range(rng.randint(3, 25))] for _ in range(6)]
    full = SuffixTrie(5)
    for s in seqs:
        full.add(s)
    full.remove(seqs[2])
    full.remove(seqs[4])
    fresh = SuffixTrie(5)
    for i, s in enumerate(seqs):
        if i not in (2, 4):
            fresh.add(s)
    assert trie_structure(full.root) == trie_structure(fresh.root)
    assert full.num_nodes == fresh.num_nodes
    incremental = SuffixTrie(5)
    for i, s in enumerate(seqs):
        if i not in (2, 4):
            app = incremental.appender()
            for t in s:
                app.append(t)
    assert trie_structure(incremental.root) == trie_structure(fresh.root)
    # best child = highest count everywhere after removals
    stack = [full.root]
    while stack:
        node = stack.pop()
        if node.children:
            assert node.best.count == max(c.count for c in node.children.values())
        stack.extend(node.children.values())
    with pytest.raises(KeyError):
        fresh.remove([9, 9, 9])


def test_speculate_continues_a_stored_sequence():
    trie = SuffixTrie(16)
    seq = [5, 6, 7, 8, 9, 10, 11, 12, 13]
    trie.add(seq)
    draft, score = trie.speculate([1, 5, 6, 7], budget=4, max_spec_factor=2.0)
    assert draft == [8, 9, 10, 11]
    assert score == pytest.approx(4.0)  # each step has probability 1
    # factor * match length caps the draft: match length 3 -> at most 3 tokens with factor 1
    draft, _ = trie.speculate([5, 6, 7], budget=10, max_spec_factor=1.0)
    assert draft == [8, 9, 10]
    # stop tokens end the draft (included)
    draft, _ = trie.speculate([5, 6, 7], budget=10, max_spec_factor=3.0, stop_tokens={9})
    assert draft == [8, 9]


def test_speculate_probability_and_cutoff_hand_example():
    trie = SuffixTrie(8)
    for tail in ([1, 2, 3], [1, 2, 3], [1, 2, 4], [1, 5, 6]):
        trie.add(tail)
    # context [1]: child 2 has 3 of the 4 occurrences of "1" (p=.75), then 3 follows "1 2" twice out of three.
    draft, score = trie.speculate([1], budget=4, max_spec_factor=4.0, min_token_prob=0.1)
    assert draft == [2, 3]
    assert score == pytest.approx(0.75 + 0.75 * 2 / 3)
    draft, _ = trie.speculate([1], budget=4, max_spec_factor=4.0, min_token_prob=0.6)
    assert draft == [2]  # 0.5 < 0.6 stops after the first token


def test_speculate_scores_every_match_length():
    """Regression: a context whose longest match has no continuation must still draft from a shorter match."""
    trie = SuffixTrie(4)
    trie.add([7, 8, 9, 1, 2])  # "9 1 2" ends the sequence: no continuation from the longest match
    trie.add([3, 1, 2, 5, 6])
    draft, _ = trie.speculate([9, 1, 2], budget=3, max_spec_factor=2.0, min_token_prob=0.0)
    assert draft[:1] == [5]


def _reference_speculate(trie, context, budget, factor, offset, tau, stop=()):
    """The proposal rule written plainly: every match length, ascending, ties to the longer match."""
    best, best_score = [], 0.0
    t = len(context)
    for m in range(1, min(t, trie.max_depth - 1) + 1):
        node = trie.find(context[t - m :])
        if node is None:
            break
        cap = min(budget, math.floor(factor * m + offset))
        prob, score, draft = 1.0, 0.0, []
        while len(draft) < cap and node.best is not None:
            child = node.best
            prob *= child.count / node.count
            if prob < tau:
                break
            draft.append(child.token)
            score += prob
            node = child
            if child.token in stop:
                break
        if draft and score >= best_score:
            best, best_score = draft, score
    return best, best_score


@pytest.mark.parametrize("seed", range(4))
def test_incremental_matches_and_pruned_proposals_equal_the_plain_rule(seed):
    rng = random.Random(seed)
    trie = SuffixTrie(rng.randint(3, 8))
    for _ in range(6):
        trie.add([rng.randint(0, 3) for _ in range(rng.randint(5, 30))])
    context = [rng.randint(0, 3)]
    matches = trie.match_nodes(context)
    for _ in range(40):
        tok = rng.randint(0, 3)
        matches = trie.advance_matches(matches, tok)
        context.append(tok)
        assert [id(n) for n in matches] == [id(n) for n in trie.match_nodes(context)]
        for budget, factor, offset, tau in ((4, 1.0, 0.0, 0.1), (8, 2.0, 1.0, 0.0), (2, 0.5, 0.0, 0.3)):
            got = trie.draft_from(matches, budget, factor, offset, tau, {3})
            want = _reference_speculate(trie, context, budget, factor, offset, tau, {3})
            assert (got.tokens, got.score) == want
            assert len(got.counts) == len(got.freqs) == len(got.tokens)


@pytest.mark.parametrize(
    "call",
    [
        lambda t: t.speculate([], budget=2),
        lambda t: t.speculate([1], budget=-1),
        lambda t: t.add([1, 2.5]),
        lambda t: t.add(["a"]),
        lambda t: t.add(torch.tensor([1.0, 2.0])),
    ],
)
def test_bad_input(call):
    with pytest.raises(ValueError):
        call(SuffixTrie(4))


def test_bad_constructor_arguments():
    with pytest.raises(ValueError):
        SuffixTrie(1)
    with pytest.raises(ValueError):
        SuffixHistory(window_steps=0)
    with pytest.raises(ValueError):
        SuffixHistory(window_sightings=0)
    with pytest.raises(ValueError):
        SuffixHistory(max_problems=0)
    with pytest.raises(TypeError, match="cost_model"):
        DASDrafter(cost_model=object())
    with pytest.raises(ValueError):
        LinearRoundCost(0.0, 1.0)
    with pytest.raises(ValueError, match="max_draft_tokens"):
        DASDrafter(max_draft_tokens=0)
    with pytest.raises(ValueError):
        LengthAwareBudget(classes={"long": 4, "medium": -1, "short": 0})
    with pytest.raises(ValueError):
        LengthAwareBudget(thresholds=(0.2, 0.8))
