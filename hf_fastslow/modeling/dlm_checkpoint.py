"""Save a block-diffusion model as a plain transformers checkpoint with a Hub model card of its measured figures.

`save_dlm_checkpoint(model, tokenizer, path, figures=..., base_model=..., method=...)` writes what
`AutoModelForCausalLM.from_pretrained(path)` reads back without `trust_remote_code`: the native config.json (which
carries the `BlockDiffusionConfig` under `block_diffusion`, and `is_causal: false` for bidirectional models), the
safetensors weights under the native parameter names, the tokenizer, and README.md (a `huggingface_hub.ModelCard`
built by `hf_fastslow.model_card.build_model_card`: library hf_fastslow, the base model, tags, the figures table).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from hf_fastslow.model_card import build_model_card
from hf_fastslow.modeling.block_diffusion import block_diffusion_config

__all__ = ["save_dlm_checkpoint"]

_ATTENTION_WORDS = {
    "causal": "strict causal attention (I-DLM style)",
    "block": "bidirectional attention inside a block, causal across blocks (SDAR / BD3-LM style)",
    "bidirectional": "bidirectional attention over the whole sequence (LLaDA / Dream style)",
}


def _is_gguf_quantized(model) -> bool:
    quant = getattr(model.config, "quantization_config", None)
    method = quant.get("quant_method") if isinstance(quant, Mapping) else getattr(quant, "quant_method", None)
    return str(getattr(method, "value", method)).lower() == "gguf"


def save_dlm_checkpoint(
    model,
    tokenizer,
    path: str | os.PathLike,
    *,
    figures: Mapping[str, Any],
    base_model: str | None,
    method: str,
    paper: str | None = None,
    description: str = "",
    tags: list[str] | None = None,
    **save_pretrained_kwargs,
):
    """Write `model` (with its attached BlockDiffusionConfig), `tokenizer` (may be None) and a model card to `path`.

    `figures`: the numbers you measured for this checkpoint (metric -> value; the card's table). `base_model`: the Hub
    id it was converted or trained from. `method`: e.g. "block-diffusion", "i-dlm", "rcd". A model loaded from GGUF has
    dense weights behind a GGUF quantizer that cannot save: the quantizer and its `quantization_config` are dropped
    (in place) first. Returns the `huggingface_hub.ModelCard` written to README.md.
    """
    bd = block_diffusion_config(model)
    if bd is None:
        raise ValueError(
            "the model has no BlockDiffusionConfig: attach one first (hf_fastslow.modeling.block_diffusion."
            "attach_block_diffusion), so that from_pretrained restores the mask id, block size, shift and attention."
        )
    if type(model).__module__.startswith("peft"):
        raise TypeError(
            "save_dlm_checkpoint writes full models; a PEFT model saves its adapter with its own save_pretrained "
            "(or merge_and_unload() it first when the adapter may be merged)."
        )
    if not isinstance(figures, Mapping):
        raise TypeError(f"figures must be a mapping of metric -> measured value, got {type(figures).__name__}.")
    if _is_gguf_quantized(model):
        from hf_fastslow.integrations.modeling import strip_gguf_quantization

        strip_gguf_quantization(model)

    os.makedirs(path, exist_ok=True)
    model.save_pretrained(path, **save_pretrained_kwargs)
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    kind = type(model).__name__
    card = build_model_card(
        base_model=base_model,
        method=method,
        paper=paper,
        tags=["diffusion-lm", "block-diffusion", *(tags or [])],
        figures=figures,
        description=(
            (description + "\n\n" if description else "")
            + f"A diffusion language model stored as a plain `{kind}` (no remote code): mask token id "
            f"{bd.mask_token_id}, block size {bd.block_size}, {_ATTENTION_WORDS[bd.attention]}, "
            + ("hidden state i predicts token i+1 (shifted logits)." if bd.logit_shift
               else "hidden state i predicts token i (no logit shift).")
            + " The settings live in config.json under `block_diffusion`."
        ),
        usage=(
            "from transformers import AutoModelForCausalLM, AutoTokenizer\n"
            "from hf_fastslow.generation.block_diffusion import block_diffusion_generate\n\n"
            'repo = "<this checkpoint>"\n'
            "tokenizer = AutoTokenizer.from_pretrained(repo)\n"
            "model = AutoModelForCausalLM.from_pretrained(repo)  # block_diffusion settings come with config.json\n"
            'ids = tokenizer("Hello", return_tensors="pt").input_ids\n'
            "out = model.generate(ids, custom_generate=block_diffusion_generate, steps=4, threshold=0.9,\n"
            "                     max_new_tokens=64)"
        ),
    )
    card.save(os.path.join(os.fspath(path), "README.md"))
    return card
