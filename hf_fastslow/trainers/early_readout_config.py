"""Configuration of early-readout distillation (Tiwari et al., "Using Early Readouts to Mediate Featural Bias in
Distillation", arXiv 2310.18590): the shared readout knobs and the classification form on `TrainingArguments`; the
causal-LM form on trl's `GKDConfig` is in `early_readout_gkd_config.py`."""

from __future__ import annotations

from dataclasses import dataclass, field

from transformers import TrainingArguments

WEIGHT_FNS = ("exp", "linear", "none")
WEIGHT_TARGETS = ("kd", "ce", "both")


@dataclass
class EarlyReadoutOptions:
    r"""The early-readout knobs shared by both forms.

    Parameters:
        readout_layer (`int`, defaults to `1`): hidden state the readout reads (1 .. L-1).
        readout_lr (`float` or `None`): learning rate of the readout head (defaults to `learning_rate`).
        readout_beta (`float`, defaults to `1.0`): strength of the up-weighting of confidently wrong examples.
        weight_fn (`str`, defaults to `"exp"`): `exp(beta*m)`, `1 + beta*m` or `"none"` (plain KD) for a wrong
            readout with confidence margin m; right readouts weigh 1.
        normalize_weights (`bool`, defaults to `True`): rescale each batch's weights to mean 1 (per micro-batch).
        readout_warmup_epochs (`float`, defaults to `1.0`): weights stay 1 until the readout has trained this long.
        detach_readout (`bool`, defaults to `True`): the readout loss trains the head only, never the backbone.
    """

    readout_layer: int = field(default=1, metadata={"help": "Early hidden state the readout reads (1 .. L-1)."})
    readout_lr: float | None = field(default=None, metadata={"help": "Readout head learning rate."})
    readout_beta: float = field(default=1.0, metadata={"help": "Up-weighting strength for confident-wrong readouts."})
    weight_fn: str = field(default="exp", metadata={"help": "exp | linear | none"})
    normalize_weights: bool = field(default=True, metadata={"help": "Rescale weights to mean 1 per batch."})
    readout_warmup_epochs: float = field(default=1.0, metadata={"help": "Epochs before weighting starts."})
    detach_readout: bool = field(default=True, metadata={"help": "Readout gradients never reach the backbone."})

    def check_readout_options(self) -> None:
        name = type(self).__name__
        if self.weight_fn not in WEIGHT_FNS:
            raise ValueError(f"{name}: weight_fn must be one of {WEIGHT_FNS}, got {self.weight_fn!r}.")
        if not self.readout_beta >= 0:
            raise ValueError(f"{name}: readout_beta must be >= 0, got {self.readout_beta}.")
        if not self.readout_warmup_epochs >= 0:
            raise ValueError(f"{name}: readout_warmup_epochs must be >= 0, got {self.readout_warmup_epochs}.")
        if self.readout_lr is not None and not self.readout_lr > 0:
            raise ValueError(f"{name}: readout_lr must be > 0, got {self.readout_lr}.")


@dataclass
class EarlyReadoutDistillationConfig(EarlyReadoutOptions, TrainingArguments):
    r"""`TrainingArguments` for distilling a sequence classifier with early-readout re-weighting.

    Per example: `l = alpha * CE(s, y) + (1 - alpha) * tau^2 * KL(softmax(t / tau) || softmax(s / tau))`, with the
    readout weight multiplying the term named by `weight_target` ("kd", "ce" or "both"); the loss is the batch mean
    plus the readout's own CE. Teacher logits come from a dataset column (`teacher_logits_column`) or a live
    `teacher_model`.

    Parameters:
        alpha (`float`, defaults to `0.5`): weight of the label CE against the KD term.
        kd_temperature (`float`, defaults to `2.0`): tau.
        weight_target (`str`, defaults to `"kd"`): which term the readout weight multiplies.
        readout_depth, readout_width (`int`): the readout MLP (2 layers of 256 by default).
        teacher_logits_column (`str`): dataset column with cached teacher logits.
    """

    alpha: float = field(default=0.5, metadata={"help": "Label CE weight (1 - alpha goes to KD)."})
    kd_temperature: float = field(default=2.0, metadata={"help": "KD softmax temperature."})
    weight_target: str = field(default="kd", metadata={"help": "kd | ce | both"})
    readout_depth: int = field(default=2, metadata={"help": "Readout MLP depth."})
    readout_width: int = field(default=256, metadata={"help": "Readout MLP width."})
    teacher_logits_column: str = field(default="teacher_logits", metadata={"help": "Cached teacher logits column."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Keep the teacher logits column."})

    def __post_init__(self):
        self.check_readout_options()
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"EarlyReadoutDistillationConfig: alpha must be in [0, 1], got {self.alpha}.")
        if not self.kd_temperature > 0:
            raise ValueError(f"EarlyReadoutDistillationConfig: kd_temperature must be > 0, got {self.kd_temperature}.")
        if self.weight_target not in WEIGHT_TARGETS:
            raise ValueError(f"EarlyReadoutDistillationConfig: weight_target must be one of {WEIGHT_TARGETS}, "
                             f"got {self.weight_target!r}.")
        if self.readout_depth < 1 or self.readout_width < 1:
            raise ValueError("EarlyReadoutDistillationConfig: readout_depth and readout_width must be >= 1.")
        super().__post_init__()

