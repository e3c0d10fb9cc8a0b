"""Stationary-batch ISD seam: building the KV cache it runs on and compacting its masked columns.

The stationary batch appends the same number of columns to every row each round and masks the rejected ones instead
of cropping them, so rows stay equal length (a `StaticCache` never changes shape). When the cache fills, each row's
valid columns are gathered to the right end; this reads the layers' key/value tensors (`cache.layers[i].keys`) and
writes them back: a static layer in place (its storage address kept, its `cumulative_length` set; transformers 5.17's
static layers have no `crop`), a dynamic one through the public `crop(-n)` + `update(...)`.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["check_stationary_cache", "compact_cache_columns", "make_stationary_cache"]


def make_stationary_cache(model: Any, implementation: str, max_cache_len: int) -> Any:
    """A fresh "dynamic" (`DynamicCache`) or "static" (`StaticCache` of `max_cache_len` columns) cache for `model`."""
    from transformers import DynamicCache, StaticCache

    if implementation == "dynamic":
        return DynamicCache(config=model.config)
    if implementation == "static":
        return StaticCache(config=model.config, max_cache_len=max_cache_len)
    raise ValueError(f"cache_implementation must be 'dynamic' or 'static'; got {implementation!r}.")


def check_stationary_cache(cache: Any) -> None:
    """Masked holes are exact only for full-attention layers: refuse sliding-window / linear-attention caches."""
    if any(getattr(cache, "is_sliding", ()) or ()) or any(getattr(cache, "is_linear", ()) or ()):
        raise ValueError(
            f"The stationary batch needs full-attention cache layers (got a {type(cache).__name__} with sliding-window "
            "or linear-attention layers): use isd_generate one request at a time instead."
        )


def compact_cache_columns(cache: Any, index: torch.Tensor, width: int) -> None:
    """Keep, for every row b, the cache columns `index[b]` (of the first `width`) in that order; afterwards the cache
    holds `index.shape[1]` columns. Keys carry their RoPE rotation already, so moving them is exact as long as the
    caller keeps each row's position ids and moves its validity mask the same way."""
    from transformers.cache_utils import StaticLayer

    new_width = index.shape[1]
    dynamic = []
    for layer_idx, layer in enumerate(cache.layers):
        keys, values = layer.keys[:, :, :width], layer.values[:, :, :width]
        at = index.to(keys.device)[:, None, :, None]
        keys = keys.gather(2, at.expand(-1, keys.shape[1], -1, keys.shape[3]))
        values = values.gather(2, at.expand(-1, values.shape[1], -1, values.shape[3]))
        if isinstance(layer, StaticLayer):
            layer.keys[:, :, :new_width].copy_(keys)
            layer.values[:, :, :new_width].copy_(values)
            layer.cumulative_length.fill_(new_width)
        else:
            dynamic.append((layer_idx, keys, values))
    if dynamic:
        for layer_idx, _, _ in dynamic:
            cache.layers[layer_idx].crop(-width)
        for layer_idx, keys, values in dynamic:
            cache.update(keys, values, layer_idx)
