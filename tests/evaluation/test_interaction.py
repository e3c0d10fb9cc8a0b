import math

import pytest
import torch

from hf_fastslow.evaluation.interaction import (
    CooPPolicy,
    GroundTruthOracle,
    InteractionState,
    InterventionStats,
    OracleGreedyPolicy,
    RandomPolicy,
    StaticGreedyPolicy,
    UncertaintyPolicy,
    area_under_curve,
    binary_entropy,
    group_membership,
    run_interaction,
    tune_coop,
)


def logit(p):
    return math.log(p / (1 - p))


def problem(batch=40, k=6, m=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    head = torch.nn.Linear(k, m)
    with torch.no_grad():
        head.weight.copy_(torch.randn(m, k, generator=gen) * 3)
        head.bias.copy_(torch.randn(m, generator=gen))
    concepts = (torch.rand(batch, k, generator=gen) < 0.5).float()
    logits = torch.randn(batch, k, generator=gen) * 2 + (concepts * 2 - 1)
    labels = head(concepts).argmax(-1).detach()
    groups = [[0, 3], [1], [2, 4, 5]]
    return head, logits, concepts, labels, groups


def hand_state(revealed=None):
    """k = 3 concepts in groups {0} and {1, 2}; two classes; f(c) = [2 c0, c1 + c2]; p = [0.5, 0.9, 0.2]."""
    head = torch.nn.Linear(3, 2, bias=False)
    with torch.no_grad():
        head.weight.copy_(torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, 1.0]]))
    probs = torch.tensor([[0.5, 0.9, 0.2]])
    stats = InterventionStats("probs", low=0.1, high=0.9)
    revealed = torch.zeros(1, 3, dtype=torch.bool) if revealed is None else revealed
    return InteractionState(probs=probs, current=probs.clone(), revealed=revealed,
                            asked=torch.zeros(1, 2, dtype=torch.bool), membership=group_membership([[0], [1, 2]], 3),
                            label_head=head, stats=stats)


def test_coop_score_on_a_hand_checked_case():
    state = hand_state()
    # f(p) = [1.0, 1.1]: yhat = 1, pi0 = sigmoid(0.1)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    h = lambda p: -p * math.log(p) - (1 - p) * math.log(1 - p)  # noqa: E731
    pi0 = sig(0.1)
    # group {0}: q = 0.5; c0 -> 0.9 gives f = [1.8, 1.1], c0 -> 0.1 gives f = [0.2, 1.1]
    i0 = 0.5 * abs(sig(-0.7) - pi0) + 0.5 * abs(sig(0.9) - pi0)
    # group {1, 2}: q = 0.55; both -> 0.9 gives f = [1.0, 1.8], both -> 0.1 gives f = [1.0, 0.2]
    i1 = 0.55 * abs(sig(0.8) - pi0) + 0.45 * abs(sig(-0.8) - pi0)
    assert i0 == pytest.approx(0.189569, abs=1e-6) and i1 == pytest.approx(0.187476, abs=1e-6)
    u = [h(0.5), h(0.9) + h(0.2)]
    assert u == pytest.approx([0.693147, 0.825485], abs=1e-6)
    policy = CooPPolicy(beta=1.0)
    torch.testing.assert_close(policy.uncertainty(state), torch.tensor([u]), rtol=0, atol=1e-6)
    torch.testing.assert_close(policy.influence_scores(state), torch.tensor([[i0, i1]]), rtol=0, atol=1e-6)
    torch.testing.assert_close(policy.scores(state), torch.tensor([[u[0] + i0, u[1] + i1]]), rtol=0, atol=1e-6)
    assert policy.select(state).item() == 1            # 0.8827 < 1.0130
    assert CooPPolicy(beta=100.0).select(state).item() == 0   # influence decides: 19.650 > 19.573
    assert CooPPolicy(beta=1.0, gamma=0.5, costs=[0.0, 1.0]).select(state).item() == 0  # 0.8827 > 0.5130
    signed = CooPPolicy(beta=1.0, influence="signed").influence_scores(state)
    expected = 0.5 * (sig(-0.7) - pi0) + 0.5 * (sig(0.9) - pi0)
    assert signed[0, 0].item() == pytest.approx(expected, abs=1e-6)
    # the variants for groups of several concepts: per concept (v2) and the exact expectation over joint answers
    v2 = CooPPolicy(influence="confidence_change_v2").influence_scores(state)
    v2_pair = 0.9 * 0.0 + 0.1 * abs(sig(-0.7) - pi0) + 0.2 * abs(sig(0.8) - pi0) + 0.8 * abs(0.5 - pi0)
    torch.testing.assert_close(v2, torch.tensor([[i0, v2_pair]]), rtol=0, atol=1e-6)
    expected = CooPPolicy(influence="expected_confidence_change").influence_scores(state)
    # answers (c1, c2): (0, 0) w 0.08 -> f = [1, 0.2]; (1, 0) w 0.72 and (0, 1) w 0.02 -> f = [1, 1]; (1, 1) w 0.18
    pair = 0.08 * abs(sig(-0.8) - pi0) + 0.74 * abs(0.5 - pi0) + 0.18 * abs(sig(0.8) - pi0)
    torch.testing.assert_close(expected, torch.tensor([[i0, pair]]), rtol=0, atol=1e-6)
    def sym_kl(a, b):  # two-class distributions given by the probability of class 1
        return sum((x - y) * (math.log(x) - math.log(y)) for x, y in ((a, b), (1 - a, 1 - b)))

    kld = CooPPolicy(influence="expected_kld").influence_scores(state)
    kld0 = 0.5 * sym_kl(sig(-0.7), pi0) + 0.5 * sym_kl(sig(0.9), pi0)
    kld1 = 0.08 * sym_kl(sig(-0.8), pi0) + 0.74 * sym_kl(0.5, pi0) + 0.18 * sym_kl(sig(0.8), pi0)
    torch.testing.assert_close(kld, torch.tensor([[kld0, kld1]]), rtol=0, atol=1e-6)
    # a concept already revealed no longer counts towards its group's uncertainty
    partly = hand_state(revealed=torch.tensor([[False, True, False]]))
    assert policy.uncertainty(partly)[0, 1].item() == pytest.approx(h(0.2), abs=1e-6)
    # ... and keeps its revealed value in the candidates built for its group (here revealed absent: r(0) = 0.1)
    partly.current[0, 1] = 0.1
    assert partly.with_group(0.9)[0, 1].tolist() == pytest.approx([0.5, 0.1, 0.9])


