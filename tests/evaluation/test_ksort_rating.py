"""K-Sort Eval rating maths: TrueSkill FFA parity with the `trueskill` package, posterior correction limits, Spearman,
stopping rule and score."""

import math
import random

import pytest

from hf_fastslow.evaluation.ksort_rating import (
    DEFAULT_SIGMA,
    Skill,
    StoppingRule,
    agreement_weight,
    corrected_skill,
    final_score,
    posterior_correction,
    spearman_rho,
    trueskill_ffa_update,
)

trueskill = pytest.importorskip("trueskill")


def _reference(env, new, opponents, ranks):
    groups = [[env.create_rating(o.mu, o.sigma)] for o in opponents] + [[env.create_rating(new.mu, new.sigma)]]
    return env.rate(groups, ranks)[-1][0]


def _random_case(rng, ties):
    k = rng.randint(1, 6)
    opponents = [Skill(rng.uniform(12, 38), rng.uniform(0.3, 3.0)) for _ in range(k)]
    new = Skill(rng.uniform(5, 45), rng.uniform(0.5, DEFAULT_SIGMA))
    ranks = [rng.randint(0, k) for _ in range(k + 1)] if ties else rng.sample(range(k + 1), k + 1)
    return new, opponents, ranks


@pytest.mark.parametrize("ties", [False, True])
def test_ffa_update_matches_trueskill_default_env(ties):
    env, rng = trueskill.TrueSkill(), random.Random(1 if ties else 0)
    for _ in range(300):
        new, opponents, ranks = _random_case(rng, ties)
        ref = _reference(env, new, opponents, ranks)
        got = trueskill_ffa_update(new, opponents, ranks)
        assert got.mu == pytest.approx(ref.mu, abs=1e-6) and got.sigma == pytest.approx(ref.sigma, abs=1e-6), (
            new, opponents, ranks)


def test_ffa_update_new_best_and_new_worst_and_defaults():
    env = trueskill.TrueSkill()
    opponents = [Skill(30, 0.5), Skill(27, 0.6), Skill(24, 0.5), Skill(21, 0.7)]
    for ranks in ([1, 2, 3, 4, 0], [0, 1, 2, 3, 4], [0, 1, 2, 3, 2]):
        ref = _reference(env, Skill(), opponents, ranks)
        got = trueskill_ffa_update(Skill(), opponents, ranks)
        assert (got.mu, got.sigma) == pytest.approx((ref.mu, ref.sigma), abs=1e-6)
    best = trueskill_ffa_update(Skill(), opponents, [1, 2, 3, 4, 0])
    worst = trueskill_ffa_update(Skill(), opponents, [0, 1, 2, 3, 4])
    assert best.mu > 25 > worst.mu and best.sigma < DEFAULT_SIGMA and worst.sigma < DEFAULT_SIGMA


def test_exact_normal_matches_trueskill_scipy_backend():
    pytest.importorskip("scipy")
    env, rng = trueskill.TrueSkill(backend="scipy"), random.Random(2)
    for i in range(60):  # trueskill's scipy backend is slow (~10 ms a rating)
        new, opponents, ranks = _random_case(rng, ties=i % 2 == 0)
        ref = _reference(env, new, opponents, ranks)
        got = trueskill_ffa_update(new, opponents, ranks, normal="exact")
        assert (got.mu, got.sigma) == pytest.approx((ref.mu, ref.sigma), abs=1e-9)


def test_ffa_update_bad_input():
    with pytest.raises(ValueError, match="one rank per player"):
        trueskill_ffa_update(Skill(), [Skill(20, 1)], [0, 1, 2])
    with pytest.raises(ValueError, match="at least one opponent"):
        trueskill_ffa_update(Skill(), [], [0])
    with pytest.raises(ValueError, match="normal"):
        trueskill_ffa_update(Skill(), [Skill(20, 1)], [0, 1], normal="fast")
    with pytest.raises(ValueError, match="sigma > 0"):
        Skill(25, 0)


def test_correction_limits_and_shape():
    prior, post = Skill(25.0, 8.0), Skill(29.0, 5.0)
    for rule in ("code", "paper"):
        assert corrected_skill(prior, post, 1.0, rule) == post
        assert corrected_skill(prior, post, 0.0, rule) == prior
    assert agreement_weight(0.0) == 0.5
    assert agreement_weight(1.0, kappa=5.0) == pytest.approx(1 / (1 + math.exp(-5)))
    mus = [posterior_correction(prior, post, rho).mu for rho in (-1, -0.6, -0.2, 0.2, 0.6, 1)]
    assert mus == sorted(mus) and len(set(mus)) == len(mus)
    for lam in (0.1, 0.3, 0.5, 0.7, 0.9):  # the code's normalised weight keeps sigma between the two inputs
        s = corrected_skill(prior, post, lam, "code").sigma
        assert post.sigma < s < prior.sigma
    w = 0.8 ** 2 / (0.8 ** 2 + 0.2 ** 2)  # the official code's normalised weight, not lambda or lambda^2
    assert corrected_skill(prior, post, 0.8, "code").sigma == pytest.approx(math.sqrt(w * 25 + (1 - w) * 64))
    assert corrected_skill(prior, post, 0.8, "paper").sigma == pytest.approx(math.sqrt(0.64 * 25 + 0.04 * 64))
    same = Skill(25.0, 4.0)  # the paper's rule shrinks below both inputs at lambda = 0.5
    assert corrected_skill(same, same, 0.5, "paper").sigma == pytest.approx(4.0 / math.sqrt(2))
    assert corrected_skill(same, same, 0.5, "code").sigma == pytest.approx(4.0)
    with pytest.raises(ValueError):
        corrected_skill(prior, post, 1.2)
    with pytest.raises(ValueError):
        corrected_skill(prior, post, 0.5, "other")
    with pytest.raises(ValueError):
        agreement_weight(float("nan"))


def test_spearman_matches_scipy_with_ties():
    stats = pytest.importorskip("scipy.stats")
    rng = random.Random(3)
    for _ in range(50):
        a = [rng.randint(0, 3) for _ in range(5)]
        b = [rng.randint(0, 4) for _ in range(5)]
        ref = stats.spearmanr(a, b).statistic
        got = spearman_rho(a, b)
        if math.isnan(ref):
            assert got is None
        else:
            assert got == pytest.approx(ref, abs=1e-12)
    assert spearman_rho([0, 1, 2, 3], [0, 1, 2, 3]) == pytest.approx(1.0)
    assert spearman_rho([0, 1, 2, 3], [3, 2, 1, 0]) == pytest.approx(-1.0)
    assert spearman_rho([1, 1, 1], [0, 1, 2]) is None


def test_stopping_rule_and_score():
    rule = StoppingRule(sigma_stop=0.75, max_runs=10)
    assert rule.converged(Skill(25, 0.7499)) and not rule.converged(Skill(25, 0.75))
    assert rule.exhausted(10) and not rule.exhausted(9)
    with pytest.raises(ValueError):
        StoppingRule(variance_rule="median")
    s = Skill(30.0, 0.7)
    assert final_score(s, [0.5, 1.5], eta=3.0, sigma_ref="code") == pytest.approx(30.0 - 3.0)
    assert final_score(s, [0.5, 1.5], eta=3.0, sigma_ref="paper") == pytest.approx(30.0 - 2.1)
