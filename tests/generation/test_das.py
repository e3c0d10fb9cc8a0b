"""DAS: suffix-trie invariants (insert / match / evict), proposal scoring, history window, budget policy, the drafter
in generate (lossless, drafts from earlier calls, budgets respected) and the TRL GRPO rollout hook."""

import math
import os
import random

import pytest
import torch

from hf_fastslow.generation import (
    DASDrafter,
    DASWindowCallback,
    LengthAwareBudget,
    SuffixHistory,
    SuffixTrie,
    das_rollout_func,
    speculative_generate,
)
from tests.conftest import tiny_llama

torch.set_num_threads(1)


def _brute_count(seqs, sub):
    n = len(sub)
    return sum(1 for s in seqs for i in range(len(s) - n + 1) if list(s[i : i + n]) == list(sub))


def _structure(node):
    """Canonical form of a trie (token -> (count, children)) for structural equality."""
    return {tok: (c.count, _structure(c)) for tok, c in node.children.items()}


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
    assert _structure(full.root) == _structure(fresh.root)
    assert full.num_nodes == fresh.num_nodes
    incremental = SuffixTrie(5)
    for i, s in enumerate(seqs):
        if i not in (2, 4):
            app = incremental.appender()
            for t in s:
                app.append(t)
    assert _structure(incremental.root) == _structure(fresh.root)
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
    with pytest.raises(ValueError, match="max_draft_tokens"):
        DASDrafter(max_draft_tokens=0)
    with pytest.raises(ValueError):
        LengthAwareBudget(classes={"long": 4, "medium": -1, "short": 0})
    with pytest.raises(ValueError):
        LengthAwareBudget(thresholds=(0.2, 0.8))


# ---------------------------------------------------------------------------------------------------------------------
# History window
# ---------------------------------------------------------------------------------------------------------------------
def test_window_eviction_equals_rebuild():
    rng = random.Random(3)
    hist = SuffixHistory(max_depth=6, window_steps=2)
    produced = []  # (step, problem, tokens)
    for step in range(5):
        hist.begin_step(step)
        for p in ("a", "b"):
            toks = [rng.randint(0, 4) for _ in range(rng.randint(2, 12))]
            hist.add_rollout(p, toks)
            produced.append((step, p, toks))
        for p in ("a", "b"):
            fresh = SuffixTrie(6)
            for s, q, toks in produced:
                if q == p and s > step - 2:
                    fresh.add(toks)
            assert _structure(hist.tree(p).root) == _structure(fresh.root)
    assert len(hist) == 4
    with pytest.raises(KeyError):
        hist.remove_rollout("nope")
    rid = hist.add_rollout("a", [1, 2], rollout_id="r1")
    assert rid == "r1"
    with pytest.raises(ValueError, match="unique"):
        hist.add_rollout("a", [1, 2], rollout_id="r1")
    with pytest.raises(ValueError):
        hist.begin_step(1)


def test_per_problem_cap_is_fifo():
    hist = SuffixHistory(max_depth=4, max_rollouts_per_problem=2)
    hist.add_rollout("p", [1, 2, 3], rollout_id=1)
    hist.add_rollout("p", [4, 5, 6], rollout_id=2)
    hist.add_rollout("p", [7, 8, 9], rollout_id=3)
    assert sorted(hist.rollouts("p")) == [2, 3]
    assert hist.tree("p").count([1]) == 0 and hist.tree("p").count([7, 8]) == 1


def test_window_callback_advances_history():
    hist = SuffixHistory(max_depth=4, window_steps=1)
    hist.add_rollout("p", [1, 2, 3])
    cb = DASWindowCallback(hist)

    class State:
        global_step = 1

    cb.on_step_begin(None, State(), None)
    assert hist.step == 1 and len(hist) == 0


# ---------------------------------------------------------------------------------------------------------------------
# Budget policy
# ---------------------------------------------------------------------------------------------------------------------
def test_closed_form_budget():
    cf = LengthAwareBudget.closed_form
    assert cf(100, alpha=1.0, k=0.5, n_fwd=100, b_max=32) == 0
    assert cf(80, alpha=1.0, k=0.5, n_fwd=100, b_max=32) == 0
    assert cf(1000, alpha=1.0, k=2.0, n_fwd=100, b_max=32) == 32  # unreachable: log argument <= 0
    values = [cf(length, alpha=2.0, k=0.3, n_fwd=100, b_max=10_000) for length in range(100, 2000, 50)]
    assert values == sorted(values) and values[-1] > 0
    # matches the formula where it is in range
    l, a, k, n = 400.0, 2.0, 0.3, 200.0
    assert cf(l, a, k, n, 10_000) == math.ceil(-(l / a) * math.log(1 - k * (1 - n / l)))


def test_length_classes_and_promotion():
    policy = LengthAwareBudget(classes={"long": 16, "medium": 8, "short": 0}, thresholds=(0.75, 0.25))
    known = [100, 200, 300, 400, 500]  # q75 = 400, q25 = 200
    assert policy.budget(None, 0, known[:3]) == 8  # too little history: default class
    assert policy.budget(450, 0, known) == 16
    assert policy.budget(250, 0, known) == 8
    assert policy.budget(50, 0, known) == 0
    # a short-predicted request is promoted as it grows
    assert policy.budget(50, 210, known) == 8
    assert policy.budget(50, 420, known) == 16


