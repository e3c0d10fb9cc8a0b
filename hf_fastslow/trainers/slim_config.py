"""Configuration of the sparsity-regularised mask search (ViT-Slim / network slimming) on `transformers.Trainer`."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class SlimSearchConfig(TrainingArguments):
    r"""`TrainingArguments` plus the mask search. The L1 weights and what is masked live in the masks' `SlimConfig`.

    Parameters:
        mask_lr (`float`, *optional*): learning rate of the mask parameters (the zetas); defaults to `learning_rate`
            (ViT-Slim trains weights and masks with one AdamW).
        train_weights (`bool`, defaults to `True`): also train the model's weights during the search (ViT-Slim); with
            `False` only the masks move (cheaper: a mask-only search for large models on a CPU).
    """

    mask_lr: float | None = field(default=None,
                                  metadata={"help": "Learning rate of the masks (default: learning_rate)."})
    train_weights: bool = field(default=True, metadata={"help": "Train the model's weights with the masks."})

    def __post_init__(self):
        if self.mask_lr is not None and not self.mask_lr > 0:
            raise ValueError(f"SlimSearchConfig: mask_lr must be > 0, got {self.mask_lr}.")
        super().__post_init__()
