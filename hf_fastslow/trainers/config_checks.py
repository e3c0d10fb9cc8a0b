"""Checks shared by the GRPO-based configs (FSTConfig, PairRLConfig), run before GRPOConfig's own validation, whose
messages for these cases are generic or come only at the first training step; and the trainers' private config copy."""

from __future__ import annotations

import copy
import dataclasses

import torch


def trainer_owned_copy(config):
    """A copy of `config` that a trainer may change without touching the caller's object.

    PairRLTrainer appends its verification weight to `reward_weights`, and GRPOTrainer adjusts some options in place
    (`dataloader_num_workers` for iterable datasets, `gradient_checkpointing_kwargs` under PEFT + ZeRO-3); a caller
    reusing the config for a second trainer or a comparison run must get back what it passed. Option values are deep
    copies; runtime state that is not an option (the cached distributed state) stays shared, as it is process-wide.
    """
    copied = copy.copy(config)
    for f in dataclasses.fields(config):
        setattr(copied, f.name, copy.deepcopy(getattr(config, f.name)))
    return copied


def check_generations_and_precision(config, name: str, paper_generations: int) -> None:
    """`num_generations >= 2`, and bf16 only where a bf16-capable GPU exists (None resolves to that default)."""
    if config.num_generations is not None and config.num_generations < 2:
        raise ValueError(
            f"{name}: num_generations={config.num_generations}; group-relative advantages need at least 2 rollouts "
            f"per problem (the paper uses {paper_generations})."
        )
    on_cpu = config.use_cpu or not (torch.cuda.is_available() and torch.cuda.is_bf16_supported())
    if config.bf16 is None:
        config.bf16 = not config.fp16 and not on_cpu
    elif config.bf16 and on_cpu and not config.use_cpu:
        raise ValueError(
            f"{name}: bf16=True but no bf16-capable GPU is available. Pass bf16=False to train in fp32 on CPU "
            "(or use_cpu=True to force CPU bf16 autocast)."
        )
