"""Attention: registering a function with both `AttentionInterface` and `AttentionMaskInterface`, transformers' own
SDPA function, and reading or switching the attention function a model calls."""

from __future__ import annotations

from collections.abc import Callable

import torch


# --------------------------------------------------------------------------------------------------------------------
# Attention: AttentionInterface + AttentionMaskInterface
# --------------------------------------------------------------------------------------------------------------------
def register_attention(name: str, fn: Callable, mask_fn: Callable | None = None) -> None:
    """Register `fn(module, q, k, v, attention_mask, scaling, dropout, **kw)` as `attn_implementation=name`.

    A custom attention name also needs a mask builder; by default we reuse the SDPA one (boolean mask).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, mask_fn if mask_fn is not None else sdpa_mask)


def sdpa_attention_function() -> Callable:
    """transformers' own `sdpa_attention_forward(module, q, k, v, attention_mask, dropout, scaling, **kw)`."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward


def attention_implementation(model: torch.nn.Module) -> str:
    """The attention function name a model's layers call (`config._attn_implementation`)."""
    return model.config._attn_implementation


def set_attention_implementation(model: torch.nn.Module, name: str) -> None:
    """Switch the model (and its sub-models) to the registered attention function `name`; raise if it refuses."""
    model.set_attn_implementation(name)
    if attention_implementation(model) != name:
        raise RuntimeError(f"{type(model).__name__} refused attn_implementation={name!r}.")
