"""Diffusion-LM seams: the transformers loading internals `dlm_loading` needs, and diffusers' LLaDA2 pipeline as a peer.

transformers (checked on 5.17 and 5.24): `from_pretrained(..., key_mapping=...)` records the renames it used on
`model._weight_conversions`, and `save_pretrained` reverts them, writing the checkpoint's original (LLaDA) names back,
which a plain `LlamaForCausalLM.from_pretrained` cannot read. `forget_key_mapping` drops exactly those renames.

diffusers (0.42.1 ships `LLaDA2Pipeline` + `BlockRefinementScheduler`; imported only when the peer runs):
`run_llada2_pipeline` drives the pipeline on any hf_fastslow block-diffusion causal LM. The pipeline calls
`model(x[:, :window_end], attention_mask=<2D padding mask>, position_ids=arange)` and reads `.logits[:, -block:]` as
the block's distributions; its own model (LLaDA2, remote code) turns the 2D mask into its attention pattern. The
adapter here does that for ours: it builds the 4D mask of the model's `BlockDiffusionConfig.attention` on the
pipeline's block layout, applies the logit shift (slot j reads position j-1 on shifted models) and counts forwards.
How the peer differs from `block_diffusion_generate` (docs/dlm_parts/h2.md has the table):
- no cache: every step recomputes the whole window `[0, end of current block)`: O(window) per forward;
- blocks are aligned to absolute position 0: when the prompt length is not a multiple of the block size, the first
  generated block holds the prompt's tail and fewer than `block_size` new tokens;
- "bidirectional" models see the whole window (prompt included) bidirectionally at every step, as LLaDA's own
  sampler; ours keeps the prompt/committed prefix in a cache computed without the later blocks;
- position ids are `arange` even under left padding (ours shifts them past the pads);
- a block whose masks are all committed before `steps` costs one more forward (the loop notices only at the top);
- no logits processors, commit-pass or stopping criteria; EOS stops a row only when `eos_token_id` is given.
"""

from __future__ import annotations

import types
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch

__all__ = ["LLaDA2PeerOutput", "forget_key_mapping", "llada2_pipeline_available", "run_llada2_pipeline"]


# --------------------------------------------------------------------------------------------------------------------
# transformers: key_mapping renames must not be reverted at save time
# --------------------------------------------------------------------------------------------------------------------
def forget_key_mapping(model: torch.nn.Module, key_mapping: Mapping[str, str]) -> torch.nn.Module:
    """Drop the renames `from_pretrained(key_mapping=...)` recorded, so `save_pretrained` writes the native names."""
    conversions = getattr(model, "_weight_conversions", None)
    if not conversions:
        return model
    ours = set(key_mapping)

    def from_key_mapping(conversion) -> bool:
        sources = getattr(conversion, "_original_source_patterns", None) or getattr(conversion, "source_patterns", ())
        return type(conversion).__name__ == "WeightRenaming" and any(p in ours for p in sources)

    model._weight_conversions = [c for c in conversions if not from_key_mapping(c)]
    return model


# --------------------------------------------------------------------------------------------------------------------
# diffusers LLaDA2Pipeline peer
# --------------------------------------------------------------------------------------------------------------------
class LLaDA2PeerOutput(NamedTuple):
    sequences: torch.LongTensor  # [B, prompt + max_new_tokens]: the prompt followed by the pipeline's tokens
    num_forwards: int  # model forwards the pipeline made (each over the whole window: no cache)


def llada2_pipeline_available() -> bool:
    from hf_fastslow.integrations.diffusers import diffusers_available

    if not diffusers_available():
        return False
    import diffusers

    return hasattr(diffusers, "LLaDA2Pipeline") and hasattr(diffusers, "BlockRefinementScheduler")


class _PipelineModelAdapter(torch.nn.Module):
    """What LLaDA2Pipeline calls as `model`: our causal LM under its block-diffusion attention and logit shift."""

    def __init__(self, model, *, block_size: int, attention: str, logit_shift: bool, prompt_length: int,
                 mask_token_id: int, suppress_mask_token: bool):
        super().__init__()
        self.model = model
        self.block_size, self.attention, self.logit_shift = block_size, attention, logit_shift
        # Slots before the pipeline's first generated block are read causally, as our prefill reads a prompt; from
        # there on the pipeline's own (0-aligned) blocks group. With a prompt that fills whole blocks this is exactly
        # the layout `block_diffusion_generate` decodes with.
        self.block_start = (prompt_length // block_size) * block_size
        self.mask_token_id, self.suppress_mask_token = mask_token_id, suppress_mask_token
        self.forwards = 0

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def attention_mask_4d(self, attention_mask: torch.Tensor | None, length: int, device) -> torch.Tensor:
        from hf_fastslow.modeling.block_diffusion import block_attention_mask

        if self.attention == "bidirectional":  # LLaDA's sampler: the whole window, both ways
            return block_attention_mask(length, length, length, q_offset=0, pattern="bidirectional",
                                        padding_mask=attention_mask, device=device)
        return block_attention_mask(length, length, self.block_size, q_offset=0, pattern=self.attention,
                                    padding_mask=attention_mask, block_start=self.block_start, device=device)

    def forward(self, input_ids, attention_mask=None, position_ids=None, **_):
        from hf_fastslow.modeling.block_diffusion import model_attention_mask

        self.forwards += 1
        length = input_ids.shape[1]
        allowed = self.attention_mask_4d(attention_mask, length, input_ids.device)
        dtype = next(self.model.parameters()).dtype
        mask = model_attention_mask(self.model, allowed, dtype)
        keep = min(length, self.block_size + 1)
        logits = self.model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, use_cache=False,
                            logits_to_keep=keep).logits
        if self.logit_shift:  # slot j's distribution is read at position j - 1
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        if self.suppress_mask_token:  # a trained DLM never proposes [MASK]; the scheduler's argmax would commit it
            logits = logits.clone()
            logits[..., self.mask_token_id] = torch.finfo(logits.dtype).min
        return types.SimpleNamespace(logits=logits)


