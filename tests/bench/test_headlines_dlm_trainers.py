"""The dlm_trainers headline extractors on trimmed copies of real quick runs (tests/bench/data/<method>_quick.json,
made by the command in each test's docstring) and on hand-made reports of the scripts' shapes. Expected values are
read off the saved files by hand, not recomputed by the extractors' logic."""


import pytest

from hf_fastslow.bench.headlines import extractors
from hf_fastslow.bench.headlines.dlm_trainers import EXTRACTORS
from hf_fastslow.bench.registry import entries_by_method, headline_extractor
from tests.bench.conftest import load_json

METHODS = ("dlm_synthetic", "isd", "block_diffusion", "isd_batch", "rcd", "losa", "spurious_features", "qttt", "dts")


def _quick(method: str):
    return load_json(f"{method}_quick.json")


def _figures(method: str, report=None):
    return EXTRACTORS[method](_quick(method) if report is None else report)


def _values(figures, digits=4):
    return [(round(f.ours, digits), None if f.peer is None else round(f.peer, digits)) for f in figures]


def test_every_method_of_the_family_has_an_extractor_found_through_its_entry():
    entries = entries_by_method()
    assert set(EXTRACTORS) == set(METHODS)
    for method in METHODS:
        assert entries[method].extract is None  # looked up in this family module, not defined in the registry
        assert headline_extractor(entries[method]) is EXTRACTORS[method] is extractors()[method]


# -- made-up reports of the scripts' shapes (moved from tests/bench/test_registry.py) ---------------------------------

def test_isd_batch_extractor_reads_the_scripts_report_shape():
    """The shape `benchmarks/isd_batch.py --json` prints (run() -> rows, machine, settings), on made-up numbers."""
    rows = [{"arm": arm, "tokens_per_s": tps, "agree_with_generate": agree, "requests": 12}
            for arm, tps, agree in (("stationary batch ISD (B=4)", 500.0, 11), ("isd_generate one by one", 250.0, 12),
                                    ("isd_generate batches of 4", 400.0, 12), ("generate one by one", 300.0, 12),
                                    ("generate batches of 4", 625.0, 12))]
    report = {"rows": rows, "machine": "m", "settings": {"model": "random", "requests": 12, "tokens": 84}}
    figures = EXTRACTORS["isd_batch"](report)
    assert [(f.ours, f.peer) for f in figures] == [(500.0, 250.0), (500.0, 625.0), (11 / 12, None)]


def test_spurious_features_extractor_on_the_scripts_report_shape():
    """The shape `benchmarks/spurious_features.py --json` writes (results per training size, per arm, per seed)."""
    arm = {"ERM": [0.2, 0.4], "KD": [0.1, 0.3], "early-readout KD": [0.5, 0.7], "Feature Sieve": [0.6, 0.6]}
    rows = {name: [{"worst_group": w, "average": 0.8} for w in values] for name, values in arm.items()}
    for row, precision in zip(rows["early-readout KD"], (0.7, 0.9)):
        row["flag_precision_minority"] = precision
    figures = EXTRACTORS["spurious_features"]({"args": {}, "teacher": [0.9, 0.9], "results": {"400": rows}})
    assert [(round(f.ours, 3), f.peer and round(f.peer, 3)) for f in figures] == [(0.6, 0.2), (0.6, 0.3), (0.8, None)]
    assert all("400 training rows, 2 seed(s)" in f.note for f in figures)


# -- real quick runs --------------------------------------------------------------------------------------------------

def test_isd_batch_quick_run():
    """`python benchmarks/isd_batch.py --quick --json` (stdout), load 2.9: 12 requests on the random Llama."""
    figures = _figures("isd_batch")
    assert _values(figures, 1) == [(534.6, 253.6), (534.6, 712.7), (1.0, None)]
    assert "12 requests, 84 new tokens" in figures[0].note


def test_losa_quick_run():
    """`python benchmarks/losa.py --quick --json losa.json`: prefix 1536, budgets 128/256, rule k5; the figures are
    the smallest budget's (128), LOSA k5 beside QUEST-naive and SDPA dense."""
    figures = _figures("losa")
    assert _values(figures) == [(0.1022, 0.1241), (0.8958, 0.6875), (276.1418, 260.0696)]
    assert "prefix 1536, budget 128, LOSA k5" in figures[0].note
    assert figures[0].paper and figures[2].paper


