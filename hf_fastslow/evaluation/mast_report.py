"""Run several MAST annotators on the same traces and report agreement with gold and between annotators.

`evaluate_annotators({"score": MASTAnnotator(...), "heuristics": HeuristicAnnotator(), ...}, traces)` annotates
every trace with every annotator (interleaved per trace, so a loaded machine slows all arms alike), and returns a
JSON-ready dict: per annotator the annotations, wall and process-CPU seconds, garbage (unparsed answers) and, for
traces with gold labels, `mast_agreement`; plus pairwise pooled kappa between annotators on all traces (the only
yardstick on traces without gold, such as the package's own agent runs). An annotator that raises is recorded with
its exact error (type and message) and the run goes on. `plot_report` draws per-mode F1 per annotator.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

from .agreement import cohen_kappa
from .mast import mast_agreement
from .mast_taxonomy import MAST_CODES
from .mast_traces import Trace

__all__ = ["evaluate_annotators", "plot_report"]


def evaluate_annotators(annotators: Mapping[str, Any], traces: Sequence[Trace], *, progress=None) -> dict[str, Any]:
    arms: dict[str, dict[str, Any]] = {
        name: {"annotations": [], "seconds": 0.0, "cpu_seconds": 0.0, "errors": []} for name in annotators}
    for i, trace in enumerate(traces):
        for name, annotator in annotators.items():
            arm = arms[name]
            t0, c0 = time.perf_counter(), time.process_time()
            try:
                arm["annotations"].append(annotator.annotate(trace))
            except Exception as err:  # noqa: BLE001 - the report shows the exact failure of a peer
                arm["annotations"].append(None)
                arm["errors"].append(f"{trace.key}: {type(err).__name__}: {err}")
            arm["seconds"] += time.perf_counter() - t0
            arm["cpu_seconds"] += time.process_time() - c0
        if progress is not None:
            progress(i + 1, len(traces))
    report: dict[str, Any] = {"traces": [list(t.key) for t in traces], "annotators": {}}
    gold_idx = [i for i, t in enumerate(traces) if t.labels is not None and set(t.labels) == set(MAST_CODES)]
    for name, arm in arms.items():
        anns = arm["annotations"]
        done = [i for i in gold_idx if anns[i] is not None]
        out = {
            "seconds": arm["seconds"], "cpu_seconds": arm["cpu_seconds"],
            "seconds_per_trace": arm["seconds"] / max(1, len(traces)),
            "cpu_seconds_per_trace": arm["cpu_seconds"] / max(1, len(traces)),
            "errors": arm["errors"], "failed_traces": sum(a is None for a in anns),
            "unparsed": sum(1 for a in anns if a is not None and a.parse_error),
            "missing_decisions": sum(v is None for a in anns if a is not None for v in a.modes.values()),
            "annotations": [a.to_dict() if a is not None else None for a in anns],
        }
        annotator = annotators[name]
        for attr in ("garbage", "prefill_tokens"):
            if hasattr(annotator, attr):
                out[attr] = getattr(annotator, attr)
        if done:
            out["agreement"] = mast_agreement([anns[i] for i in done], [traces[i] for i in done])
        report["annotators"][name] = out
    names = list(arms)
    pairs = {}
    for a in range(len(names)):
        for b in range(a + 1, len(names)):
            rows = [(x, y) for x, y in zip(arms[names[a]]["annotations"], arms[names[b]]["annotations"])
                    if x is not None and y is not None]
            if rows:
                pa = [bool(x.modes.get(c)) for x, _ in rows for c in MAST_CODES]
                pb = [bool(y.modes.get(c)) for _, y in rows for c in MAST_CODES]
                pairs[f"{names[a]} vs {names[b]}"] = {"pooled_kappa": cohen_kappa(pa, pb), "traces": len(rows)}
    report["pairwise"] = pairs
    return report


def plot_report(report: Mapping[str, Any], path: str, *, title: str = "MAST: per-mode F1 vs gold") -> str | None:
    """Grouped bars of per-mode F1 per annotator (annotators with gold agreement only). Returns the path, or None
    with the reason printed when matplotlib is missing or there is nothing to plot."""
    from hf_fastslow.evaluation.cli_support import pyplot_or_reason

    plt, reason = pyplot_or_reason()
    if plt is None:
        print(reason)
        return None
    arms = {n: a["agreement"] for n, a in report["annotators"].items() if a.get("agreement")}
    if not arms:
        print("plot skipped: no traces with gold labels, so there is no F1 to draw")
        return None
    fig, ax = plt.subplots(figsize=(12, 4))
    width = 0.8 / len(arms)
    for k, (name, agr) in enumerate(arms.items()):
        xs = [i + k * width for i in range(len(MAST_CODES))]
        ax.bar(xs, [agr["per_label"][c]["f1"] for c in MAST_CODES], width,
               label=f"{name} (macro F1 {agr['macro_f1']:.2f}, kappa {agr['pooled_kappa']:.2f})")
    ax.set_xticks([i + 0.4 - width / 2 for i in range(len(MAST_CODES))], MAST_CODES)
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("F1")
    ax.set_title(title)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