def run_llada2_pipeline(
    model,
    tokenizer,
    input_ids: torch.LongTensor,
    *,
    block_size: int | None = None,
    steps: int,
    threshold: float,
    mask_token_id: int | None = None,
    max_new_tokens: int,
    attention_mask: torch.Tensor | None = None,
    eos_token_id: int | None = None,
    editing_threshold: float | None = None,
    max_post_steps: int = 16,
    temperature: float = 0.0,
    generator: torch.Generator | None = None,
    minimal_topk: int = 1,
    attention: str | None = None,
    logit_shift: bool | None = None,
    suppress_mask_token: bool = True,
    **pipeline_kwargs: Any,
) -> LLaDA2PeerOutput:
    """Decode with diffusers' `LLaDA2Pipeline` + `BlockRefinementScheduler` on an hf_fastslow causal LM.

    `block_size`, `mask_token_id`, `attention` and `logit_shift` default to the model's attached
    `BlockDiffusionConfig` (attention "bidirectional", no shift when none is attached: a LLaDA). Greedy by default
    (`temperature=0`); `threshold` commits every slot above it, at least the schedule's share of `block_size / steps`
    per step (the pipeline's rule). `editing_threshold` (LLaDA2.1's re-editing of committed tokens) is off by default.
    `eos_token_id=None` never stops early. Returns `LLaDA2PeerOutput(sequences, num_forwards)`.
    """
    from hf_fastslow.integrations.diffusers import require_diffusers
    from hf_fastslow.modeling.block_diffusion import ATTENTION_PATTERNS, block_diffusion_config

    diffusers = require_diffusers("The diffusers LLaDA2 pipeline peer")
    if not llada2_pipeline_available():
        raise ImportError(
            f"diffusers {diffusers.__version__} has no LLaDA2Pipeline/BlockRefinementScheduler (added in 0.42)."
        )
    attached = block_diffusion_config(model)
    block_size = block_size if block_size is not None else getattr(attached, "block_size", None)
    mask_token_id = mask_token_id if mask_token_id is not None else getattr(attached, "mask_token_id", None)
    if block_size is None or mask_token_id is None:
        raise ValueError("pass block_size and mask_token_id (the model has no BlockDiffusionConfig attached).")
    attention = attention or (attached.attention if attached is not None else "bidirectional")
    if attention not in ATTENTION_PATTERNS:
        raise ValueError(f"attention must be one of {ATTENTION_PATTERNS}, got {attention!r}.")
    logit_shift = logit_shift if logit_shift is not None else (attached.logit_shift if attached is not None else False)
    if input_ids.dim() == 1:
        input_ids = input_ids[None]
    if max_new_tokens < 1 or steps < 1 or block_size < 1:
        raise ValueError("max_new_tokens, steps and block_size must be >= 1.")

    adapter = _PipelineModelAdapter(
        model, block_size=block_size, attention=attention, logit_shift=logit_shift,
        prompt_length=input_ids.shape[1], mask_token_id=mask_token_id, suppress_mask_token=suppress_mask_token,
    )
    scheduler = diffusers.BlockRefinementScheduler(block_length=block_size, num_inference_steps=steps,
                                                   threshold=threshold)
    pipe = diffusers.LLaDA2Pipeline(model=adapter, scheduler=scheduler, tokenizer=tokenizer)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        input_ids=input_ids, attention_mask=attention_mask, gen_length=max_new_tokens, block_length=block_size,
        num_inference_steps=steps, threshold=threshold, editing_threshold=editing_threshold,
        max_post_steps=max_post_steps, temperature=temperature,
        sampling_method="greedy" if temperature == 0 else "multinomial", minimal_topk=minimal_topk,
        eos_early_stop=eos_token_id is not None, eos_token_id=eos_token_id, mask_token_id=mask_token_id,
        generator=generator, output_type="seq", use_chat_template=False, **pipeline_kwargs,
    )
    sequences = torch.cat([input_ids.to(out.sequences.device), out.sequences], dim=1)
    return LLaDA2PeerOutput(sequences=sequences, num_forwards=adapter.forwards)
