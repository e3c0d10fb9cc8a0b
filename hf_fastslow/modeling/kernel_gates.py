"""Learnable binary gates per convolution kernel (MetaDOCK; Chavan et al., "Dynamic Kernel Selection for Improved
Generalization and Memory Efficiency in Meta-learning", CVPR 2022, arXiv 2206.01690).

Every (output-channel, input-channel) slice of a `nn.Conv2d` weight gets a score ζ; the forward weight is
`W ⊙ z[:, :, None, None]` with the hard gate `z = 1[σ(βζ) > 0.5] = 1[ζ > 0]` (β > 0), and the backward pass is
straight-through: the gradient reaching `z` is handed to σ(βζ) unchanged. The gate is a
`torch.nn.utils.parametrize` parametrisation of the conv's `weight`, so it works on any `nn.Conv2d` (a transformers
ResNet's, the package's Conv4, grouped and depth-wise convs, where a kernel gate is a channel gate) and the scores are
ordinary parameters, visible to `named_parameters()`, `torch.func.functional_call` and optimizers.

The straight-through estimator is written as `s + (hard - s).detach()`: a custom `torch.autograd.Function` without
`setup_context` raises under `torch.func` transforms, which the implicit-MAML trainer uses for Hessian-vector products.
Its forward value equals the hard gate exactly (for s in [0.5, 1] the difference `1 - s` is exact in floating point,
for s < 0.5 it is `-s`), so open gates reproduce the dense conv bit for bit.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import nn
from torch.nn.utils import parametrize


def check_budget(budget: float, name: str = "budget") -> float:
    """A kept fraction must lie in (0, 1]: 0 would switch every kernel off, above 1 cannot be reached."""
    budget = float(budget)
    if not 0.0 < budget <= 1.0:
        raise ValueError(f"{name} is the fraction of kernels kept active and must lie in (0, 1], got {budget}.")
    return budget


class KernelGate(nn.Module):
    """Parametrisation `weight -> weight * z[:, :, None, None]` with one score per kernel.

    `mode`: "ste" (default) hard forward, straight-through backward to the scores; "hard" the same hard mask with the
    scores detached (the paper's pruned mode: no gradient reaches ζ); "open" every gate on (the dense conv).
    """

    def __init__(self, out_channels: int, in_channels: int, beta: float = 1.0, init_range: float = 0.01):
        super().__init__()
        if beta <= 0:
            raise ValueError(f"KernelGate: beta must be > 0 (z = 1[sigmoid(beta * score) > 0.5]), got {beta}.")
        self.beta = float(beta)
        self.mode = "ste"
        # U(0, init_range): every gate starts open and close to its threshold, so a few steps can flip it.
        self.scores = nn.Parameter(torch.rand(out_channels, in_channels) * init_range)

    def gate(self, scores: torch.Tensor | None = None) -> torch.Tensor:
        """The gate values z (forward value 0/1); straight-through to σ(βζ) in "ste" mode."""
        scores = self.scores if scores is None else scores
        if self.mode == "open":
            return torch.ones_like(scores)
        hard = (scores > 0).to(scores.dtype)
        if self.mode == "hard":
            return hard.detach()
        soft = torch.sigmoid(self.beta * scores)
        return soft + (hard - soft).detach()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.gate()[:, :, None, None].to(weight.dtype)


class KernelGates:
    """The gates attached to one model: names, counts, the active fraction, the budget penalty.

    Scores are looked up by their parameter names in the model (`<conv>.parametrizations.weight.0.scores`), so the
    same methods work on the live parameters and on a dict of fast weights inside `torch.func.functional_call`.
    """

    def __init__(self, model: nn.Module, convs: dict[str, nn.Conv2d], budget: float | None):
        self.model = model
        self.convs = convs
        self.budget = None if budget is None else check_budget(budget)
        self.score_names = [f"{name}.parametrizations.weight.0.scores" if name else "parametrizations.weight.0.scores"
                            for name in convs]

    def __len__(self) -> int:
        return len(self.convs)

    def modules(self) -> list[KernelGate]:
        return [conv.parametrizations.weight[0] for conv in self.convs.values()]

    def scores(self, params: Mapping[str, torch.Tensor] | None = None) -> list[torch.Tensor]:
        """The score tensors, from `params` (fast weights by name) where given, else the live parameters."""
        if params is None:
            return [gate.scores for gate in self.modules()]
        return [params[name] for name in self.score_names]

    def num_kernels(self) -> int:
        return sum(gate.scores.numel() for gate in self.modules())

    def set_mode(self, mode: str) -> None:
        if mode not in ("ste", "hard", "open"):
            raise ValueError(f"KernelGates.set_mode: mode must be 'ste', 'hard' or 'open', got {mode!r}.")
        for gate in self.modules():
            gate.mode = mode

    def active_fraction(self, params: Mapping[str, torch.Tensor] | None = None) -> float:
        """Fraction of kernels whose gate is on (ζ > 0), over all gated convs."""
        scores = self.scores(params)
        return float(sum(int((s > 0).sum()) for s in scores)) / float(sum(s.numel() for s in scores))

    def soft_active_fraction(self, params: Mapping[str, torch.Tensor] | None = None) -> torch.Tensor:
        """The active fraction r as a differentiable tensor: hard value, straight-through gradient to σ(βζ)."""
        gates = self.modules()
        zs = [gate.gate(s) for gate, s in zip(gates, self.scores(params))]
        return sum(z.sum() for z in zs) / sum(z.numel() for z in zs)

    def budget_loss(
        self,
        params: Mapping[str, torch.Tensor] | None = None,
        budget: float | None = None,
        weight: float = 1.0,
        l1: float = 0.0,
    ) -> torch.Tensor:
        """`weight * (r - budget)^2 + l1 * Σ|ζ|` (the paper's budget term and its small L1 on the scores)."""
        budget = self.budget if budget is None else check_budget(budget)
        if budget is None:
            raise ValueError("KernelGates.budget_loss: no budget given here or to attach_kernel_gates.")
        loss = weight * (self.soft_active_fraction(params) - budget) ** 2
        if l1:
            loss = loss + l1 * sum(s.abs().sum() for s in self.scores(params))
        return loss

    def export_masks(self) -> dict[str, torch.Tensor]:
        """`{conv name: bool (out, in) mask}` of the kernels kept, e.g. to compare what two tasks use."""
        return {name: (gate.scores.detach() > 0).clone() for name, gate in zip(self.convs, self.modules())}

    def active_conv_parameters(self) -> int:
        """Conv weights left active: kernel size times the number of open gates, per conv (bias not counted)."""
        total = 0
        for conv, gate in zip(self.convs.values(), self.modules()):
            kh, kw = conv.kernel_size
            total += kh * kw * int((gate.scores > 0).sum())
        return total

    def bake(self) -> None:
        """Write the hard mask into the weights and remove the gates (the model is a plain dense model again, with
        zeroed kernels), e.g. before `save_pretrained` into a model class that knows nothing of gates."""
        self.set_mode("hard")
        for conv in self.convs.values():
            parametrize.remove_parametrizations(conv, "weight", leave_parametrized=True)
        self.convs = {}
        self.score_names = []


def attach_kernel_gates(
    model: nn.Module,
    include: Callable[[str, nn.Module], bool] | None = None,
    budget: float | None = None,
    beta: float = 1.0,
    init_range: float = 0.01,
) -> KernelGates:
    """Put a `KernelGate` on every `nn.Conv2d` of `model` (or those `include(name, module)` selects).

    `model` may itself be a single `nn.Conv2d`. Raises `ValueError` when `include` selects a module that is not an
    `nn.Conv2d`, when nothing is selected, when a conv is already gated, or for a budget outside (0, 1].
    """
    if budget is not None:
        budget = check_budget(budget)
    convs: dict[str, nn.Conv2d] = {}
    for name, module in model.named_modules():
        if include is None:
            if not isinstance(module, nn.Conv2d):
                continue
        elif not include(name, module):
            continue
        if not isinstance(module, nn.Conv2d):
            raise ValueError(
                f"attach_kernel_gates: {name or 'the model'} is a {type(module).__name__}; kernel gates apply to "
                "nn.Conv2d only (a Linear layer has no kernels; gate its input channels another way)."
            )
        if parametrize.is_parametrized(module, "weight"):
            raise ValueError(f"attach_kernel_gates: {name or 'the model'}'s weight is already parametrised.")
        convs[name] = module
    if not convs:
        raise ValueError(f"attach_kernel_gates: no nn.Conv2d selected in {type(model).__name__}.")
    for conv in convs.values():
        out_c, in_per_group = conv.weight.shape[:2]
        gate = KernelGate(out_c, in_per_group, beta=beta, init_range=init_range)
        gate.to(device=conv.weight.device, dtype=conv.weight.dtype)
        parametrize.register_parametrization(conv, "weight", gate)
    return KernelGates(model, convs, budget)
