"""RCD trainer (Residual Context Diffusion, arXiv 2601.22954, stage 2): block-diffusion SFT where the masked slots of
the noisy half are fed the residual `(1 - alpha) E(m) + alpha E^T p` built from a frozen reference model's prediction
for the same noisy input, so that the target learns to use the soft tokens `rcd_generate` feeds it at decode time,
without backpropagation through the denoising steps.

Everything else (data preparation, noising, the [x_t | x_0] layout, the 1/t-weighted loss normalized by
`num_items_in_batch`, metrics, saving) is `BlockDiffusionTrainer`'s: RCD only overrides its `forward_logits` hook.
"""

from __future__ import annotations

import os

import torch

from ..generation.rcd import entropy_weighted_residual, inject_residual, input_embedding_scale
from ..integrations import trl_metric_buffer
from ..integrations.attention import attention_implementation
from ..modeling.block_diffusion_training import additive_attention_mask
from .block_diffusion_trainer import BlockDiffusionTrainer, unwrapped_base_model
from .rcd_config import RCDTrainingConfig


def slot_logits(logits: torch.Tensor, batch: dict, logit_shift: bool, block_size: int) -> torch.Tensor:
    """The distribution logits of each slot of the noisy half [B, L, V], from a forward's logits [B, S, V] on the
    laid-out batch.

    Without the shift slot j's distribution is the noisy hidden j's. With it (converted AR models) it is hidden j-1's:
    the noisy one inside the same block; for a block's first slot the CLEAN hidden j-1 (its last committed token at
    decode time, where that slot's distribution comes from the already-committed prefix). Slot 0 has no predecessor;
    it is a prompt token and never masked, so its row is the noisy hidden 0's (unused)."""
    noisy = logits[:, batch["noisy_half"]]
    if not logit_shift:
        return noisy
    previous = noisy[:, :-1]
    if batch["clean_half"] is not None:
        blocks = batch.get("block_ids")  # the trainer's block of each token (response-aligned or absolute grid)
        if blocks is None:
            blocks = batch["position_ids"][:, batch["noisy_half"]] // block_size
        same_block = blocks[:, 1:] == blocks[:, :-1]
        previous = torch.where(same_block.unsqueeze(-1), previous, logits[:, batch["clean_half"]][:, :-1])
    return torch.cat([noisy[:, :1], previous], dim=1)


def _model_vocab(model) -> int:
    head = model.get_output_embeddings()
    return int(head.weight.shape[0]) if head is not None else int(model.config.vocab_size)


