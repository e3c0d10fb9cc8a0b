"""Squeeze Evolve logic on ScriptedBackend and the pure fitness / routing functions (no model; fast)."""

import random
import re

import numpy as np
import pytest
import torch

from hf_fastslow.backends.base import Capabilities, Completion, Usage
from hf_fastslow.backends.testing import ScriptedBackend
from hf_fastslow.generation.evolution_baselines import RSA, MajorityVote
from hf_fastslow.generation.evolution_fitness import (
    LITE,
    assign_tiers,
    confidence_from_top_logprobs,
    fill_missing,
    group_diversity,
    percentile_thresholds,
    select_groups,
    token_confidence,
    trajectory_confidence,
)
from hf_fastslow.generation.squeeze_evolve import SqueezeEvolve, recombination_messages, strip_think
from hf_fastslow.generation.squeeze_evolve_config import SqueezeEvolveConfig, Tier

PROBLEM = "What is 20 + 22? Reply with the number."
NO_LOGPROBS = Capabilities(native_n=False, logprobs=False, max_top_logprobs=0, streaming=True,
                           continue_final_message=False, prompt_scoring=False, seed=True)


# ----- pure functions --------------------------------------------------------------------------------------------
def test_token_confidence_closed_form_and_invariances():
    logits = torch.tensor([[1.0, 2.0, 3.0, 0.5, -1.0], [0.0, 0.0, 0.0, 0.0, 0.0], [5.0, -2.0, 1.0, 1.0, 0.0]])
    k = 2
    expected = [torch.logsumexp(row, 0) - row.topk(k).values.mean() for row in logits]
    assert torch.allclose(token_confidence(logits, k), torch.stack(expected), atol=1e-6)
    # -(1/k) sum of the top-k log-probs, i.e. the same statistic from log-probs
    logp = logits.log_softmax(-1)
    assert torch.allclose(token_confidence(logits, k), -logp.topk(k).values.mean(-1), atol=1e-6)
    assert torch.allclose(token_confidence(logits + torch.tensor([[3.0], [-7.0], [100.0]]), k),
                          token_confidence(logits, k), atol=1e-4)
    sharp, flat = token_confidence(logits * 2, k), token_confidence(logits, k)
    assert (sharp[[0, 2]] > flat[[0, 2]]).all()  # row 1 is uniform: sharpening changes nothing
    assert torch.allclose(token_confidence(logits, 5), -logp.mean(-1), atol=1e-6)
    with pytest.raises(ValueError, match="k must be"):
        token_confidence(logits, 6)


def test_confidence_from_top_logprobs_matches_logits_route():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(1))
    top = logits.log_softmax(-1).topk(5).values
    shuffled = [random.Random(i).sample(row, len(row)) for i, row in enumerate(top.tolist())]  # order must not matter
    got = confidence_from_top_logprobs(shuffled, 5)
    assert np.allclose(got, token_confidence(logits, 5).tolist(), atol=1e-5)
    # asked k=3 of 5 values: the 3 largest
    assert np.allclose(confidence_from_top_logprobs(top.tolist(), 3), token_confidence(logits, 3).tolist(), atol=1e-5)
    with pytest.raises(ValueError, match="fewer than top_k"):
        confidence_from_top_logprobs([[-0.1, -2.0]], 3)
    assert trajectory_confidence([1.0, 2.0, 6.0]) == 3.0 and trajectory_confidence([]) is None
    assert fill_missing([2.0, None, 1.5]) == [2.0, 0.5, 1.5] and fill_missing([None]) == [0.0]


def test_percentile_thresholds_match_numpy():
    rng = np.random.default_rng(0)
    for n in (1, 2, 5, 16, 33):
        f = rng.normal(size=n).tolist()
        for ps in ((10.0,), (33.0, 66.0), (0.5, 50.0, 99.5), (25.0, 75.0)):
            assert np.allclose(percentile_thresholds(f, ps), np.percentile(f, ps))