def test_rcd_quick_run():
    """`python benchmarks/rcd.py --quick --threads 1 --json rcd.json`, load 15-19: 1 prompt x 16 tokens, block 8."""
    figures = _figures("rcd")
    assert _values(figures) == [(0.4036, 0.4533), (2331.8459, 2206.2309), (2229.2504, 2206.2309), (1.19, None)]
    assert "block 8, 1 GSM8K prompt(s) x 16 new tokens, 3 rounds; tokens == baseline 0.812" in figures[0].note


def test_rcd_components_run_has_no_decode_headline():
    report = _quick("rcd")
    pieces = {"block forward": {"ms": 1.0, "per_block_forward": 1.0}}
    report["blocks"] = [{"block": 8, "machine": "m", "pieces": pieces}]
    with pytest.raises(KeyError):
        EXTRACTORS["rcd"](report)


def test_dlm_synthetic_quick_run():
    """`python benchmarks/dlm_synthetic.py --quick --out DIR`: 3-digit addition, 40 steps, 64 held-out problems; at
    that size no arm learns the task (every accuracy 0.0 in the file) and the note says so."""
    figures = _figures("dlm_synthetic")
    assert _values(figures) == [(0.0, 0.0), (1.0, 1.0), (0.0, 0.0)]
    assert all("smoke scale" in f.note for f in figures)
    assert "64/64 answers == its generate" in figures[1].note


def test_dlm_synthetic_reads_the_named_rows():
    """On the full profile's row names, with made-up accuracies: each figure takes its own row."""
    report = _quick("dlm_synthetic")
    accuracy = {("block diffusion", "BD3", "b=4 steps=4 thr=0.9"): 0.87, ("AR greedy", "AR", "generate"): 0.10,
                ("RCD (zero init)", "RCD", "b=4 thr=0.9"): 0.84,
                ("SeqD (block diffusion)", "SeqD", "b=4 thr=0.9"): 0.89}
    for row in report["rows"]:
        row["accuracy"] = accuracy.get((row["method"], row["model"], row["setting"]), 0.5)
        if (row["method"], row["setting"]) == ("ISD greedy", "N=3"):
            row["tpf"] = 1.59
    figures = EXTRACTORS["dlm_synthetic"](report)
    assert _values(figures) == [(0.87, 0.10), (1.59, 1.0), (0.84, 0.89)]
    assert not any("smoke scale" in f.note for f in figures)
    del report["rows"][-1]  # the last RCD row (self init, thr 0.3) is not read
    EXTRACTORS["dlm_synthetic"](report)
    report["rows"] = [r for r in report["rows"] if r["model"] != "SeqD"]
    with pytest.raises(KeyError):
        EXTRACTORS["dlm_synthetic"](report)


def test_block_diffusion_quick_run():
    """`python benchmarks/block_diffusion.py --quick --json bd.json` under load 19-28: block 4 / steps 4 / threshold
    0.9 on the tiny random Llama and on SmolLM2; the figures are SmolLM2's."""
    figures = _figures("block_diffusion")
    assert _values(figures) == [(0.9221, 0.1108), (0.9221, 0.3366), (1.5238, 0.8421)]
    assert figures[0].note.startswith("SmolLM2-135M-Instruct (unconverted), block 4, steps 4, threshold 0.9")


def test_block_diffusion_without_the_default_model_reads_the_tiny_setting():
    report = _quick("block_diffusion")
    report["settings"] = [s for s in report["settings"] if not s["model"].startswith("SmolLM2")]
    figures = EXTRACTORS["block_diffusion"](report)
    # the tiny setting's arms in the file: ours 28.45 tok/s (TPF 1.185), LLaDA2Pipeline 11.87 (TPF 1.0), AR greedy 29.17
    assert _values(figures) == [(28.449, 11.8673), (28.449, 29.1667), (1.1852, 1.0)]
    assert figures[0].note.startswith("tiny random Llama (2 layers, hidden 64), block 4, steps 4, threshold 0.9")


