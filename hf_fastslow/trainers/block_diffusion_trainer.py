"""AR -> DLM conversion trainer: `SFTTrainer` whose loss is a masked-diffusion objective (MDLM/LLaDA, BD3-LM/SDAR
block diffusion on `[x_t | x_0]`, I-DLM). Data preparation is SFTTrainer's (chat templates, assistant-only and
completion-only labels): only labelled tokens are masked and scored, so prompts stay clean context.

Subclasses override small hooks: `build_noisy_batch(inputs)` (noising + layout), `forward_logits(model, batch)` (the
denoiser forward: RCD injects residual embeddings here), `diffusion_loss(model, batch)` (the objective) and
`combine_losses(noisy_ce, clean_ce)`.
"""

from __future__ import annotations

import json
import os

import torch
from torch.nn import functional as F
from transformers.modeling_outputs import CausalLMOutput
from trl import SFTTrainer

from ..integrations import trl_metric_buffer
from ..modeling.block_diffusion_training import (
    block_ids,
    diffusion_targets,
    noisy_inputs,
    sequence_positions,
    single_sequence_mask,
    split_block_first_targets,
    training_mask_2l,
    two_half_position_ids,
)
from .block_diffusion_config import OBJECTIVE_LAYOUT, BlockDiffusionTrainingConfig
from .config_checks import trainer_owned_copy

BLOCK_DIFFUSION_CONFIG_FILE = "block_diffusion_config.json"


