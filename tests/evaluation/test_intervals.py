import pytest

from hf_fastslow.evaluation.intervals import wilson_interval


def test_wilson_interval_closed_form_and_edges():
    lo, hi = wilson_interval(7, 20)  # textbook value for 7/20
    assert lo == pytest.approx(0.1812, abs=1e-3) and hi == pytest.approx(0.5671, abs=1e-3)
    lo, hi = wilson_interval(0, 10)  # the normal approximation would collapse to (0, 0) here
    assert lo == 0.0 and hi == pytest.approx(0.2775, abs=1e-3)
    lo, hi = wilson_interval(10, 10)
    assert hi == 1.0 and lo == pytest.approx(1 - 0.2775, abs=1e-3)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    narrow, wide = wilson_interval(50, 100), wilson_interval(5, 10)
    assert narrow[1] - narrow[0] < wide[1] - wide[0]


@pytest.mark.parametrize("k,n", [(-1, 5), (6, 5), (0, -1)])
def test_wilson_interval_rejects_impossible_counts(k, n):
    with pytest.raises(ValueError, match="0 <= k <= n"):
        wilson_interval(k, n)
