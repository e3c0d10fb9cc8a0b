"""Early-readout distillation (arXiv 2310.18590) for causal-LM students, on trl's (experimental) `GKDTrainer`.

Per token, a tuned-logit-lens readout of an early hidden state predicts the next token; tokens it gets wrong with
a high confidence margin get more weight on GKD's generalized JSD (weights without gradient, mean 1 over the
completion tokens of the micro-batch). Prompt and padding tokens (labels -100) never count toward the flags, the
weights or the loss. With `weight_fn="none"` the distillation loss is GKD's own; on-policy sampling (`lmbda`) is
GKD's `training_step`, unchanged.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from trl.experimental.gkd import GKDTrainer

from ..modeling.readout import TokenReadoutHead, check_readout_layer
from .early_readout_gkd_config import EarlyReadoutGKDConfig
from .early_readout_trainer import READOUT_WEIGHTS_NAME, readout_weights

__all__ = ["EarlyReadoutGKDTrainer"]


class EarlyReadoutGKDTrainer(GKDTrainer):
    """`GKDTrainer` with per-token early-readout weights (see the module docstring). Arguments are GKDTrainer's;
    `args` must be an `EarlyReadoutGKDConfig`."""

    def __init__(self, model=None, teacher_model=None, args: EarlyReadoutGKDConfig | None = None, **kwargs):
        if not isinstance(args, EarlyReadoutGKDConfig):
            raise TypeError(f"args must be an EarlyReadoutGKDConfig, got {type(args).__name__}.")
        if isinstance(model, torch.nn.Module):
            check_readout_layer(model, args.readout_layer)
        super().__init__(model=model, teacher_model=teacher_model, args=args, **kwargs)
        student = self.accelerator.unwrap_model(self.model)
        check_readout_layer(student, args.readout_layer)
        self.readout = TokenReadoutHead(student).to(self.args.device)
        self._stats = {"tokens": 0, "flagged": 0, "readout_right": 0}

    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        mine = list(self.readout.parameters())
        if not any(p is q for group in optimizer.param_groups for p in group["params"] for q in mine):
            optimizer.add_param_group({"params": mine, "weight_decay": 0.0,
                                       "lr": self.args.readout_lr or self.args.learning_rate})
        return optimizer

    def weighting_active(self) -> bool:
        return (self.state.epoch or 0.0) >= self.args.readout_warmup_epochs

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        student_outputs = model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                                output_hidden_states=True)
        self.teacher_model.eval()
        with torch.no_grad():
            teacher_outputs = self.teacher_model(input_ids=inputs["input_ids"],
                                                 attention_mask=inputs["attention_mask"])
        # Position i predicts token i + 1 (the causal shift GKD uses); labels -100 mark prompt and padding.
        student_logits = student_outputs.logits[:, :-1, :]
        teacher_logits = teacher_outputs.logits[:, :-1, :]
        labels = inputs["labels"][:, 1:]
        valid = labels != -100
        targets = labels.masked_fill(~valid, 0)
        per_token = self.generalized_jsd_loss(student_logits, teacher_logits, labels=None, beta=self.beta,
                                              reduction="none").sum(-1)
        hidden = student_outputs.hidden_states[self.args.readout_layer][:, :-1]
        readout_logits = self.readout(hidden.detach() if self.args.detach_readout else hidden)
        readout_loss = F.cross_entropy(readout_logits[valid].float(), targets[valid]) if bool(valid.any()) \
            else readout_logits.sum() * 0
        active = self.weighting_active()
        weights = readout_weights(readout_logits, targets, self.args.weight_fn if active else "none",
                                  self.args.readout_beta, self.args.normalize_weights, valid=valid)
        total = (per_token * weights)[valid].sum()
        if num_items_in_batch is not None:
            loss = total / torch.as_tensor(num_items_in_batch, device=total.device)
        else:
            loss = total / valid.sum().clamp_min(1)
        loss = loss + readout_loss
        if model.training:
            right = (readout_logits.argmax(-1) == targets) & valid
            self._stats["tokens"] += int(valid.sum())
            self._stats["readout_right"] += int(right.sum())
            self._stats["flagged"] += int((valid & ~right).sum()) if active else 0
        return (loss, student_outputs) if return_outputs else loss

    def flag_stats(self) -> dict:
        """Completion tokens seen, readout top-1 accuracy on them, fraction flagged after warm-up."""
        tokens = max(self._stats["tokens"], 1)
        return {"tokens": self._stats["tokens"], "readout_accuracy": self._stats["readout_right"] / tokens,
                "flagged_fraction": self._stats["flagged"] / tokens}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            torch.save(self.readout.state_dict(), os.path.join(output_dir, READOUT_WEIGHTS_NAME))
