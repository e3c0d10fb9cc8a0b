"""DAS: history window, budget policy, the drafter
in generate (lossless, drafts from earlier calls, budgets respected), cost-aware drafting. The TRL glue is tested in
tests/trainers/test_das_rollout.py."""

import math
import random

import pytest
import torch

from hf_fastslow.generation import (
    DASDrafter,
    LengthAwareBudget,
    SuffixHistory,
    SuffixTrie,
    problem_id_for,
    speculative_generate,
)
from hf_fastslow.generation import das as das_module
from hf_fastslow.generation.das import (
    DraftAcceptanceModel,
    LinearRoundCost,
    OnlineRoundCost,
    choose_verify_width,
)
from tests.conftest import tiny_llama
from tests.generation.test_suffix_trie import trie_structure

FREE = LinearRoundCost(1.0, 0.0)  # verify width costs nothing: every draft is verified (deterministic tests)

torch.set_num_threads(1)


# ---------------------------------------------------------------------------------------------------------------------
# History window
# ---------------------------------------------------------------------------------------------------------------------
def test_step_window_eviction_equals_rebuild():
    rng = random.Random(3)
    hist = SuffixHistory(max_depth=6, window_steps=2, window_sightings=100)
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
            assert trie_structure(hist.tree(p).root) == trie_structure(fresh.root)
    assert len(hist) == 4
    with pytest.raises(KeyError):
        hist.remove_rollout("nope")
    rid = hist.add_rollout("a", [1, 2], rollout_id="r1")
    assert rid == "r1"
    with pytest.raises(ValueError, match="unique"):
        hist.add_rollout("a", [1, 2], rollout_id="r1")
    with pytest.raises(ValueError):
        hist.begin_step(1)


def test_window_counts_sightings_not_steps():
    """An epoch over a dataset: each prompt returns after many rounds and steps; its trie always equals one rebuilt from
    the rollouts of its last `window_sightings` sightings (the running one included), whatever happened in between."""
    rng = random.Random(5)
    hist = SuffixHistory(max_depth=5, window_sightings=2, max_rollouts_per_problem=100)
    produced = {}  # problem -> list of (sighting, tokens)
    problems = [f"p{i}" for i in range(6)]
    for epoch in range(4):
        for batch in range(3):  # one generation batch (round) per two prompts, three siblings each
            hist.advance_window()  # a training step: a new round
            for p in problems[2 * batch : 2 * batch + 2]:
                before = trie_structure(hist.tree(p).root) if hist.tree(p) else {}
                if epoch >= 2:  # a returning prompt still drafts from both earlier sightings until a sibling lands
                    expect = SuffixTrie(5)
                    for s, toks in produced[p]:
                        if s >= epoch - 2:
                            expect.add(toks)
                    assert before == trie_structure(expect.root)
                for _ in range(3):
                    toks = [rng.randint(0, 4) for _ in range(rng.randint(2, 9))]
                    hist.add_rollout(p, toks, response_length=len(toks))
                    produced.setdefault(p, []).append((epoch, toks))
                    fresh = SuffixTrie(5)
                    for s, old in produced[p]:
                        if s > epoch - 2:
                            fresh.add(old)
                    assert trie_structure(hist.tree(p).root) == trie_structure(fresh.root)
                assert len(hist.sightings(p)) == min(epoch + 1, 2)
    assert hist.step == 12 and len(hist) == 6 * 2 * 3


def test_history_memory_bounds_and_sorted_lengths():
    hist = SuffixHistory(max_depth=4, max_problems=3, length_ema=1.0)
    for i, p in enumerate("abcd"):
        hist.begin_round()
        hist.add_rollout(p, [1, 2, 3], response_length=10 * (i + 1))
    assert hist.problems == ["b", "c", "d"]  # least recently sighted problem left, with its length
    assert hist.known_lengths() == [20.0, 30.0, 40.0] and hist.predicted_length("a") is None
    version = hist.lengths_version
    hist.begin_round()
    hist.add_rollout("b", [4, 5], response_length=5)  # "b" is now the most recent and the shortest
    assert hist.lengths_version > version
    assert hist.known_lengths() == [5.0, 30.0, 40.0]
    hist.add_rollout("e", [6], response_length=7)
    assert hist.problems == ["d", "b", "e"] and hist.known_lengths() == [5.0, 7.0, 40.0]
    for rid in list(hist.rollouts("d")):
        hist.remove_rollout(rid)  # a problem whose last rollout leaves takes its trie and length with it
    assert hist.problems == ["b", "e"] and hist.known_lengths() == [5.0, 7.0] and hist.tree("d") is None