def test_percentile_edges_and_out_of_range():
    f = [0.3, 0.1, 0.7, 0.5]
    assert assign_tiers(f, percentile_thresholds(f, [0.0]), 2) == [0, 0, 0, 0]  # p=0: none expensive
    assert assign_tiers(f, percentile_thresholds(f, [100.0]), 2) == [1, 1, 1, 1]  # p=100: all expensive
    for bad in ([-1.0], [100.5], [float("nan")], [60.0, 40.0], [50.0, 50.0]):
        with pytest.raises(ValueError, match="percentiles"):
            percentile_thresholds(f, bad)
    with pytest.raises(ValueError, match="no group fitness"):
        percentile_thresholds([], [50.0])


def test_assign_tiers_rules():
    # boundary: f == theta goes expensive
    assert assign_tiers([1.0, 2.0, 3.0], [2.0], 2) == [1, 1, 0]
    # three tiers: routes are monotone (lower fitness -> more expensive tier)
    rng = random.Random(3)
    f = [rng.random() for _ in range(40)]
    tiers = assign_tiers(f, percentile_thresholds(f, [33.0, 66.0]), 3)
    order = sorted(range(40), key=lambda i: f[i])
    assert [tiers[i] for i in order] == sorted(tiers, reverse=True)
    assert set(tiers) == {0, 1, 2}
    # all-equal fitness: the documented departure, everything to tier 0 (the reference sends all expensive)
    assert assign_tiers([0.4] * 5, percentile_thresholds([0.4] * 5, [50.0]), 2) == [0] * 5
    # lite: the top fraction of the tier-0 groups by fitness, at least one
    assert assign_tiers([1.0, 5.0, 4.0, 3.0], [1.0], 2, lite_fraction=0.5) == [1, LITE, 0, 0]  # 3 cheap -> 1 lite
    assert assign_tiers([1.0, 5.0, 4.0, 3.0], [1.0], 2, lite_fraction=0.7) == [1, LITE, LITE, 0]
    with pytest.raises(ValueError, match="at most"):
        assign_tiers([1.0], [0.1, 0.2], 2)


def test_group_diversity_and_select_groups():
    answers = ["4", "4", "5", None, None]
    assert group_diversity(answers, [0, 1]) == 1 and group_diversity(answers, [0, 2, 3, 4]) == 4
    groups = select_groups(6, 3, 10, random.Random(7))
    assert len(groups) == 10 and all(len(set(g)) == 3 and all(0 <= i < 6 for i in g) for g in groups)
    assert select_groups(6, 3, 10, random.Random(7)) == groups  # reproducible under the seed
    weighted = select_groups(4, 2, 200, random.Random(0), weights=[1.0, 1.0, 0.0, 0.0])
    assert all(sorted(g) == [0, 1] for g in weighted)  # zero weight is drawn only when nothing else is left
    with pytest.raises(ValueError, match="above the population"):
        select_groups(3, 4, 2, random.Random(0))


def test_strip_think_and_prompts():
    assert strip_think("<think>hmm 13</think> The answer is 42") == "The answer is 42"
    assert strip_think("The answer <think>unclosed 9") == "The answer"
    assert recombination_messages(PROBLEM, []) == [{"role": "user", "content": PROBLEM}]
    refine = recombination_messages(PROBLEM, ["The answer is 41"])[0]["content"]
    agg = recombination_messages(PROBLEM, ["The answer is 41", "The answer is 42"])[0]["content"]
    assert "one correct solution" in refine and "Solution 2:\nThe answer is 42" in agg and agg.startswith(PROBLEM)


# ----- scripted tiers ----------------------------------------------------------------------------------------
def candidate_answers(messages):
    return re.findall(r"Solution \d+:\nThe answer is (\d+)", messages[-1]["content"])


