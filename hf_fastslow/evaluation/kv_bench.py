"""One row of a KV-cache quality/memory table, measured by the rules of the XQuant benchmark (benchmarks/xquant.py):
perplexity through the cache on teacher-forced chunks (`kv_ppl.cache_perplexity`), the storage walk
(`memory.storage_bytes`) after every chunk, bytes per token as the least-squares slope of those points, and the
bytes held once the full-precision window is at its largest. Used by benchmarks/qvg.py (benchmarks/xquant.py holds
its own copy of `fit_line`)."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from ..integrations import cache_kwargs
from .kv_ppl import cache_perplexity
from .memory import storage_bytes

__all__ = ["cache_table_row", "fit_line"]


def fit_line(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares (slope, intercept) of bytes against tokens."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return slope, my - slope * mx


@torch.no_grad()
def cache_table_row(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cache_factory: Callable[[], object],
    chunk: int,
    extra_ids: torch.Tensor | None = None,
) -> dict:
    """Perplexity and memory of one cache: `{"ppl", "bytes_per_token", "fixed", "at_end", "window_full",
    "fixed_window_full", "seconds", "cache"}`.

    `extra_ids` (1, R - 1) are fed after the text so that the window is at its largest ("window_full" = bytes held
    then, "fixed_window_full" = that minus the slope times every token fed).
    """
    points: list[tuple[int, int]] = []
    t0 = time.perf_counter()
    r = cache_perplexity(model, input_ids, cache_factory, chunk=chunk,
                         on_chunk=lambda n, c: points.append((n, storage_bytes(c))))
    cache = r["cache"]
    window_full = points[-1][1]
    n_fed = input_ids.shape[1]
    if extra_ids is not None and extra_ids.shape[1]:
        model(extra_ids, use_cache=True, **cache_kwargs(model, cache))
        window_full = storage_bytes(cache)
        n_fed += extra_ids.shape[1]
    seconds = time.perf_counter() - t0
    slope, fixed = fit_line(points)
    return dict(ppl=r["ppl"], bytes_per_token=slope, fixed=fixed, at_end=points[-1][1], window_full=window_full,
                fixed_window_full=window_full - slope * n_fed, seconds=seconds, cache=cache)