def test_per_problem_cap_is_fifo():
    hist = SuffixHistory(max_depth=4, max_rollouts_per_problem=2)
    hist.add_rollout("p", [1, 2, 3], rollout_id=1)
    hist.add_rollout("p", [4, 5, 6], rollout_id=2)
    hist.add_rollout("p", [7, 8, 9], rollout_id=3)
    assert sorted(hist.rollouts("p")) == [2, 3]
    assert hist.tree("p").count([1]) == 0 and hist.tree("p").count([7, 8]) == 1


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
    length, a, k, n = 400.0, 2.0, 0.3, 200.0
    assert cf(length, a, k, n, 10_000) == math.ceil(-(length / a) * math.log(1 - k * (1 - n / length)))


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


def test_length_cutoffs_from_sorted_lengths():
    policy = LengthAwareBudget(thresholds=(0.75, 0.25), min_problems=2)
    assert policy.cutoffs([1.0]) is None
    assert policy.cutoffs([100.0, 200.0, 300.0, 400.0, 500.0]) == (400.0, 200.0)
    assert policy.class_of(None, 0, None) == policy.default_class
    assert policy.class_of(350, 0, (400.0, 200.0)) == "medium" and policy.class_of(10, 450, (400.0, 200.0)) == "long"


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
    drafter = _BudgetSpy(max_draft_tokens=6, budget=None, cost_model=FREE)
    forwards = []
    for _epoch in range(3):
        out = model.generate(ids, attention_mask=mask, max_new_tokens=48, do_sample=False,
                             custom_generate=speculative_generate, drafter=drafter)
        assert torch.equal(out, ref)
        forwards.append(drafter.last_stats.target_forwards)
        drafter.advance_window()
    assert len(drafter.history) == 6  # window of 2 sightings: the last two calls' rows (3 each)
    assert forwards[1] < forwards[0]  # the second epoch drafts from the first epoch's rollouts
    assert drafter.violations == 0 and drafter.max_len <= 6
    # The default drafter (cost-aware, timed on this machine) is lossless whatever it decides.
    out = model.generate(ids, attention_mask=mask, max_new_tokens=48, do_sample=False,
                         custom_generate=speculative_generate, drafter=DASDrafter(history=drafter.history))
    assert torch.equal(out, ref)


def test_self_drafting_on_an_empty_history(model):
    """A cold history (nothing recorded) still drafts from the request's own tokens when the text repeats."""
    prompt = torch.tensor([[5, 6, 7, 8, 9] * 5])
    ref = model.generate(prompt, max_new_tokens=40, do_sample=False)
    assert len(set(ref[0, -20:].tolist())) < 10  # the tiny model falls into a loop: self-drafting has material
    drafter = DASDrafter(budget=None, record_rollouts=False, cost_model=FREE)
    out = model.generate(prompt, max_new_tokens=40, do_sample=False, custom_generate=speculative_generate,
                         drafter=drafter)
    assert torch.equal(out, ref)
    assert len(drafter.history) == 0
    assert drafter.last_stats.accepted >= 10, drafter.last_stats


class _LiveTrieSpy(DASDrafter):
    """Checks at every round: each live request's trie holds its tokens exactly once, and rows without a budget
    (finished) have no live trie."""

    def propose(self, context):
        drafts = super().propose(context)
        self.live_ids = getattr(self, "live_ids", set()) | set(self._live)
        for i, rid in enumerate(context.request_ids):
            state = self._live.get(rid)
            if context.budgets[i] == 0:
                assert state is None, f"row {i} has no budget but a live trie"
            elif state is not None:
                indexed = sum(c.count for c in state.trie.root.children.values())
                assert indexed == state.seen == context.input_ids[i].shape[0], (indexed, state.seen)
                for tok in set(context.input_ids[i].tolist()):
                    assert state.trie.count([tok]) == context.input_ids[i].tolist().count(tok)
        self.rounds_seen = getattr(self, "rounds_seen", 0) + 1
        return drafts


