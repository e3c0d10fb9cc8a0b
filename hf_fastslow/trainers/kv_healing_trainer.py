"""KV healing trainer: `SFTTrainer` whose loss is CE on the data plus KL to the frozen original model (CARE healing,
arXiv 2603.17946: the converted model is distilled back towards the model it was converted from)."""

from __future__ import annotations

import os

import torch
from torch.nn import functional as F
from trl import SFTTrainer

from ..integrations import trl_metric_buffer
from .config_checks import trainer_owned_copy
from .kv_healing_config import KVHealingConfig


def _load_model(model):
    """A CARE checkpoint path loads through `from_pretrained_care`; anything else is returned as given."""
    if isinstance(model, (str, os.PathLike)) and os.path.exists(os.path.join(model, "config.json")):
        import json

        with open(os.path.join(model, "config.json")) as fh:
            if "care" in json.load(fh):
                from ..modeling.care import from_pretrained_care

                return from_pretrained_care(model)
    return model


class KVHealingTrainer(SFTTrainer):
    """`SFTTrainer` with loss `CE + kl_weight * tau^2 * KL(teacher || student)` (see `KVHealingConfig`).

    Args:
        model: the converted model to train (a model, a Hub id / path, or a CARE checkpoint directory).
        teacher_model: the frozen original model (a model or a path); it is put in eval mode, its parameters stop
            requiring gradients and it is moved to the training device. Its vocabulary must match the student's.
        args: a `KVHealingConfig` (copied: the trainer never changes the caller's object).
        Every other `SFTTrainer` argument passes through (datasets, processing_class, peft_config, callbacks, ...).
    """

    def __init__(self, model, teacher_model, args: KVHealingConfig | None = None, **kwargs):
        if args is None:
            args = KVHealingConfig(output_dir="kv_healing")
        if not isinstance(args, KVHealingConfig):
            raise TypeError(f"KVHealingTrainer: args must be a KVHealingConfig, got {type(args).__name__}.")
        if teacher_model is None:
            raise ValueError("KVHealingTrainer: teacher_model (the frozen original model) is required.")
        if isinstance(teacher_model, (str, os.PathLike)):
            from transformers import AutoModelForCausalLM

            teacher_model = AutoModelForCausalLM.from_pretrained(teacher_model)
        args = trainer_owned_copy(args)
        super().__init__(model=_load_model(model), args=args, **kwargs)
        student_vocab = self.model.get_output_embeddings().weight.shape[0]
        teacher_vocab = teacher_model.get_output_embeddings().weight.shape[0]
        if student_vocab != teacher_vocab:
            raise ValueError(f"KVHealingTrainer: teacher vocabulary ({teacher_vocab}) differs from the student's "
                             f"({student_vocab}); the KL term needs the same vocabulary.")
        teacher_model.requires_grad_(False)
        self.teacher_model = teacher_model.eval().to(self.args.device)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        mode = "train" if model.training else "eval"
        labels = inputs["labels"]
        model_inputs = {k: v for k, v in inputs.items() if k != "labels"}
        model_inputs["use_cache"] = False
        outputs = model(**model_inputs)
        targets = labels[:, 1:]
        mask = targets != -100
        n_tokens = mask.sum() if num_items_in_batch is None else num_items_in_batch
        n_tokens = torch.as_tensor(n_tokens, device=labels.device).clamp(min=1)
        student = outputs.logits[:, :-1].float()[mask]
        ce = F.cross_entropy(student, targets[mask], reduction="sum") / n_tokens
        loss = ce
        kl = torch.zeros((), device=ce.device)
        if self.args.kl_weight > 0:
            with torch.no_grad():
                teacher = self.teacher_model(**model_inputs).logits[:, :-1].float()[mask]
            tau = self.args.kl_temperature
            kl = F.kl_div(F.log_softmax(student / tau, -1), F.log_softmax(teacher / tau, -1), log_target=True,
                          reduction="sum") / n_tokens
            loss = ce + self.args.kl_weight * tau**2 * kl
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * self.accelerator.num_processes
        metrics = trl_metric_buffer(self, mode)
        metrics["ce"].append(self.accelerator.gather_for_metrics(ce.detach()).mean().item())
        metrics["kl"].append(self.accelerator.gather_for_metrics(kl.detach()).mean().item())
        return (loss, outputs) if return_outputs else loss
