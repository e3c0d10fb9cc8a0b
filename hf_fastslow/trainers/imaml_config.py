"""Configuration of implicit MAML (Rajeswaran et al., "Meta-Learning with Implicit Gradients", NeurIPS 2019) with
MetaDOCK kernel gates adapted in the inner loop (Chavan et al., CVPR 2022, arXiv 2206.01690)."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from transformers import TrainingArguments

from hf_fastslow.modeling.kernel_gates import check_budget


@dataclass
class IMAMLConfig(TrainingArguments):
    r"""`TrainingArguments` plus the inner loop, the implicit gradient and the gate budget.

    One Trainer "batch" is a meta-batch of `per_device_train_batch_size` episodes (the paper uses 4). Per episode the
    inner loop takes `inner_steps` SGD steps on the support loss (cross-entropy, plus the budget terms for the gate
    scores), optionally with the proximal term inside the loop (`inner_proximal`, textbook iMAML) and/or one extra
    "pull-back" step on it afterwards (`pull_back`, the MetaDOCK code). The meta-gradient is `v` solving
    `((1 + cg_damping) I + H / (lam + lam_damping)) v = g` by `cg_steps` conjugate-gradient iterations, `g` the query
    gradient at the adapted weights and `H` the support cross-entropy's Hessian there (Hessian-vector products by
    `torch.func.jvp` over `torch.func.grad`). Textbook iMAML is `cg_damping=0, lam_damping=0, inner_proximal=True`.

    Parameters:
        inner_steps (`int`, 16), inner_lr (`float`, 5e-3): inner SGD on the weights.
        gate_inner_lr (`float`, optional): inner SGD on the gate scores (defaults to `inner_lr`).
        lam (`float`, 0.5): proximal strength λ. lam_damping (`float`, 10.0), cg_damping (`float`, 1.0),
            cg_steps (`int`, 5): the implicit system as the MetaDOCK code sets it.
        inner_proximal (`bool`, False), pull_back (`bool`, True): where the proximal term acts (see above).
        budget (`float`, optional): kept fraction of kernels in (0, 1]; None takes the gates' own budget (or no
            budget term when the model has no gates).
        budget_weight (`float`, 50.0): final weight of `(r - budget)^2`, warmed up linearly over
            `budget_warmup_steps` meta-steps (defaults to `max_steps`).
        budget_anneal (`bool`, False): target `max(budget, exp(-4 t / T))` instead of a fixed one (the paper's option).
        gate_l1 (`float`, 1e-6): L1 on the scores.
        keep_best_on_eval (`bool`, True): keep the weights of the best `eval_accuracy` (meta-validation) in memory and
            restore them when training ends; selection never looks at meta-test tasks.
    """

    inner_steps: int = field(default=16, metadata={"help": "Inner-loop SGD steps per episode."})
    inner_lr: float = field(default=5e-3, metadata={"help": "Inner-loop SGD learning rate for weights."})
    gate_inner_lr: float | None = field(default=None, metadata={"help": "Inner-loop SGD lr for gate scores."})
    lam: float = field(default=0.5, metadata={"help": "Proximal strength lambda."})
    lam_damping: float = field(default=10.0, metadata={"help": "Added to lambda in the implicit system."})
    cg_damping: float = field(default=1.0, metadata={"help": "Identity damping c in (1 + c) I + H / (lam + lam_d)."})
    cg_steps: int = field(default=5, metadata={"help": "Conjugate-gradient iterations."})
    inner_proximal: bool = field(default=False, metadata={"help": "Proximal term inside the inner loop."})
    pull_back: bool = field(default=True, metadata={"help": "One SGD step on the proximal term after the loop."})
    budget: float | None = field(default=None, metadata={"help": "Kept fraction of kernels in (0, 1]."})
    budget_weight: float = field(default=50.0, metadata={"help": "Final weight of the budget penalty."})
    budget_warmup_steps: int | None = field(default=None, metadata={"help": "Linear warm-up of the budget weight."})
    budget_anneal: bool = field(default=False, metadata={"help": "Anneal the target from 1 to the budget."})
    gate_l1: float = field(default=1e-6, metadata={"help": "L1 weight on the gate scores."})
    keep_best_on_eval: bool = field(default=True, metadata={"help": "Restore the best meta-validation weights."})
    remove_unused_columns: bool = field(default=False, metadata={"help": "Episodes keep all their columns."})
    max_grad_norm: float = field(default=0.0, metadata={"help": "No clipping of the meta-gradient (paper)."})
    adam_epsilon: float = field(default=1e-3, metadata={"help": "Adam epsilon of the MetaDOCK code."})
    weight_decay: float = field(default=0.0, metadata={"help": "Weight decay of the meta-optimizer."})

    def __post_init__(self):
        if self.inner_steps < 1:
            raise ValueError(f"IMAMLConfig: inner_steps must be >= 1, got {self.inner_steps}.")
        if self.cg_steps < 1:
            raise ValueError(f"IMAMLConfig: cg_steps must be >= 1, got {self.cg_steps}.")
        for name in ("inner_lr", "lam", "lam_damping", "cg_damping", "budget_weight", "gate_l1"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"IMAMLConfig: {name} must be >= 0, got {getattr(self, name)}.")
        if self.gate_inner_lr is not None and not self.gate_inner_lr >= 0:
            raise ValueError(f"IMAMLConfig: gate_inner_lr must be >= 0, got {self.gate_inner_lr}.")
        if self.lam + self.lam_damping <= 0:
            raise ValueError("IMAMLConfig: lam + lam_damping must be > 0 (the implicit system divides by it).")
        if self.budget is not None:
            self.budget = check_budget(self.budget)
        if self.gradient_accumulation_steps != 1:
            raise ValueError(
                "IMAMLConfig: gradient_accumulation_steps must be 1; the meta-gradient of a meta-batch is written "
                "into .grad in one step (raise per_device_train_batch_size for more episodes per step)."
            )
        if self.fp16 or self.bf16:
            raise ValueError("IMAMLConfig: fp16/bf16 are not supported; CG on Hessian-vector products needs fp32.")
        if self.remove_unused_columns:
            raise ValueError("IMAMLConfig: remove_unused_columns must be False (episodes are not model inputs).")
        super().__post_init__()

    def budget_at(self, step: int, budget: float | None = None) -> tuple[float, float | None]:
        """(budget weight, target kept fraction) at meta-step `step`; `budget` stands in for an unset `self.budget`."""
        budget = self.budget if self.budget is not None else budget
        if budget is None:
            return 0.0, None
        horizon = self.budget_warmup_steps or self.max_steps or 1
        progress = min(1.0, max(0.0, step / max(horizon, 1)))
        target = budget
        if self.budget_anneal:
            target = max(budget, math.exp(-4.0 * progress))
        return self.budget_weight * progress, target
