"""The CARE seam (latent K/V attention, `hf_fastslow.modeling.care_attention`): the attention function a stock attention
module would call, its modeling module's eager fallback, and where the current queries sit among the keys a cache
layer returns (which depends on the layer class: dynamic layers return past + new, static ones their whole buffer)."""

from __future__ import annotations

import functools
import inspect
import sys
from collections.abc import Callable

import torch


def attention_function(attn: torch.nn.Module) -> Callable:
    """`ALL_ATTENTION_FUNCTIONS.get_interface(config._attn_implementation, <module's eager_attention_forward>)`, as
    the stock forward of `attn`'s class resolves it."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    modeling = sys.modules[_stock_class(attn).__module__]
    eager = getattr(modeling, "eager_attention_forward", None)
    if eager is None:
        raise NotImplementedError(f"{_stock_class(attn).__name__}: its modeling module has no eager_attention_forward.")
    return ALL_ATTENTION_FUNCTIONS.get_interface(attn.config._attn_implementation, eager)


def _stock_class(attn: torch.nn.Module) -> type:
    # a converted module's class is a subclass made on the fly of the stock class; its modeling module is the stock one
    return getattr(type(attn), "_care_stock_class", type(attn))


def cache_layer_length(cache, layer_idx: int) -> int:
    """Tokens a cache layer has seen so far (0 for a layer not yet written)."""
    if cache is None:
        return 0
    return int(cache.get_seq_length(layer_idx))


def query_offset(cache, layer_idx: int, past_len: int, key_len: int, q_len: int) -> int:
    """Index, among the `key_len` keys the cache returned for this call, of the first of the `q_len` new tokens.

    Dynamic layers (DynamicLayer, DynamicSlidingWindowLayer, QuantizedLayer) return the kept past followed by the new
    tokens, so the new ones are last. A StaticLayer returns its whole preallocated buffer with the new tokens written
    at `past_len`. A StaticSlidingWindowLayer rolls its buffer once full, so key order is not token order: refused.
    """
    if cache is None:
        return 0
    layers = getattr(cache, "layers", None)
    layer = layers[layer_idx] if layers is not None and layer_idx < len(layers) else None
    from transformers.cache_utils import StaticLayer, StaticSlidingWindowLayer

    if isinstance(layer, StaticSlidingWindowLayer):
        raise NotImplementedError(
            "CARE latent attention: a StaticSlidingWindowLayer rolls its buffer, so cached latents lose their order; "
            "use the default DynamicCache (or a StaticCache on a model without sliding layers)."
        )
    if isinstance(layer, StaticLayer):
        return past_len
    return key_len - q_len


def cache_update(cache, keys: torch.Tensor, values: torch.Tensor, layer_idx: int, kwargs: dict):
    """`cache.update(...)` as the installed stock attention calls it (`kwargs=` in 5.24, a `cache_kwargs` dict
    before)."""
    if _update_takes_kwargs(type(cache)):
        return cache.update(keys, values, layer_idx, kwargs=kwargs)
    return cache.update(keys, values, layer_idx, {})


@functools.cache
def _update_takes_kwargs(cache_cls: type) -> bool:
    try:
        return "kwargs" in inspect.signature(cache_cls.update).parameters
    except (TypeError, ValueError):
        return False
