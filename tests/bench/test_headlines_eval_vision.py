"""The eval_vision headline extractors (hf_fastslow/bench/headlines/eval_vision.py) on the JSON of real runs: trimmed
copies of quick runs in tests/bench/data/, and the full-size runs docs/benchmarks/ or tests/bench/data/ keep. Expected
values are read off those files by hand (the docs pages quote the same numbers), not recomputed by the extractors'
logic; a swapped ours/peer or a wrong key fails here."""

import subprocess
import sys

import pytest

from hf_fastslow.bench.headlines import extractors
from hf_fastslow.bench.headlines.eval_vision import EXTRACTORS
from hf_fastslow.bench.registry import entries_by_method
from hf_fastslow.bench.runner import command
from tests.bench.conftest import DATA, ROOT, load_json

METHODS = ("ipw", "ksort", "mast", "concept_bottleneck", "slimming", "metadock")
# metadock_quick.json's table: MetaDOCK Conv4-32 @ 25% vs iMAML dense Conv4-16, 1-shot then 5-shot
METADOCK_QUICK = [(0.7367, 0.706), (0.856, 0.832)]


def _pairs(figures, digits=4):
    return [(round(f.ours, digits), None if f.peer is None else round(f.peer, digits)) for f in figures]


def test_every_method_of_the_family_has_its_extractor_and_a_plot_under_the_run_folder(tmp_path):
    assert set(EXTRACTORS) == set(METHODS)
    found, entries = extractors(), entries_by_method()
    for method in METHODS:
        assert found[method] is EXTRACTORS[method] and entries[method].extract is None  # looked up by family
        cmd = command(entries[method], "quick", "cpu", tmp_path, python="py")
        if method != "ksort":  # ksort's script draws no plot (the K-Sort verb does)
            assert cmd[cmd.index("--plot") + 1] == str(tmp_path / f"{method}.png")


def test_ipw_recorded_run():
    """docs/benchmarks/ipw_results.json (50 problems, docs/benchmarks/ipw.md)."""
    ipw = EXTRACTORS["ipw"](load_json(ROOT / "docs/benchmarks/ipw_results.json"))
    assert [f.metric.split(",")[0] for f in ipw] == [
        "fp32 energy per query (J): the IPW meter vs CodeCarbon's CPU share",
        "energy saved by routing local/cloud vs cloud only", "energy saved by routing local/cloud vs cloud only",
        "accuracy per joule", "accuracy"]
    # reports.fp32 energy 17.60 J vs other_meters.fp32 CodeCarbon CPU 7.18 J; routing "1.0" saves 4.1 %, "0.8" 26.8 %
    # (the noisy router sends 36 % local at accuracy 0.24 vs 0.26); int8 vs fp32 accuracy per joule 0.00764 vs
    # 0.01477, accuracy 0.06 vs 0.26
    assert _pairs(ipw, 5) == [(17.60324, 7.18172), (0.04062, None), (0.26802, None), (0.00764, 0.01477),
                              (0.06, 0.26)]
    assert ipw[1].metric.endswith("router accuracy 1") and ipw[2].metric.endswith("router accuracy 0.8")
    assert "36% of queries local, accuracy 0.24 vs cloud only 0.26" in ipw[2].note
    assert [f.measured for f in ipw] == [False, False, False, False, True]  # no energy counter on the recording box


def test_mast_recorded_full_run():
    """docs/benchmarks/mast_results.json: 24 fixtures; docs/evaluation.md quotes kappa ~0 for the judge, 0.56 for the
    heuristics, 0 for agentdash, and the prefix cache at 24.6 s vs 175 s."""
    figures = EXTRACTORS["mast"](load_json(ROOT / "docs/benchmarks/mast_results.json"))
    assert _pairs(figures) == [(0.0144, 0.0), (0.0714, 0.0), (0.5621, 0.0), (24.6489, 175.2488)]
    assert "24 fixture traces" in figures[0].note and "agentdash" in figures[0].note
    assert figures[0].paper.startswith("0.77")


def test_slimming_recorded_full_run():
    """The default-size run (docs/vision.md 'The default-size run'): ViT 0.420 at 10 % vs 0.486 dense, CNN 0.211 vs
    0.560; LM at 50 % MLP: 36,773 (IA3 masks) vs 3.56 M (torch prune)."""
    figures = EXTRACTORS["slimming"](load_json("slimming_full.json"))
    assert [f.metric.split(":")[0] for f in figures] == ["vit tracker", "cnn tracker", "default LM"]
    assert _pairs(figures, 3) == [(0.42, 0.486), (0.211, 0.56), (36773.387, 3564711.021)]
    assert "params 38,835 of 217,861" in figures[0].note and "3000 dense" in figures[0].note
    assert "dense ppl 50.332" in figures[2].note


