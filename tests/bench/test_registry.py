"""The bench registry covers every benchmark script and every public method; a run's JSON report has the documented
schema; methods that cannot run here are reported with their reason; bad names list the valid ones. Runs use tiny
fake benchmark scripts written to tmp_path, never a real model."""

import json
import os
import re
import sys
from pathlib import Path

import pytest
import torch

from hf_fastslow.bench import registry as registry_module
from hf_fastslow.bench.registry import (
    ENTRIES,
    UNBENCHED_INDEX_PAGES,
    BenchEntry,
    Figure,
    Output,
    benchmark_scripts,
    entries_by_method,
    resolve,
)
from hf_fastslow.bench.runner import (
    COMMITTED_REPORTS,
    REPORT_NAME,
    blocked_reason,
    command,
    progress_line,
    recorded_walls,
    run_entries,
    table,
)
from hf_fastslow.cli import main

ROOT = Path(__file__).resolve().parents[2]

# README's methods table, by the docs page each row links: the registry entries that measure that row's methods. A new
# README row fails test_readme_methods_map_to_entries until it is mapped here to the entries that benchmark it.
README_PAGE_ENTRIES = {
    "docs/xquant.md": ["xquant"],
    "docs/qvg.md": ["qvg"],
    "docs/video.md": ["qvg_video"],
    "docs/ear.md": ["ear"],
    "docs/attention.md": ["iha", "care", "crest"],
    "docs/speculative.md": ["das", "speculative_loop"],
    "docs/aurora.md": ["aurora"],
    "docs/dlm.md": ["dlm_synthetic", "isd", "block_diffusion", "isd_batch", "rcd", "losa"],
    "docs/trainers.md": ["fst", "pairrl", "v1_infer", "spurious_features", "dts", "qttt"],
    "docs/agents.md": ["squeeze_evolve", "catts", "staircase", "speculative_agent"],
    "docs/evaluation.md": ["ipw", "ksort", "mast"],
    "docs/vision.md": ["concept_bottleneck", "slimming", "metadock"],
    "docs/scaling.md": ["multiprocess_trainers", "replica_failover"],
    "docs/kernels.md": ["kernels_quantize"],
    "docs/backends.md": [],  # shown by examples/backends.py --serve (UNBENCHED_INDEX_PAGES)
}


def _table_rows(text: str, header: str) -> list[str]:
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(line)
    assert rows, f"no rows under {header!r}"
    return rows


def test_every_benchmark_script_has_an_entry():
    scripts = benchmark_scripts(ROOT)
    assert len(scripts) >= 30
    covered = {e.script for e in ENTRIES}
    assert [s for s in scripts if s not in covered] == []
    assert [s for s in covered if not (ROOT / s).is_file()] == []
    assert len({e.method for e in ENTRIES}) == len(ENTRIES)


def test_docs_benchmarks_index_maps_to_entries():
    rows = _table_rows((ROOT / "docs/benchmarks.md").read_text(), "| method | page |")
    scripts = {e.script for e in ENTRIES}
    pages = {e.docs for e in ENTRIES} | set(UNBENCHED_INDEX_PAGES)
    for row in rows:
        named = re.findall(r"`(benchmarks/\w+\.py)", row)
        if named:
            assert [s for s in named if s not in scripts] == [], row
            continue
        link = re.search(r"\]\(([^)#]*)", row)
        page = link.group(1) if link and link.group(1) else "benchmarks.md"  # "[below](#xquant)"
        assert page in pages, row


def test_readme_methods_map_to_entries():
    rows = _table_rows((ROOT / "README.md").read_text(), "| area | what |")
    methods = entries_by_method()
    for row in rows:
        page = re.search(r"\]\((docs/[\w/]+\.md)", row.split("|")[-2]).group(1)
        assert page in README_PAGE_ENTRIES, f"README row not mapped to bench entries: {row[:100]}"
        assert [m for m in README_PAGE_ENTRIES[page] if m not in methods] == []
    for page, names in README_PAGE_ENTRIES.items():
        assert names or page.removeprefix("docs/") in UNBENCHED_INDEX_PAGES, page


@pytest.mark.parametrize("entry", ENTRIES, ids=lambda e: e.method)
def test_entry_flags_exist_in_its_script(entry):
    source = (ROOT / entry.script).read_text()
    flags = [a for a in (*(entry.quick_args or ()), *entry.full_args) if a.startswith("--")]
    flags += [f for f in (entry.output.flag, entry.device_flag) if f] + [flag for flag, _ in entry.side_outputs]
    assert [f for f in flags if f'"{f}"' not in source] == []
    assert entry.quick_args is not None or entry.quick_note, "a missing quick profile needs its reason"
    if entry.output.mode == "none":
        assert "json.dump" not in source, "the script writes JSON: record how"


