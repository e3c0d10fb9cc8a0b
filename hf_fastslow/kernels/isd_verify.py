"""ISD verify: the speculative-sampling acceptance of one I-DLM round, vectorized over rows (the PyTorch reference).

Row r verifies its `num_drafts[r]` leading drafts left to right: draft k (token x, drafted from q, anchor p) is
accepted iff `uniforms[r, k] < min(1, p[x] / (verify_alpha * q[x]))`, and verification stops at the first rejection.
The caller samples the correction token from `residual`: `normalize(max(0, p - verify_alpha * q))` at the first
rejected position (Leviathan et al. 2023), `p` itself when that difference is all zero. With `verify_alpha = 1` the
committed tokens follow `p` exactly, for any `q` (one-hot `q` for argmax proposals: the residual is `p` without the
draft, renormalized). `verify_alpha < 1` is I-DLM's lossy speed knob.

`isd_verify` dispatches to the Triton twin (`isd_verify_triton`, same signature) on CUDA; see `dispatch`.
"""

from __future__ import annotations

import torch

from .dispatch import kernel

__all__ = ["check_isd_verify_args", "isd_verify", "isd_verify_reference"]


def check_isd_verify_args(anchor_probs, draft_tokens, draft_probs, num_drafts, uniforms, verify_alpha) -> None:
    if anchor_probs.dim() != 3:
        raise ValueError(f"isd_verify: anchor_probs must be [R, K, V], got shape {tuple(anchor_probs.shape)}.")
    rows, k_max, _ = anchor_probs.shape
    if draft_probs.shape != anchor_probs.shape:
        raise ValueError(
            f"isd_verify: draft_probs {tuple(draft_probs.shape)} must have anchor_probs' shape "
            f"{tuple(anchor_probs.shape)}."
        )
    if draft_tokens.shape != (rows, k_max) or uniforms.shape != (rows, k_max):
        raise ValueError(
            f"isd_verify: draft_tokens {tuple(draft_tokens.shape)} and uniforms {tuple(uniforms.shape)} must be "
            f"[R, K] = {(rows, k_max)}."
        )
    if num_drafts.shape != (rows,):
        raise ValueError(f"isd_verify: num_drafts must be [R] = ({rows},), got {tuple(num_drafts.shape)}.")
    if draft_tokens.dtype != torch.long or num_drafts.dtype != torch.long:
        raise TypeError("isd_verify: draft_tokens and num_drafts must be torch.long.")
    if not (anchor_probs.is_floating_point() and draft_probs.is_floating_point() and uniforms.is_floating_point()):
        raise TypeError("isd_verify: anchor_probs, draft_probs and uniforms must be floating point.")
    if not float(verify_alpha) > 0:
        raise ValueError(f"isd_verify: verify_alpha must be > 0, got {verify_alpha}.")


def isd_verify_reference(anchor_probs, draft_tokens, draft_probs, num_drafts, uniforms, verify_alpha=1.0):
    """anchor_probs [R,K,V] (p at the K verify positions, processed + normalized); draft_tokens [R,K] long;
    draft_probs [R,K,V] (q; one-hot rows for argmax proposals); num_drafts [R] long (<= K); uniforms [R,K] in [0,1).

    Returns (accepted [R] long = number of leading drafts accepted, residual [R,V] float32 =
    normalize(max(0, p - verify_alpha*q)) at the first rejected position, p itself when that residual is all zero;
    rows with everything accepted get zeros).
    """
    check_isd_verify_args(anchor_probs, draft_tokens, draft_probs, num_drafts, uniforms, verify_alpha)
    rows, k_max, vocab = anchor_probs.shape
    p = anchor_probs.float()
    q = draft_probs.float()
    if k_max == 0:
        return torch.zeros(rows, dtype=torch.long, device=p.device), p.new_zeros(rows, vocab)
    tokens = draft_tokens[..., None]
    p_x = p.gather(2, tokens).squeeze(-1)
    q_x = q.gather(2, tokens).squeeze(-1)
    # The rule exactly as written: q[x] = 0 gives an infinite ratio (accepted), p[x] = q[x] = 0 a NaN (rejected).
    ratio = torch.clamp(p_x / (verify_alpha * q_x), max=1.0)
    live = torch.arange(k_max, device=p.device)[None, :] < num_drafts[:, None]
    ok = (uniforms.float() < ratio) & live
    accepted = ok.long().cumprod(dim=1).sum(dim=1)

    # Residual at the first rejected position (a valid index for every row; rows that accepted all are zeroed).
    at = accepted.clamp(max=k_max - 1)[:, None, None].expand(rows, 1, vocab)
    p_at = p.gather(1, at).squeeze(1)
    q_at = q.gather(1, at).squeeze(1)
    diff = (p_at - verify_alpha * q_at).clamp(min=0)
    total = diff.sum(dim=-1, keepdim=True)
    residual = torch.where(total > 0, diff / torch.where(total > 0, total, torch.ones_like(total)), p_at)
    rejected = accepted < num_drafts
    residual = torch.where(rejected[:, None], residual, torch.zeros_like(residual))
    return accepted, residual


isd_verify = kernel(isd_verify_reference, "hf_fastslow.kernels.isd_verify_triton:isd_verify_triton", name="isd_verify")
