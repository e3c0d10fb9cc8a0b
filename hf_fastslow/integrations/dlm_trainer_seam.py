"""peft internals the DLM conversion trainers (IDLMTrainer's R-ISD mode) need, checked in one place."""

from __future__ import annotations

import torch

# peft 0.21: attribute of a gradient-checkpointed layer listing the per-forward aLoRA hooks its backward removes
_PEFT_CHECKPOINT_HOOKS = "_peft_gradient_checkpointing_forward_hooks"


def release_alora_checkpoint_hooks(model: torch.nn.Module) -> int:
    """Remove the aLoRA hooks a forward left on gradient-checkpointed layers; returns how many were removed.

    With gradient checkpointing on, peft registers the `alora_offsets` hooks of every checkpointed layer at the forward
    and removes them in that layer's backward. A forward that is never backpropagated (evaluation under no_grad) leaves
    them behind, and peft refuses the next forward ("Multiple invocations of PEFT forward hooks before .backward()").
    Call this after such a forward; never between a training forward and its backward (the recomputation needs them).
    """
    removed = 0
    for module in model.modules():
        hooks = getattr(module, _PEFT_CHECKPOINT_HOOKS, None)
        while hooks:
            hooks.pop().remove()
            removed += 1
    return removed
