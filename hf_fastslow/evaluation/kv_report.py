"""What the KV-cache benchmarks (benchmarks/xquant.py, benchmarks/qvg.py; the plot also benchmarks/care.py) write
besides their tables: each table row as a JSON record under a stable key (the cache's arm and its bit width, so a
reader does not depend on the row's wording), written by `write_report_json` (from cli_support, re-exported here), and
the plot of memory against perplexity, one line per arm through its bit widths (or kept KV fractions)."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from hf_fastslow.evaluation.cli_support import pyplot_or_reason, write_report_json

__all__ = ["plot_memory_vs_ppl", "row_key", "write_report_json"]


def row_key(arm: str, bits) -> str:
    """`arm/int<bits>` ("quanto_best/int2"); the bare arm for an unquantized cache (bits None or "-")."""
    return arm if bits in (None, "-") else f"{arm}/int{bits}"


def plot_memory_vs_ppl(rows: dict[str, dict] | Iterable[dict], path: str | Path, title: str, *, along: str = "bits",
                       point_label: str = "{}b") -> str | None:
    """Bytes per token (x) against perplexity (y) of every measured row of `rows` (records with "arm", `along`,
    "ppl", "bytes_per_token", by key or in a list; failed rows have no "ppl" and are left out), the rows of one arm
    joined in order of `along` (the bit width; CARE: the kept KV fraction), each point labelled with
    `point_label.format(value)`; the uncompressed reference (`along` None) as a dashed line.
    Returns None when the plot was written, else why not (matplotlib missing)."""
    plt, reason = pyplot_or_reason()
    if plt is None:
        return reason
    measured = [r for r in (rows.values() if isinstance(rows, dict) else rows) if "ppl" in r]
    arms: dict[str, list[dict]] = {}
    for r in measured:
        arms.setdefault(r["arm"], []).append(r)
    fig, ax = plt.subplots(figsize=(8, 5.5))
    markers = "osD^v<>phX*"
    for i, (arm, points) in enumerate(arms.items()):
        if points[0][along] is None:
            ax.axhline(points[0]["ppl"], color="grey", ls="--", lw=1,
                       label=f"{arm}: PPL {points[0]['ppl']:.2f} at {points[0]['bytes_per_token']:,.0f} B/token")
            continue
        points = sorted(points, key=lambda r: r[along])
        xs, ys = [p["bytes_per_token"] for p in points], [p["ppl"] for p in points]
        (line,) = ax.plot(xs, ys, marker=markers[i % len(markers)], label=arm)
        for p in points:
            ax.annotate(point_label.format(p[along]), (p["bytes_per_token"], p["ppl"]), textcoords="offset points",
                        xytext=(4, 4), fontsize=8, color=line.get_color())
    # log axes only where the points span more than 5x (a peer at 1,000 PPL beside 34), else linear (readable ticks)
    for values, set_scale in (([r["bytes_per_token"] for r in measured if r[along] is not None], ax.set_xscale),
                              ([r["ppl"] for r in measured], ax.set_yscale)):
        if values and max(values) > 5 * min(values):
            set_scale("log")
    ax.set_xlabel("bytes per token (slope of the storage walk; shared factors excluded)")
    ax.set_ylabel("perplexity through the cache (lower is better)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
