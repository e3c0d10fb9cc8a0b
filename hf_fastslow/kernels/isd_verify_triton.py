"""Triton kernel of the ISD speculative verify (see `isd_verify.py` for the contract and the PyTorch reference).

One program per row r. It gathers p[r, k, x_k] and q[r, k, x_k] at the K drafted tokens in one vector load, runs the
ratio test `u < min(1, p/(alpha q))` for all K positions at once, takes the first rejected live position (k <
num_drafts[r]) as the accepted count, and, when a draft was rejected, streams that position's p and q over the vocab
in tiles twice: once for the mass of max(0, p - alpha q), once to write the normalized residual (or p itself when the
residual is all zero). Rows that accepted everything get zeros. Nothing of size [R, K, V] is materialized; the
PyTorch path builds the [R, V] residual of every row and the [R, K] gathers as separate ops.

Division is IEEE (`div_rn`) so the ratio test rounds as torch's does. Runs natively on CUDA and on the CPU under
`TRITON_INTERPRET=1` (set before this module is imported).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .isd_verify import check_isd_verify_args


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


@triton.jit
def _isd_verify_kernel(
    p_ptr, tok_ptr, q_ptr, nd_ptr, u_ptr, acc_ptr, res_ptr, K, V, alpha,
    BLOCK_K: tl.constexpr, BLOCK_V: tl.constexpr,
):
    r = tl.program_id(0).to(tl.int64)
    k = tl.arange(0, BLOCK_K)
    n = tl.load(nd_ptr + r)
    live = (k < K) & (k < n)
    x = tl.load(tok_ptr + r * K + k, mask=live, other=0).to(tl.int64)
    at_x = (r * K + k) * V + x
    px = tl.load(p_ptr + at_x, mask=live, other=0.0)
    qx = tl.load(q_ptr + at_x, mask=live, other=1.0)
    u = tl.load(u_ptr + r * K + k, mask=live, other=0.0)
    ratio = tl.math.div_rn(px, alpha * qx)
    # u < min(1, ratio) with a NaN ratio (p = q = 0) rejecting, as torch's NaN-propagating min does.
    accept = (u < ratio) & (u < 1.0)
    first_reject = tl.min(tl.where(live & (~accept), k, BLOCK_K), axis=0)
    accepted = tl.minimum(first_reject, n)
    tl.store(acc_ptr + r, accepted.to(tl.int64))

    v_idx = tl.arange(0, BLOCK_V)
    out = res_ptr + r * V
    if accepted < n:
        at = (r * K + accepted) * V
        mass = tl.zeros((BLOCK_V,), tl.float32)
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + v_idx
            ok = cols < V
            p = tl.load(p_ptr + at + cols, mask=ok, other=0.0)
            q = tl.load(q_ptr + at + cols, mask=ok, other=0.0)
            mass += tl.maximum(p - alpha * q, 0.0)
        total = tl.sum(mass, axis=0)
        if total > 0:
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + v_idx
                ok = cols < V
                p = tl.load(p_ptr + at + cols, mask=ok, other=0.0)
                q = tl.load(q_ptr + at + cols, mask=ok, other=0.0)
                tl.store(out + cols, tl.math.div_rn(tl.maximum(p - alpha * q, 0.0), total), mask=ok)
        else:
            for v0 in range(0, V, BLOCK_V):
                cols = v0 + v_idx
                ok = cols < V
                tl.store(out + cols, tl.load(p_ptr + at + cols, mask=ok, other=0.0), mask=ok)
    else:
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + v_idx
            tl.store(out + cols, tl.zeros((BLOCK_V,), tl.float32), mask=cols < V)


def isd_verify_triton(anchor_probs, draft_tokens, draft_probs, num_drafts, uniforms, verify_alpha=1.0):
    """Triton twin of `hf_fastslow.kernels.isd_verify.isd_verify` (same arguments, same outputs)."""
    check_isd_verify_args(anchor_probs, draft_tokens, draft_probs, num_drafts, uniforms, verify_alpha)
    rows, k, vocab = anchor_probs.shape
    device = anchor_probs.device
    accepted = torch.empty(rows, dtype=torch.long, device=device)
    residual = torch.empty(rows, vocab, dtype=torch.float32, device=device)
    if rows == 0:
        return accepted, residual
    if k == 0 or vocab == 0:
        accepted.zero_()
        residual.zero_()
        return accepted, residual
    guard = torch.cuda.device(device) if anchor_probs.is_cuda else contextlib.nullcontext()
    with guard:
        _isd_verify_kernel[(rows,)](
            anchor_probs.float().contiguous(), draft_tokens.contiguous(), draft_probs.float().contiguous(),
            num_drafts.contiguous(), uniforms.float().contiguous(), accepted, residual,
            k, vocab, float(verify_alpha),
            BLOCK_K=max(2, _next_pow2(k)), BLOCK_V=min(2048, max(16, _next_pow2(vocab))),
        )
    return accepted, residual
