"""Run registry entries as subprocesses (`python benchmarks/X.py <profile args> <out flag>`), one at a time, and gather
their headline figures into one table and one JSON report with the environment they were measured in.

A method that cannot run here (an unmet requirement, no quick profile, no device option) gets a line saying why and a
record in the JSON with that reason; nothing is skipped silently. Each script's stdout/stderr goes to DIR/<method>.log.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from hf_fastslow.bench.registry import BenchEntry, Figure, headline_extractor, resolve
from hf_fastslow.bench.report import cell, merge_reports, table

REPORT_NAME = "bench_report.json"
# The committed report of each profile (docs/bench.md): its wall times are the progress bars' expected lengths.
COMMITTED_REPORTS = {"quick": "docs/benchmarks/quick_report.json", "full": "docs/benchmarks/full/bench_report.json"}
_VERSIONED = ("hf_fastslow", "torch", "transformers", "trl", "peft", "accelerate", "diffusers", "triton")


def repo_root() -> Path:
    """The checkout holding benchmarks/ (the scripts are not packaged): the one this package was imported from when it
    is an editable install, else the current directory."""
    checkout = Path(__file__).resolve().parents[2]
    return checkout if (checkout / "benchmarks").is_dir() else Path.cwd()


def environment(device: str) -> dict:
    import torch

    from hf_fastslow.evaluation.timing import machine_state

    versions = {}
    for name in _VERSIONED:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    cuda = torch.cuda.is_available()
    return {"python": platform.python_version(), "platform": platform.platform(), "versions": versions,
            "device": device, "cuda_available": cuda, "cuda_device": torch.cuda.get_device_name() if cuda else None,
            **machine_state()}


def unmet_requirement(requirement: str, allow_downloads: bool) -> str | None:
    """Why `requirement` is not met on this machine, or None when it is."""
    kind, _, detail = requirement.partition(":")
    if kind == "cuda":
        import torch

        return None if torch.cuda.is_available() else "needs a CUDA GPU (none here)"
    if kind == "module":
        try:
            found = importlib.util.find_spec(detail) is not None
        except ModuleNotFoundError:  # a parent package is missing
            found = False
        return None if found else f"needs the module {detail} (not installed; see the extras in pyproject.toml)"
    if kind == "download":
        return None if allow_downloads else f"downloads {detail}: opt in with --allow-downloads"
    raise ValueError(f"unknown requirement {requirement!r}")


def blocked_reason(entry: BenchEntry, profile: str, device: str, allow_downloads: bool) -> str | None:
    """Why `entry` cannot run here in `profile` on `device`, or None."""
    for requirement in entry.requirements(profile):
        reason = unmet_requirement(requirement, allow_downloads)
        if reason:
            return reason
    if entry.args(profile) is None:
        return f"no {profile} profile: {entry.quick_note or 'not recorded'}"
    if device != "cpu" and entry.device_flag is None and "cuda" not in entry.requires:
        return "the script has no device option (it runs on CPU only); run it with --device cpu"
    return None


def command(entry: BenchEntry, profile: str, device: str, out_dir: Path, python: str = sys.executable) -> list[str]:
    args = list(entry.args(profile))
    if entry.device_flag and entry.device_flag not in args:
        args += [entry.device_flag, device]
    for flag, name in entry.side_outputs:
        args += [flag, str(out_dir / name)]
    out = entry.output
    if out.mode == "file":
        args += [out.flag, str(out_dir / f"{entry.method}.json")]
    elif out.mode == "dir":
        args += [out.flag, str(out_dir / entry.method)]
    elif out.mode == "stdout":
        args += [out.flag]
    return [python, entry.script, *args]


def read_json(entry: BenchEntry, profile: str, out_dir: Path, log_text: str) -> tuple[dict | list | None, str | None]:
    """The script's JSON output and where it was read from (None, None for a script that writes none)."""
    out = entry.output
    if out.mode == "none":
        return None, None
    if out.mode == "stdout":
        start = log_text.find("\n{") + 1 if not log_text.startswith("{") else 0
        value, _ = json.JSONDecoder().raw_decode(log_text[start:])
        path = out_dir / f"{entry.method}.json"
        path.write_text(json.dumps(value, indent=1))
        return value, str(path)
    if out.mode == "dir":
        path = out_dir / entry.method / out.filename.format(profile=profile)
    else:
        path = out_dir / f"{entry.method}.json"
    return json.loads(path.read_text()), str(path)


