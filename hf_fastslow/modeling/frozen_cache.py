"""A read-only context cache for qTTT (arXiv 2512.13898): span queries attend over the prefill's frozen keys/values.

qTTT prefills a long context once and then runs short spans of that same context through the model again, with
gradients, so the adapted query projections can be trained against the keys they will meet when answering. The span's
own keys and values are already in the cache (the prefill computed them), so a span pass must read the cache and
never write to it: `FrozenContextCache` layers return the stored tensors from `update` and store nothing. Masking is
an explicit 4D boolean mask (query at absolute position `t + i` sees keys `0 .. t + i`), which every transformers
release we support passes through to the attention function unchanged.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

__all__ = [
    "FrozenContextCache", "FrozenContextLayer", "dynamic_cache_from_layers", "span_attention_mask",
]


class FrozenContextLayer(DynamicLayer):
    """One layer of fixed keys/values [B, H_kv, T, D]; `update` returns them and stores nothing."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor):
        super().__init__()
        self.keys, self.values = keys, values
        self.device = keys.device
        self.dtype = keys.dtype
        self.is_initialized = True

    def update(self, key_states, value_states, *args, **kwargs):
        # The span's own keys/values were computed by the prefill at the same positions; the stored ones are the
        # frozen context the paper adapts against, so the new ones are dropped.
        return self.keys, self.values

    def crop(self, tokens_to_remove: int) -> None:
        raise TypeError("FrozenContextCache is read-only: it cannot be cropped.")


class FrozenContextCache(Cache):
    """Per-layer keys/values of a prefilled context, read-only (see the module docstring)."""

    def __init__(self, layers_kv: list[tuple[torch.Tensor, torch.Tensor]]):
        if not layers_kv:
            raise ValueError("FrozenContextCache needs the keys/values of at least one layer.")
        super().__init__(layers=[FrozenContextLayer(k, v) for k, v in layers_kv])

    @classmethod
    def from_cache(cls, cache: Cache) -> FrozenContextCache:
        """Freeze a prefilled cache (shares its tensors; nothing writes to them)."""
        layers = getattr(cache, "layers", None)
        if not layers or any(not getattr(layer, "is_initialized", False) for layer in layers):
            raise ValueError("from_cache needs a cache whose every layer holds the prefilled context.")
        if any(getattr(layer, "is_sliding", False) for layer in layers):
            raise NotImplementedError("sliding-window cache layers are not supported by FrozenContextCache.")
        return cls([(layer.keys, layer.values) for layer in layers])

    def layer_tensors(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        return [(layer.keys, layer.values) for layer in self.layers]


def dynamic_cache_from_layers(layers_kv: list[tuple[torch.Tensor, torch.Tensor]]) -> DynamicCache:
    """A fresh `DynamicCache` holding copies of the given keys/values (generation appends to it; the originals stay
    untouched)."""
    cache = DynamicCache()
    for index, (keys, values) in enumerate(layers_kv):
        cache.update(keys.clone(), values.clone(), index)
    return cache


def span_attention_mask(span_start: int, span_len: int, context_len: int, batch_size: int = 1,
                        device: torch.device | None = None) -> torch.Tensor:
    """[B, 1, span_len, context_len] bool: the query at absolute position `span_start + i` sees keys 0..span_start+i."""
    if span_start < 0 or span_len < 1 or span_start + span_len > context_len:
        raise ValueError(f"span [{span_start}, {span_start + span_len}) does not fit a context of {context_len}.")
    query_pos = span_start + torch.arange(span_len, device=device)
    allowed = torch.arange(context_len, device=device)[None, :] <= query_pos[:, None]
    return allowed[None, None].expand(batch_size, 1, span_len, context_len)