class _MatchSpy(DASDrafter):
    """Checks at every round that each row's cached match nodes in the problem trie are the recomputed ones."""

    def propose(self, context):
        drafts = super().propose(context)
        for i, rid in enumerate(context.request_ids):
            state = self._live.get(rid)
            tree = self.history.tree(context.problem_ids[i])
            fresh = state is not None and state.hist_seen == context.input_ids[i].shape[0]  # matched this round
            if fresh and tree is not None and state.hist_trie is tree:
                ctx = context.input_ids[i][-(self.history.max_depth - 1) :].tolist()
                assert [id(n) for n in state.hist_matches] == [id(n) for n in tree.match_nodes(ctx)]
                self.checked = getattr(self, "checked", 0) + 1
        return drafts


def test_cached_history_matches_follow_the_trie():
    """A sibling's rollout lands between two rounds and holds the running row's context: the row's cached match nodes
    are recomputed, so the next round drafts the sibling's continuation."""
    from hf_fastslow.generation import DraftContext

    drafter = _MatchSpy(history=SuffixHistory(max_depth=8), budget=None, cost_model=FREE, max_draft_tokens=4,
                        use_local=False)
    drafter.history.add_rollout("p", [9, 9, 1, 2])  # an unrelated rollout: the trie exists, "3 4 5" is unknown
    drafter.reset()

    def round_(tokens, r):
        ctx = DraftContext(input_ids=[torch.tensor(tokens)], budgets=[4], request_ids=["row"], problem_ids=["p"],
                           prompt_lengths=[2], round=r)
        return drafter.propose(ctx)[0].tolist()

    assert round_([1, 2, 3], 1) == []
    drafter.history.add_rollout("p", [1, 2, 3, 4, 5, 6, 7, 8])  # a sibling finished
    assert round_([1, 2, 3, 4], 2) == [5, 6, 7, 8]
    assert drafter.checked == 2


def test_live_tries_index_each_token_once_and_finished_rows_are_left_alone(model):
    ids, mask = _batch()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False)
    eos = int(ref[0, ids.shape[1]])  # row 0 stops at its first token; the others run on
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=eos)
    drafter = _LiveTrieSpy(budget=None, cost_model=FREE)
    created = []
    original = das_module._LiveRequest.__init__

    def counting_init(self, *args):
        created.append(1)
        original(self, *args)

    das_module._LiveRequest.__init__ = counting_init
    try:
        out = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, eos_token_id=eos,
                             custom_generate=speculative_generate, drafter=drafter)
    finally:
        das_module._LiveRequest.__init__ = original
    assert torch.equal(out, ref)
    assert drafter.rounds_seen > 5
    assert len(created) == len(drafter.live_ids) <= 2  # one trie per running row, none rebuilt for finished rows


def test_length_policy_limits_drafts(model):
    ids, mask = _batch()
    hist = SuffixHistory(max_depth=16)
    policy = LengthAwareBudget(classes={"long": 3, "medium": 2, "short": 0}, min_problems=1)
    drafter = _BudgetSpy(history=hist, max_draft_tokens=8, budget=policy, cost_model=FREE)
    for _ in range(2):
        model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                       custom_generate=speculative_generate, drafter=drafter)
    assert drafter.max_len <= 3
    assert hist.known_lengths()


def test_length_quantiles_are_computed_once_per_change(model):
    """Cut-offs are recomputed only when a length estimate changed, not per row and round."""
    ids, mask = _batch()
    hist = SuffixHistory(max_depth=16)
    for p in range(6):
        hist.add_rollout(("seed", p), [1, 2, 3], response_length=5 * (p + 1))
    calls = []

    class CountingBudget(LengthAwareBudget):
        def cutoffs(self, sorted_lengths):
            calls.append(len(sorted_lengths))
            return super().cutoffs(sorted_lengths)

        @staticmethod
        def _quantile(sorted_values, q):
            calls.append(-1)
            return LengthAwareBudget._quantile(sorted_values, q)

    drafter = DASDrafter(history=hist, budget=CountingBudget(min_problems=1), cost_model=FREE)
    model.generate(ids, attention_mask=mask, max_new_tokens=24, do_sample=False,
                   custom_generate=speculative_generate, drafter=drafter)
    assert drafter.last_stats.rounds > 30
    # Once before the first round, then once after each round in which a row finished (3 rows, 3 new problems).
    computed = [c for c in calls if c >= 0]
    assert computed[0] == 6 and len(computed) <= 3 and calls.count(-1) == 2 * len(computed)


