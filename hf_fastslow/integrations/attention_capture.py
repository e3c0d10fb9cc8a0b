"""transformers internals for attention-function hooks: switching a model's attention implementation, transformers'
own SDPA attention function, the attention modules of a decoder, and a capture of post-RoPE q/k/v.

Attention functions registered through `AttentionInterface` receive q (B, H, N, D) and k/v (B, Hk, S, D) after the
rotary embedding and after the cache update, which is exactly what an attention-error study needs; so the capture is a
registered attention function (it records, then runs transformers' SDPA), installed for the duration of a block.
"""

from __future__ import annotations

import contextlib

import torch

from hf_fastslow.integrations.attention import (
    attention_implementation,
    register_attention,
    sdpa_attention_function,
    set_attention_implementation,
)
from hf_fastslow.integrations.modeling import decoder_layers

CAPTURE_ATTENTION = "hf_fastslow_capture"


def attention_modules(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The self-attention module of every decoder layer (`layer.self_attn`, the Llama-family layout), in order."""
    modules = []
    for index, layer in enumerate(decoder_layers(model)):
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            raise NotImplementedError(f"{type(layer).__name__} (layer {index}) has no `self_attn` attention module.")
        modules.append(attn)
    return modules


def _capture_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    store = getattr(module, "_hf_fastslow_capture", None)
    if store is not None:
        store[module._hf_fastslow_capture_index] = {
            "q": query.detach().clone(), "k": key.detach().clone(), "v": value.detach().clone(),
            "mask": None if attention_mask is None else attention_mask.detach().clone(),
            "scaling": scaling, "is_causal": getattr(module, "is_causal", True),
        }
    return sdpa_attention_function()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                                     **kwargs)


@contextlib.contextmanager
def capture_attention_inputs(model: torch.nn.Module, layers: list[int] | None = None):
    """Within the block, every forward records each chosen layer's post-RoPE q/k/v into the yielded dict.

    `captured[layer] = {"q": (B, H, N, D), "k": (B, Hk, S, D), "v": ..., "mask": the mask the layer received,
    "scaling": float, "is_causal": bool}` (the last forward wins). The model runs transformers' SDPA meanwhile;
    its previous attention implementation is restored on exit.
    """
    register_attention(CAPTURE_ATTENTION, _capture_forward)
    modules = attention_modules(model)
    chosen = range(len(modules)) if layers is None else layers
    captured: dict[int, dict] = {}
    previous = attention_implementation(model)
    for index in chosen:
        modules[index]._hf_fastslow_capture = captured
        modules[index]._hf_fastslow_capture_index = index
    set_attention_implementation(model, CAPTURE_ATTENTION)
    try:
        yield captured
    finally:
        set_attention_implementation(model, previous)
        for index in chosen:
            del modules[index]._hf_fastslow_capture, modules[index]._hf_fastslow_capture_index
