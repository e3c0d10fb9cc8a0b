"""The attention family's headline extractors (ear, iha, care, crest) on the JSON of real quick runs
(tests/bench/data/<method>_quick.json, trimmed copies of `python benchmarks/<method>.py --quick ...`). The expected
figures are copied from those files by hand, not recomputed by the extractor's logic; a profile's missing part (null)
gives no figure, and a changed schema fails loudly."""

import copy

import pytest

from hf_fastslow.bench.headlines import extractors
from hf_fastslow.bench.headlines.attention import EXTRACTORS
from hf_fastslow.bench.registry import entries_by_method
from tests.bench.conftest import load_json


def _by_metric(figures, words):
    found = [f for f in figures if words in f.metric]
    assert len(found) == 1, [f.metric for f in figures]
    return found[0]


def test_the_family_is_registered_and_wired():
    found = extractors()
    entries = entries_by_method()
    for method in ("ear", "iha", "care", "crest"):
        assert found[method] is EXTRACTORS[method]
        assert entries[method].quick_args == ("--quick",)
        assert entries[method].output.mode == "file"


def test_ear_quick():
    figures = EXTRACTORS["ear"](load_json("ear_quick.json"))
    assert len(figures) == 4
    error = _by_metric(figures, "mean over layers, lower is better")
    assert error.ours == pytest.approx(0.06722515550625148)
    assert error.peer == pytest.approx(0.46302728623048633)
    assert "512 tokens, last 128 queries, 30 layers" in error.note
    routing = _by_metric(figures, "routing alone")
    assert (routing.ours, routing.peer) == (pytest.approx(0.06722515550625148), pytest.approx(0.4164782291378875))
    share = _by_metric(figures, "share of layers")
    assert share.ours == pytest.approx(24 / 30) and share.peer is None
    assert "24 of 30 layers" in share.note
    e2e = _by_metric(figures, "KL(dense || sparse)")
    assert (e2e.ours, e2e.peer) == (pytest.approx(0.004317122511565685), pytest.approx(0.024157293140888214))
    assert "512 tokens, chunk 128" in e2e.note


def test_ear_skipped_parts_give_no_figure():
    report = load_json("ear_quick.json")
    report["llm_end_to_end"] = None
    assert len(EXTRACTORS["ear"](report)) == 3
    report["layers"] = None
    assert EXTRACTORS["ear"](report) == []


def test_ear_changed_schema_fails_loudly():
    report = load_json("ear_quick.json")
    del report["layers"]["mean"]["EAR (error + comp)"]
    with pytest.raises(KeyError):
        EXTRACTORS["ear"](report)
    with pytest.raises(KeyError):
        EXTRACTORS["ear"]({"layers": None})


def test_iha_quick():
    figures = EXTRACTORS["iha"](load_json("iha_quick.json"))
    assert len(figures) == 4
    exact = _by_metric(figures, "identity IHA conversion (P=3)")
    assert (exact.ours, exact.peer) == (0.000110626220703125, 0.0001010894775390625)
    assert "greedy 8 tokens identical: yes" in exact.note
    prefill = _by_metric(figures, "prefill ms")
    assert (prefill.ours, prefill.peer) == (pytest.approx(3587.8452289980487), pytest.approx(3065.6717130041216))
    assert "median of 3 interleaved round(s); CPU-time ratio 1.10" in prefill.note
    accuracy = _by_metric(figures, "held-out exact match")
    assert (accuracy.ours, accuracy.peer) == (0.53125, 0.53125)
    assert accuracy.paper and "RULER" in accuracy.paper
    assert "32 train / 32 held-out, top 2 layers, 8 steps" in accuracy.note
    assert accuracy.note.endswith("; smoke scale: quick profile, too few examples to separate the arms")
    assert "smoke" not in exact.note  # exactness is the recorded figure at P=3
    nll = _by_metric(figures, "answer-token NLL")
    assert (nll.ours, nll.peer) == (pytest.approx(0.24831104278564453), pytest.approx(0.2576962411403656))


def test_iha_arms_not_swapped():
    # the quick run's two arms tie on exact match; move one to see which side each lands on
    report = load_json("iha_quick.json")
    report["finetune"]["arms"]["IHA"]["acc"] = 0.5625
    accuracy = _by_metric(EXTRACTORS["iha"](report), "held-out exact match")
    assert (accuracy.ours, accuracy.peer) == (0.5625, 0.53125)


