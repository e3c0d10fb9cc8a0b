"""Start a script as N real processes with `torchrun` (gloo on CPU), collect one JSON result per rank, and stop every
process by its pid when the run outlives its timeout.

A worker calls `write_rank_result(payload)`; the parent calls `launch(script, args, nproc=2)` and gets the list of
payloads in rank order. Used by tests/distributed and benchmarks/multiprocess_trainers.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
RESULT_DIR_ENV = "HF_FASTSLOW_RANK_RESULTS"


class LaunchError(RuntimeError):
    """The launched run failed or timed out; the message carries the tail of its log."""


def write_rank_result(payload: dict) -> None:
    """Worker side: write this rank's JSON payload where the launcher collects it."""
    out = os.environ[RESULT_DIR_ENV]
    rank = int(os.environ.get("RANK", "0"))
    tmp = os.path.join(out, f".rank{rank}.json.tmp")
    with open(tmp, "w") as f:
        json.dump(payload, f)
    os.replace(tmp, os.path.join(out, f"rank{rank}.json"))  # the parent never reads a half-written file


def _descendants(pid: int) -> list[int]:
    """Child pids of `pid`, recursively (from /proc), deepest last."""
    found, todo = [], [pid]
    while todo:
        parent = todo.pop()
        for task in Path(f"/proc/{parent}/task").glob("*"):
            try:
                kids = [int(k) for k in (task / "children").read_text().split()]
            except OSError:
                continue
            found.extend(kids)
            todo.extend(kids)
    return found


def stop_by_pid(pid: int, grace_s: float = 5.0) -> list[int]:
    """SIGTERM `pid` and its descendants (each by its own pid), SIGKILL what is left after `grace_s`."""
    pids = [pid, *_descendants(pid)]
    for p in pids:
        try:
            os.kill(p, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + grace_s
    for p in pids:
        while time.monotonic() < deadline:
            try:
                os.kill(p, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
    return pids


def torchrun_command(script: str | os.PathLike, args=(), nproc: int = 2) -> list[str]:
    """`torchrun --standalone --nproc_per_node N script args` through this interpreter (a free rendezvous port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", str(script),
            *map(str, args)]


def accelerate_command(script: str | os.PathLike, args=(), nproc: int = 2) -> list[str]:
    """`accelerate launch --multi_gpu --num_processes N script args`: the accelerate spelling that starts N processes
    on a CPU-only machine too (it runs torchrun); the trainer's `use_cpu=True` then selects gloo. `--cpu` (or a
    MULTI_CPU config file with `use_cpu: true`) starts one process only."""
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", f"--num_processes={nproc}",
            "--num_machines=1", "--mixed_precision=no", "--dynamo_backend=no", str(script), *map(str, args)]


def launch(script: str | os.PathLike, args=(), nproc: int = 2, timeout: float = 600.0, command: list[str] | None = None,
           env: dict | None = None) -> list[dict]:
    """Run `script` as `nproc` processes (default: `torchrun_command`; pass `command` for another launcher) and return
    each rank's payload, rank order. Raises `LaunchError` with the log tail on a non-zero exit, a missing rank result
    or a timeout (after stopping every process of the run by pid)."""
    with tempfile.TemporaryDirectory(prefix="hf_fastslow_mp_") as out:
        full_env = {**os.environ, **(env or {}), RESULT_DIR_ENV: out, "OMP_NUM_THREADS": "1",
                    "TRL_EXPERIMENTAL_SILENCE": "1", "TOKENIZERS_PARALLELISM": "false",
                    "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        log_path = os.path.join(out, "log.txt")
        cmd = command if command is not None else torchrun_command(script, args, nproc)
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=log, stderr=subprocess.STDOUT)
            try:
                rc = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                stopped = stop_by_pid(proc.pid)
                proc.wait()
                raise LaunchError(f"timed out after {timeout}s; stopped pids {stopped}\n{_tail(log_path)}") from None
        if rc != 0:
            raise LaunchError(f"{' '.join(cmd[:6])} ... exited with {rc}\n{_tail(log_path)}")
        results = []
        for rank in range(nproc):
            path = os.path.join(out, f"rank{rank}.json")
            if not os.path.isfile(path):
                raise LaunchError(f"rank {rank} wrote no result (did the launcher start {nproc} processes?)\n"
                                  f"{_tail(log_path)}")
            with open(path) as f:
                results.append(json.load(f))
        return results


def _tail(path: str, chars: int = 4000) -> str:
    with open(path, errors="replace") as f:
        return f.read()[-chars:]