def test_das_sampling_preserves_distribution_and_drafts_from_siblings():
    """T=1 sampling with DAS drafts (warm history of the same prompt): the joint law of tokens 2-4 is the target's
    (chi-square against exact enumeration), drafts are accepted, and the history holds the siblings."""
    vocab = 6
    model = tiny_llama(num_layers=2, hidden=32, vocab=vocab, seed=3)
    with torch.no_grad():
        model.lm_head.weight.mul_(6.0)  # peaked distributions: siblings agree often enough to draft
    model.generation_config.eos_token_id = None
    prompt = torch.tensor([[3, 4, 5, 3]])
    seqs = torch.cartesian_prod(*[torch.arange(vocab)] * 3)
    with torch.no_grad():
        logits = model(torch.cat([prompt.expand(len(seqs), -1), seqs], 1)).logits[:, -4:]
    logp = torch.log_softmax(logits.double(), -1)
    joint = sum(logp[:, j].gather(1, seqs[:, j : j + 1]) for j in range(3)).squeeze(1)
    expected = (joint[:, None] + logp[:, 3]).exp().reshape(vocab, vocab, vocab, vocab).sum(0).reshape(-1)

    drafter = DASDrafter(budget=None, cost_model=FREE, max_draft_tokens=3, min_token_prob=0.0)
    kwargs = dict(max_new_tokens=4, do_sample=True, temperature=1.0, top_k=None, top_p=None,
                  custom_generate=speculative_generate, drafter=drafter)
    model.generate(prompt.expand(64, -1), **kwargs)  # epoch 0: the history learns the siblings
    assert len(drafter.history) == 32 and drafter.history.problems == [problem_id_for(prompt[0])]
    n = 3000
    out = model.generate(prompt.expand(n, -1), **kwargs)
    assert drafter.last_stats.accepted > 300 and drafter.last_stats.proposed > n  # history drafts were verified
    tail = out[:, -3:]
    observed = torch.bincount(tail[:, 0] * vocab * vocab + tail[:, 1] * vocab + tail[:, 2], minlength=vocab**3)
    assert _chi2_p_value(observed.double(), expected * n) > 0.001


def _chi2_p_value(observed, expected_counts):
    small = expected_counts < 5  # pool cells with small expectation into one bin (chi-square validity)
    obs = torch.cat([observed[~small], observed[small].sum()[None]])
    exp = torch.cat([expected_counts[~small], expected_counts[small].sum()[None]])
    chi2 = float(((obs - exp) ** 2 / exp.clamp_min(1e-12)).sum())
    dof = len(obs) - 1
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(chi2 / 2)))


# ---------------------------------------------------------------------------------------------------------------------
# Cost-aware drafting
# ---------------------------------------------------------------------------------------------------------------------
def test_choose_verify_width_rule():
    """One row: draft k tokens only if E[accepted | k] > cost(k + 1) / cost(1) - 1; the best-paying k wins."""
    expected = [[0.0, 0.5, 0.9]]
    cheap = LinearRoundCost(1.0, 0.25)  # cost(1) = 1.25, cost(2) = 1.5, cost(3) = 1.75
    assert choose_verify_width(expected, 1, cheap.cost) == 3  # 1.9 / 1.75 > 1.5 / 1.5 > 1 / 1.25
    dear = LinearRoundCost(1.0, 1.0)  # cost(k + 1) / cost(1) - 1 = k / 2: 0.5 and 0.9 do not beat 0.5 and 1.0
    assert choose_verify_width(expected, 1, dear.cost) == 1
    assert choose_verify_width([[0.0, 0.51]], 1, dear.cost) == 2
    assert choose_verify_width([], 4, dear.cost) == 1
    # Batch of 4 padded rows: one confident row does not pay for widening all four; four do.
    batch = LinearRoundCost(1.0, 0.1)  # cost(4) = 1.4, cost(8) = 1.8: needs sum of E > 4 * (1.8 / 1.4 - 1) = 1.14
    assert choose_verify_width([[0.0, 0.9], [0.0], [0.0], [0.0]], 4, batch.cost) == 1
    assert choose_verify_width([[0.0, 0.9], [0.0, 0.3]], 4, batch.cost) == 2
    # Once a width is paid every row drafts up to it: longer drafts of other rows count.
    assert choose_verify_width([[0.0, 0.3, 0.6, 0.9], [0.0, 0.9, 1.8, 2.7]], 2, batch.cost) == 4