def scripted_tier(name, *, recombine, seeds=("42", "41", "42", "40", "39", "42"), capabilities=None, **kw):
    """Seeds: answers by the sample seed (call seed + sample index). Recombination: `recombine(candidate answers)`.
    Confidence via top-3 log-probs: the right answer 42 is sure (peaked), any other is unsure (flat)."""

    def respond(messages, index, kwargs):
        found = candidate_answers(messages)
        answer = recombine(found) if found else seeds[(kwargs.get("seed") or 0) % len(seeds)]  # seed + index
        text = f"The answer is {answer}"
        row = [-0.01, -6.0, -7.0] if answer == "42" else [-1.0, -1.1, -1.2]
        return Completion(text=text, prompt_tokens=sum(len(m["content"].split()) for m in messages),
                          completion_tokens=4, top_logprobs=[row] * 4 if kwargs.get("top_logprobs") else None)

    return ScriptedBackend(respond, name=name, capabilities=capabilities, **kw)


def majority_of(found):
    return max(sorted(set(found)), key=found.count)


def tiers(cheap_caps=None, strong_caps=None, prices=((1.0, 2.0), (10.0, 20.0))):
    cheap = scripted_tier("cheap", recombine=majority_of, capabilities=cheap_caps)
    strong = scripted_tier("strong", recombine=lambda found: "42", capabilities=strong_caps)
    return [Tier(cheap, "cheap", *prices[0]), Tier(strong, "strong", *prices[1])]


def config(**kw):
    base = dict(population=6, group_size=3, groups=6, loops=2, percentiles=(50.0,), top_k=3, seed=0)
    base.update(kw)
    return SqueezeEvolveConfig(**base)


def test_expensive_tier_seeds_and_low_confidence_goes_expensive():
    ts = tiers()
    res = SqueezeEvolve(ts, config()).run(PROBLEM)
    cheap_calls, strong_calls = ts[0].backend.calls, ts[1].backend.calls
    seed_calls = [c for c in strong_calls if not candidate_answers(c.messages)]
    assert len(seed_calls) == 6 and all(not candidate_answers(c.messages) for c in seed_calls)
    assert all(candidate_answers(c.messages) for c in cheap_calls)  # the cheap tier never seeds
    rec = res.per_loop[1]
    assert len(rec.routes) == 6 and set(rec.routes) == {0, 1}
    # every expensive group is less confident than every cheap one (strict split at the median)
    strong_f = [f for f, r in zip(rec.fitness, rec.routes) if r == 1]
    cheap_f = [f for f, r in zip(rec.fitness, rec.routes) if r == 0]
    assert max(strong_f) <= rec.thresholds[0] < min(cheap_f)
    # fewer sure (42) members among the expensive groups' parents
    pop0 = res.per_loop[0].answers
    right = [sum(pop0[i] == "42" for i in g) for g in rec.groups]
    assert max(r for r, t in zip(right, rec.routes) if t == 1) <= min(r for r, t in zip(right, rec.routes) if t == 0)
    assert res.answer == "42" and "top-3 log-probs" in res.fitness_source
    assert 0 < res.fraction_cheap < 1 and res.route_counts["cheap"] + res.route_counts["strong"] == 12


def test_loops_zero_is_self_consistency():
    ts = tiers()
    se = SqueezeEvolve(ts, config(loops=0, population=5)).run(PROBLEM)
    mv_backend = scripted_tier("strong", recombine=lambda f: "42")
    mv = MajorityVote(Tier(mv_backend, "strong", 10.0, 20.0), config(loops=0, population=5)).run(PROBLEM)
    assert [c.text for c in se.population] == [c.text for c in mv.population]
    assert se.answer == mv.answer and se.text == mv.text
    assert se.usage_by_tier["strong"].total_tokens == mv.usage_by_tier["strong"].total_tokens
    assert se.cost == pytest.approx(mv.cost) and not ts[0].backend.calls
    # the same requests, except that SE asks for log-probs (it needs none at T=0, but asking is free)
    assert [c.messages for c in ts[1].backend.calls] == [c.messages for c in mv_backend.calls]