def _fake_script(tmp_path: Path, name: str, body: str) -> str:
    path = tmp_path / f"{name}.py"
    path.write_text("import argparse, json, sys\n"
                    "p = argparse.ArgumentParser()\n"
                    "p.add_argument('--quick', action='store_true')\n"
                    "p.add_argument('--out')\n"
                    "p.add_argument('--json', action='store_true')\n"
                    "args = p.parse_args()\n" + body)
    return str(path)


_WRITES = "json.dump({'ours': 2.0, 'peer': 4.0, 'joules': 7.5, 'quick': args.quick}, open(args.out, 'w'))\n"


def _extract(report):
    return [Figure("seconds per answer", report["ours"], report["peer"], paper="2x faster"),
            Figure("joules per answer", report["joules"], None, measured=False)]


@pytest.fixture
def fakes(tmp_path):
    prints = "print('loading...'); print(json.dumps({'ours': 3.0, 'peer': 1.5, 'joules': 1.0}, indent=1))\n"
    return {
        "fake": BenchEntry("fake", _fake_script(tmp_path, "fake", _WRITES), "a peer", "seconds per answer", "x.md",
                           Output("file", "--out"), ("--quick",), extract=_extract, paper="about 2x"),
        "printer": BenchEntry("printer", _fake_script(tmp_path, "printer", prints), "a peer", "seconds", "x.md",
                              Output("stdout", "--json"), ("--quick",), extract=_extract),
        "tables_only": BenchEntry("tables_only", _fake_script(tmp_path, "tables_only", "print('| a | b |')\n"),
                                  "a peer", "m", "x.md", Output("none"), ("--quick",)),
        "crashes": BenchEntry("crashes", _fake_script(tmp_path, "crashes", "print('boom'); sys.exit(3)\n"),
                              "a peer", "m", "x.md", Output("file", "--out"), ("--quick",)),
        "needs_gpu": BenchEntry("needs_gpu", _fake_script(tmp_path, "needs_gpu", _WRITES), "a peer", "m", "x.md",
                                Output("file", "--out"), ("--quick",), requires=("cuda",)),
        "no_quick": BenchEntry("no_quick", _fake_script(tmp_path, "no_quick", _WRITES), "a peer", "m", "x.md",
                               Output("file", "--out"), None, quick_note="not timed yet"),
        "downloads": BenchEntry("downloads", _fake_script(tmp_path, "downloads", _WRITES), "a peer", "m", "x.md",
                                Output("file", "--out"), ("--quick",), full_requires=("download:big weights",)),
    }


def test_run_report_schema_and_figures(tmp_path, fakes):
    said = []
    out = tmp_path / "out"
    report = run_entries(["fake", "printer", "tables_only", "crashes"], fakes, out_dir=out, root=tmp_path,
                         say=said.append)
    assert json.loads((out / REPORT_NAME).read_text()) == json.loads(json.dumps(report, default=str))
    assert set(report) == {"profile", "environment", "methods", "load_average_after"}
    env = report["environment"]
    assert {"python", "versions", "device", "torch_threads", "cpus", "load_average"} <= set(env)
    assert env["versions"]["torch"] == torch.__version__.split("+")[0] or env["versions"]["torch"] == torch.__version__
    by_name = {m["method"]: m for m in report["methods"]}
    assert list(by_name) == ["fake", "printer", "tables_only", "crashes"]
    fake = by_name["fake"]
    assert fake["status"] == "measured" and fake["command"].endswith(f"--quick --out {out / 'fake.json'}")
    assert json.loads(Path(fake["json"]).read_text())["quick"] is True  # the quick profile's args reached the script
    assert [(f["ours"], f["peer"], f["ratio"], f["measured"]) for f in fake["figures"]] == [
        (2.0, 4.0, 0.5, True), (7.5, None, None, False)]
    assert [f["ratio"] for f in by_name["printer"]["figures"]] == [2.0, None]  # JSON read from stdout past a line
    assert by_name["tables_only"]["status"] == "ran" and "no JSON" in by_name["tables_only"]["reason"]
    assert by_name["crashes"]["status"] == "failed" and "exit status 3" in by_name["crashes"]["reason"]
    assert "boom" in by_name["crashes"]["reason"]
    assert sum("[" in line and "/4]" in line for line in said) >= 4  # a progress line per method
    rendered = table(report)
    assert "| fake | seconds per answer | 2 | 4 | 0.5 | 2x faster | measured |" in rendered
    assert "| estimated |" in rendered and "| crashes |" in rendered and "failed: exit status 3" in rendered