def recorded_walls(root: Path, profile: str) -> dict[str, float]:
    """Each method's wall seconds in the committed report of `profile` (its measured records of that profile with a
    positive time); {} without a readable report. Only sets the progress bar's length, so a malformed one is ignored."""
    try:
        methods = json.loads((root / COMMITTED_REPORTS[profile]).read_text())["methods"]
        walls = {m["method"]: float(m["wall_s"]) for m in methods
                 if isinstance(m, dict) and m.get("status") == "measured" and m.get("profile", profile) == profile
                 and isinstance(m.get("wall_s"), (int, float))}
    except (KeyError, OSError, ValueError, TypeError, AttributeError):
        return {}
    return {name: wall for name, wall in walls.items() if math.isfinite(wall) and wall > 0}


def progress_line(method: str, elapsed: float, expected: float | None, last: str, width: int = 20) -> str:
    """One heartbeat: a bar against the method's recorded wall time where there is one (elapsed seconds alone
    otherwise), then the script's last output line."""
    if not expected:
        return f"    {method}: {elapsed:.0f} s  | {last}"
    filled = min(width, int(width * elapsed / expected))
    over = ", over the recorded time" if elapsed > expected else ""
    return f"    {method}: [{'#' * filled}{'-' * (width - filled)}] {elapsed:.0f} / ~{expected:.0f} s{over}  | {last}"


def _run_script(cmd: list[str], cwd: Path, log_path: Path, method: str, say: Callable[[str], None], heartbeat_s: float,
                timeout_s: float | None, expected_s: float | None = None) -> tuple[int | None, float]:
    """Run one script, its output to log_path; every heartbeat_s a progress line (see progress_line)."""
    t0 = time.perf_counter()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=env)
        next_beat = t0 + heartbeat_s
        try:
            while proc.poll() is None:
                time.sleep(0.2)
                now = time.perf_counter()
                if timeout_s is not None and now - t0 > timeout_s:
                    return None, now - t0
                if now >= next_beat:
                    next_beat = now + heartbeat_s
                    lines = [x for x in re.split(r"[\r\n]", log_path.read_text(errors="replace")) if x.strip()]
                    say(progress_line(method, now - t0, expected_s, lines[-1][-90:] if lines else ""))
        finally:  # a timeout, Ctrl-C or a failing progress callback must not leave the script running
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return proc.returncode, time.perf_counter() - t0


def new_record(entry: BenchEntry, profile: str) -> dict:
    """A method's record in the report, before it runs (every key present, so the schema does not depend on status)."""
    return {"method": entry.method, "script": entry.script, "peer": entry.peer, "metric": entry.metric,
            "paper": entry.paper, "docs": f"docs/{entry.docs}", "profile": profile, "command": None, "status": None,
            "reason": None, "wall_s": None, "finished_at": None, "environment": None, "log": None, "json": None,
            "plots": [], "figures": []}


def apply_headline(record: dict, entry: BenchEntry, data) -> bool:
    """Fill record's status, reason and figures from the script's JSON `data`; False when the extractor failed."""
    if data is None:
        record.update(status="ran", reason="the script writes no JSON: figures are in its log only")
        return True
    extract = headline_extractor(entry)
    if extract is None:
        record.update(status="ran", reason="headline extractor not written yet: figures are in its JSON")
        return True
    try:
        figures = extract(data)
    except (KeyError, IndexError, TypeError, ValueError) as err:  # the script's JSON changed shape
        record.update(status="failed",
                      reason=f"ran, but its headline extractor failed on its JSON: {type(err).__name__}: {err}")
        return False
    record.update(status="measured", figures=[{**asdict(f), "ratio": f.ratio} for f in figures])
    return True


def _shown(path) -> str:
    """`path` (or a command line holding paths) with the current directory's prefix cut, so that a report committed
    from a checkout names its files relative to it, not by this machine's absolute paths."""
    here = str(Path.cwd()) + os.sep
    return str(path).replace(here, "")


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


