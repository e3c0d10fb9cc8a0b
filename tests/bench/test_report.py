"""Merging runs into one report (--update), ingesting a recorded run's JSON (--ingest), and docs/benchmarks.md's
generated block (--render): the page must equal what its committed report renders."""

import json
import re
from pathlib import Path

import pytest

from hf_fastslow.bench.registry import BenchEntry, Figure, Output, entries_by_method
from hf_fastslow.bench.report import BEGIN, END, generated_block, ingest, merge_reports, render_block, render_into
from hf_fastslow.bench.runner import REPORT_NAME, run_entries
from hf_fastslow.cli import main

ROOT = Path(__file__).resolve().parents[2]
FULL_REPORT = ROOT / "docs/benchmarks/full/bench_report.json"


def _entry(tmp_path, name, value):
    script = tmp_path / f"{name}.py"
    script.write_text("import argparse, json\np = argparse.ArgumentParser()\np.add_argument('--quick', "
                      "action='store_true')\np.add_argument('--out')\nargs = p.parse_args()\n"
                      f"json.dump({{'ours': {value}, 'peer': 2.0}}, open(args.out, 'w'))\n")
    return BenchEntry(name, str(script), "a peer", "m", "x.md", Output("file", "--out"), ("--quick",),
                      extract=lambda r: [Figure("seconds", r["ours"], r["peer"])])


def test_update_merges_runs_and_keeps_each_records_environment(tmp_path):
    entries = {"a": _entry(tmp_path, "a", 1.0), "b": _entry(tmp_path, "b", 3.0)}
    out = tmp_path / "out"
    first = run_entries(["a", "b"], entries, out_dir=out, root=tmp_path, say=lambda _: None)
    entries["a"] = _entry(tmp_path, "a2", 5.0).__class__(**{**entries["a"].__dict__,
                                                            "script": str(tmp_path / "a2.py")})
    second = run_entries(["a"], entries, out_dir=out, root=tmp_path, say=lambda _: None, update=True)
    assert [m["method"] for m in second["methods"]] == ["a", "b"]
    assert [m["figures"][0]["ours"] for m in second["methods"]] == [5.0, 3.0]  # a re-run, b kept
    assert second["methods"][1]["finished_at"] == first["methods"][1]["finished_at"]
    assert all(m["environment"]["cpus"] for m in second["methods"])
    assert json.loads((out / REPORT_NAME).read_text())["methods"][0]["figures"][0]["ours"] == 5.0
    alone = run_entries(["a"], entries, out_dir=out, root=tmp_path, say=lambda _: None)  # no --update: replaced
    assert [m["method"] for m in alone["methods"]] == ["a"]


def test_each_record_carries_the_load_at_its_methods_start(tmp_path, monkeypatch):
    import hf_fastslow.evaluation.timing as timing

    loads = iter(["0.1/0.1/0.1", "1.0/1.0/1.0", "2.0/2.0/2.0", "3.0/3.0/3.0", "9.0/9.0/9.0"])
    monkeypatch.setattr(timing, "load_average", lambda: next(loads))
    entries = {"a": _entry(tmp_path, "a", 1.0), "b": _entry(tmp_path, "b", 3.0)}
    report = run_entries(["a", "b"], entries, out_dir=tmp_path / "o", root=tmp_path, say=lambda _: None)
    assert [m["environment"]["load_average"] for m in report["methods"]] == ["1.0/1.0/1.0", "2.0/2.0/2.0"]
    block = render_block(report)
    assert block.count("- quick profile; device") == 1  # one machine: one line, the load moved to each method
    assert re.search(r"\ba \d+ \(1\.0/1\.0/1\.0\), b \d+ \(2\.0/2\.0/2\.0\)\.", block)


def test_merge_orders_by_registry_and_fills_old_records():
    env = {"device": "cpu", "cpus": 2, "torch_threads": 1, "load_average": "1/1/1",
           "versions": {"torch": "t", "transformers": "x"}}
    old = {"profile": "full", "environment": env, "methods": [{"method": "z"}, {"method": "a", "v": 1}]}
    new = {"profile": "quick", "environment": env, "methods": [{"method": "a", "v": 2, "profile": "quick"}]}
    merged = merge_reports(old, new, ["a", "z"])
    assert [(m["method"], m.get("v")) for m in merged["methods"]] == [("a", 2), ("z", None)]
    assert merged["methods"][1]["profile"] == "full" and merged["methods"][1]["environment"] is env
    assert merged["profile"] == "full+quick"


