"""Feature Sieve (SiFeR, Tiwari & Shenoy, arXiv 2301.13293) on `transformers.Trainer`, for sequence classifiers.

Per optimizer step, before Trainer's own (main) step:
  1. aux step: the aux head learns to predict the label from hidden state `aux_layer` (backbone untouched);
  2. forget step (every `forget_every` steps): the layers below `aux_layer` take SGD steps on
     CE(aux(z), uniform) = KL(U || p_aux) + log K, making what the current aux head reads undecodable there;
     the aux head itself is not moved;
  3. the main step, on gradients that hold nothing from steps 1-2 (they are zeroed first).
With gradient accumulation, steps 1-2 run once per optimizer step, on its first micro-batch.

    args = FeatureSieveConfig(output_dir="out", aux_layer=1, forget_every=5, use_cpu=True)
    trainer = FeatureSieveTrainer(model, args=args, train_dataset=ds)
    trainer.train(); print(trainer.sieve_stats())
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from transformers import Trainer
from transformers.trainer_utils import get_last_checkpoint

from ..modeling.readout import EarlyReadoutHead, check_readout_layer, lower_layer_parameters, pool_last_token
from .feature_sieve_config import FeatureSieveConfig

__all__ = ["FeatureSieveTrainer", "forget_loss"]

_MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids", "token_type_ids")
SIEVE_STATE_NAME = "feature_sieve.pt"


def forget_loss(aux_logits: torch.Tensor) -> torch.Tensor:
    """CE of the aux head's prediction against the uniform distribution: -(1/K) sum_k log p_k, mean over the batch.
    Equals KL(U || p) + log K, so its minimum, log K, is reached exactly at a uniform prediction."""
    return -F.log_softmax(aux_logits.float(), dim=-1).mean(-1).mean()


class FeatureSieveTrainer(Trainer):
    """`transformers.Trainer` with the Feature Sieve's aux and forget steps (see the module docstring).

    Args:
        model: a `*ForSequenceClassification` model with decoder layers.
        args: `FeatureSieveConfig`.
        aux_head: a custom aux module (pooled hidden -> logits); an `EarlyReadoutHead` by default.
    Other arguments are `Trainer`'s. Checkpoints hold the aux head and the aux/forget optimizer states
    (`feature_sieve.pt`) and `train(resume_from_checkpoint=...)` restores them.
    """

    def __init__(self, model, args: FeatureSieveConfig | None = None, aux_head=None, **kwargs):
        if args is None:
            args = FeatureSieveConfig(output_dir="feature-sieve-out")
        if not isinstance(args, FeatureSieveConfig):
            raise TypeError(f"args must be a FeatureSieveConfig, got {type(args).__name__}.")
        try:
            check_readout_layer(model, args.aux_layer, what="aux_layer")
        except NotImplementedError as err:
            raise TypeError(f"FeatureSieveTrainer needs a model with a decoder-layer list: {err}") from None
        self.aux_head = aux_head or EarlyReadoutHead(model.config.hidden_size, model.config.num_labels,
                                                     args.aux_depth, args.aux_width)
        self.aux_optimizer = self.forget_optimizer = None
        self._resume_from: str | None = None
        self._stats = {"aux_steps": 0, "forget_steps": 0, "aux_accuracy": [], "forget_loss": [],
                       "aux_accuracy_after_forget": []}
        self._micro_steps = 0
        super().__init__(model=model, args=args, **kwargs)
        self.aux_head.to(self.args.device)

    # -- optimizers ---------------------------------------------------------------------------------------------------
    def create_optimizer(self, model=None):
        optimizer = super().create_optimizer(model) if model is not None else super().create_optimizer()
        if self.aux_optimizer is None:
            a = self.args
            self.aux_optimizer = torch.optim.SGD(self.aux_head.parameters(), lr=a.aux_lr, momentum=a.aux_momentum,
                                                 weight_decay=a.aux_weight_decay)
            lower = lower_layer_parameters(self.accelerator.unwrap_model(self.model), a.aux_layer,
                                           a.include_embeddings_in_forget)
            self.forget_optimizer = torch.optim.SGD(lower, lr=a.forget_lr, momentum=0.0)
        if self._resume_from is not None:
            self.load_sieve_state(self._resume_from)
            self._resume_from = None
        return optimizer

    # -- the sieve ----------------------------------------------------------------------------------------------------
    def aux_logits(self, model, inputs, grad_backbone: bool) -> torch.Tensor:
        model_inputs = {k: inputs[k] for k in _MODEL_INPUTS if k in inputs}
        with torch.set_grad_enabled(grad_backbone):
            hidden = model(**model_inputs, output_hidden_states=True).hidden_states[self.args.aux_layer]
            pooled = pool_last_token(hidden, model_inputs.get("attention_mask"))
        return self.aux_head(pooled)

    def aux_step(self, model, inputs) -> None:
        """Train the aux head on the labels; the backbone runs without gradient."""
        self.aux_optimizer.zero_grad(set_to_none=True)
        logits = self.aux_logits(model, inputs, grad_backbone=False)
        F.cross_entropy(logits.float(), inputs["labels"]).backward()
        self.aux_optimizer.step()
        self.aux_optimizer.zero_grad(set_to_none=True)
        self._stats["aux_steps"] += 1
        self._stats["aux_accuracy"].append(float((logits.argmax(-1) == inputs["labels"]).float().mean()))

    def forget_step(self, model, inputs) -> None:
        """Move the lower layers so the current aux head predicts uniformly; the aux head stays where it is."""
        for _ in range(self.args.forget_steps):
            self.forget_optimizer.zero_grad(set_to_none=True)
            loss = forget_loss(self.aux_logits(model, inputs, grad_backbone=True))
            loss.backward()
            self.forget_optimizer.step()
            self._stats["forget_loss"].append(float(loss.detach()))
        self._stats["forget_steps"] += 1
        with torch.no_grad():
            after = self.aux_logits(model, inputs, grad_backbone=False)
        self._stats["aux_accuracy_after_forget"].append(float((after.argmax(-1) == inputs["labels"]).float().mean()))

    def training_step(self, model, inputs, num_items_in_batch=None):
        first_micro_batch = self._micro_steps % self.args.gradient_accumulation_steps == 0
        self._micro_steps += 1
        if first_micro_batch:
            inputs = {k: v.to(self.args.device) if torch.is_tensor(v) else v for k, v in inputs.items()}
            was_training = model.training
            model.train()
            self.aux_step(model, inputs)
            if self.args.forget_every and self.state.global_step % self.args.forget_every == 0:
                self.forget_step(model, inputs)
            # Nothing of the aux/forget passes may reach the main step (first micro-batch: no main grads yet).
            model.zero_grad(set_to_none=True)
            self.aux_head.zero_grad(set_to_none=True)
            model.train(was_training)
        return super().training_step(model, inputs, num_items_in_batch)

    # -- reporting, checkpoints -----------------------------------------------------------------------------------
    def sieve_stats(self) -> dict:
        """Aux/forget step counts, the aux head's batch accuracy (last 20 aux steps, and right after forget steps)
        and the last forget loss (log K = fully forgotten)."""
        def recent(values):
            values = values[-20:]
            return sum(values) / len(values) if values else None

        s = self._stats
        return {"aux_steps": s["aux_steps"], "forget_steps": s["forget_steps"],
                "aux_accuracy": recent(s["aux_accuracy"]),
                "aux_accuracy_after_forget": recent(s["aux_accuracy_after_forget"]),
                "forget_loss": s["forget_loss"][-1] if s["forget_loss"] else None}

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        """The model as `Trainer` saves it, plus the aux head and the aux/forget optimizer states."""
        super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir or self.args.output_dir
        if self.args.should_save:
            state = {"aux_head": self.aux_head.state_dict(),
                     "aux_optimizer": None if self.aux_optimizer is None else self.aux_optimizer.state_dict(),
                     "forget_optimizer": None if self.forget_optimizer is None else self.forget_optimizer.state_dict(),
                     "micro_steps": self._micro_steps}
            torch.save(state, os.path.join(output_dir, SIEVE_STATE_NAME))

    def load_sieve_state(self, checkpoint_dir: str) -> None:
        path = os.path.join(checkpoint_dir, SIEVE_STATE_NAME)
        if not os.path.exists(path):
            raise FileNotFoundError(f"{checkpoint_dir} has no {SIEVE_STATE_NAME}: "
                                    "not a FeatureSieveTrainer checkpoint.")
        state = torch.load(path, map_location=self.args.device, weights_only=True)
        self.aux_head.load_state_dict(state["aux_head"])
        if state["aux_optimizer"] is not None and self.aux_optimizer is not None:
            self.aux_optimizer.load_state_dict(state["aux_optimizer"])
        if state["forget_optimizer"] is not None and self.forget_optimizer is not None:
            self.forget_optimizer.load_state_dict(state["forget_optimizer"])
        self._micro_steps = state["micro_steps"]

    def train(self, resume_from_checkpoint=None, **kwargs):
        if resume_from_checkpoint is True:
            resume_from_checkpoint = get_last_checkpoint(self.args.output_dir)
        self._resume_from = resume_from_checkpoint or None
        return super().train(resume_from_checkpoint=resume_from_checkpoint, **kwargs)