@torch.no_grad()
def naive_coop_scores(state, beta):
    """One example, one group at a time, in plain Python."""
    batch, n_groups = state.asked.shape
    scores = torch.full((batch, n_groups), float("-inf"))
    for i in range(batch):
        base = torch.softmax(state.label_head(state.current[i]), -1)
        yhat = int(base.argmax())
        for g in range(n_groups):
            if state.asked[i, g]:
                continue
            members = [j for j in range(state.probs.shape[1]) if state.membership[g, j]]
            u = sum(float(binary_entropy(state.probs[i, j])) for j in members if not state.revealed[i, j])
            q = sum(float(state.probs[i, j]) for j in members) / len(members)
            change = []
            for value in (state.stats.high, state.stats.low):
                c = state.current[i].clone()
                for j in members:
                    if not state.revealed[i, j]:
                        c[j] = value
                change.append(abs(float(torch.softmax(state.label_head(c), -1)[yhat]) - float(base[yhat])))
            scores[i, g] = u + beta * (q * change[0] + (1 - q) * change[1])
    return scores


class Recording(CooPPolicy):
    def select(self, state):
        self.seen.append((state.asked.clone(), state.revealed.clone(), self.scores(state), state))
        return super().select(state)


def test_vectorised_coop_equals_a_per_example_per_group_loop_at_every_step():
    head, logits, concepts, labels, groups = problem()
    stats = InterventionStats.fit(logits)
    policy = Recording(beta=2.0)
    policy.seen = []
    trace = run_interaction(head, policy, concept_logits=logits, concept_labels=concepts, labels=labels,
                            groups=groups, stats=stats)
    assert len(policy.seen) == 3
    for step, (asked, revealed, scores, state) in enumerate(policy.seen):
        state = InteractionState(probs=state.probs, current=torch.where(revealed, stats.values(concepts),
                                                                        stats.bottleneck(logits)),
                                 revealed=revealed, asked=asked, membership=state.membership, label_head=head,
                                 stats=stats)
        naive = naive_coop_scores(state, 2.0)
        torch.testing.assert_close(scores.masked_fill(asked, float("-inf")), naive, rtol=0, atol=1e-5)
        assert torch.equal(naive.argmax(1), trace.chosen[step])


def test_beta_zero_is_the_argmax_of_summed_entropy():
    head, logits, concepts, labels, groups = problem()
    membership = group_membership(groups, logits.shape[1])
    summed = binary_entropy(torch.sigmoid(logits)) @ membership.T.float()
    trace = run_interaction(head, UncertaintyPolicy(), concept_logits=logits, concept_labels=concepts,
                            labels=labels, groups=groups, stats=InterventionStats.fit(logits), steps=1)
    assert torch.equal(trace.chosen[0], summed.argmax(1))