@pytest.mark.parametrize("update", ["replace", "accumulate"])
def test_one_tier_is_rsa(update):
    a = scripted_tier("m", recombine=majority_of)
    b = scripted_tier("m", recombine=majority_of)
    cfg = config(loops=3, update=update, percentiles=(10.0,))  # percentiles are ignored with one tier
    se = SqueezeEvolve([Tier(a, "m", 1.0, 1.0)], cfg).run(PROBLEM)
    rsa = RSA(Tier(b, "m", 1.0, 1.0), cfg).run(PROBLEM)
    assert [c.text for c in se.population] == [c.text for c in rsa.population]
    assert [(c.messages, c.kwargs) for c in a.calls] == [(c.messages, c.kwargs) for c in b.calls]
    assert [r.groups for r in se.per_loop] == [r.groups for r in rsa.per_loop]
    assert se.answer == rsa.answer and se.fraction_cheap == rsa.fraction_cheap == 0.0
    assert se.usage_by_tier["m"].total_tokens == rsa.usage_by_tier["m"].total_tokens
    assert len(se.population) == (6 + 3 * 6 if update == "accumulate" else 6)


def test_accounting_equals_backend_ledgers():
    ts = tiers()
    scorer_calls_before = [len(t.backend.ledger) for t in ts]
    res = SqueezeEvolve(ts, config(loops=3)).run(PROBLEM)
    assert scorer_calls_before == [0, 0]
    for tier in ts:
        led: Usage = tier.backend.ledger.total()
        got = res.usage_by_tier[tier.name]
        assert (got.calls, got.prompt_tokens, got.completion_tokens) == (
            led.calls, led.prompt_tokens, led.completion_tokens)
        assert got.cpu_seconds == pytest.approx(led.cpu_seconds)
        assert res.cost_by_tier[tier.name] == pytest.approx(
            (led.prompt_tokens * tier.price_in + led.completion_tokens * tier.price_out) / 1e6)
    # one call per tier per loop (batched), plus the seeding call
    assert ts[1].backend.ledger.total().calls == 1 + sum(1 in r.routes for r in res.per_loop)
    assert res.cost == pytest.approx(sum(res.cost_by_tier.values())) and res.tokens == sum(
        t.backend.ledger.total().total_tokens for t in ts)


def test_diversity_routes_split_groups_expensive():
    ts = tiers(cheap_caps=NO_LOGPROBS, strong_caps=NO_LOGPROBS)
    res = SqueezeEvolve(ts, config(fitness="diversity", loops=1)).run(PROBLEM)
    rec, pop0 = res.per_loop[1], res.per_loop[0].answers
    for g, f in zip(rec.groups, rec.fitness):
        assert f == -group_diversity(pop0, g)
    distinct = [len({pop0[i] for i in g}) for g in rec.groups]
    assert min(d for d, r in zip(distinct, rec.routes) if r == 1) >= max(d for d, r in zip(distinct, rec.routes)
                                                                           if r == 0)
    assert "diversity" in res.fitness_source
    assert all(c.kwargs.get("top_logprobs") in (0, None) for t in ts for c in t.backend.calls)


def test_confidence_without_logprobs_is_a_clear_error():
    with pytest.raises(ValueError, match='fitness="diversity"'):
        SqueezeEvolve(tiers(cheap_caps=NO_LOGPROBS), config())
    small_k = Capabilities(**{**NO_LOGPROBS.__dict__, "logprobs": True, "max_top_logprobs": 2})
    with pytest.raises(ValueError, match="at most 2"):
        SqueezeEvolve(tiers(strong_caps=small_k), config())


