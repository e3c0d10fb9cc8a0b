"""Early-readout distillation (Tiwari et al., arXiv 2310.18590) for sequence classifiers, on `transformers.Trainer`.

A small head reads the student's pooled hidden state at an early layer. Examples that this early readout gets wrong
with high confidence are the ones the student is likely solving through an easy, spurious feature; their
distillation loss is up-weighted per instance (weights computed without gradient). The readout trains on its own
CE; with `detach_readout` (default) its gradient never reaches the backbone, so with `weight_fn="none"` (or
`readout_beta=0`) the student's loss and gradients are exactly plain Hinton KD.

    args = EarlyReadoutDistillationConfig(output_dir="out", readout_layer=1, use_cpu=True)
    trainer = EarlyReadoutDistillationTrainer(student, args=args, train_dataset=ds)  # ds has "teacher_logits"
    trainer.train(); print(trainer.flag_stats())
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from transformers import Trainer

from ..modeling.readout import EarlyReadoutHead, check_readout_layer, confidence_margin, pool_last_token
from .early_readout_config import EarlyReadoutDistillationConfig

__all__ = ["EarlyReadoutDistillationTrainer", "hinton_kd_terms", "readout_weights"]

_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
READOUT_WEIGHTS_NAME = "early_readout_head.pt"


def readout_weights(readout_logits: torch.Tensor, targets: torch.Tensor, weight_fn: str, beta: float,
                    normalize: bool, valid: torch.Tensor | None = None) -> torch.Tensor:
    """Per-example (or per-token) weights, no gradient: 1 where the readout is right, `exp(beta*m)` (or
    `1 + beta*m`) where it is wrong with confidence margin m; rescaled to mean 1 over the valid entries."""
    with torch.no_grad():
        logits = readout_logits.detach()
        if valid is None:
            valid = torch.ones(targets.shape, dtype=torch.bool, device=targets.device)
        weights = torch.ones(targets.shape, dtype=torch.float32, device=targets.device)
        if weight_fn != "none" and beta != 0:
            wrong = (logits.argmax(-1) != targets) & valid
            margin = confidence_margin(logits)
            boost = torch.exp(beta * margin) if weight_fn == "exp" else 1 + beta * margin
            weights = torch.where(wrong, boost, weights)
        weights = weights * valid
        if normalize and bool(valid.any()):
            weights = weights * valid.sum() / weights.sum()
        return weights


def hinton_kd_terms(student_logits: torch.Tensor, teacher_logits: torch.Tensor, labels: torch.Tensor,
                    temperature: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-example CE(s, y) and tau^2 * KL(softmax(t / tau) || softmax(s / tau)), both in fp32."""
    s, t = student_logits.float(), teacher_logits.float()
    ce = F.cross_entropy(s, labels, reduction="none")
    log_p_s = F.log_softmax(s / temperature, dim=-1)
    log_p_t = F.log_softmax(t / temperature, dim=-1)
    kd = temperature**2 * (log_p_t.exp() * (log_p_t - log_p_s)).sum(-1)
    return ce, kd