def test_progress_bar_runs_against_the_committed_reports_wall_time(tmp_path, fakes):
    assert progress_line("m", 30, 120, "step 3") == "    m: [#####---------------] 30 / ~120 s  | step 3"
    assert progress_line("m", 150, 120, "").startswith("    m: [####################] 150 / ~120 s, over the recorded")
    assert progress_line("m", 30, None, "step 3") == "    m: 30 s  | step 3"  # no recorded run: elapsed alone
    committed = tmp_path / COMMITTED_REPORTS["quick"]
    committed.parent.mkdir(parents=True)
    committed.write_text(json.dumps({"methods": [
        {"method": "slow", "status": "measured", "wall_s": 4.0},
        {"method": "crashes", "status": "failed", "wall_s": 1.0}]}))  # a failed run's time is no expectation
    assert recorded_walls(tmp_path, "quick") == {"slow": 4.0}
    assert recorded_walls(tmp_path, "full") == {}  # no committed full report under this root
    for bad in ({"methods": {"slow": 1}}, {"methods": [3]}, {"methods": [{"status": "measured", "wall_s": 2}]}, [1]):
        committed.write_text(json.dumps(bad))
        assert recorded_walls(tmp_path, "quick") == {}  # malformed: no bar, never a crash
    committed.write_text(json.dumps({"methods": [
        {"method": "a", "status": "measured", "wall_s": "12"}, {"method": "b", "status": "measured", "wall_s": -3},
        {"method": "c", "status": "measured", "wall_s": 5, "profile": "full"},  # a merged report's other profile
        {"method": "slow", "status": "measured", "wall_s": 4.0, "profile": "quick"}]}))
    assert recorded_walls(tmp_path, "quick") == {"slow": 4.0}
    slow = BenchEntry("slow", _fake_script(tmp_path, "slow", "import time; print('warming up', flush=True); "
                                                             "time.sleep(1.5); " + _WRITES), "a peer", "m", "x.md",
                      Output("file", "--out"), ("--quick",), extract=_extract)
    said = []
    run_entries(["slow"], {"slow": slow}, out_dir=tmp_path / "o", root=tmp_path, heartbeat_s=0.5, say=said.append)
    beats = [line for line in said if line.startswith("    slow: [")]
    assert beats and all("/ ~4 s  | " in line for line in beats)
    assert beats[-1].endswith("| warming up")


