"""Model internals other modules need: decoder layers, rotary embeddings, GGUF quantizer stripping."""

from __future__ import annotations

import inspect
from collections.abc import Callable

import torch


# --------------------------------------------------------------------------------------------------------------------
# Modeling helpers (attention modules, rotary)
# --------------------------------------------------------------------------------------------------------------------
def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of a causal LM (`model.model.layers` for the Llama family)."""
    base = getattr(model, "model", model)
    base = getattr(base, "language_model", base)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise NotImplementedError(f"{type(model).__name__}: cannot locate decoder layers (expected `model.layers`).")
    return list(layers)


def rotary_module(model: torch.nn.Module) -> torch.nn.Module | None:
    base = getattr(model, "model", model)
    base = getattr(base, "language_model", base)
    return getattr(base, "rotary_emb", None)


def rotary_embeddings(model: torch.nn.Module, attn: torch.nn.Module, x: torch.Tensor, position_ids: torch.Tensor):
    """(cos, sin) for `position_ids` as the model computes them for attention module `attn`."""
    rope = rotary_module(model)
    if rope is None:
        raise NotImplementedError(f"{type(model).__name__}: no `rotary_emb` module found.")
    layer_type = getattr(attn, "layer_type", None)
    params = inspect.signature(rope.forward).parameters
    if layer_type is not None and "layer_type" in params:
        return rope(x, position_ids, layer_type)
    return rope(x, position_ids)


def apply_rotary_fn(attn: torch.nn.Module) -> Callable:
    """The `apply_rotary_pos_emb` of the modeling module that defines `attn` (keeps each model's RoPE convention)."""
    import sys

    mod = sys.modules[type(attn).__module__]
    fn = getattr(mod, "apply_rotary_pos_emb", None)
    if fn is None:
        raise NotImplementedError(f"{type(attn).__name__}: its modeling module has no `apply_rotary_pos_emb`.")
    return fn


def strip_gguf_quantization(model: torch.nn.Module) -> torch.nn.Module:
    """Drop the GGUF quantizer of a GGUF-loaded model (its weights are already dense) so it can `save_pretrained`."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("is_quantized", "_is_quantized"):
        if getattr(model, attr, False) is True:
            try:
                setattr(model, attr, False)
            except AttributeError:
                pass
    return model
