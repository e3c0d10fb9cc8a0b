"""Multi-process CPU runs (torchrun, gloo) of FST and of DAS rollouts beside the 1-process run on the same data.

Every arm is a real launch of tests/distributed/workers.py with `torchrun --nproc_per_node N` (N = 1 or 2, the same
launcher for both, so process start-up is paid alike); the global batch is the same (2 ranks x half the rows). Arms
are interleaved within each repeat. Reported per arm: wall-clock of the whole launch and of `trainer.train()` (the
slowest rank), CPU seconds of the launched processes, per-rank rollouts, and:

* FST: the fast context and pool on each rank (identical by design), fast-round generations per rank;
* DAS (tiny random Llama, 4 prompts, 2 per step, each revisited every other step and not always on the same rank;
  low temperature so siblings repeat and drafts can hit): draft acceptance per rank (accepted / proposed draft
  tokens, acceptance length, tokens per row forward), with the all-gather of finished rollouts
  (`share_across_ranks=True`) and without it (a history per process), and the history size.

A 2-core shared box cannot show speed-up from 2 processes: the figures show what each rank does and that the state
agrees, not scaling.

(Named multiprocess_trainers.py, not multiprocess.py: a benchmarks/multiprocess.py shadows the `multiprocess` package
that `datasets` imports, for every script run from this folder.)

Run:  python benchmarks/multiprocess_trainers.py --quick   (1 repeat, ~6 min on a loaded 2-core box)
      python benchmarks/multiprocess_trainers.py           (3 repeats)
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_fastslow.evaluation.timing import load_average  # noqa: E402
from tests.distributed.launcher import launch  # noqa: E402

WORKERS = "tests/distributed/workers.py"


def children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_arm(name: str, nproc: int, args: list[str], tmp: Path) -> dict:
    cpu0, t0 = children_cpu(), time.perf_counter()
    ranks = launch(WORKERS, [args[0], str(tmp / name), *args[1:]], nproc=nproc, timeout=900)
    wall = time.perf_counter() - t0
    return {"arm": name, "nproc": nproc, "launch_wall_s": wall, "cpu_s": children_cpu() - cpu0,
            "train_s": max(r["train_seconds"] for r in ranks), "ranks": ranks}


def timing(result: dict) -> dict:
    return {"arm": result["arm"], "launch_wall_s": round(result["launch_wall_s"], 1),
            "train_s": round(result["train_s"], 2), "cpu_s": round(result["cpu_s"], 1)}


def fst_row(result: dict) -> dict:
    ranks = result["ranks"]
    rl_rows = [r["global_step"] * 4 // len(ranks) for r in ranks]  # global batch 4 split over the ranks
    return {**timing(result),
            "fast_generations_per_rank": [r["task_calls"] - n for r, n in zip(ranks, rl_rows)],
            "rl_rollouts_per_rank": rl_rows,
            "reflector_calls_per_rank": [r["reflector_calls"] for r in ranks],
            "same_fast_context": len({r["fast_context"] for r in ranks}) == 1,
            "same_pool_and_scores": len({json.dumps([r["fast_pool"], r["fast_scores"]]) for r in ranks}) == 1,
            "fast_context": ranks[0]["fast_context"]}


def das_row(result: dict) -> dict:
    ranks = result["ranks"]
    return {**timing(result),
            "rollouts_per_rank": [r["local_rollouts"] for r in ranks],
            "history_rollouts_per_rank": [r["rollouts_in_history"] for r in ranks],
            "history_problems_per_rank": [len(r["problems_order"]) for r in ranks],
            "acceptance_per_rank": [round(r["accepted"] / max(r["proposed"], 1), 3) for r in ranks],
            "accepted_per_rank": [r["accepted"] for r in ranks],
            # Per row (1.0 = plain decoding at any batch size); new_tokens / target_forwards would grow with the batch.
            "tokens_per_row_forward_per_rank": [round(r["tokens_per_row_forward"], 3) for r in ranks],
            "acceptance_length_per_rank": [round(r["acceptance_length"], 3) for r in ranks],
            "same_history": len({json.dumps(r["history"], sort_keys=True) for r in ranks}) == 1}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="1 repeat")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--das-steps", type=int, default=6)
    p.add_argument("--temperature", type=float, default=0.02)
    p.add_argument("--das-prompts", type=int, default=4)
    p.add_argument("--das-batch", type=int, default=8,
                   help="global rows per step (4 generations per prompt): 4 splits each group over the 2 ranks")
    p.add_argument("--history-only", action="store_true",
                   help="DAS drafts from the rollout history only (use_local=False): isolates what the all-gather adds")
    p.add_argument("--arms", default="fst,das", help="comma-separated: fst, das")
    p.add_argument("--out", default="multiprocess_benchmark.json")
    p.add_argument("--tmp", default=None, help="scratch folder for the runs' output (default: a temporary one)")
    opts = p.parse_args(argv)
    repeats = 1 if opts.quick else opts.repeats
    das = ["das", "--prompts", str(opts.das_prompts), "--steps", str(opts.das_steps), "--temperature",
           str(opts.temperature), "--batch", str(opts.das_batch), "--generations", "4", "--tokens", "24",
           *(["--no-local"] if opts.history_only else [])]
    arms = [("fst_1proc", 1, ["fst"]), ("fst_2proc", 2, ["fst"]),
            ("das_1proc", 1, das), ("das_2proc_shared", 2, das), ("das_2proc_per_rank", 2, [*das, "--no-share"])]
    arms = [a for a in arms if a[0].split("_")[0] in opts.arms.split(",")]
    import tempfile

    results = []
    load_before = load_average()
    with tempfile.TemporaryDirectory(dir=opts.tmp) as tmp:
        for rep in range(repeats):
            order = arms if rep % 2 == 0 else arms[::-1]  # interleaved, alternating order
            for name, nproc, args in order:
                res = run_arm(name, nproc, args, Path(tmp) / f"r{rep}")
                res["repeat"] = rep
                results.append(res)
                row = fst_row(res) if name.startswith("fst") else das_row(res)
                print(json.dumps(row), flush=True)
    report = {"repeats": repeats, "load_average_before": load_before, "load_average_after": load_average(),
              "cpu_count": os.cpu_count(), "das_args": das,
              "rows": [fst_row(r) if r["arm"].startswith("fst") else das_row(r) for r in results]}
    with open(opts.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"wrote {opts.out}; load average {load_before} -> {report['load_average_after']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