@pytest.mark.parametrize("fmt", ["probs", "logits", "binary"])
def test_all_groups_revealed_gives_the_oracle_concept_prediction(fmt):
    head, logits, concepts, labels, groups = problem()
    stats = InterventionStats.fit(logits, fmt=fmt)
    for policy in (CooPPolicy(beta=1.0), RandomPolicy(seed=1), UncertaintyPolicy(), OracleGreedyPolicy(),
                   StaticGreedyPolicy(order=[2, 0, 1])):
        trace = run_interaction(head, policy, concept_logits=logits, concept_labels=concepts, labels=labels,
                                groups=groups, stats=stats, steps=10)  # more steps than groups: stops at K = 3
        assert trace.chosen.shape == (3, len(labels)) and len(trace.accuracy_per_step) == 4
        assert torch.equal(trace.predictions[0], head(stats.bottleneck(logits)).argmax(-1))
        assert torch.equal(trace.predictions[-1], head(stats.values(concepts)).argmax(-1))
        assert torch.equal(torch.sort(trace.chosen, dim=0).values, torch.arange(3)[:, None].expand(3, len(labels)))
    if fmt == "binary":  # revealing r(c) = c exactly: the label head on the true concepts, which defines the labels
        assert trace.accuracy_per_step[-1] == 1.0
    else:
        assert stats.low < stats.high


def test_invisible_concepts_are_never_revealed_but_the_query_is_spent():
    head, logits, concepts, labels, groups = problem(batch=8)
    visible = torch.ones_like(concepts, dtype=torch.bool)
    visible[:, 3] = False
    trace = run_interaction(head, CooPPolicy(beta=1.0), concept_logits=logits, concept_labels=concepts,
                            labels=labels, groups=groups, stats=InterventionStats.fit(logits),
                            oracle=GroundTruthOracle(visible=visible))
    assert not trace.revealed[:, 3].any() and trace.revealed[:, [0, 1, 2, 4, 5]].all()
    assert trace.chosen.shape[0] == 3


def test_random_is_reproducible_and_the_oracle_bound_beats_it():
    head, logits, concepts, labels, groups = problem(batch=200)
    stats = InterventionStats.fit(logits)
    kw = dict(concept_logits=logits, concept_labels=concepts, labels=labels, groups=groups, stats=stats)
    a, b = RandomPolicy(seed=5), RandomPolicy(seed=5)
    first, second = run_interaction(head, a, **kw), run_interaction(head, b, **kw)
    assert torch.equal(first.chosen, second.chosen)
    assert torch.equal(run_interaction(head, a, **kw).chosen, first.chosen)  # reset per run
    assert not torch.equal(run_interaction(head, RandomPolicy(seed=6), **kw).chosen, first.chosen)
    oracle = run_interaction(head, OracleGreedyPolicy(), **kw)
    assert oracle.area_under_curve() > first.area_under_curve()
    assert all(o >= r for o, r in zip(oracle.accuracy_per_step, first.accuracy_per_step))


def test_static_greedy_fits_a_permutation_whose_first_group_is_the_best_single_group():
    head, logits, concepts, labels, groups = problem(batch=100)
    stats = InterventionStats.fit(logits)
    static = StaticGreedyPolicy().fit(head, logits, concepts, labels, groups, stats)
    assert sorted(static.order) == [0, 1, 2]
    membership = group_membership(groups, logits.shape[1])
    single = []
    for g in range(3):
        mixed = torch.where(membership[g][None], stats.values(concepts), stats.bottleneck(logits))
        single.append((head(mixed).argmax(-1) == labels).float().mean().item())
    assert single[static.order[0]] == max(single)
    trace = run_interaction(head, static, concept_logits=logits, concept_labels=concepts, labels=labels,
                            groups=groups, stats=stats)
    assert torch.equal(trace.chosen, torch.tensor(static.order)[:, None].expand(3, 100))
    with pytest.raises(ValueError, match="no order"):
        run_interaction(head, StaticGreedyPolicy(), concept_logits=logits, concept_labels=concepts, labels=labels,
                        groups=groups, stats=stats)


