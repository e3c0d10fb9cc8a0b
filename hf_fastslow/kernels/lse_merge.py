"""Merge partial attention outputs by their log-sum-exps: the op that joins attention computed over disjoint key sets.

If `o1`, `lse1` are the softmax-attention output and the log-sum-exp of the scaled logits of a query over key set A,
and `o2`, `lse2` the same over a disjoint key set B, then attention over A ∪ B is

    lse = log(exp(lse1) + exp(lse2)),   o = exp(lse1 - lse) * o1 + exp(lse2 - lse) * o2.

SVG-EAR merges its exact diagonal/sink part with its routed part this way; IHA and LOSA reuse the same op.
Conventions: `o*` have shape (..., D) and `lse*` the matching (...); a partial over an empty key set has
lse = -inf (its output is ignored, whatever it holds), and two empty partials give o = 0, lse = -inf (never NaN).
Computed in fp32; the output has `o1`'s dtype and the lse is fp32.
"""

from __future__ import annotations

import torch

from .dispatch import kernel


def check_lse_merge_args(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor) -> None:
    if o1.shape != o2.shape:
        raise ValueError(f"lse_merge: partial outputs differ in shape: {tuple(o1.shape)} vs {tuple(o2.shape)}.")
    if o1.dim() < 1 or lse1.shape != o1.shape[:-1] or lse2.shape != o1.shape[:-1]:
        raise ValueError(
            f"lse_merge: log-sum-exps must have the outputs' shape without the last dim {tuple(o1.shape[:-1])}; "
            f"got {tuple(lse1.shape)} and {tuple(lse2.shape)}."
        )
    if not (o1.is_floating_point() and o2.is_floating_point() and lse1.is_floating_point()
            and lse2.is_floating_point()):
        raise TypeError("lse_merge: outputs and log-sum-exps must be floating point.")


def lse_merge_reference(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(o, lse) of attention over the union of the two partials' disjoint key sets (see the module docstring)."""
    check_lse_merge_args(o1, lse1, o2, lse2)
    l1, l2 = lse1.float(), lse2.float()
    m = torch.maximum(l1, l2)
    # Both empty: m = -inf; a finite stand-in keeps exp() at 0 instead of exp(-inf + inf) = NaN.
    m_safe = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w1, w2 = torch.exp(l1 - m_safe), torch.exp(l2 - m_safe)
    total = w1 + w2
    inv = torch.where(total > 0, 1.0 / total, torch.zeros_like(total))
    # Weights of an empty partial are exactly 0; where() keeps a NaN/inf it may hold out of the sum.
    out = torch.where((w1 > 0).unsqueeze(-1), o1.float() * (w1 * inv).unsqueeze(-1), 0.0) + torch.where(
        (w2 > 0).unsqueeze(-1), o2.float() * (w2 * inv).unsqueeze(-1), 0.0
    )
    lse = torch.where(total > 0, m_safe + torch.log(total), torch.full_like(m, float("-inf")))
    return out.to(o1.dtype), lse


lse_merge = kernel(lse_merge_reference, "hf_fastslow.kernels.lse_merge_triton:lse_merge_triton", name="lse_merge")
