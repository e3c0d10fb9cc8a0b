"""Attention-output error of an approximate attention against dense attention, per layer, on captured q/k/v.

`capture_qkv(model, input_ids)` runs one forward and returns each layer's post-RoPE q/k/v (B, H, N, D) as the
model's attention function received them; `attention_error_by_layer` compares an approximation with exact SDPA
on them. The error is ||O - O_dense||_F / ||O_dense||_F over every batch row, head, query and channel (fp64).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from hf_fastslow.integrations.attention_capture import capture_attention_inputs


def relative_error(approx: torch.Tensor, reference: torch.Tensor) -> float:
    """||approx - reference|| / ||reference|| (Frobenius, fp64)."""
    if approx.shape != reference.shape:
        raise ValueError(f"relative_error: shapes differ: {tuple(approx.shape)} vs {tuple(reference.shape)}.")
    ref = reference.double()
    return float((approx.double() - ref).norm() / ref.norm().clamp(min=1e-300))


def dense_attention(q, k, v, *, causal=False, scale=None):
    """Exact SDPA on (B, H, N, D) with GQA; causal queries are the last Nq key positions (bottom-right aligned)."""
    mask = None
    if causal:
        nq, nk = q.shape[2], k.shape[2]
        mask = torch.ones(nq, nk, dtype=torch.bool, device=q.device).tril(nk - nq)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale, enable_gqa=q.shape[1] != k.shape[1])


@torch.no_grad()
def capture_qkv(model: torch.nn.Module, input_ids: torch.Tensor, layers: list[int] | None = None,
                **forward_kwargs) -> dict[int, dict]:
    """One forward of `model` on `input_ids`; {layer: {"q", "k", "v", "mask", "scaling", "is_causal"}} post-RoPE."""
    with capture_attention_inputs(model, layers) as captured:
        model(input_ids=input_ids, **forward_kwargs)
    return dict(captured)


def attention_error_by_layer(
    captured: dict[int, dict], approx: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    reference: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
) -> dict[int, float]:
    """{layer: relative_error(approx(q, k, v), reference(q, k, v))}; the reference defaults to dense SDPA."""
    reference = reference or dense_attention
    return {
        layer: relative_error(approx(t["q"].float(), t["k"].float(), t["v"].float()),
                              reference(t["q"].float(), t["k"].float(), t["v"].float()))
        for layer, t in sorted(captured.items())
    }
