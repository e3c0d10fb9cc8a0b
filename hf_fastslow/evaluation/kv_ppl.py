"""Perplexity through a cache: teacher-forced chunks, so that attention really reads what the cache holds
(used to score KV/X cache quantizers such as XQuant, arXiv 2508.10395)."""

from __future__ import annotations

import math
from collections.abc import Callable
from importlib import resources

import torch
from torch.nn import functional as F

from ..integrations import cache_kwargs

__all__ = ["bundled_text", "cache_perplexity"]


def bundled_text() -> str:
    """A public-domain English text shipped with the package (Verne, "In the Year 2889", Project Gutenberg #19362)."""
    return resources.files("hf_fastslow").joinpath("data/in_the_year_2889.txt").read_text(encoding="utf-8")


@torch.no_grad()
def cache_perplexity(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    cache_factory: Callable[[], object] | None,
    chunk: int = 64,
    on_chunk: Callable[[int, object], None] | None = None,
) -> dict:
    """Feed `input_ids` (1, T) in chunks of `chunk` tokens through a fresh cache from `cache_factory()` (None = the
    model's default DynamicCache) and score every target predicted from the second chunk on.

    Rule (the same for every cache): chunk k>0 attends to the k*chunk earlier tokens through the cache, so with a
    residual window R, everything older than the cache's unquantized window is read back quantized; the chunk's own
    tokens attend to each other exactly as the model computed them (every cache in this package and in transformers
    returns the current call's K/V unquantized). Targets of the first chunk see no history and are left out.
    `on_chunk(n_tokens_fed, cache)` is called after every chunk (e.g. to measure memory). Returns
    `{"ppl", "nll", "n_targets", "cache"}`.
    """
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must have shape (1, T), got {tuple(input_ids.shape)}.")
    if chunk <= 0 or input_ids.shape[1] <= chunk:
        raise ValueError(f"need a positive chunk shorter than the text (chunk={chunk}, T={input_ids.shape[1]}).")
    cache = cache_factory() if cache_factory is not None else None
    if cache is None:
        from transformers import DynamicCache

        cache = DynamicCache(config=model.config)
    total_nll, n_targets = 0.0, 0
    prev_last_logits = None
    for start in range(0, input_ids.shape[1], chunk):
        piece = input_ids[:, start : start + chunk]
        logits = model(piece, use_cache=True, **cache_kwargs(model, cache)).logits.float()
        if start > 0:
            # predictions for this chunk: the last logit of the previous chunk, then all but the last of this one
            preds = torch.cat([prev_last_logits, logits[:, :-1]], dim=1)
            total_nll += F.cross_entropy(preds[0], piece[0], reduction="sum").item()
            n_targets += piece.shape[1]
        prev_last_logits = logits[:, -1:]
        if on_chunk is not None:
            on_chunk(start + piece.shape[1], cache)
    nll = total_nll / n_targets
    return {"ppl": math.exp(nll), "nll": nll, "n_targets": n_targets, "cache": cache}
