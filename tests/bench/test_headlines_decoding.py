"""The decoding family's headline extractors on the JSON of real runs (tests/bench/data/<method>_quick.json: trimmed
copies of quick runs made on the development box; docs/benchmarks/fst_results.json: the recorded full fst run).

Expected values are read off those files by hand, not recomputed by the extractors' logic.
"""

from __future__ import annotations

import copy

import pytest

from hf_fastslow.bench.headlines import extractors
from hf_fastslow.bench.headlines.decoding import EXTRACTORS
from hf_fastslow.bench.registry import entries_by_method, headline_extractor
from tests.bench.conftest import ROOT, load_json


def _pairs(figures) -> list[tuple]:
    return [(f.ours, f.peer) for f in figures]


def test_every_decoding_method_is_looked_up_through_its_entry():
    entries = entries_by_method()
    for method in ("das", "speculative_loop", "aurora", "v1_infer", "pairrl", "fst"):
        assert entries[method].extract is None  # not set on the entry: found in this family module
        assert headline_extractor(entries[method]) is EXTRACTORS[method] is extractors()[method]


def test_fst_on_the_recorded_full_run():
    figures = EXTRACTORS["fst"](load_json(ROOT / "docs/benchmarks/fst_results.json"))
    assert len(figures) == 2  # that run had no fst_frozen arm
    assert (figures[0].ours, round(figures[0].peer, 3)) == (0.5, 0.167)  # docs/benchmarks/fst.md: 6/12 vs GRPO's 2/12
    assert round(figures[1].ours, 3) == 0.076 and round(figures[1].peer, 3) == 0.045  # KL, seed context
    assert "12 held-out items" in figures[0].note and "lower is less drift" in figures[1].metric


def test_v1_infer_quick():
    figures = EXTRACTORS["v1_infer"](load_json("v1_infer_quick.json"))
    # summary.selectors: v1_budget_1N 1/4 correct, 691 judge tokens/question; pointwise 1/4, 552.75; majority vote 2/4
    assert _pairs(figures) == [(0.25, 0.25), (0.25, 0.5), (691, 552.75), (0.75, None)]
    assert "pointwise" in figures[0].metric and "majority vote" in figures[1].metric
    assert "addition, 4 questions, N=4 candidates" in figures[0].note and figures[0].paper
    assert "4 vs 4 judge calls" in figures[2].note and "lower is better" in figures[2].metric


def test_a_renamed_arm_fails_loudly():
    report = load_json("v1_infer_quick.json")
    report["summary"]["selectors"]["v1_1N"] = report["summary"]["selectors"].pop("v1_budget_1N")
    with pytest.raises(KeyError):
        EXTRACTORS["v1_infer"](report)
    broken = copy.deepcopy(load_json(ROOT / "docs/benchmarks/fst_results.json"))
    del broken["kl_to_base"]
    with pytest.raises(KeyError):
        EXTRACTORS["fst"](broken)


def test_pairrl_quick():
    report = load_json("pairrl_quick.json")
    figures = EXTRACTORS["pairrl"](report)
    # results: base/grpo/pairrl pass@1 all 3/8, verifier accuracy 0 on the 2 held-out pairs: one step moves nothing
    assert _pairs(figures) == [(0.375, 0.375), (0.0, 0.0)]
    assert "smoke scale" in figures[0].note and "2 pairs" in figures[1].note and "base 0.375" in figures[0].note
    # the quick run's arms tie, so tell them apart by hand: ours must be PairRL's, the peer GRPO's
    report["results"]["pairrl"]["pass_at_1"], report["results"]["grpo"]["verifier"]["accuracy"] = 0.5, 0.25
    assert _pairs(EXTRACTORS["pairrl"](report)) == [(0.5, 0.375), (0.0, 0.25)]


def test_speculative_loop_quick():
    figures = EXTRACTORS["speculative_loop"](load_json("speculative_loop_quick.json"))
    assert [f.metric.split(":")[0] for f in figures] == ["batch 1, greedy", "batch 1, sample T=1", "batch 8, greedy",
                                                         "batch 8, sample T=1"]
    # rows: ms_per_step of "speculative, no drafts" (ours) and of "generate" (peer), by batch and mode
    assert [(round(f.ours, 1), round(f.peer, 1)) for f in figures] == [
        (1085.4, 1094.2), (865.7, 917.0), (2274.9, 2073.2), (5328.5, 4498.6)]
    assert "outside the forward 264.41 vs 240.39 ms/step" in figures[3].note and "16 tokens" in figures[3].note


def test_aurora_quick():
    figures = EXTRACTORS["aurora"](load_json("aurora_quick.json"))
    # result.totals: online acc_len 15/14 rounds, frozen 1.0; last window (requests 2-3, humaneval) online 15/13;
    # tokens/s online 0.2895 vs plain 0.3834 (a box at load ~25); no mismatches
    assert [(round(f.ours, 4), f.peer if f.peer is None else round(f.peer, 4)) for f in figures] == [
        (1.0714, 1.0), (1.1538, 1.0), (0.2895, 0.3834), (0, None)]
    assert "window 2-3, humaneval" in figures[1].metric and "smoke scale" in figures[0].note
    assert "of 4 requests" in figures[3].note and figures[0].paper and figures[2].paper


def test_das_quick():
    figures = EXTRACTORS["das"](load_json("das_quick.json"))
    # grpo.arms: das 222.88 s vs plain 275.08 s (median totals); serve.arms: das_warm 36.79 vs plain 107.32,
    # das_cold 100.72 vs prompt_lookup 89.44; 0 mismatches
    assert [(round(f.ours, 2), f.peer if f.peer is None else round(f.peer, 2)) for f in figures] == [
        (222.88, 275.08), (36.79, 107.32), (100.72, 89.44), (0, None)]
    assert "median per-repeat ratio 0.821 (CPU seconds 0.914)" in figures[0].note and "batch 8" in figures[0].note
    assert "4.41 tokens per forward" in figures[1].note and "tokens=10, ngram=2" in figures[2].note
    assert "of 8 DAS outputs" in figures[3].note and figures[0].paper


def test_fst_quick():
    figures = EXTRACTORS["fst"](load_json("fst_quick.json"))
    # grpo and fst held-out accuracy 0/6 each; kl_to_base.seed_context: fst 0.004468, grpo 0.035058
    assert [(round(f.ours, 6), round(f.peer, 6)) for f in figures] == [(0.0, 0.0), (0.004468, 0.035058)]
    assert "smoke scale" in figures[0].note and "6 held-out items" in figures[0].note
