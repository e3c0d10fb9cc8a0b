"""The search phase of ViT-Slim / network slimming on `transformers.Trainer`: the task loss plus
w_attn * sum|zeta_attn| + w_mlp * sum|zeta_mlp| (+ w_channel * sum|gamma| for ResNets), the masks in their own
parameter group without weight decay (decay would shrink every mask alike and blur the ranking).

    masks = attach_slim_masks(model, SlimConfig(attn_granularity="head"))
    args = SlimSearchConfig(output_dir="search", max_steps=200, use_cpu=True)
    SlimSearchTrainer(model=model, masks=masks, args=args, train_dataset=ds).train()
    masks.binarize(attn_budget=0.5, mlp_budget=0.5); child = slice_model(model, masks)
"""

from __future__ import annotations

from transformers import Trainer

from ..modeling.slimming import SlimMasks
from .slim_config import SlimSearchConfig

__all__ = ["SlimSearchTrainer"]


class SlimSearchTrainer(Trainer):
    """`transformers.Trainer` whose loss adds the masks' L1 penalty; logs mean |zeta| per kind.

    Args:
        model: the model the masks were attached to.
        masks: `SlimMasks` from `attach_slim_masks(model, cfg)`.
        args: `SlimSearchConfig`.
    Other arguments are `Trainer`'s.
    """

    def __init__(self, model=None, masks: SlimMasks | None = None, args: SlimSearchConfig | None = None, **kwargs):
        if masks is None or not isinstance(masks, SlimMasks):
            raise TypeError("SlimSearchTrainer needs masks=attach_slim_masks(model, cfg).")
        if masks.model is not model:
            raise ValueError("the masks were attached to a different model than the one passed to the trainer.")
        if masks.binarized:
            raise ValueError("the masks are already binarized: the search is over (fine-tune the sliced child with "
                             "a plain Trainer).")
        if args is None:
            args = SlimSearchConfig(output_dir="slim-search-out")
        if not isinstance(args, SlimSearchConfig):
            raise TypeError(f"args must be a SlimSearchConfig, got {type(args).__name__}.")
        self.masks = masks
        self._mask_ids = {id(p) for p in masks.mask_parameters()}
        if not args.train_weights:
            for p in model.parameters():
                if id(p) not in self._mask_ids:
                    p.requires_grad_(False)
            if masks.family == "resnet":  # network slimming's scores are the gammas themselves
                for bn in masks._batchnorms():
                    bn.weight.requires_grad_(True)
        super().__init__(model=model, args=args, **kwargs)
        masks.to(self.args.device)
        self._penalty_sum, self._penalty_n = 0.0, 0

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        out = super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)
        loss, outputs = out if return_outputs else (out, None)
        penalty = self.masks.penalty().to(loss.device)
        self._penalty_sum += float(penalty.detach())
        self._penalty_n += 1
        loss = loss + penalty
        return (loss, outputs) if return_outputs else loss

    def create_optimizer(self, model=None):
        opt_model = self.model if model is None else model
        if self.optimizer is None:
            decay = set(self.get_decay_parameter_names(opt_model))
            named = [(n, p) for n, p in opt_model.named_parameters() if p.requires_grad and id(p) not in self._mask_ids]
            groups = [
                {"params": [p for n, p in named if n in decay], "weight_decay": self.args.weight_decay},
                {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0},
                {"params": self.masks.mask_parameters(), "weight_decay": 0.0,
                 "lr": self.args.mask_lr if self.args.mask_lr is not None else self.args.learning_rate},
            ]
            groups = [g for g in groups if g["params"]]
            optimizer_cls, optimizer_kwargs = self.get_optimizer_cls_and_kwargs(self.args, opt_model)
            self.optimizer = optimizer_cls(groups, **optimizer_kwargs)
        return self.optimizer

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        logs = dict(logs)
        logs.update(self.masks.summary())
        if self._penalty_n:
            logs["slim/penalty"] = self._penalty_sum / self._penalty_n
            self._penalty_sum, self._penalty_n = 0.0, 0
        super().log(logs, start_time)