def test_ingest_reads_a_recorded_json_through_the_extractor(tmp_path):
    entry = _entry(tmp_path, "a", 1.0)
    recorded = tmp_path / "recorded.json"
    recorded.write_text(json.dumps({"ours": 4.0, "peer": 8.0}))
    record = ingest(entry, recorded, "full", "(recorded) a.py")
    assert record["status"] == "measured" and record["figures"][0]["ratio"] == 0.5
    assert "recorded run" in record["reason"] and record["environment"] is None
    recorded.write_text(json.dumps({"other": 1}))
    assert ingest(entry, recorded, "full", "x")["status"] == "failed"  # a shape the extractor does not know


def test_cli_ingest_and_render(tmp_path, capsys):
    out = tmp_path / "out"
    recorded = tmp_path / "k.json"
    recorded.write_text((ROOT / "docs/benchmarks/ipw_results.json").read_text())
    assert main(["bench", "--ingest", "ipw=" + str(recorded), "--profile", "full", "--out", str(out)]) == 0
    report = json.loads((out / REPORT_NAME).read_text())
    assert [m["method"] for m in report["methods"]] == ["ipw"] and report["methods"][0]["figures"]
    assert main(["bench", "--ingest", "nope=x.json", "--out", str(out)]) == 2
    assert "METHOD=JSON" in capsys.readouterr().err
    assert main(["bench", "--ingest", f"ipw={tmp_path / 'missing.json'}", "--out", str(out)]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["bench", "--render", str(tmp_path / "missing.json"), "--into", str(tmp_path / "p.md")]) == 2
    assert "missing.json" in capsys.readouterr().err
    page = tmp_path / "page.md"
    page.write_text(f"# Title\n\ntext\n\n{BEGIN}\nold\n{END}\n\nafter\n")
    assert main(["bench", "--render", str(out / REPORT_NAME), "--into", str(page)]) == 0
    text = page.read_text()
    assert text.startswith("# Title\n\ntext\n\n" + BEGIN) and text.endswith(END + "\n\nafter\n")
    assert "| ipw |" in text and "\nold\n" not in text
    assert "environment not recorded" in text  # an ingested run says it has no environment
    assert render_into(page, report, entries_by_method()) is False  # idempotent (the CLI adds the missing methods)
    page.write_text("no markers\n")
    with pytest.raises(ValueError, match="no generated block"):
        render_into(page, report)


def test_docs_benchmarks_page_is_generated_from_its_committed_report():
    """docs/benchmarks.md's block is exactly what docs/benchmarks/full/bench_report.json renders: editing one without
    re-rendering (`hf-fastslow bench --render docs/benchmarks/full/bench_report.json --into docs/benchmarks.md`)
    fails."""
    report, entries = json.loads(FULL_REPORT.read_text()), entries_by_method()
    block = generated_block(ROOT / "docs/benchmarks.md")
    assert block == render_block(report, entries)
    assert all(f"\n| {name} | " in block for name in entries), "every method has a row (or says why not)"
    for m in report["methods"]:
        assert m["status"] in ("measured", "cannot run here", "failed", "ran"), m["method"]
        assert m["status"] == "measured" or m["reason"], f"{m['method']}: a row without figures must say why"


def test_a_method_missing_from_the_report_gets_a_row_saying_so():
    entries = entries_by_method()
    block = render_block({"methods": []}, {"ksort": entries["ksort"]})
    assert "| ksort | " in block and "not in this report: not yet run at this profile" in block


def test_readme_quick_table_is_generated_from_its_committed_report():
    """README.md's benchmark table is what docs/benchmarks/quick_report.json renders, every method with a row."""
    report, entries = json.loads((ROOT / "docs/benchmarks/quick_report.json").read_text()), entries_by_method()
    block = generated_block(ROOT / "README.md")
    assert block == render_block(report, entries)
    assert {m["method"] for m in report["methods"]} == set(entries), "the quick run covers every method"
    assert {m["profile"] for m in report["methods"]} == {"quick"}


def test_a_run_stopped_half_way_keeps_the_methods_it_measured(tmp_path):
    entries = {"a": _entry(tmp_path, "a", 1.0), "b": _entry(tmp_path, "b", 3.0)}

    def stop_at_b(line):
        if line.startswith("[2/2] b: python"):
            raise KeyboardInterrupt  # the user presses Ctrl-C while b runs

    with pytest.raises(KeyboardInterrupt):
        run_entries(["a", "b"], entries, out_dir=tmp_path / "out", root=tmp_path, say=stop_at_b)
    saved = json.loads((tmp_path / "out" / REPORT_NAME).read_text())
    assert saved["methods"][0]["method"] == "a" and saved["methods"][0]["figures"][0]["ours"] == 1.0