def test_a_timeout_or_a_failing_progress_callback_does_not_leave_the_script_running(tmp_path):
    pid_file = tmp_path / "pid"
    body = (f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); print('up', flush=True); "
            "time.sleep(60)\n")
    sleeper = BenchEntry("sleeper", _fake_script(tmp_path, "sleeper", body), "a peer", "m", "x.md",
                         Output("file", "--out"), ("--quick",))

    def fail_on_heartbeat(line):
        if line.startswith("    sleeper:"):
            raise RuntimeError("terminal closed")

    with pytest.raises(RuntimeError, match="terminal closed"):
        run_entries(["sleeper"], {"sleeper": sleeper}, out_dir=tmp_path / "o", root=tmp_path, heartbeat_s=1.0,
                    say=fail_on_heartbeat)
    with pytest.raises(ProcessLookupError):  # killed and reaped, not orphaned
        os.kill(int(pid_file.read_text()), 0)
    pid_file.unlink()
    report = run_entries(["sleeper"], {"sleeper": sleeper}, out_dir=tmp_path / "t", root=tmp_path, timeout_s=1.5,
                         say=lambda line: None)
    assert report["methods"][0]["status"] == "failed" and "timed out after 2 s" in report["methods"][0]["reason"]
    with pytest.raises(ProcessLookupError):
        os.kill(int(pid_file.read_text()), 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report on a machine without a GPU")
def test_methods_that_cannot_run_here_are_reported_with_why(tmp_path, fakes):
    said = []
    report = run_entries(["needs_gpu", "no_quick", "downloads"], fakes, profile="quick", out_dir=tmp_path / "q",
                         root=tmp_path, say=said.append)
    rows = {m["method"]: m for m in report["methods"]}
    assert rows["needs_gpu"]["status"] == "cannot run here" and "CUDA" in rows["needs_gpu"]["reason"]
    assert rows["no_quick"]["status"] == "cannot run here" and "not timed yet" in rows["no_quick"]["reason"]
    assert rows["downloads"]["status"] == "measured" or rows["downloads"]["status"] == "ran"  # quick needs no download
    assert any("needs_gpu: cannot run here: needs a CUDA GPU" in line for line in said)
    assert "| needs_gpu |" in table(report)
    full = run_entries(["downloads"], fakes, profile="full", out_dir=tmp_path / "f", root=tmp_path, say=said.append)
    assert "--allow-downloads" in full["methods"][0]["reason"]
    allowed = blocked_reason(fakes["downloads"], "full", "cpu", allow_downloads=True)
    assert allowed is None
    missing = BenchEntry("m", "x.py", "p", "m", "x.md", Output("none"), (), requires=("module:no_such_module_xyz.sub",))
    assert "no_such_module_xyz.sub" in blocked_reason(missing, "quick", "cpu", False)
    cpu_only = fakes["fake"]
    assert "CPU only" in blocked_reason(cpu_only, "quick", "cuda", False)


def test_an_extractor_that_no_longer_fits_its_json_fails_that_method_only(tmp_path, fakes):
    stale = BenchEntry("stale", fakes["fake"].script, "p", "m", "x.md", Output("file", "--out"), ("--quick",),
                       extract=lambda report: [Figure("m", report["renamed_key"])])
    report = run_entries(["stale", "fake"], {**fakes, "stale": stale}, out_dir=tmp_path / "o", root=tmp_path,
                         say=lambda line: None)
    stale_row, fake_row = report["methods"]
    assert stale_row["status"] == "failed" and "KeyError: 'renamed_key'" in stale_row["reason"]
    assert fake_row["status"] == "measured"


def test_a_missing_script_is_reported(tmp_path):
    ghost = BenchEntry("ghost", "benchmarks/ghost.py", "p", "m", "x.md", Output("none"), ("--quick",))
    report = run_entries([], {"ghost": ghost}, out_dir=tmp_path / "o", root=tmp_path, say=lambda line: None)
    assert report["methods"][0]["status"] == "cannot run here"
    assert "benchmarks/ghost.py not found" in report["methods"][0]["reason"]


def test_registry_entries_that_cannot_run_on_this_box_say_why():
    if torch.cuda.is_available():
        pytest.skip("a GPU machine runs the cuda entries")
    assert "CUDA" in blocked_reason(entries_by_method()["kernels_quantize"], "quick", "cpu", False)
    for entry in ENTRIES:
        if entry.quick_args is None:
            assert blocked_reason(entry, "quick", "cpu", False).startswith("no quick profile")


def test_commands_follow_each_output_mode(tmp_path):
    entries = entries_by_method()
    assert command(entries["ksort"], "quick", "cpu", tmp_path, python="py") == [
        "py", "benchmarks/ksort.py", "--quick", "--out", str(tmp_path / "ksort.json")]
    assert command(entries["dlm_synthetic"], "quick", "cpu", tmp_path, python="py")[-2:] == [
        "--out", str(tmp_path / "dlm_synthetic")]
    assert command(entries["isd_batch"], "quick", "cpu", tmp_path, python="py")[-1] == "--json"
    assert command(entries["ipw"], "quick", "cuda", tmp_path, python="py")[2:] == [
        "--quick", "--device", "cuda", "--plot", str(tmp_path / "ipw.png"), "--out", str(tmp_path / "ipw.json")]


def test_side_outputs_go_under_the_run_folder(tmp_path):
    cmd = command(entries_by_method()["fst"], "full", "cpu", tmp_path, python="py")
    assert cmd[cmd.index("--plot") + 1] == str(tmp_path / "fst_reward_vs_rollouts.png")  # never docs/
    assert cmd[cmd.index("--out") + 1] == str(tmp_path / "fst.json")


def test_bad_names_list_the_valid_ones(capsys):
    with pytest.raises(KeyError) as err:
        resolve(["ksort", "nope", "xquantt"], entries_by_method())
    message = err.value.args[0]
    assert "nope, xquantt" in message and all(e.method in message for e in ENTRIES)
    assert main(["bench", "nope"]) == 2
    assert "unknown method(s): nope; valid: aurora, " in capsys.readouterr().err


def test_cli_lists_every_method(capsys):
    assert main(["bench", "--list"]) == 0
    out = capsys.readouterr().out
    assert all(f"| {e.method} | {e.script} |" in out for e in ENTRIES)
    assert "| kernels_quantize |" in out and ("needs a CUDA GPU" in out or torch.cuda.is_available())


def test_cli_runs_a_method_and_prints_the_table(tmp_path, fakes, capsys, monkeypatch):
    monkeypatch.setattr(registry_module, "ENTRIES", (fakes["fake"], fakes["needs_gpu"]))
    out = tmp_path / "cli_out"
    assert main(["bench", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| fake | seconds per answer | 2 | 4 | 0.5 | 2x faster | measured |" in printed
    assert "| needs_gpu |" in printed and (out / REPORT_NAME).is_file()
    assert sys.modules["hf_fastslow.bench.cli"].__doc__.startswith("The `bench` verb")
