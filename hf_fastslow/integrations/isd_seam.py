"""ISD seam: what R-ISD needs from peft's activated LoRA (aLoRA) internals.

R-ISD keeps the base weights and puts an aLoRA on top that acts only on the last `n` positions of each row (peft's
`alora_offsets`). ISD rounds end with the N-1 mask slots, so `alora_offsets=[N-1] * B` makes the adapter draft while
every verified position runs the base weights, bit for bit. peft computes offsets once per `generate` call from the
invocation tokens and injects them into every LoRA layer with forward pre-hooks; a decoding loop that needs different
offsets per forward (0 for the prefill, N-1 for a round) registers its own hooks after peft's, so its value wins.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator, Sequence
from typing import Any

import torch

__all__ = ["alora_layers", "alora_offsets", "uses_alora", "unwrap_peft_model"]


def _peft_lora_classes():
    if "peft" not in sys.modules:  # no peft model can exist before peft is imported: skip its (slow) import
        return None, None
    try:
        from peft.tuners.lora import LoraLayer
        from peft.tuners.lora.variants import ALoraLinearVariant
    except ImportError:  # peft missing, or a peft without aLoRA
        return None, None
    return LoraLayer, ALoraLinearVariant


def unwrap_peft_model(model: Any) -> Any:
    """The transformers model inside a `PeftModel` (the model itself otherwise): `generate` hands a custom decoding
    loop this inner model, so a direct call should see the same one."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base) and hasattr(model, "peft_config"):
        return get_base()
    return model


def alora_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The LoRA layers of `model` whose active, enabled adapter is an activated LoRA (aLoRA)."""
    lora_layer, alora_variant = _peft_lora_classes()
    if lora_layer is None:
        return []
    found = []
    for module in model.modules():
        if not isinstance(module, lora_layer) or getattr(module, "disable_adapters", False):
            continue
        variants = getattr(module, "lora_variant", {}) or {}
        if any(isinstance(variants.get(name), alora_variant) for name in module.active_adapters):
            found.append(module)
    return found


def uses_alora(model: torch.nn.Module) -> bool:
    """Whether forwards of `model` go through an active aLoRA adapter (then ISD runs as R-ISD).

    Raises ValueError for a merged aLoRA: its weights act on every position, so no verifier is the base model.
    """
    layers = alora_layers(model)
    if any(getattr(layer, "merged", False) for layer in layers):
        raise ValueError(
            "The activated LoRA (aLoRA) adapter is merged into the base weights: R-ISD needs it unmerged so that it "
            "acts on the mask slots only."
        )
    return bool(layers)


def _set_offsets(module, args, kwargs, offsets):
    kwargs["alora_offsets"] = offsets
    return args, kwargs


@contextlib.contextmanager
def alora_offsets(model: torch.nn.Module, offsets: Sequence[int]) -> Iterator[None]:
    """Inside the block, every aLoRA layer of `model` applies its adapter to the last `offsets[i]` positions of row i
    only (0: nowhere), whatever offsets peft's own `generate` hooks computed."""
    offsets = [int(o) for o in offsets]
    handles = []
    try:
        for layer in alora_layers(model):
            handles.append(
                layer.register_forward_pre_hook(
                    lambda module, args, kwargs: _set_offsets(module, args, kwargs, offsets), with_kwargs=True
                )
            )
        yield
    finally:
        for handle in handles:
            handle.remove()