class RCDTrainer(BlockDiffusionTrainer):
    """`BlockDiffusionTrainer` with RCD's residual inputs from a frozen reference model (see `RCDTrainingConfig`).

    Args:
        model: the target DLM to train (its initialization is the SeqD baseline's, so the two are comparable on the
            same token count).
        ref_model: the frozen reference DLM (a model or a path): a block-diffusion model trained with the same mask
            token, logit shift and tokenizer (the paper: a smaller SFT DLM). It is put in eval mode, stops requiring
            gradients, is prepared by the accelerator for evaluation only and runs under `torch.no_grad()`; it is
            never wrapped by peft. Must not be `model` itself.
        args: an `RCDTrainingConfig`.
        ref_processing_class: the reference model's tokenizer, when it has its own: its vocabulary must equal the
            target's `processing_class` (checked); omitted = the two share `processing_class`.
        Every other `BlockDiffusionTrainer` / `SFTTrainer` argument passes through.
    """

    config_class = RCDTrainingConfig

    def __init__(self, model, ref_model, args: RCDTrainingConfig | None = None, ref_processing_class=None, **kwargs):
        if ref_model is None:
            raise ValueError("RCDTrainer: ref_model (the frozen reference DLM) is required.")
        if ref_model is model:
            raise ValueError("RCDTrainer: model and ref_model cannot be the same object (the reference is frozen; "
                             "pass a separate copy).")
        if isinstance(ref_model, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM

            ref_model = AutoModelForCausalLM.from_pretrained(ref_model)
        super().__init__(model, args=args, **kwargs)
        self._check_reference(ref_model, ref_processing_class)
        ref_model.requires_grad_(False)
        ref_model.eval()
        self.ref_model = self.accelerator.prepare_model(ref_model, evaluation_mode=True)
        self.ref_model.eval()

    def _check_reference(self, ref_model, ref_processing_class) -> None:
        from ..modeling.block_diffusion import block_diffusion_config

        target = unwrapped_base_model(self.model)
        if _model_vocab(ref_model) != _model_vocab(target):
            raise ValueError(f"RCDTrainer: the reference model's vocabulary ({_model_vocab(ref_model)}) differs from "
                             f"the target's ({_model_vocab(target)}); its distributions index the target's embedding "
                             "table, so the two must share a tokenizer.")
        if ref_processing_class is not None and self.processing_class is not None:
            ref_tok = getattr(ref_processing_class, "tokenizer", ref_processing_class)
            tok = getattr(self.processing_class, "tokenizer", self.processing_class)
            if ref_tok.get_vocab() != tok.get_vocab():
                raise ValueError("RCDTrainer: the reference tokenizer's vocabulary differs from the target's.")
        ref_config = block_diffusion_config(ref_model)
        if ref_config is not None:
            target_config = self.block_diffusion_config
            if ref_config.mask_token_id != target_config.mask_token_id:
                raise ValueError(f"RCDTrainer: the reference model's mask token ({ref_config.mask_token_id}) differs "
                                 f"from the target's ({target_config.mask_token_id}).")
            if ref_config.logit_shift != target_config.logit_shift:
                raise ValueError("RCDTrainer: the reference model's logit_shift differs from the target's; its "
                                 "distributions would belong to the wrong slots.")

    # -------------------------------------------------------------------------------------------------------------
    # The hook
    # -------------------------------------------------------------------------------------------------------------
    def residual_inputs(self, model, batch: dict) -> torch.Tensor:
        """inputs_embeds [B, S, D] of the target: its own lookups everywhere, the residual on the masked slots of the
        noisy half (clean half, prompt, unmasked and padding slots untouched)."""
        base = unwrapped_base_model(self.accelerator.unwrap_model(model))
        embedding = base.get_input_embeddings()
        embeds = embedding(batch["input_ids"])
        args = self.args
        if args.rcd_alpha_mode == "fixed" and args.rcd_fixed_alpha == 0:
            return embeds  # SeqD: no reference pass needed
        with torch.no_grad():
            ref_logits = super().forward_logits(self.ref_model, batch)
        slots = slot_logits(ref_logits, batch, args.logit_shift, args.block_size)  # [B, L, V]
        masked = batch["masked"]
        delta, alpha = entropy_weighted_residual(
            slots[masked], embedding.weight, args.rcd_t_res, args.rcd_residual_topk, alpha_mode=args.rcd_alpha_mode,
            fixed_alpha=args.rcd_fixed_alpha, embed_scale=input_embedding_scale(embedding))
        rows, length = masked.shape
        full_delta = embeds.new_zeros(rows, length, embeds.shape[-1])
        full_delta[masked] = delta.to(embeds.dtype)
        full_alpha = torch.zeros(rows, length, dtype=torch.float32, device=embeds.device)
        full_alpha[masked] = alpha
        noisy = batch["noisy_half"]
        injected = inject_residual(embeds[:, noisy], full_delta, full_alpha, masked)
        if alpha.numel():
            mode = "train" if self.model.training else "eval"
            trl_metric_buffer(self, mode)["residual_alpha"].append(float(alpha.mean()))
        if batch["clean_half"] is None:
            return injected
        parts = [injected, embeds[:, batch["clean_half"]]]
        return torch.cat(parts if noisy.start == 0 else parts[::-1], dim=1)

    def forward_logits(self, model, batch: dict) -> torch.Tensor:
        """The target's logits [B, S, V] on the residual inputs (one forward, no cache)."""
        mask = batch["attention_mask"]
        # Under DDP `model` is the DistributedDataParallel wrapper (no dtype / attention settings): unwrap it first.
        base = unwrapped_base_model(self.accelerator.unwrap_model(model))
        if attention_implementation(base) == "eager":
            mask = additive_attention_mask(mask, base.dtype)
        outputs = model(inputs_embeds=self.residual_inputs(model, batch), attention_mask=mask,
                        position_ids=batch["position_ids"], use_cache=False, **batch["model_kwargs"])
        return outputs.logits