def test_slimming_missing_kept_fraction_fails_loudly():
    report = load_json("slimming_full.json")
    report["trackers"]["vit"]["rows"] = [r for r in report["trackers"]["vit"]["rows"] if r["kept"] != 0.1]
    with pytest.raises(KeyError, match="kept=0.1"):
        EXTRACTORS["slimming"](report)


def test_metadock_quick_run():
    figures = EXTRACTORS["metadock"](load_json("metadock_quick.json"))
    assert [f.metric.split(" meta-test")[0] for f in figures] == ["5-way 1-shot", "5-way 5-shot"]
    assert _pairs(figures) == METADOCK_QUICK
    assert all("Conv4-16 (= 25% params)" in f.note for f in figures)
    # the gates kept ~72 % of the kernels in 8 meta-steps: flagged, and the quick run is called smoke scale
    assert all("budget not reached" in f.note and "smoke scale" in f.note for f in figures)


def test_metadock_merged_report(tmp_path):
    """`metadock.py --merge` (how the full run is split over processes) keeps the rows and table the extractor reads;
    its settings carry the merge call's width, so arms are found by their budget suffix."""
    merged = tmp_path / "merged.json"
    subprocess.run([sys.executable, str(ROOT / "benchmarks/metadock.py"), "--merge", str(DATA / "metadock_quick.json"),
                    "--width", "64", "--out", str(merged), "--plot", str(tmp_path / "m.png")], check=True,
                   capture_output=True, cwd=tmp_path)
    figures = EXTRACTORS["metadock"](load_json(merged))
    assert _pairs(figures) == METADOCK_QUICK


def test_metadock_missing_arm_fails_loudly():
    report = load_json("metadock_quick.json")
    report["table"] = [t for t in report["table"] if "params)" not in t["arm"]]
    with pytest.raises(KeyError, match="gated or narrow arm missing"):
        EXTRACTORS["metadock"](report)


def test_concept_bottleneck_quick_run():
    """3 seeds x 8 epochs: CooP 84.5 AUC points vs the static order's 82.1 (the best non-oracle baseline)."""
    figures = EXTRACTORS["concept_bottleneck"](load_json("concept_bottleneck_quick.json"))
    assert _pairs(figures) == [(84.5249, 82.1263), (2.3986, None)]
    assert "peer: static" in figures[0].note and "3 seed(s)" in figures[0].note
    assert figures[0].metric.startswith("test accuracy AUC over the first 3 queries") and figures[1].paper == ">= 5"


def test_ksort_quick_run():
    """The quick run docs/bench.md shows (5 seeds x 2 models, 12 prompts): K-Sort needs 73 runs to converge vs static
    matching's 81.3, both converge within 90; text arena |mu - true skill| 0.361 vs Bradley-Terry's 0.300."""
    figures = EXTRACTORS["ksort"](load_json("ksort_quick.json"))
    assert _pairs(figures) == [(73, 81.3), (1, 1), (0.3613, 0.3)]
    assert figures[1].paper == "0.91-0.93" and "static judge + Bradley-Terry" in figures[2].note
    text_only = load_json("ksort_quick.json")
    del text_only["synthetic"]  # --skip-synthetic: only the text arena's figure
    assert _pairs(EXTRACTORS["ksort"](text_only)) == [(0.3613, 0.3)]


def test_slimming_quick_run():
    """--quick (300 dense / 20 search / 20 child steps, 4 test sequences): ViT 0.196 at 10 % vs 0.136 dense (noise at
    this size), CNN 0.101 vs 0.133; LM at 50 % MLP 14,042 vs 8.5 M; every note calls it smoke-scale."""
    figures = EXTRACTORS["slimming"](load_json("slimming_quick.json"))
    assert _pairs(figures, 3) == [(0.196, 0.136), (0.101, 0.133), (14042.2, 8544592.894)]
    assert all("smoke scale" in f.note for f in figures)
    assert not any("smoke" in f.note for f in EXTRACTORS["slimming"](load_json("slimming_full.json")))


def test_mast_without_the_agentdash_arm_has_no_peer_and_says_why():
    report = load_json(ROOT / "docs/benchmarks/mast_results.json")
    del report["fixtures"]["annotators"]["agentdash"]
    report["agentdash_setup_error"] = "ImportError: no module named fastapi"
    figures = EXTRACTORS["mast"](report)
    assert _pairs(figures[:3]) == [(0.0144, None), (0.0714, None), (0.5621, None)]
    assert "agentdash not run (ImportError: no module named fastapi)" in figures[0].note
    report["agentdash_setup_error"] = None  # the arm is missing although it was to run: the shape changed
    with pytest.raises(KeyError):
        EXTRACTORS["mast"](report)