def test_quota_split():
    split = LengthAwareBudget.split_quota
    assert split([4, 4, 4], [True, False, False], quota=20) == [4, 4, 4]
    out = split([16, 16, 8, 8], [True, True, False, False], quota=24)
    assert out[:2] == [12, 12] and out[2:] == [0, 0]
    out = split([4, 8, 8], [True, False, False], quota=12)
    assert out[0] == 4 and sum(out) <= 12 and all(o <= b for o, b in zip(out, [4, 8, 8]))
    out = split([16, 16, 16], [True, True, True], quota=2)
    assert all(o >= 1 for o in out)  # long rows keep at least one token
    with pytest.raises(ValueError):
        split([1], [True], quota=-1)


# ---------------------------------------------------------------------------------------------------------------------
# Drafter in generate
# ---------------------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def model():
    return tiny_llama()


def _batch():
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(3, 128, (3, 10), generator=g)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    mask[2, :2] = 0
    ids[mask == 0] = 0
    return ids, mask


class _BudgetSpy(DASDrafter):
    def propose(self, context):
        drafts = super().propose(context)
        for d, b in zip(drafts, context.budgets):
            self.violations = getattr(self, "violations", 0) + int(len(d) > b)
        self.max_len = max([getattr(self, "max_len", 0)] + [len(d) for d in drafts])
        return drafts


def test_das_lossless_and_learns_across_calls(model):
    ids, mask = _batch()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=48, do_sample=False)
    drafter = _BudgetSpy(max_draft_tokens=6, budget=None)
    forwards = []
    for epoch in range(3):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=48, do_sample=False,
                             custom_generate=speculative_generate, drafter=drafter)
        assert torch.equal(out, ref)
        forwards.append(drafter.last_stats.target_forwards)
        drafter.advance_window()
    assert len(drafter.history) == 9  # window of 4 steps keeps all three epochs (3 rows each)
    assert forwards[1] < forwards[0]  # the second epoch drafts from the first epoch's rollouts
    assert drafter.violations == 0 and drafter.max_len <= 6


def test_length_policy_limits_drafts(model):
    ids, mask = _batch()
    hist = SuffixHistory(max_depth=16)
    policy = LengthAwareBudget(classes={"long": 3, "medium": 2, "short": 0}, min_problems=1)
    drafter = _BudgetSpy(history=hist, max_draft_tokens=8, budget=policy)
    for _ in range(2):
        model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                       custom_generate=speculative_generate, drafter=drafter)
    assert drafter.max_len <= 3
    assert hist.known_lengths()


def test_das_sampling_runs_with_siblings(model):
    ids, _ = _batch()
    torch.manual_seed(0)
    drafter = DASDrafter()
    rows = ids[:1].expand(4, -1)  # four GRPO-style siblings of one prompt
    out = model.generate(rows, max_new_tokens=24, do_sample=True, custom_generate=speculative_generate,
                         drafter=drafter)
    assert out.shape[0] == 4
    assert len(drafter.history) == 4 and len(drafter.history.problems) == 1


def test_grpo_rollout_func_smoke(tmp_path):
    """Two GRPO steps with DAS rollouts: one completion per (prompt x generation), history follows the steps."""
    pytest.importorskip("trl")
    from datasets import Dataset
    from transformers import AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    try:
        from hf_fastslow import default_model_path

        tok = AutoTokenizer.from_pretrained(default_model_path())
    except ImportError as err:
        pytest.skip(str(err))
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    model = tiny_llama(vocab=len(tok))
    for cfg in (model.config, model.generation_config):
        cfg.pad_token_id, cfg.eos_token_id, cfg.bos_token_id = tok.pad_token_id, tok.eos_token_id, tok.bos_token_id
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + {i}?"}]} for i in range(4)])

    def reward(completions, **kwargs):
        return [len(c[0]["content"]) / 100 for c in completions]

    args = GRPOConfig(output_dir=str(tmp_path), use_cpu=True, bf16=False, per_device_train_batch_size=4,
                      num_generations=4, max_completion_length=12, max_steps=2, logging_steps=1, report_to=[],
                      save_strategy="no")
    drafter = DASDrafter(history=SuffixHistory(window_steps=1))
    rollout = das_rollout_func(drafter)
    seen = []

    def counting_rollout(prompts, trainer):
        out = rollout(prompts, trainer)
        seen.append((len(prompts), len(out["completion_ids"]), trainer.state.global_step))
        assert all(0 < len(c) <= 12 for c in out["completion_ids"])
        return out

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          rollout_func=counting_rollout)
    trainer.train()
    assert [(p, c) for p, c, _ in seen] == [(4, 4), (4, 4)]  # num_generations rows per prompt, one completion each
    assert drafter.history.step == 1 and len(drafter.history) == 4  # window of 1 step: step-0 rollouts evicted
    assert drafter.stats.sequences == 8
