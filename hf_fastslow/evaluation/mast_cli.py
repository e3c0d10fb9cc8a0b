"""`hf-fastslow mast`: annotate multi-agent traces with the MAST failure modes and write a JSON report (`--out`,
default mast_report.json) with a PNG of per-mode F1 beside it when the traces carry gold labels.

    hf-fastslow mast                                   # the bundled fixture traces; score mode + heuristics
    hf-fastslow mast --methods score,generate,heuristics --limit 6
    hf-fastslow mast --traces traces.json              # a JSON list of Trace dicts (trace_id, task, turns, labels)
    hf-fastslow mast --mad MAD_full_dataset.json --limit 20
    hf-fastslow mast --endpoint http://127.0.0.1:8000/v1 --served-model NAME --methods generate

Methods: score (P(yes) per mode from the judge's logits; in-process model only), generate (the reference answer
format, parsed; garbage is counted), heuristics (deterministic rules, no model). Standard-library imports only at
module level (the CLI lists verbs without importing torch).
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

METHODS = ("score", "generate", "heuristics")


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("mast", help="MAST failure-mode annotation of multi-agent traces",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--traces", default=None, help="JSON list of Trace dicts (default: the bundled fixture traces)")
    p.add_argument("--mad", default=None, help="a local MAD JSON file (mcemri/MAD layout) instead of --traces")
    p.add_argument("--limit", type=int, default=None, help="annotate only the first N traces")
    p.add_argument("--methods", default="score,heuristics", help=f"comma-separated, from {', '.join(METHODS)}")
    p.add_argument("--model", default="default", help="judge: 'default' (SmolLM2-135M-Instruct) or a model folder")
    p.add_argument("--endpoint", default=None, help="OpenAI-compatible base URL of the judge (generate mode)")
    p.add_argument("--served-model", default=None, help="the endpoint's model name")
    p.add_argument("--window-tokens", type=int, default=None, help="judge context per window (default: model's)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="generate mode's answer budget")
    p.add_argument("--threads", type=int, default=1, help="torch threads for a local judge")
    p.add_argument("--out", default="mast_report.json", help="JSON report path (the PNG goes beside it)")
    p.set_defaults(func=run)


def _load_traces(args):
    from hf_fastslow.evaluation.mast_fixtures import fixture_traces
    from hf_fastslow.evaluation.mast_traces import Trace, load_mad

    if args.mad and args.traces:
        raise SystemExit("give --traces or --mad, not both")
    if args.mad:
        traces = load_mad(args.mad)
    elif args.traces:
        with open(args.traces, encoding="utf-8") as f:
            rows = json.load(f)
        if not isinstance(rows, list):
            raise SystemExit(f"{args.traces}: expected a JSON list of trace objects")
        traces = [Trace.from_dict(r) for r in rows]
    else:
        traces = fixture_traces()
    traces = traces[: args.limit] if args.limit else traces
    if not traces:
        raise SystemExit("no traces to annotate")
    return traces


def _judge_backend(args):
    from hf_fastslow.evaluation.cli_support import backend_from_args

    return backend_from_args(args.model, endpoint=args.endpoint, served_model=args.served_model,
                             threads=args.threads)


def run(args) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = sorted(set(methods) - set(METHODS))
    if bad or not methods:
        raise SystemExit(f"unknown --methods {bad or methods}; choose from {', '.join(METHODS)}")
    traces = _load_traces(args)

    from hf_fastslow.evaluation.mast import MASTAnnotator
    from hf_fastslow.evaluation.mast_heuristics import HeuristicAnnotator
    from hf_fastslow.evaluation.mast_report import evaluate_annotators, plot_report

    annotators = {}
    backend = _judge_backend(args) if set(methods) - {"heuristics"} else None
    for m in methods:
        if m == "heuristics":
            annotators[m] = HeuristicAnnotator()
        else:
            annotators[m] = MASTAnnotator(backend, m, window_tokens=args.window_tokens,
                                          max_new_tokens=args.max_new_tokens)
    report = evaluate_annotators(annotators, traces,
                                 progress=lambda i, n: print(f"\rannotated {i}/{n} traces", end="", flush=True))
    print()
    report["judge"] = None if backend is None else backend.name
    out = Path(args.out)
    out.write_text(json.dumps(report, indent=1, default=str))
    print(f"report: {out}")
    for name, arm in report["annotators"].items():
        agr = arm.get("agreement")
        score = (f"macro F1 {agr['macro_f1']:.3f}, pooled kappa {agr['pooled_kappa']:.3f}" if agr
                 else "no gold labels")
        print(f"{name:>10}: {score}; unparsed {arm['unparsed']}, failed {arm['failed_traces']}, "
              f"{arm['seconds_per_trace']:.2f} s/trace ({arm['cpu_seconds_per_trace']:.2f} CPU-s)")
        for err in arm["errors"][:3]:
            print(f"            error: {err}")
    png = plot_report(report, str(out.with_suffix(".png")))
    if png:
        print(f"plot: {png}")
    return 0