def test_local_scorer_for_a_server_without_logprobs():
    ts = tiers(cheap_caps=NO_LOGPROBS, strong_caps=NO_LOGPROBS)
    scored = []

    def score(messages, continuation):
        scored.append((messages[-1]["content"], continuation))
        return [-0.1] * 4 if continuation.endswith("42") else [-2.0] * 4

    scorer = ScriptedBackend("unused", name="local-scorer", scorer=score)
    res = SqueezeEvolve(ts, config(loops=2), scorer=Tier(scorer, "local", 5.0, 0.0)).run(PROBLEM)
    assert "scorer local-scorer" in res.fitness_source
    # each member scored once, under the prompt that produced it: 6 seeds, then 6 children of loop 1
    assert len(scored) == 12 and all(p == PROBLEM for p, _ in scored[:6])
    assert all("Solution 1:" in p for p, _ in scored[6:])
    usage = res.usage_by_tier["scoring"]
    assert usage.calls == 12 and usage.prompt_tokens == scorer.ledger.total().prompt_tokens
    assert res.cost_by_tier["scoring"] == pytest.approx(usage.prompt_tokens * 5.0 / 1e6)
    rec = res.per_loop[1]
    assert set(rec.routes) == {0, 1}
    # accumulate: old members keep their score; only the 6 new children of loop 1 are scored in loop 2
    scored.clear()
    SqueezeEvolve(ts, config(loops=2, update="accumulate"), scorer=scorer).run(PROBLEM)
    assert len(scored) == 12
    scorer_no_scoring = ScriptedBackend("x", name="no-score")
    with pytest.raises(ValueError, match="cannot score"):
        SqueezeEvolve(ts, config(), scorer=scorer_no_scoring)


def test_lite_groups_vote_without_a_call():
    ts = tiers()
    res = SqueezeEvolve(ts, config(loops=1, lite_fraction=1.0)).run(PROBLEM)
    rec = res.per_loop[1]
    lite = [g for g, r in enumerate(rec.routes) if r == LITE]
    assert lite and 0 not in rec.routes  # every cheap group became a vote
    assert not ts[0].backend.calls
    pop0 = res.per_loop[0].answers
    for g in lite:
        answers = [pop0[i] for i in rec.groups[g]]
        child = res.population[g]
        assert child.tier == "vote" and answers.count(child.answer) == max(answers.count(a) for a in answers)
    assert res.route_counts["vote"] == len(lite)


def test_bad_input_errors():
    with pytest.raises(ValueError, match="above population"):
        config(population=3, group_size=4)
    for bad in ((-5.0,), (101.0,), (60.0, 40.0)):
        with pytest.raises(ValueError, match="percentiles"):
            config(percentiles=bad)
    with pytest.raises(ValueError, match="2 percentiles for 2 tiers"):
        SqueezeEvolve(tiers(), config(percentiles=(30.0, 60.0)))
    with pytest.raises(ValueError, match="fitness"):
        config(fitness="entropy")
    with pytest.raises(ValueError, match="weighted"):
        config(fitness="diversity", selection="weighted")
    with pytest.raises(ValueError, match="population"):
        config(population=0)
    with pytest.raises(ValueError, match="non-empty"):
        SqueezeEvolve(tiers(), config()).run("  ")
    with pytest.raises(TypeError, match="Tier"):
        SqueezeEvolve([ScriptedBackend("x")], config())
    with pytest.raises(ValueError, match="distinct"):
        t = tiers()
        SqueezeEvolve([t[0], Tier(t[1].backend, "cheap")], config())


def test_weighted_selection_prefers_confident_members():
    ts = tiers()
    res = SqueezeEvolve(ts, config(loops=1, selection="weighted", selection_temperature=0.05, groups=30,
                                   group_size=2)).run(PROBLEM)
    pop0 = res.per_loop[0].answers
    picks = [pop0[i] for g in res.per_loop[1].groups for i in g]
    assert picks.count("42") / len(picks) > 0.8  # 3 of 6 members are sure; uniform picking would give ~0.5
