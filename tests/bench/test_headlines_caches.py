"""The caches family's headline extractors (hf_fastslow/bench/headlines/caches.py) on the JSON of real quick runs
(tests/bench/data/<method>_quick.json, made by the scripts' --quick/--json on the 2-core CPU box). Expected values are
copied from those files, not recomputed."""

from __future__ import annotations

import copy

import pytest

from hf_fastslow.bench.headlines.caches import EXTRACTORS
from hf_fastslow.bench.registry import entries_by_method, headline_extractor
from tests.bench.conftest import load_json


def _by_metric(figures) -> dict:
    return {f.metric: f for f in figures}


def test_every_caches_entry_finds_its_extractor():
    entries = entries_by_method()
    for method in ("xquant", "qvg", "qvg_video", "kernels_quantize"):
        assert headline_extractor(entries[method]) is EXTRACTORS[method]
        assert entries[method].output.flag == "--json"
    assert entries["xquant"].quick_args == ("--quick",) and entries["qvg"].quick_args == ("--quick",)
    assert entries["xquant"].side_outputs == (("--plot", "xquant.png"),)
    assert entries["qvg"].side_outputs == (("--plot", "qvg.png"),)


def test_xquant_quick_figures():
    figures = _by_metric(EXTRACTORS["xquant"](load_json("xquant_quick.json")))
    assert len(figures) == 4
    ppl4 = figures["4 bit: perplexity through the cache, lower is better"]
    assert ppl4.ours == pytest.approx(29.009849794070966)  # XQuant latent int4
    assert ppl4.peer == pytest.approx(28.956316235054285)  # quanto best axes int4
    assert "XQuant-CL 29.12" in ppl4.note and "DynamicCache 28.99" in ppl4.note and "512 tokens" in ppl4.note
    ppl2 = figures["2 bit: perplexity through the cache, lower is better"]
    assert (ppl2.ours, ppl2.peer) == (pytest.approx(34.68537242739882), pytest.approx(43.16270922927117))
    assert "XQuant-CL 35.11" in ppl2.note and "6.60" in ppl2.paper
    bytes4 = figures["4 bit: bytes per token (storage walk, slope), lower is better"]
    assert (bytes4.ours, bytes4.peer) == (6484.0, 7200.0)
    assert "3.55x vs 3.20x" in bytes4.note and "35.4 MB of SVD factors" in bytes4.note and "957 tokens" in bytes4.note
    assert "7.7x" in bytes4.paper
    bytes2 = figures["2 bit: bytes per token (storage walk, slope), lower is better"]
    assert (bytes2.ours, bytes2.peer) == (3892.0, 4320.0)
    assert "5.92x vs 5.33x" in bytes2.note and "902 tokens" in bytes2.note
    assert all(f.measured for f in figures.values())


def test_xquant_break_even_reads_the_models_dtype_and_never():
    report = load_json("xquant_quick.json")
    bytes4 = _by_metric(EXTRACTORS["xquant"](report))["4 bit: bytes per token (storage walk, slope), lower is better"]
    assert "less than a float32 DynamicCache from 957 tokens on" in bytes4.note
    report["model_dtype"] = "torch.bfloat16"
    report["break_even_tokens"]["xquant_latent/int4"] = None  # the script writes None where it prints "never"
    bytes4 = _by_metric(EXTRACTORS["xquant"](report))["4 bit: bytes per token (storage walk, slope), lower is better"]
    assert "never holds less than a bfloat16 DynamicCache" in bytes4.note


def test_qvg_quick_figures():
    figures = _by_metric(EXTRACTORS["qvg"](load_json("qvg_quick.json")))
    assert len(figures) == 4
    ppl2 = figures["2 bit: perplexity through the cache, lower is better"]
    assert ppl2.ours == pytest.approx(31.98506434695099)  # QVG S=1 int2
    assert ppl2.peer == pytest.approx(43.16270922927117)  # quanto best axes int2
    assert "S=2 31.24 at 6,484 B/token" in ppl2.note and "S=1 asym. 29.69 at 5,224 B/token" in ppl2.note
    assert "DynamicCache 28.99" in ppl2.note and "448 scored" in ppl2.note
    bytes2 = figures["2 bit: bytes per token (storage walk, slope), lower is better"]
    assert (bytes2.ours, bytes2.peer) == (4864.0, 4320.0)
    assert "4.74x vs 5.33x" in bytes2.note and "6.94x" in bytes2.paper
    ppl4 = figures["4 bit: perplexity through the cache, lower is better"]
    assert (ppl4.ours, ppl4.peer) == (pytest.approx(29.186906556970293), pytest.approx(28.956316235054285))
    assert "QVG S=2" not in ppl4.note  # the quick run has no 4-bit S=2 row
    bytes4 = figures["4 bit: bytes per token (storage walk, slope), lower is better"]
    assert (bytes4.ours, bytes4.peer) == (7744.0, 7200.0)
    assert "2.98x vs 3.20x" in bytes4.note