def test_online_round_cost_learns_a_linear_curve():
    cost = OnlineRoundCost(prior_token_ratio=0.05)
    assert cost.cost(21) / cost.cost(1) == pytest.approx(2.05 / 1.05)  # prior shape before any data
    for _ in range(5):
        cost.observe(8, 0.4)
    # One size measured: the prior's shape through the measured point.
    assert cost.cost(8) == pytest.approx(0.4) and cost.cost(16) / cost.cost(8) == pytest.approx(1.8 / 1.4)
    cost = OnlineRoundCost(prior_token_ratio=0.05)
    truth = LinearRoundCost(0.1, 0.02)
    rng = random.Random(0)
    for _ in range(16):
        for n in (8, 16, 40):
            # a shared machine: most rounds near the truth, one in five slowed 3x by another process
            cost.observe(n, truth.cost(n) * (3.0 if rng.random() < 0.2 else rng.uniform(0.97, 1.03)))
    base, per_token = cost.coefficients()
    assert per_token == pytest.approx(0.02, rel=0.1)  # the intercept is an extrapolation: the prior pulls it
    for n in (8, 16, 40):
        assert cost.cost(n) == pytest.approx(truth.cost(n), rel=0.05)
    flat = OnlineRoundCost()
    for _ in range(10):
        flat.observe(4, 1.0)
        flat.observe(64, 0.9)  # wider measured faster (noise): never a negative slope
    assert flat.coefficients()[1] == 0.0
    steep = OnlineRoundCost()
    for _ in range(10):
        steep.observe(1, 0.1)
        steep.observe(2, 0.5)  # noise: one more token "costs" 4x the pass; the slope is capped at the base
    base, per_token = steep.coefficients()
    assert per_token == base and steep.cost(2) / steep.cost(1) == pytest.approx(1.5)


def test_acceptance_model_learns_per_cell():
    model = DraftAcceptanceModel(prior_weight=2.0)
    strong = DraftAcceptanceModel.cell(True, "history", 12, 1.0)
    weak = DraftAcceptanceModel.cell(True, "history", 1, 0.3)
    assert model.prob(strong) > model.prob(weak)  # prior: frequency shrunk by the count
    assert model.expected_accepted([strong, strong]) == pytest.approx(
        [0.0, model.prob(strong), model.prob(strong) * (1 + model.prob(strong))])
    for _ in range(50):
        model.update([weak, weak, weak], 3)
        model.update([strong, strong], 0)  # first rejected; the second was never judged
    assert model.prob(weak) > 0.9 and model.prob(strong) < 0.1
    assert DraftAcceptanceModel.cell(False, "local", 3, 0.5) != DraftAcceptanceModel.cell(True, "local", 3, 0.5)


def test_cost_aware_drafter_in_generate(model):
    """Free width: every draft is verified; a prohibitive width: nothing is proposed and decoding is plain. Both
    lossless. The drafter times rounds and reports (rows x width, seconds) to its cost model."""
    ids, mask = _batch()
    ref = model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False)
    history = SuffixHistory()
    warm = DASDrafter(history=history, budget=None, cost_model=FREE)
    model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                   custom_generate=speculative_generate, drafter=warm)

    class Recorder(LinearRoundCost):
        def __init__(self, per_token):
            super().__init__(1.0, per_token)
            self.seen = []

        def observe(self, tokens, seconds):
            self.seen.append((tokens, seconds))

    results = {}
    for name, per_token in (("free", 0.0), ("prohibitive", 100.0)):
        cost = Recorder(per_token)
        drafter = DASDrafter(history=history, budget=None, cost_model=cost, record_rollouts=False, explore_every=0)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=32, do_sample=False,
                             custom_generate=speculative_generate, drafter=drafter)
        assert torch.equal(out, ref)
        results[name] = (drafter.last_stats, drafter, cost)
    free_stats, free, free_cost = results["free"]
    dear_stats, dear, dear_cost = results["prohibitive"]
    assert free_stats.proposed > 0 and free.drafted_rounds > 0 and free.skipped_rounds == 0
    assert dear_stats.proposed == 0 and dear.drafted_rounds == 0 and dear.skipped_rounds > 0
    assert free_stats.target_forwards < dear_stats.target_forwards == 32  # prefill + 31 plain rounds
    # Every round but the last is timed; a pass feeds rows x width tokens.
    assert len(dear_cost.seen) == dear_stats.target_forwards - 2 and all(n == 3 for n, _ in dear_cost.seen)
    assert all(s > 0 for _, s in dear_cost.seen)
    assert len(free_cost.seen) == free_stats.target_forwards - 2
    assert any(n > 3 and n % 3 == 0 for n, _ in free_cost.seen)