def test_iha_skipped_parts_and_changed_schema():
    report = load_json("iha_quick.json")
    report["finetune"] = None
    assert [f.metric.split(",")[0] for f in EXTRACTORS["iha"](report)] == [
        "max |delta logit| of the identity IHA conversion (P=3) vs the stock model's own eager-vs-SDPA difference",
        "prefill ms of that batch"]
    broken = copy.deepcopy(load_json("iha_quick.json"))
    del broken["finetune"]["arms"]["stock"]
    with pytest.raises(KeyError):
        EXTRACTORS["iha"](broken)


def test_crest_quick():
    figures = EXTRACTORS["crest"](load_json("crest_quick.json"))
    assert len(figures) == 4
    accuracy = _by_metric(figures, "exact-match accuracy")
    assert (accuracy.ours, accuracy.peer) == (0.0, 0.0)
    assert accuracy.note.endswith("; smoke scale: quick profile, too few examples to separate the arms")
    assert "4 GSM-Symbolic items" in accuracy.note and "5 non-linear of 52 steps" in accuracy.note
    tokens = _by_metric(figures, "mean new tokens")
    assert (tokens.ours, tokens.peer) == (96, 93.75)
    assert "no steering 84.8" in tokens.note and "CREST 4, SEAL 3 of 4" in tokens.note
    steps = _by_metric(figures, "non-linear steps per answer")
    assert (steps.ours, steps.peer) == (0, 0)
    probe = _by_metric(figures, "balanced probe accuracy")
    assert (probe.ours, probe.peer) == (pytest.approx(0.9848976731300354), pytest.approx(0.7750809192657471))
    assert "smoke" not in probe.note  # the quick profile keeps the recorded calibration


def test_crest_arms_not_swapped_and_full_profile_note():
    report = load_json("crest_quick.json")
    report["arms"]["CREST"]["accuracy"], report["arms"]["SEAL-style"]["accuracy"] = 0.25, 0.5
    report["arms"]["CREST"]["nonlinear_steps_per_answer"] = 0.75
    report["args"]["quick"] = False
    figures = EXTRACTORS["crest"](report)
    accuracy = _by_metric(figures, "exact-match accuracy")
    assert (accuracy.ours, accuracy.peer) == (0.25, 0.5)
    assert accuracy.note.startswith("peer: SEAL-style vector")
    assert _by_metric(figures, "non-linear steps per answer").ours == 0.75
    del report["arms"]["SEAL-style"]
    with pytest.raises(KeyError):
        EXTRACTORS["crest"](report)


def test_care_quick():
    figures = EXTRACTORS["care"](load_json("care_quick.json"))
    assert len(figures) == 3  # no healing in the quick profile
    vs_svd = _by_metric(figures, "one-shot CARE (uniform ranks) vs plain SVD")
    assert (vs_svd.ours, vs_svd.peer) == (pytest.approx(44.29535696532455), pytest.approx(26642.32851335294))
    assert vs_svd.paper and "22048.8" in vs_svd.paper
    assert "calibration 256 GSM8K questions x 32 tokens" in vs_svd.note and "512 tokens" in vs_svd.note
    vs_original = _by_metric(figures, "one-shot CARE vs the original model")
    assert (vs_original.ours, vs_original.peer) == (pytest.approx(44.29535696532455), pytest.approx(28.991157589702322))
    memory = _by_metric(figures, "KV cache bytes per token")
    assert (memory.ours, memory.peer) == (23040.0, 46080.0)


def test_care_healed_row_read_when_present():
    report = load_json("care_quick.json")
    report["rows"].append({"arm": "care_uniform_healed", "model": "CARE uniform + healing", "fraction": 0.5,
                           "ppl": 43.65, "bytes_per_token": 23040.0, "fixed": 0.0})
    report["healing"].append({"fraction": 0.5, "steps": 12, "seconds": 156.0, "log": []})
    healed = _by_metric(EXTRACTORS["care"](report), "after KVHealingTrainer")
    assert (healed.ours, healed.peer) == (43.65, pytest.approx(44.29535696532455))
    assert "12 healing steps" in healed.note
    report["rows"] = [r for r in report["rows"] if r["arm"] != "svd_uniform"]
    with pytest.raises(KeyError):
        EXTRACTORS["care"](report)