def run_entries(names: list[str], entries: dict[str, BenchEntry], profile: str = "quick", device: str = "cpu",
                out_dir: str | Path = "bench_out", root: Path | None = None, allow_downloads: bool = False,
                timeout_s: float | None = None, heartbeat_s: float = 30.0,
                say: Callable[[str], None] = print, update: bool = False) -> dict:
    """Run the named entries (all when `names` is empty); returns the report written to out_dir/bench_report.json.
    update: merge into the report already in out_dir (these methods' records replace theirs, the others stay)."""
    from hf_fastslow.evaluation.timing import load_average

    chosen = resolve(names, entries)  # raises with the valid names before anything runs
    root = Path(root) if root is not None else repo_root()
    out_dir = Path(out_dir).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    report = {"profile": profile, "environment": environment(device), "methods": []}
    previous = out_dir / REPORT_NAME
    previous = json.loads(previous.read_text()) if update and previous.is_file() else None
    expected = recorded_walls(root, profile)
    for i, entry in enumerate(chosen, 1):
        try:
            record = new_record(entry, profile)
            # the load when this method starts, not when the run did: a long run's load drifts from method to method
            record["environment"] = {**report["environment"], "load_average": load_average()}
            report["methods"].append(record)
            reason = blocked_reason(entry, profile, device, allow_downloads)
            if not reason and not (root / entry.script).is_file():
                reason = f"{entry.script} not found under {root} (run the verb from a source checkout)"
            if reason:
                record.update(status="cannot run here", reason=reason, finished_at=_now())
                say(f"[{i}/{len(chosen)}] {entry.method}: cannot run here: {reason}")
                continue
            cmd = command(entry, profile, device, out_dir)
            log_path = out_dir / f"{entry.method}.log"
            record.update(command=_shown(" ".join(cmd[1:])), log=_shown(log_path))
            say(f"[{i}/{len(chosen)}] {entry.method}: python {record['command']}")
            rc, wall = _run_script(cmd, root, log_path, entry.method, say, heartbeat_s, timeout_s,
                                   expected.get(entry.method))
            record.update(wall_s=round(wall, 1), finished_at=_now())
            record["plots"] = [_shown(out_dir / name) for _, name in entry.side_outputs
                               if name.endswith((".png", ".svg")) and (out_dir / name).is_file()]
            log_text = log_path.read_text(errors="replace")
            if rc != 0:
                tail = " / ".join(log_text.strip().splitlines()[-3:])[-300:]
                why = f"timed out after {timeout_s:.0f} s" if rc is None else f"exit status {rc}"
                record.update(status="failed", reason=f"{why}: {tail}")
                say(f"[{i}/{len(chosen)}] {entry.method}: FAILED after {wall:.0f} s ({why}); log {log_path}")
                continue
            try:
                data, json_path = read_json(entry, profile, out_dir, log_text)
            except (OSError, ValueError) as err:
                record.update(status="failed", reason=f"ran, but its JSON could not be read: {err}")
                say(f"[{i}/{len(chosen)}] {entry.method}: ran in {wall:.0f} s but its JSON could not be read: {err}")
                continue
            record["json"] = _shown(json_path) if json_path else None
            if not apply_headline(record, entry, data):
                say(f"[{i}/{len(chosen)}] {entry.method}: {record['reason']}")
                continue
            say(f"[{i}/{len(chosen)}] {entry.method}: done in {wall:.0f} s"
                + (f" ({record['reason']})" if record["reason"] else ""))
        finally:  # written after every method: a run stopped half-way keeps what it measured
            _write_report(out_dir, report, previous, entries)
    report["load_average_after"] = load_average()
    return _write_report(out_dir, report, previous, entries)


def _write_report(out_dir: Path, report: dict, previous: dict | None, entries: dict) -> dict:
    merged = merge_reports(previous, report, list(entries)) if previous is not None else report
    (out_dir / REPORT_NAME).write_text(json.dumps(merged, indent=1, default=str))
    return merged


__all__ = ["COMMITTED_REPORTS", "REPORT_NAME", "Figure", "blocked_reason", "cell", "command", "environment",
           "progress_line", "recorded_walls", "repo_root", "run_entries", "table"]
