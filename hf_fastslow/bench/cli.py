"""The `bench` verb: `hf-fastslow bench [METHOD ...] [--profile quick|full] [--device cpu|cuda] [--out DIR] [--list]
[--update] [--render REPORT --into PAGE] [--ingest METHOD=JSON ...]`.
Standard library only at module level (hf_fastslow.cli imports every verb module to build its parser)."""

from __future__ import annotations

import sys


def _list(entries, profile: str, device: str) -> int:
    from hf_fastslow.bench.runner import blocked_reason, cell

    print("| method | script | peer | headline | quick | JSON | here |")
    print("|---|---|---|---|---|---|---|")
    for e in entries.values():
        quick = "-" if e.quick_args is None else (" ".join(e.quick_args) or "(defaults)")
        here = blocked_reason(e, profile, device, allow_downloads=False) or "runs"
        cells = (e.method, e.script, e.peer, e.metric, quick, e.output.mode, here)
        print("| " + " | ".join(cell(c) for c in cells) + " |")
    return 0


def _bench(args) -> int:
    from hf_fastslow.bench.registry import entries_by_method, resolve
    from hf_fastslow.bench.runner import REPORT_NAME, run_entries, table

    entries = entries_by_method()
    try:
        resolve(args.methods, entries)
    except KeyError as err:
        print(f"hf-fastslow bench: {err.args[0]}", file=sys.stderr)
        return 2
    if args.list:
        return _list({e.method: e for e in resolve(args.methods, entries)}, args.profile, args.device)
    if args.ingest:
        return _ingest(args, entries)
    if args.render:
        return _render(args)
    report = run_entries(args.methods, entries, profile=args.profile, device=args.device, out_dir=args.out,
                         allow_downloads=args.allow_downloads, timeout_s=args.timeout, update=args.update)
    print()
    print(table(report))
    print(f"\nJSON report: {args.out}/{REPORT_NAME}; each script's output: {args.out}/<method>.log")
    failed = [m["method"] for m in report["methods"] if m["status"] == "failed"]
    return 1 if failed else 0


def _render(args) -> int:
    """--render REPORT --into PAGE: rewrite PAGE's generated block from REPORT (no run)."""
    import json
    from pathlib import Path

    from hf_fastslow.bench.report import render_into

    if not args.into:
        print("hf-fastslow bench: --render needs --into PAGE (e.g. docs/benchmarks.md)", file=sys.stderr)
        return 2
    from hf_fastslow.bench.registry import entries_by_method

    try:
        changed = render_into(args.into, json.loads(Path(args.render).read_text()), entries_by_method())
    except (OSError, ValueError) as err:  # a missing file, a report that is not JSON, a page without markers
        print(f"hf-fastslow bench: --render {args.render} --into {args.into}: {err}", file=sys.stderr)
        return 2
    print(f"{args.into}: {'block rewritten from' if changed else 'already up to date with'} {args.render}")
    return 0


def _ingest(args, entries) -> int:
    """--ingest METHOD=JSON ...: records from JSON files the scripts wrote outside the verb, merged into
    OUT/bench_report.json (the profile says which sizes they ran at)."""
    import json
    import shutil
    from pathlib import Path

    from hf_fastslow.bench.report import ingest, merge_reports
    from hf_fastslow.bench.runner import REPORT_NAME, environment

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for item in args.ingest:
        method, sep, path = item.partition("=")
        if not sep or method not in entries:
            print(f"hf-fastslow bench: --ingest takes METHOD=JSON with a method from --list, got {item!r}",
                  file=sys.stderr)
            return 2
        if not Path(path).is_file():
            print(f"hf-fastslow bench: --ingest {item}: no such file", file=sys.stderr)
            return 2
        kept = out / f"{method}.json"
        if Path(path).resolve() != kept.resolve():
            shutil.copy2(path, kept)  # keeps the run's modification time, which the record reports
        record = ingest(entries[method], kept, args.profile, command=f"(recorded) {entries[method].script}")
        records.append(record)
        print(f"{method}: {record['status']}" + (f" ({record['reason']})" if record["reason"] else ""))
    report = {"profile": args.profile, "environment": environment(args.device), "methods": records}
    path = out / REPORT_NAME
    if path.is_file():
        report = merge_reports(json.loads(path.read_text()), report, list(entries))
    path.write_text(json.dumps(report, indent=1, default=str))
    return 1 if any(r["status"] == "failed" for r in records) else 0


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("bench", help="re-measure the methods' headline figures beside their peers",
                              description="Run benchmarks/<method>.py for the chosen methods (all by default) and "
                                          "gather one table and one JSON report.")
    p.add_argument("methods", nargs="*", metavar="METHOD", help="methods to run (default: all; --list shows them)")
    p.add_argument("--profile", choices=("quick", "full"), default="quick",
                   help="quick: reduced sizes (~2 min each on 2 CPU cores); full: the sizes docs/benchmarks.md records")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--out", default="bench_out", help="folder for the report, each script's JSON and log")
    p.add_argument("--list", action="store_true", help="list the methods, their peers and whether they run here")
    p.add_argument("--allow-downloads", action="store_true", help="let methods that download weights run")
    p.add_argument("--timeout", type=float, default=None, help="seconds per method before it is stopped")
    p.add_argument("--update", action="store_true",
                   help="merge into the report already in --out (these methods replace theirs, the others stay)")
    p.add_argument("--render", metavar="REPORT", help="no run: rewrite --into PAGE's generated block from REPORT")
    p.add_argument("--into", metavar="PAGE", help="the page --render rewrites (docs/benchmarks.md)")
    p.add_argument("--ingest", nargs="+", metavar="METHOD=JSON",
                   help="no run: add records from JSON files the scripts wrote themselves (recorded runs at "
                        "--profile's sizes) to --out's report")
    p.set_defaults(func=_bench)
