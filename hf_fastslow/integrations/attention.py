"""Attention: one call registers a function with both `AttentionInterface` and `AttentionMaskInterface`."""

from __future__ import annotations

from collections.abc import Callable


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
