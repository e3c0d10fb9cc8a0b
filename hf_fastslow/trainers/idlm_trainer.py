"""I-DLM trainer: introspective-consistency training on `[x_t | x_0]` (arXiv 2604.11035), and R-ISD training on
`[x_0 | x_t]` with a peft activated LoRA that acts on the noisy half only (base weights frozen)."""

from __future__ import annotations

import copy
import os

import torch

from ..integrations import trl_metric_buffer
from ..integrations.dlm_trainer_seam import release_alora_checkpoint_hooks
from .block_diffusion_trainer import BlockDiffusionTrainer
from .idlm_config import IDLMConfig


def _mask_id_for_gating(model, args: IDLMConfig) -> int:
    if args.mask_token_id is not None:
        return args.mask_token_id
    from ..modeling.block_diffusion import block_diffusion_config

    source = model
    if isinstance(model, (str, os.PathLike)):
        from transformers import AutoConfig

        source = AutoConfig.from_pretrained(model)
    attached = block_diffusion_config(source)  # a model or a config
    if attached is None:
        raise ValueError("IDLMTrainer(lora_gated=True): no mask token: pass mask_token_id in IDLMConfig or attach a "
                         "BlockDiffusionConfig to the model first.")
    return attached.mask_token_id


def activated_lora_config(peft_config, args: IDLMConfig, mask_token_id: int):
    """The aLoRA config R-ISD trains: `peft_config` (a `LoraConfig`, copied) or a default one built from `args`, with
    `alora_invocation_tokens=[mask_token_id]` (only consulted when no `alora_offsets` are passed: the trainer and ISD
    pass them explicitly)."""
    from peft import LoraConfig

    if peft_config is None:
        return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, target_modules=args.lora_target_modules,
                          lora_dropout=0.0, task_type="CAUSAL_LM", alora_invocation_tokens=[mask_token_id])
    if not isinstance(peft_config, LoraConfig):
        raise TypeError(f"IDLMTrainer(lora_gated=True): peft_config must be a peft LoraConfig (activated LoRA), got "
                        f"{type(peft_config).__name__}.")
    if peft_config.use_dora:
        raise ValueError("IDLMTrainer(lora_gated=True): activated LoRA does not support DoRA (use_dora=False).")
    config = copy.deepcopy(peft_config)
    config.alora_invocation_tokens = [mask_token_id]
    config.task_type = config.task_type or "CAUSAL_LM"
    return config


class IDLMTrainer(BlockDiffusionTrainer):
    """`BlockDiffusionTrainer` with I-DLM's loss `CE_noisy + alpha * CE_clean` (see `IDLMConfig`).

    With `lora_gated=True` (R-ISD) the model is wrapped in an activated LoRA (from `peft_config` or the config's
    defaults) whose adapter runs on the noisy half `[x_0 | x_t][L:]` only; pass a plain (non-peft) model. The saved
    folder is a peft adapter folder plus `block_diffusion_config.json`; at decode time pass `alora_offsets=[N - 1]`
    so that only the mask slots run the adapter.

    Extra logged metric: `ce_alpha` (the alpha used, i.e. the auto-balanced value when `auto_balance`).
    """

    config_class = IDLMConfig

    def __init__(self, model, args: IDLMConfig | None = None, peft_config=None, **kwargs):
        if args is None:
            args = IDLMConfig(output_dir="idlm")
        if isinstance(args, IDLMConfig) and args.lora_gated:
            if hasattr(model, "peft_config"):
                raise ValueError("IDLMTrainer(lora_gated=True): pass the base model (not a PeftModel); the trainer "
                                 "adds the activated LoRA itself (give your LoraConfig as peft_config).")
            peft_config = activated_lora_config(peft_config, args, _mask_id_for_gating(model, args))
        super().__init__(model, args=args, peft_config=peft_config, **kwargs)

    @property
    def clean_first(self) -> bool:
        return self.args.lora_gated

    def build_noisy_batch(self, inputs: dict) -> dict:
        batch = super().build_noisy_batch(inputs)
        if self.args.lora_gated:
            # aLoRA adapts the last `offset` positions of each row: exactly the noisy half of [x_0 | x_t].
            length = batch["clean_ids"].shape[1]
            batch["model_kwargs"]["alora_offsets"] = [length] * batch["clean_ids"].shape[0]
        return batch

    def forward_logits(self, model, batch: dict) -> torch.Tensor:
        logits = super().forward_logits(model, batch)
        if self.args.lora_gated and not torch.is_grad_enabled():
            # no backward will follow (evaluation): drop the aLoRA hooks peft keeps for it under gradient checkpointing
            release_alora_checkpoint_hooks(model)
        return logits

    def combine_losses(self, noisy_ce: torch.Tensor, clean_ce: torch.Tensor | None) -> torch.Tensor:
        if clean_ce is None:
            return noisy_ce
        if self.args.auto_balance:
            # stopgrad: the factor rescales the clean term without pulling CE_noisy through it
            alpha = (noisy_ce / clean_ce.clamp(min=torch.finfo(clean_ce.dtype).tiny)).detach()
        else:
            alpha = torch.tensor(self.args.ce_alpha, device=noisy_ce.device)
        trl_metric_buffer(self, "train" if self.model.training else "eval")["ce_alpha"].append(float(alpha))
        return noisy_ce + alpha * clean_ce