def test_tune_coop_picks_the_best_validation_area():
    head, logits, concepts, labels, groups = problem(batch=100)
    stats = InterventionStats.fit(logits)
    policy, areas = tune_coop(head, concept_logits=logits, concept_labels=concepts, labels=labels, groups=groups,
                              stats=stats, queries=2, betas=(0.0, 1.0, 10.0),
                              influences=("confidence_change_v1", "expected_confidence_change"))
    assert len(areas) == 6 and areas[(policy.influence, policy.beta)] == max(areas.values())
    again = run_interaction(head, policy, concept_logits=logits, concept_labels=concepts, labels=labels,
                            groups=groups, stats=stats, steps=2)
    assert again.area_under_curve(2) == pytest.approx(max(areas.values()))


def test_percentile_stats_and_noisy_oracle():
    logits = torch.linspace(-4, 4, 101).reshape(1, 101)
    stats = InterventionStats.fit(logits, fmt="logits")
    assert stats.low == pytest.approx(-3.6) and stats.high == pytest.approx(3.6)
    probs = InterventionStats.fit(logits)
    assert probs.high == pytest.approx(torch.sigmoid(torch.tensor(3.6)).item(), abs=1e-6)
    torch.testing.assert_close(probs.values(torch.tensor([1.0, 0.0])), torch.tensor([probs.high, probs.low]))
    truth = torch.zeros(200, 50)
    noisy, _ = GroundTruthOracle(noise=0.1, seed=3).answer(truth)
    assert 0.07 < noisy.mean().item() < 0.13
    assert torch.equal(noisy, GroundTruthOracle(noise=0.1, seed=3).answer(truth)[0])
    assert area_under_curve([0.5, 0.7, 0.8, 0.9, 1.0], 3) == pytest.approx((0.6 + 0.75 + 0.85) / 3)


def test_clear_errors():
    head, logits, concepts, labels, groups = problem(batch=4)
    stats = InterventionStats.fit(logits)
    kw = dict(concept_logits=logits, concept_labels=concepts, labels=labels, stats=stats)
    with pytest.raises(ValueError, match="must not overlap"):
        run_interaction(head, CooPPolicy(), groups=[[0, 1], [1, 2, 3, 4, 5]], **kw)
    with pytest.raises(ValueError, match=r"in no group"):
        run_interaction(head, CooPPolicy(), groups=[[0, 1], [2, 3]], **kw)
    with pytest.raises(ValueError, match="costs must be >= 0"):
        CooPPolicy(costs=[1.0, -1.0, 0.0])
    with pytest.raises(ValueError, match="3 costs for 2"):
        run_interaction(head, CooPPolicy(gamma=1.0, costs=[1.0, 1.0, 1.0]), groups=[[0, 1, 2], [3, 4, 5]], **kw)
    with pytest.raises(ValueError, match="intervention format"):
        InterventionStats.fit(logits, fmt="hard")
    with pytest.raises(ValueError, match="influence must be"):
        CooPPolicy(influence="kld")
    with pytest.raises(ValueError, match="reads 5 concepts"):
        run_interaction(torch.nn.Linear(5, 4), CooPPolicy(), groups=groups, **kw)
    with pytest.raises(ValueError, match="concept_labels"):
        run_interaction(head, CooPPolicy(), groups=groups, concept_logits=logits, concept_labels=concepts[:, :5],
                        labels=labels, stats=stats)


def test_with_a_concept_bottleneck_model():
    from transformers import ResNetConfig

    from hf_fastslow.modeling.concept_bottleneck import ConceptBottleneckConfig, ConceptBottleneckModel

    model = ConceptBottleneckModel(ConceptBottleneckConfig(
        backbone_config=ResNetConfig(num_channels=1, embedding_size=8, hidden_sizes=[8], depths=[1]),
        n_concepts=4, n_classes=3, concept_groups=[[0, 1], [2], [3]], bottleneck="joint")).eval()
    x, concepts, labels = torch.randn(6, 1, 8, 8), torch.randint(0, 2, (6, 4)).float(), torch.randint(0, 3, (6,))
    with torch.no_grad():
        logits = model(pixel_values=x).concept_logits
    stats = InterventionStats.fit(logits, fmt="logits")
    trace = run_interaction(model, CooPPolicy(beta=1.0), pixel_values=x, concept_labels=concepts, labels=labels,
                            stats=stats)
    with torch.no_grad():
        full = model(pixel_values=x, intervention_mask=torch.ones(6, 4, dtype=torch.bool),
                     concept_values=stats.values(concepts)).logits
    assert torch.equal(trace.predictions[-1], full.argmax(-1))
    with pytest.raises(ValueError, match="reads 'logits'"):
        run_interaction(model, CooPPolicy(), pixel_values=x, concept_labels=concepts, labels=labels,
                        stats=InterventionStats.fit(logits, fmt="probs"))