def unwrapped_base_model(model):
    """The transformers model under a peft wrapper (the one whose config is saved), or `model` itself."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


class BlockDiffusionTrainer(SFTTrainer):
    """`SFTTrainer` trained with the masked-diffusion objective of `BlockDiffusionTrainingConfig`.

    At construction the model gets a `BlockDiffusionConfig` (mask id, block size, logit shift, attention pattern
    matching the objective) through `attach_block_diffusion`, so `save_pretrained` / `from_pretrained` keep it and
    `block_diffusion_generate` decodes with the trained layout. Under PEFT the adapter folder also gets
    `block_diffusion_config.json`.

    Logged metrics (SFTTrainer's `entropy` / `mean_token_accuracy` assume AR logits; here they are recomputed on the
    denoising targets): `noisy_ce` (mean CE per masked target), `clean_ce` (AR CE of the clean half, shifted
    two-half objectives only), `entropy`, `mean_token_accuracy` (top-1 on masked targets), `mask_ratio`
    (masked / maskable tokens) and `num_tokens` (real input tokens seen, each sequence counted once).

    Args:
        model: a causal LM (or Hub id / path), converted in place; every other `SFTTrainer` argument passes through.
        args: a `BlockDiffusionTrainingConfig` (copied: the trainer never changes the caller's object).
    """

    config_class = BlockDiffusionTrainingConfig

    def __init__(self, model, args: BlockDiffusionTrainingConfig | None = None, **kwargs):
        if args is None:
            args = self.config_class(output_dir="block_diffusion")
        if not isinstance(args, self.config_class):
            raise TypeError(f"{type(self).__name__}: args must be a {self.config_class.__name__}, "
                            f"got {type(args).__name__}.")
        args = trainer_owned_copy(args)
        super().__init__(model=model, args=args, **kwargs)
        self.total_train_tokens = 0
        self.noise_generator: torch.Generator | None = None  # None = torch's global RNG (seeded by Trainer)
        self.block_diffusion_config = self._attach_block_diffusion()

    # -------------------------------------------------------------------------------------------------------------
    # Set-up
    # -------------------------------------------------------------------------------------------------------------
    @property
    def clean_first(self) -> bool:
        """Two-half layout `[x_0 | x_t]` instead of `[x_t | x_0]` (R-ISD's activated LoRA needs the noisy suffix)."""
        return False

    def _attach_block_diffusion(self):
        from ..modeling.block_diffusion import BlockDiffusionConfig, attach_block_diffusion, block_diffusion_config

        base = unwrapped_base_model(self.model)
        attached = block_diffusion_config(base)
        mask_id = self.args.mask_token_id
        if mask_id is None:
            if attached is None:
                raise ValueError(f"{type(self).__name__}: no mask token: pass mask_token_id in the config, or attach "
                                 "one first (hf_fastslow.modeling.block_diffusion.ensure_mask_token / "
                                 "attach_block_diffusion).")
            mask_id = attached.mask_token_id
        vocab = base.get_input_embeddings().weight.shape[0]
        if not 0 <= mask_id < vocab:
            raise ValueError(f"{type(self).__name__}: mask_token_id {mask_id} is outside the embedding table "
                             f"({vocab} rows).")
        pad_id = getattr(self.processing_class, "pad_token_id", None)
        pad_id = getattr(getattr(self.processing_class, "tokenizer", None), "pad_token_id", pad_id)
        if pad_id is not None and mask_id == pad_id:
            raise ValueError(f"{type(self).__name__}: mask_token_id {mask_id} is the pad token; pick another id.")
        self.mask_token_id = int(mask_id)
        config = BlockDiffusionConfig(mask_token_id=self.mask_token_id, block_size=self.args.block_size,
                                      logit_shift=self.args.logit_shift,
                                      attention=OBJECTIVE_LAYOUT[self.args.objective][1])
        attach_block_diffusion(base, config)
        return config

    # -------------------------------------------------------------------------------------------------------------
    # Hooks
    # -------------------------------------------------------------------------------------------------------------
    def build_noisy_batch(self, inputs: dict) -> dict:
        """Noise a collated SFT batch (`input_ids`, `labels`, 2D `attention_mask`) and lay it out for the objective.

        Returns a dict: `input_ids` [B, S] (S = L for "mdlm", 2L otherwise), `attention_mask` bool [B, 1, S, S],
        `position_ids` [B, S], `targets` [B, S] (label of each hidden state, -100 = none), `noisy_weight` [B, S]
        (1 / p_mask on the denoising targets, 0 elsewhere; for "bd3" with the shift a masked block-first token is
        scored on the clean hidden before it, as the shifted block decoder reads it), `clean_target_mask` [B, S],
        `noisy_half` / `clean_half` (slices of S; `clean_half` None for "mdlm"), `masked` [B, L], `p_mask` [B],
        `clean_ids` / `labels` / `padding_mask` / `block_ids` [B, L], `normalizer` (target-token count of this
        micro-batch) and `model_kwargs` (extra forward kwargs).
        """
        if "input_ids" not in inputs or "labels" not in inputs:
            raise ValueError(f"{type(self).__name__}: batches need input_ids and labels (got {sorted(inputs)}).")
        ids, labels = inputs["input_ids"], inputs["labels"]
        padding_mask = inputs.get("attention_mask")
        if padding_mask is None:
            padding_mask = torch.ones_like(ids)
        if padding_mask.dim() != 2:
            raise ValueError(f"{type(self).__name__}: expected a 2D padding attention_mask, got "
                             f"{tuple(padding_mask.shape)}.")
        real = padding_mask.bool()
        if bool(((ids == self.mask_token_id) & real).any()):
            raise ValueError(f"{type(self).__name__}: the data contains the mask token id {self.mask_token_id}; a "
                             "mask id must never occur in clean text (choose an unused token).")
        labels = labels.masked_fill(~real, -100)
        args, length = self.args, ids.shape[1]
        x_t, masked, p_mask = noisy_inputs(ids, labels, self.mask_token_id, mask_rate=args.mask_rate, eps=args.eps,
                                           generator=self.noise_generator)
        noisy_t, clean_t = diffusion_targets(ids, labels, masked, args.logit_shift)
        pattern = OBJECTIVE_LAYOUT[args.objective][0]
        blocks = block_ids(labels, args.block_size, padding_mask, args.block_alignment)
        first_t = torch.full_like(noisy_t, -100)
        if pattern == "bd3" and args.logit_shift:
            noisy_t, first_t = split_block_first_targets(noisy_t, args.block_size, padding_mask, blocks)
        weight = (noisy_t != -100).float() / p_mask[:, None]
        first_weight = (first_t != -100).float() / p_mask[:, None]
        shifted = labels[:, 1:] if args.logit_shift else labels
        batch = {"masked": masked, "p_mask": p_mask, "block_ids": blocks, "clean_ids": ids, "labels": labels,
                 "padding_mask": padding_mask, "normalizer": (shifted != -100).sum(), "model_kwargs": {}}
        if pattern is None:  # MDLM: x_t alone, bidirectional
            batch.update(input_ids=x_t, attention_mask=single_sequence_mask(length, "bidirectional", padding_mask),
                         position_ids=sequence_positions(length, padding_mask, ids.device), targets=noisy_t,
                         noisy_weight=weight, clean_target_mask=torch.zeros_like(real),
                         noisy_half=slice(0, length), clean_half=None)
            return batch
        # the clean half's targets are the AR labels; a masked block-first token (bd3) is one of them: same hidden,
        # same token, also counted in the denoising term with its 1 / p_mask weight
        if self.clean_first:
            halves = (ids, x_t), (clean_t, noisy_t), (first_weight, weight)
            noisy_half, clean_half = slice(length, 2 * length), slice(0, length)
        else:
            halves = (x_t, ids), (noisy_t, clean_t), (weight, first_weight)
            noisy_half, clean_half = slice(0, length), slice(length, 2 * length)
        targets = torch.cat(halves[1], dim=1)
        clean_target_mask = torch.zeros_like(targets, dtype=torch.bool)
        clean_target_mask[:, clean_half] = clean_t != -100
        batch.update(
            input_ids=torch.cat(halves[0], dim=1),
            attention_mask=training_mask_2l(length, args.block_size, pattern, padding_mask, self.clean_first, blocks),
            position_ids=two_half_position_ids(length, padding_mask, ids.device).expand(ids.shape[0], -1),
            targets=targets, noisy_weight=torch.cat(halves[2], dim=1), clean_target_mask=clean_target_mask,
            noisy_half=noisy_half, clean_half=clean_half,
        )
        return batch

    def forward_logits(self, model, batch: dict) -> torch.Tensor:
        """Logits [B, S, V] of the denoiser on the laid-out batch (one forward, no cache)."""
        from ..modeling.block_diffusion import model_attention_mask

        # Under DDP `model` is the DistributedDataParallel wrapper (no dtype / attention settings): unwrap it first.
        base = unwrapped_base_model(self.accelerator.unwrap_model(model))  # bool mask for SDPA/flex, additive for eager
        mask = model_attention_mask(base, batch["attention_mask"], base.dtype)
        outputs = model(input_ids=batch["input_ids"], attention_mask=mask, position_ids=batch["position_ids"],
                        use_cache=False, **batch["model_kwargs"])
        return outputs.logits

    def combine_losses(self, noisy_ce: torch.Tensor, clean_ce: torch.Tensor | None) -> torch.Tensor:
        """The total loss from the normalized noisy (denoising) and clean (AR) cross-entropies."""
        if clean_ce is None or self.args.clean_loss_weight == 0:
            return noisy_ce
        return noisy_ce + self.args.clean_loss_weight * clean_ce

    def diffusion_loss(self, model, batch: dict) -> tuple[torch.Tensor, dict]:
        """(loss, stats): `noisy_ce = sum_noisy w * CE / N`, `clean_ce = sum_clean CE / N` (N = `batch["normalizer"]`,
        replaced by the Trainer's `num_items_in_batch` when given), loss = `combine_losses(noisy_ce, clean_ce)`.
        `stats` holds detached sums/counts for the logged metrics and `logits`."""
        logits = self.forward_logits(model, batch)
        targets = batch["targets"]
        normalizer = torch.as_tensor(batch["normalizer"], device=logits.device).clamp(min=1)
        noisy_sel = batch["noisy_weight"] > 0
        noisy_logits = logits[noisy_sel].float()
        noisy_tokens = F.cross_entropy(noisy_logits, targets[noisy_sel], reduction="none")
        noisy_ce = (noisy_tokens * batch["noisy_weight"][noisy_sel]).sum() / normalizer
        clean_ce = clean_sum = None
        if batch["clean_half"] is not None and self.args.logit_shift:
            clean_sel = batch["clean_target_mask"]
            clean_sum = F.cross_entropy(logits[clean_sel].float(), targets[clean_sel], reduction="sum")
            clean_ce = clean_sum / normalizer
        loss = self.combine_losses(noisy_ce, clean_ce)
        with torch.no_grad():
            logp = F.log_softmax(noisy_logits.detach(), dim=-1)
            stats = {
                "noisy_ce_sum": noisy_tokens.detach().sum(), "noisy_count": noisy_sel.sum(),
                "entropy_sum": -(logp.exp() * logp).sum(-1).sum(),
                "correct": (noisy_logits.argmax(-1) == targets[noisy_sel]).sum(),
                "masked": batch["masked"].sum(), "maskable": (batch["labels"] != -100).sum(),
                "clean_ce_sum": None if clean_sum is None else clean_sum.detach(), "logits": logits,
            }
        return loss, stats

    # -------------------------------------------------------------------------------------------------------------
    # Trainer plumbing
    # -------------------------------------------------------------------------------------------------------------
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if self.model.training else "eval"
        batch = self.build_noisy_batch(inputs)
        local_normalizer = batch["normalizer"]
        if num_items_in_batch is not None:
            batch["normalizer"] = num_items_in_batch
        loss, stats = self.diffusion_loss(model, batch)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes  # DDP averages gradients; num_items counts every rank
        self._log_diffusion_metrics(mode, stats, local_normalizer, batch["padding_mask"])
        if return_outputs:
            return loss, CausalLMOutput(loss=loss.detach(), logits=stats["logits"])
        return loss

    def _log_diffusion_metrics(self, mode: str, stats: dict, local_normalizer, padding_mask) -> None:
        gather = self.accelerator.gather_for_metrics

        def total(value) -> float:
            return float(gather(torch.as_tensor(value, device=self.args.device).reshape(1).float()).sum())

        metrics = trl_metric_buffer(self, mode)
        count = total(stats["noisy_count"])
        if count > 0:
            metrics["noisy_ce"].append(total(stats["noisy_ce_sum"]) / count)
            metrics["entropy"].append(total(stats["entropy_sum"]) / count)
            metrics["mean_token_accuracy"].append(total(stats["correct"]) / count)
        maskable = total(stats["maskable"])
        if maskable > 0:
            metrics["mask_ratio"].append(total(stats["masked"]) / maskable)
        if stats.get("clean_ce_sum") is not None:
            n = total(local_normalizer)
            if n > 0:
                metrics["clean_ce"].append(total(stats["clean_ce_sum"]) / n)
        if mode == "train":
            self.total_train_tokens += int(total(padding_mask.sum()))
        metrics["num_tokens"] = [self.total_train_tokens]

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save and unwrapped_base_model(self.model) is not self.model:
            # An adapter folder has no config.json: keep the decoding layout beside the adapter.
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, BLOCK_DIFFUSION_CONFIG_FILE), "w") as fh:
                json.dump(self.block_diffusion_config.to_dict(), fh, indent=1)
