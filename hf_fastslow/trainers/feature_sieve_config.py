"""Configuration of the Feature Sieve (SiFeR; Tiwari & Shenoy, "Overcoming Simplicity Bias in Deep Networks using a
Feature Sieve", arXiv 2301.13293)."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments


@dataclass
class FeatureSieveConfig(TrainingArguments):
    r"""`TrainingArguments` plus the sieve: an auxiliary head on hidden state `aux_layer` learns what is decodable
    there (aux step, every optimizer step), and every `forget_every` steps the layers below it are pushed to make
    the head's output uniform (forget step). Three optimizers: the main one (Trainer's), the aux head's and the
    forget one over the lower layers (SGD, as in the official code).

    Parameters:
        aux_layer (`int`, defaults to `1`): hidden state the aux head reads (1 .. L-1).
        aux_depth, aux_width (`int`): the aux head MLP (2 layers of 256).
        aux_lr, aux_weight_decay, aux_momentum (`float`): SGD of the aux head (1e-2, 1e-4, 0.9).
        forget_lr (`float`, defaults to `1e-2`): SGD (no momentum) of the lower layers in forget steps.
        forget_every (`int`, defaults to `5`): a forget step every this many optimizer steps; 0 disables forgetting
            (the main model then trains exactly as with plain `Trainer`).
        forget_steps (`int`, defaults to `1`): forget updates per forget step.
        include_embeddings_in_forget (`bool`, defaults to `False`): also move the input embeddings when forgetting
            (off: in tied models they are the LM head too).
    """

    aux_layer: int = field(default=1, metadata={"help": "Hidden state the aux head reads (1 .. L-1)."})
    aux_depth: int = field(default=2, metadata={"help": "Aux head MLP depth."})
    aux_width: int = field(default=256, metadata={"help": "Aux head MLP width."})
    aux_lr: float = field(default=1e-2, metadata={"help": "Aux head SGD learning rate."})
    aux_weight_decay: float = field(default=1e-4, metadata={"help": "Aux head weight decay."})
    aux_momentum: float = field(default=0.9, metadata={"help": "Aux head SGD momentum."})
    forget_lr: float = field(default=1e-2, metadata={"help": "Lower-layer SGD learning rate in forget steps."})
    forget_every: int = field(default=5, metadata={"help": "Forget step period in optimizer steps (0 = never)."})
    forget_steps: int = field(default=1, metadata={"help": "Forget updates per forget step."})
    include_embeddings_in_forget: bool = field(default=False, metadata={"help": "Forget through the embeddings."})

    def __post_init__(self):
        if self.forget_every < 0:
            raise ValueError(f"FeatureSieveConfig: forget_every must be >= 0, got {self.forget_every}.")
        if self.forget_steps < 1:
            raise ValueError(f"FeatureSieveConfig: forget_steps must be >= 1, got {self.forget_steps}.")
        if self.aux_depth < 1 or self.aux_width < 1:
            raise ValueError("FeatureSieveConfig: aux_depth and aux_width must be >= 1.")
        for name in ("aux_lr", "forget_lr"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"FeatureSieveConfig: {name} must be >= 0, got {getattr(self, name)}.")
        super().__post_init__()
