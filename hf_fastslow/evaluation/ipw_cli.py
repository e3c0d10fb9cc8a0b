"""`hf-fastslow ipw`: profile accuracy and energy per query of a local model or an OpenAI-compatible endpoint and
write a JSON report (`--out`, default ipw_report.json) with a PNG beside it (energy per query against tokens).

    hf-fastslow ipw                                   # the default model, 20 two-digit additions, auto meter
    hf-fastslow ipw --model path/to/model --dtype bf16 --problems 50
    hf-fastslow ipw --endpoint http://127.0.0.1:8000/v1 --served-model NAME --meter-pid SERVER_PID
    hf-fastslow ipw --dataset questions.jsonl        # one {"question": ..., "answer": ...} per line

Standard-library imports only at module level (the CLI lists verbs without importing torch).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

SUFFIX = " Reply with just the number."


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("ipw", help="Intelligence per Watt: accuracy, energy per query, IPW, APJ",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default", help="'default' (SmolLM2-135M-Instruct) or a model folder")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="local model dtype")
    p.add_argument("--endpoint", default=None, help="OpenAI-compatible base URL (then --model is not loaded)")
    p.add_argument("--served-model", default=None, help="the endpoint's model name")
    p.add_argument("--meter-pid", type=int, action="append", default=None,
                   help="meter these processes' CPU time (e.g. the server's pid); repeatable")
    p.add_argument("--dataset", default=None, help="JSONL file of {'question', 'answer'} rows (default: additions)")
    p.add_argument("--problems", type=int, default=20, help="two-digit additions when no --dataset")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--meter", default="auto", choices=("auto", "estimate", "none"),
                   help="auto: NVML/RAPL counters where readable, else the CPU-time estimate")
    p.add_argument("--watts-per-core", type=float, default=None, help="the estimate's watts per busy core")
    p.add_argument("--machine", action="store_true", help="estimate over the whole machine's CPU time")
    p.add_argument("--threads", type=int, default=1, help="torch threads for a local model")
    p.add_argument("--out", default="ipw_report.json")
    p.set_defaults(func=run)


def _dataset(args) -> list[dict]:
    if args.dataset:
        rows = [json.loads(line) for line in Path(args.dataset).read_text().splitlines() if line.strip()]
        if not rows:
            raise SystemExit(f"{args.dataset} holds no rows")
        return rows
    from hf_fastslow.evaluation.prompts import arithmetic_problems

    return [{"question": row["question"] + SUFFIX, "answer": row["answer"]}
            for row in arithmetic_problems(args.problems, args.seed)]


def _meter(args):
    from hf_fastslow.evaluation.energy import CPUTimeEstimateMeter, auto_meter

    pids = None
    if args.meter_pid:
        pids = sorted(set(args.meter_pid) | {os.getpid()})  # the server's work and this client's
    estimate = {"watts_per_core": args.watts_per_core}
    if pids is not None:
        estimate["pids"] = pids
    elif args.machine or (args.endpoint and args.meter != "none"):
        estimate["machine"] = True  # an endpoint's work is not in this process: meter the machine
    if args.meter == "none":
        return None
    if args.meter == "estimate":
        return CPUTimeEstimateMeter(**estimate)
    return auto_meter(estimate=estimate)


def _backend(args):
    from hf_fastslow.evaluation.cli_support import backend_from_args

    return backend_from_args(args.model, endpoint=args.endpoint, served_model=args.served_model,
                             threads=args.threads, dtype=args.dtype)


def _plot(report, png: Path) -> str:
    from hf_fastslow.evaluation.cli_support import pyplot_or_reason

    plt, reason = pyplot_or_reason()
    if plt is None:
        return reason
    recs = report.metered
    fig, ax = plt.subplots(figsize=(6, 4))
    if recs:
        ys, ylabel = [r.energy_j for r in recs], f"energy per query, J ({report.kind})"
    else:
        recs, ylabel = report.records, "latency per query, s (no energy meter)"
        ys = [r.seconds for r in recs]
    for ok, colour, label in ((True, "tab:green", "correct"), (False, "tab:red", "wrong")):
        pts = [(r.completion_tokens, y) for r, y in zip(recs, ys) if (r.correct >= 0.5) == ok]
        if pts:
            ax.scatter(*zip(*pts), c=colour, label=label, s=18)
    ax.set_xlabel("completion tokens")
    ax.set_ylabel(ylabel)
    ax.set_title(f"{report.name}: accuracy {report.accuracy:.2f}", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=120)
    plt.close(fig)
    return f"plot: {png}"


def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from hf_fastslow.evaluation.ipw import IPWProfiler

    dataset = _dataset(args)
    backend = _backend(args)
    meter = _meter(args)
    cpu_pids = sorted(set(args.meter_pid) | {os.getpid()}) if args.meter_pid else None
    profiler = IPWProfiler(backend, dataset, meter=meter, warmup=args.warmup, max_new_tokens=args.max_new_tokens,
                           cpu_pids=cpu_pids)
    report = profiler.run()
    out = Path(args.out)
    payload = {"command": {k: v for k, v in vars(args).items() if k != "func"}, "report": report.to_dict()}
    out.write_text(json.dumps(payload, indent=2, default=str))
    print(report.summary())
    if report.kind == "estimated":
        print(f"energy is ESTIMATED ({report.meter_source}): {report.fallback_reason or 'estimate requested'}; "
              "accuracy per CPU-second is the hardware-honest efficiency figure here")
    print(f"report: {out}")
    print(_plot(report, out.with_suffix(".png")))
    return 0