class EarlyReadoutDistillationTrainer(Trainer):
    """`transformers.Trainer` for a sequence-classification student distilled with early-readout re-weighting.

    Args:
        model: the student (`*ForSequenceClassification` with decoder layers).
        teacher_model: a live teacher (frozen, eval); optional when the dataset has cached teacher logits.
        args: `EarlyReadoutDistillationConfig`.
        readout_head: a custom readout module (pooled hidden -> logits); an `EarlyReadoutHead` by default.
    Other arguments are `Trainer`'s.
    """

    def __init__(self, model, teacher_model=None, args: EarlyReadoutDistillationConfig | None = None,
                 train_dataset=None, eval_dataset=None, processing_class=None, readout_head=None, **kwargs):
        if args is None:
            args = EarlyReadoutDistillationConfig(output_dir="early-readout-out")
        if not isinstance(args, EarlyReadoutDistillationConfig):
            raise TypeError(f"args must be an EarlyReadoutDistillationConfig, got {type(args).__name__}.")
        check_readout_layer(model, args.readout_layer)
        num_labels = model.config.num_labels
        if teacher_model is not None:
            if teacher_model.config.num_labels != num_labels:
                raise ValueError(f"teacher has {teacher_model.config.num_labels} labels, the student {num_labels}.")
        elif train_dataset is not None:
            columns = getattr(train_dataset, "column_names", None) or []
            if args.teacher_logits_column not in columns:
                raise ValueError(f"no teacher: pass `teacher_model` or a `{args.teacher_logits_column}` dataset "
                                 f"column with cached teacher logits (columns: {columns}).")
            width = len(train_dataset[0][args.teacher_logits_column])
            if width != num_labels:
                raise ValueError(f"cached teacher logits have {width} classes, the student {num_labels}.")
        self.readout = readout_head or EarlyReadoutHead(model.config.hidden_size, num_labels, args.readout_depth,
                                                        args.readout_width)
        self.teacher_model = teacher_model
        self._stats = {"seen": 0, "flagged": 0, "readout_right": 0, "weighted_steps": 0}
        super().__init__(model=model, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
                         processing_class=processing_class, **kwargs)
        self.readout.to(self.args.device)
        if self.teacher_model is not None:
            self.teacher_model.to(self.args.device).eval().requires_grad_(False)

    # -- optimizer: the readout head trains with its own learning rate -----------------------------------------------
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if not any(p is q for group in optimizer.param_groups for p in group["params"]
                   for q in self.readout.parameters()):
            optimizer.add_param_group({"params": list(self.readout.parameters()), "weight_decay": 0.0,
                                       "lr": self.args.readout_lr or self.args.learning_rate})
        return optimizer

    # -- hooks ------------------------------------------------------------------------------------------------------
    def weighting_active(self) -> bool:
        """Weights stay 1 while the readout warms up (its flags mean nothing before it has learned)."""
        epoch = self.state.epoch or 0.0
        return epoch >= self.args.readout_warmup_epochs

    def teacher_logits(self, inputs: dict, model_inputs: dict) -> torch.Tensor:
        cached = inputs.get(self.args.teacher_logits_column)
        if cached is not None:
            return torch.as_tensor(cached, device=self.args.device).float()
        if self.teacher_model is None:
            raise ValueError(f"batch has no `{self.args.teacher_logits_column}` and no teacher_model was given.")
        with torch.no_grad():
            return self.teacher_model(**model_inputs).logits.float()

    def readout_forward(self, hidden_states, attention_mask) -> torch.Tensor:
        pooled = pool_last_token(hidden_states[self.args.readout_layer], attention_mask)
        return self.readout(pooled.detach() if self.args.detach_readout else pooled)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        labels = inputs["labels"]
        model_inputs = {k: inputs[k] for k in _MODEL_INPUTS if k in inputs}
        outputs = model(**model_inputs, output_hidden_states=True)
        teacher = self.teacher_logits(inputs, model_inputs)
        readout_logits = self.readout_forward(outputs.hidden_states, model_inputs.get("attention_mask"))
        readout_loss = F.cross_entropy(readout_logits.float(), labels)
        active = self.weighting_active()
        weights = readout_weights(readout_logits, labels, self.args.weight_fn if active else "none",
                                  self.args.readout_beta, self.args.normalize_weights)
        ce, kd = hinton_kd_terms(outputs.logits, teacher, labels, self.args.kd_temperature)
        a, target = self.args.alpha, self.args.weight_target
        if target == "kd":
            per_example = a * ce + (1 - a) * weights * kd
        elif target == "ce":
            per_example = a * weights * ce + (1 - a) * kd
        else:
            per_example = weights * (a * ce + (1 - a) * kd)
        loss = per_example.mean() + readout_loss
        if model.training:
            right = readout_logits.argmax(-1) == labels
            self._stats["seen"] += labels.numel()
            self._stats["readout_right"] += int(right.sum())
            self._stats["flagged"] += int((~right).sum()) if active else 0
            self._stats["weighted_steps"] += int(active)
        return (loss, outputs) if return_outputs else loss

    # -- reporting, saving ------------------------------------------------------------------------------------------
    def flag_stats(self) -> dict:
        """Training examples seen, readout accuracy, and the fraction flagged (wrong readout, after warm-up)."""
        seen = max(self._stats["seen"], 1)
        return {"seen": self._stats["seen"], "readout_accuracy": self._stats["readout_right"] / seen,
                "flagged_fraction": self._stats["flagged"] / seen, "weighted_steps": self._stats["weighted_steps"]}

    @torch.no_grad()
    def readout_flags(self, dataset) -> dict[str, torch.Tensor]:
        """Over `dataset` (eval mode): readout prediction, margin, wrong flag and weight per example, in order."""
        loader = self.get_eval_dataloader(dataset)
        model = self.model.eval()
        rows = {"prediction": [], "margin": [], "wrong": [], "weight": []}
        for batch in loader:
            batch = {k: v.to(self.args.device) if torch.is_tensor(v) else v for k, v in batch.items()}
            model_inputs = {k: batch[k] for k in _MODEL_INPUTS if k in batch}
            out = model(**model_inputs, output_hidden_states=True)
            logits = self.readout_forward(out.hidden_states, model_inputs.get("attention_mask"))
            rows["prediction"].append(logits.argmax(-1))
            rows["margin"].append(confidence_margin(logits))
            rows["wrong"].append(logits.argmax(-1) != batch["labels"])
            rows["weight"].append(readout_weights(logits, batch["labels"], self.args.weight_fn,
                                                  self.args.readout_beta, normalize=False))
        return {k: torch.cat(v).cpu() for k, v in rows.items()}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """The student as `Trainer` saves it, plus the readout head (`early_readout_head.pt`) beside it."""
        super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            torch.save(self.readout.state_dict(), os.path.join(output_dir, READOUT_WEIGHTS_NAME))