def test_isd_extractor_on_the_scripts_report_shape():
    """The results.json `benchmarks/isd.py` writes (decoding rows per arm, equality per compared arm), made-up
    numbers; the lossless figure counts the ISD arms only, not prompt lookup."""
    decoding = [{"arm": arm, "tokens_per_s": tps, "acceptance": acc}
                for arm, tps, acc in (("greedy generate", 4.0, None), ("prompt lookup (3 tokens)", 3.0, None),
                                      ("ISD N=2, base model", 2.0, 0.06), ("R-ISD N=2, trained adapter", 2.5, 0.2),
                                      ("ISD N=3, base model", 1.5, 0.05), ("R-ISD N=3, trained adapter", 5.0, 0.4))]
    equality = [{"arm": arm, "identical": same, "prompts": 3}
                for arm, same in (("fp32 prompt lookup (3 tokens)", 0), ("fp32 ISD N=3, base model", 3),
                                  ("fp32 R-ISD N=3, trained adapter", 2), ("float64 ISD N=3 (R-ISD)", 3))]
    report = {"args": {"strides": [2, 3], "lookup": 3, "prompts": 3, "new_tokens": 24}, "decoding": decoding,
              "training": {"tokens": 1712}, "equality": equality}
    figures = EXTRACTORS["isd"](report)
    assert [(f.ours, f.peer) for f in figures] == [(0.4, 0.05), (5.0, 4.0), (5.0, 3.0), (5 / 6, None)]
    assert "1712 clean tokens" in figures[0].note and figures[1].paper


def test_qttt_extractor_on_the_scripts_report_shape():
    """The JSON `benchmarks/qttt.py` writes (per context length, JSON keys are strings): the longest length is read."""
    def arms(in_context, thinking, qttt, full):
        return {"in-context": {"exact_match": in_context}, "thinking (FLOP-matched)": {"exact_match": thinking},
                "qTTT": {"exact_match": qttt}, "full TTT": {"exact_match": full}}

    run = {"context_tokens": 2045.3, "thinking_budget": 2543, "lr_qttt": 1e-4, "lr_full": 1e-3}
    report = {"args": {"examples": 10, "steps": 16},
              "lengths": {"2048": {**run, "arms": arms(0.1, 0.2, 0.4, 0.0)},
                          "1024": {**run, "arms": arms(0.9, 0.9, 0.9, 0.9)}}}
    figures = EXTRACTORS["qttt"](report)
    assert [(f.ours, f.peer) for f in figures] == [(0.4, 0.1), (0.4, 0.2), (0.4, 0.0)]
    assert "~2045 tokens, 10 examples" in figures[0].note and "budget 2543" in figures[1].note


def test_dts_extractor_on_the_scripts_report_shape():
    """The JSON `benchmarks/dts.py` writes (table per arm); an arm without pairs has accuracy None: no DPO figure."""
    table = {"base model": {"accuracy": 0.083},
             "DTS": {"pairs": 7, "jaccard": 0.188, "accuracy": 0.042},
             "sampling": {"pairs": 5, "jaccard": 0.242, "accuracy": 0.062}}
    report = {"args": {"train": 24, "test": 48, "problems": "easy", "k": 4}, "table": table, "token_ratio": 1.08}
    figures = EXTRACTORS["dts"](report)
    assert [(f.ours, f.peer) for f in figures] == [(7, 5), (0.188, 0.242), (0.042, 0.062)]
    assert "base model 0.083" in figures[2].note
    table["DTS"]["accuracy"] = None
    assert len(EXTRACTORS["dts"](report)) == 2


def test_isd_quick_run():
    """`python benchmarks/isd.py --quick --out DIR` (results.json), load 17-28: 239 training tokens, 1 prompt x 12
    tokens, N=3; smoke scale: acceptance 0.0 before and after, R-ISD slower than greedy, outputs identical."""
    figures = _figures("isd")
    assert _values(figures) == [(0.0, 0.0), (0.1867, 0.4066), (0.1867, 0.6203), (1.0, None)]
    assert "239 clean tokens; 1 GSM8K prompt(s) x 12 new tokens" in figures[0].note
    assert figures[3].note == "2 ISD arm(s); lossless means 1.0" and figures[3].ratio is None
