"""Cohen's kappa and F1 on textbook cases, against scikit-learn, and the multi-label summary."""

import math
import random

import pytest

from hf_fastslow.evaluation.agreement import binary_agreement, cohen_kappa, multilabel_agreement


def test_kappa_textbook_2x2():
    # The standard worked example: 50 items, both "yes" 20, both "no" 15, A yes/B no 5, A no/B yes 10.
    # p_o = 0.7, p_e = 0.5 * 0.6 + 0.5 * 0.4 = 0.5, kappa = 0.4.
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4, abs=1e-12)


def test_kappa_edges():
    x = [True, False, True, True, False]
    assert cohen_kappa(x, x) == pytest.approx(1.0)
    # Agreement exactly at chance: independent marginals 50/50 each, p_o = 0.5.
    assert cohen_kappa([1, 1, 0, 0], [1, 0, 1, 0]) == pytest.approx(0.0)
    assert cohen_kappa([1, 0, 1, 0], [0, 1, 0, 1]) == pytest.approx(-1.0)
    assert cohen_kappa(["no"] * 4, ["no"] * 4) == 1.0  # one label throughout: perfect by convention
    with pytest.raises(ValueError, match="same items"):
        cohen_kappa([1, 0], [1])
    with pytest.raises(ValueError, match="no items"):
        cohen_kappa([], [])


def test_matches_sklearn_on_random_labels():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(0)
    for _ in range(50):
        n = rng.randint(2, 40)
        a = [rng.random() < 0.4 for _ in range(n)]
        b = [rng.random() < 0.5 for _ in range(n)]
        if len(set(a) | set(b)) > 1:
            assert cohen_kappa(a, b) == pytest.approx(metrics.cohen_kappa_score(a, b), abs=1e-12)
        agg = binary_agreement(a, b)
        assert agg.f1 == pytest.approx(metrics.f1_score(b, a, zero_division=0.0), abs=1e-12)
        assert agg.precision == pytest.approx(metrics.precision_score(b, a, zero_division=0.0), abs=1e-12)
        assert agg.recall == pytest.approx(metrics.recall_score(b, a, zero_division=0.0), abs=1e-12)


def test_missing_predictions_are_counted_not_dropped():
    agg = binary_agreement([None, True, None, False], [True, True, False, False])
    assert (agg.tp, agg.fp, agg.fn, agg.tn, agg.missing) == (1, 0, 1, 2, 2)
    assert agg.n == 4  # nothing dropped
    with pytest.raises(ValueError, match="gold"):
        binary_agreement([True], [None])


def test_multilabel_summary():
    pred = [{"a": True, "b": False}, {"a": False, "b": None}, {"a": True}]
    gold = [{"a": True, "b": False}, {"a": True, "b": True}, {"a": False, "b": False}]
    r = multilabel_agreement(pred, gold, ["a", "b"])
    assert r["per_label"]["a"]["tp"] == 1 and r["per_label"]["a"]["fp"] == 1 and r["per_label"]["a"]["fn"] == 1
    assert r["per_label"]["b"]["missing"] == 2 and r["missing"] == 2  # a None and an absent label
    assert r["macro_f1"] == pytest.approx((0.5 + 0.0) / 2)
    assert r["decisions"] == 6
    assert not math.isnan(r["pooled_kappa"])
