"""What IHA needs from transformers: its attention name and mask, the SDPA fallback for unconverted layers, which
attention modules route through `AttentionInterface`, and loading a checkpoint whose modules exist before the
weights are read."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .attention import register_attention
from .modeling import decoder_layers

# Model types whose attention module projects q/k/v, applies (optional QK-norm and) RoPE, updates the cache and then
# calls `ALL_ATTENTION_FUNCTIONS[config._attn_implementation]` with post-RoPE q [B,H,N,d] and k/v [B,G,S,d]: checked
# in the 5.24 sources of Llama, Qwen2 (q/k/v biases live in the projections), Qwen3 and Gemma 3 (QK-norm runs before
# RoPE, so mixing the normalised, rotated heads is what the attention function sees).
IHA_MODEL_TYPES = ("llama", "qwen2", "qwen3", "gemma3_text")


def iha_mask(*args, **kwargs):
    """The SDPA boolean mask, always materialised: IHA expands it to pseudo-tokens and never relies on `is_causal`."""
    from transformers.masking_utils import sdpa_mask

    kwargs["allow_is_causal_skip"] = False
    return sdpa_mask(*args, **kwargs)


def register_iha_attention(name: str, fn: Callable) -> None:
    """`attn_implementation=name` runs `fn`; its mask builder never skips the mask (padding must reach `fn`)."""
    register_attention(name, fn, iha_mask)


def iha_unsupported_reason(model: torch.nn.Module) -> str | None:
    """Why IHA cannot convert `model` (None if it can)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    name = type(model).__name__
    if model_type not in IHA_MODEL_TYPES:
        return (
            f"{name} (model_type={model_type!r}) is not supported by IHA: supported model types are "
            f"{', '.join(IHA_MODEL_TYPES)} (text-only causal LMs whose attention runs through transformers' "
            "AttentionInterface)."
        )
    if not getattr(model, "_supports_attention_backend", False):
        return f"{name} does not route its attention through transformers' AttentionInterface."
    softcap = getattr(config, "attn_logit_softcapping", None)
    if softcap is not None:
        return (f"{name} caps its attention logits (attn_logit_softcapping={softcap}); IHA's SDPA/Triton path "
                "has no logit soft-capping.")
    try:
        layers = decoder_layers(model)
    except NotImplementedError as err:
        return str(err)
    for i, layer in enumerate(layers):
        attn = getattr(layer, "self_attn", None)
        missing = [a for a in ("q_proj", "k_proj", "v_proj", "o_proj", "head_dim") if not hasattr(attn, a)]
        if attn is None or missing:
            return f"{name}: decoder layer {i} has no `self_attn` with {', '.join(missing or ['q/k/v/o projections'])}."
    return None


def causal_lm_class(config) -> type:
    """The `*ForCausalLM` class a checkpoint's config names (its `architectures`, else the auto mapping)."""
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    for arch in getattr(config, "architectures", None) or []:
        cls = getattr(transformers, arch, None)
        if isinstance(cls, type):
            return cls
    return MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]


def from_pretrained_with_modules(path, attach: Callable[[torch.nn.Module], None], **kwargs):
    """`(model, loading_info)` of `from_pretrained(path)` where `attach(model)` adds submodules right after
    `__init__`, before the weights are read, so their tensors load from the checkpoint like any other (no unexpected
    keys, no trust_remote_code).

    A throw-away subclass runs `attach` in `__init__`; the loaded model gets its stock class back afterwards.
    Keys `attach` created that the checkpoint lacks raise instead of being left uninitialised.
    """
    from transformers import AutoConfig

    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path)
    base = causal_lm_class(config)

    class _WithModules(base):  # noqa: N801 - transient
        def __init__(self, cfg, *args, **kw):
            super().__init__(cfg, *args, **kw)
            attach(self)

    _WithModules.__name__ = _WithModules.__qualname__ = base.__name__
    model, info = _WithModules.from_pretrained(path, config=config, output_loading_info=True, **kwargs)
    model.__class__ = base
    return model, info
