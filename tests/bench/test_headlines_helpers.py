"""The pieces the headline extractors and the benchmark scripts share: index_rows / smoke_note
(hf_fastslow/bench/headlines/__init__.py) and apply_quick / write_report_json / the memory-vs-perplexity plot
(hf_fastslow/evaluation/cli_support.py, kv_report.py)."""

import argparse
import json

import pytest

from hf_fastslow.bench.headlines import index_rows, smoke_note
from hf_fastslow.evaluation.cli_support import apply_quick, write_report_json
from hf_fastslow.evaluation.kv_report import plot_memory_vs_ppl
from tests.bench.conftest import load_json

ROWS = [{"arm": "a", "kept": 1.0, "v": 1}, {"arm": "b", "kept": 0.1 * 3, "v": 2}, {"arm": "a", "kept": 0.5, "v": 3}]


def test_index_rows_by_one_key_by_a_tuple_and_grouped():
    by_kept = index_rows(ROWS, "kept")
    assert by_kept[1.0]["v"] == 1 and by_kept[0.3]["v"] == 2  # 0.30000000000000004 found at its literal
    assert index_rows(ROWS, "arm", "kept")["a", 0.5]["v"] == 3
    assert index_rows(ROWS, "arm")["a"]["v"] == 3  # a later row with the same key replaces the earlier
    assert [r["v"] for r in index_rows(ROWS, "arm", grouped=True)["a"]] == [1, 3]
    assert index_rows(ROWS, lambda r: r["arm"].upper())["B"]["v"] == 2
    with pytest.raises(KeyError, match=r"no row at \(arm, kept\)=\('b', 0.5\).*\('a', 1.0\)"):
        index_rows(ROWS, "arm", "kept")["b", 0.5]
    with pytest.raises(KeyError, match="kept=0.25"):
        index_rows(ROWS, "kept")[0.25]


def test_smoke_note():
    assert smoke_note(True, "too small") == "; smoke scale: too small"
    assert smoke_note(False, "too small") == ""


def test_apply_quick_only_with_quick():
    quick = apply_quick(argparse.Namespace(quick=True, n=10, m=1), {"n": 2})
    assert (quick.n, quick.m) == (2, 1)
    assert apply_quick(argparse.Namespace(quick=False, n=10), {"n": 2}).n == 10


def test_write_report_json_adds_the_load(tmp_path):
    write_report_json(tmp_path / "r.json", {"x": 1})
    written = json.loads((tmp_path / "r.json").read_text())
    assert written["x"] == 1 and written["load_average"].count("/") == 2 and written["process_cpu_s"] > 0
    write_report_json(None, {"x": 1})  # no path: nothing written, no error


def test_memory_vs_ppl_plot_of_cares_rows(tmp_path):
    pytest.importorskip("matplotlib")
    rows = load_json("care_quick.json")["rows"]
    points = [{**row, "fraction": None if row["arm"] == "original" else row["fraction"]} for row in rows]
    assert plot_memory_vs_ppl(points, tmp_path / "care.png", "care", along="fraction", point_label="{:.0%}") is None
    assert (tmp_path / "care.png").stat().st_size > 1000