def test_qvg_video_quick_figures():
    figures = _by_metric(EXTRACTORS["qvg_video"](load_json("qvg_video_quick.json")))
    assert len(figures) == 4
    latent = figures["scene, int2: generated-latent relative error vs the uncompressed cache, lower is better"]
    assert latent.ours == pytest.approx(0.00046292197657749057)  # QVG S=1 asym. int2
    assert latent.peer == pytest.approx(0.0028735969681292772)  # KIVI-style int2
    assert "0.0155" in latent.note and "3 given + 4 generated chunks of 128 tokens" in latent.note
    key = figures["scene, int2: key relative error (pre-RoPE), lower is better"]
    assert (key.ours, key.peer) == (pytest.approx(0.07038881528101645), pytest.approx(0.266835576860927))
    assert "value error 0.073 vs 0.447" in key.note
    equal = figures["scene, equal bytes: generated-latent relative error, lower is better"]
    assert equal.ours == pytest.approx(0.0007663612486794591)  # QVG S=1 symmetric int2
    assert equal.peer == pytest.approx(0.0009202546207234263)  # KIVI-style int3, the same bytes
    assert "4.74x" in equal.note
    x = figures["int2: compression of finished chunks vs a bf16 cache (x), higher is better"]
    assert (x.ours, x.peer) == (pytest.approx(4.413793103448276), pytest.approx(6.7368421052631575))
    assert "1.79x vs 1.95x" in x.note and "6.94x" in x.paper


def test_kernels_quantize_cpu_json_has_the_reference_only():
    figures = EXTRACTORS["kernels_quantize"](load_json("kernels_quantize_quick.json"))
    assert [f.metric for f in figures] == ["int2 quantize_pack (per-token): ms, lower is better",
                                           "int2 dequant_matmul (per-token): ms, lower is better",
                                           "int2 dequant_matmul (per-channel): ms, lower is better"]
    assert figures[0].ours is None and figures[0].peer == pytest.approx(28.00047749769874)
    assert figures[1].ours is None and figures[1].peer is None and "reference 1.727 ms" in figures[1].note
    assert "reference 2.093 ms" in figures[2].note
    assert not any(f.measured for f in figures)
    assert all("CPU: the reference path only" in f.note for f in figures)


def test_kernels_quantize_interpreter_json():
    figures = EXTRACTORS["kernels_quantize"](load_json("kernels_quantize_interpret.json"))
    assert (figures[0].ours, figures[0].peer) == (pytest.approx(238.0424139992101), pytest.approx(0.7388680023723282))
    assert (figures[1].ours, figures[1].peer) == (pytest.approx(251.70804699882865), pytest.approx(282.6391729977331))
    assert (figures[2].ours, figures[2].peer) == (pytest.approx(157.34217499993974), pytest.approx(382.7408799988916))
    assert "reference 0.293 ms" in figures[2].note
    assert not any(f.measured for f in figures)  # interpreter times are not speed
    assert all("Triton interpreter" in f.note for f in figures)


@pytest.mark.parametrize("method, data, path", [
    ("xquant", "xquant_quick.json", ("rows", "xquant_latent/int2")),
    ("xquant", "xquant_quick.json", ("rows", "quanto_best/int4")),
    ("qvg", "qvg_quick.json", ("rows", "qvg_s1/int2")),
    ("qvg", "qvg_quick.json", ("rows", "dynamic")),
    ("qvg_video", "qvg_video_quick.json", ("scenarios", "scene")),
    ("qvg_video", "qvg_video_quick.json", ("scenarios", "scene", "rows", "kivi/int3")),
    ("kernels_quantize", "kernels_quantize_quick.json", ("rows", "dequant_matmul/per-channel/int2")),
])
def test_a_renamed_arm_fails_loudly(method, data, path):
    report = copy.deepcopy(load_json(data))
    parent = report
    for key in path[:-1]:
        parent = parent[key]
    parent[path[-1] + "-renamed"] = parent.pop(path[-1])
    with pytest.raises(KeyError):
        EXTRACTORS[method](report)


def test_memory_vs_ppl_plot(tmp_path):
    pytest.importorskip("matplotlib")
    from hf_fastslow.evaluation.kv_report import plot_memory_vs_ppl, row_key

    assert row_key("dynamic", "-") == "dynamic" and row_key("quanto_best", 2) == "quanto_best/int2"
    rows = load_json("xquant_quick.json")["rows"]
    rows["failed/int3"] = {"arm": "failed", "bits": 3, "failed": "RuntimeError: x"}  # left out, not a crash
    out = tmp_path / "plot.png"
    assert plot_memory_vs_ppl(rows, out, "test") is None
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
