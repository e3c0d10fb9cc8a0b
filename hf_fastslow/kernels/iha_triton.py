"""Fused IHA forward in Triton: mix, interleave, attend and collapse without materialising the P-times larger
pseudo-query/key/value tensors in memory.

One program handles one (batch, head, block of query tokens). Its rows are pseudo-queries (token n, copy p) laid out
n-major with P padded to a power of two; each row is mixed on the fly from the H base query heads. The key loop
streams blocks of base key/value tokens, mixes each block's G KV heads into P pseudo-keys/values in registers,
and runs an online softmax over the pseudo-token logits (token-causal mask: a pseudo-key is visible iff its base
token is). The epilogue folds the P rows of each token with the collapse weights: per-head directly into the
output, global by adding every output head's share (atomic adds into an fp32 buffer).

Forward only (inference); training uses the differentiable PyTorch reference (`hf_fastslow.kernels.iha`).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .iha import check_iha_shapes


@triton.jit
def _iha_fwd_kernel(
    q_ptr, k_ptr, v_ptr, mask_ptr, aq_ptr, ak_ptr, av_ptr, r_ptr, out_ptr,
    N, S, H, G, scaling,
    sqb, sqh, sqn, sqd,
    skb, skh, sks, skd,
    svb, svh, svs, svd,
    smb, smn, sms,
    sob, son, soh, sod,
    D: tl.constexpr, P: tl.constexpr, PP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr, HAS_MASK: tl.constexpr, PER_HEAD: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H

    rows = tl.arange(0, BLOCK_N * PP)
    n = pid_n * BLOCK_N + rows // PP
    p = rows % PP
    row_ok = (n < N) & (p < P)
    d = tl.arange(0, BLOCK_D)
    d_ok = d < D

    # pseudo-queries: q_mix[(n, p)] = sum_m alpha_q[m, h, p] * q[b, m, n]
    q_mix = tl.zeros((BLOCK_N * PP, BLOCK_D), dtype=tl.float32)
    for m in range(0, H):
        coef = tl.load(aq_ptr + (m * H + h) * P + p, mask=p < P, other=0.0).to(tl.float32)
        q_m = tl.load(q_ptr + b * sqb + m * sqh + n[:, None] * sqn + d[None, :] * sqd,
                      mask=row_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        q_mix += coef[:, None] * q_m

    m_i = tl.full((BLOCK_N * PP,), float("-inf"), dtype=tl.float32)
    l_i = tl.zeros((BLOCK_N * PP,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_N * PP, BLOCK_D), dtype=tl.float32)
    cols = tl.arange(0, BLOCK_S * PP)
    pc = cols % PP
    for s_start in range(0, S, BLOCK_S):
        s = s_start + cols // PP
        col_ok = (s < S) & (pc < P)
        k_mix = tl.zeros((BLOCK_S * PP, BLOCK_D), dtype=tl.float32)
        v_mix = tl.zeros((BLOCK_S * PP, BLOCK_D), dtype=tl.float32)
        for g in range(0, G):
            ck = tl.load(ak_ptr + (g * H + h) * P + pc, mask=pc < P, other=0.0).to(tl.float32)
            cv = tl.load(av_ptr + (g * H + h) * P + pc, mask=pc < P, other=0.0).to(tl.float32)
            ld_mask = col_ok[:, None] & d_ok[None, :]
            k_g = tl.load(k_ptr + b * skb + g * skh + s[:, None] * sks + d[None, :] * skd, mask=ld_mask, other=0.0)
            v_g = tl.load(v_ptr + b * svb + g * svh + s[:, None] * svs + d[None, :] * svd, mask=ld_mask, other=0.0)
            k_mix += ck[:, None] * k_g.to(tl.float32)
            v_mix += cv[:, None] * v_g.to(tl.float32)

        logits = tl.dot(q_mix, tl.trans(k_mix), input_precision="ieee") * scaling
        allowed = row_ok[:, None] & col_ok[None, :]
        if HAS_MASK:
            token_ok = tl.load(mask_ptr + b * smb + n[:, None] * smn + s[None, :] * sms, mask=allowed, other=0)
            allowed = allowed & (token_ok != 0)
        else:  # bottom-right aligned token-causal
            allowed = allowed & (s[None, :] <= n[:, None] + (S - N))
        logits = tl.where(allowed, logits, float("-inf"))

        m_new = tl.maximum(m_i, tl.max(logits, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        weights = tl.exp(logits - m_safe[:, None])
        rescale = tl.exp(m_i - m_safe)
        l_i = l_i * rescale + tl.sum(weights, axis=1)
        acc = acc * rescale[:, None] + tl.dot(weights, v_mix, input_precision="ieee")
        m_i = m_new

    # rows that saw no key (padding queries) give 0, like the reference
    o = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
    n_out = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    st_mask = (n_out < N)[:, None] & d_ok[None, :]
    if PER_HEAD:
        w = tl.load(r_ptr + h * P + p, mask=p < P, other=0.0).to(tl.float32)
        folded = tl.sum(tl.reshape(o * w[:, None], (BLOCK_N, PP, BLOCK_D)), axis=1)
        tl.store(out_ptr + b * sob + n_out[:, None] * son + h * soh + d[None, :] * sod, folded, mask=st_mask)
    else:
        for ho in range(0, H):
            w = tl.load(r_ptr + (ho * H + h) * P + p, mask=p < P, other=0.0).to(tl.float32)
            folded = tl.sum(tl.reshape(o * w[:, None], (BLOCK_N, PP, BLOCK_D)), axis=1)
            tl.atomic_add(out_ptr + b * sob + n_out[:, None] * son + ho * soh + d[None, :] * sod, folded,
                          mask=st_mask)


def iha_attend_triton(query, key, value, mask, alpha_q, alpha_k, alpha_v, collapse, scaling, dropout=0.0):
    """Same contract as `iha_attend_reference` (dropout must be 0: this is the inference path)."""
    if dropout:
        raise ValueError("The fused IHA kernel has no dropout; use iha_attend_reference for training.")
    p = check_iha_shapes(query, key, value, mask, alpha_q, alpha_k, alpha_v, collapse)
    b, h, n, d = query.shape
    g, s = key.shape[1], key.shape[2]
    pp = triton.next_power_of_2(p)
    block_n = max(1, 64 // pp) if n > 1 else 1
    block_n = min(block_n, triton.next_power_of_2(n))
    if block_n * pp < 16:  # tl.dot needs at least 16 rows
        block_n = 16 // pp
    block_s = max(1, 64 // pp)
    block_d = max(16, triton.next_power_of_2(d))
    per_head = collapse.dim() == 2
    out = torch.zeros(b, n, h, d, device=query.device, dtype=torch.float32)
    if mask is not None:
        mask_u8 = mask[:, 0].to(torch.uint8)
        smb = mask_u8.stride(0) if mask_u8.shape[0] > 1 else 0
        smn, sms = mask_u8.stride(1), mask_u8.stride(2)
    else:
        mask_u8, smb, smn, sms = query, 0, 0, 0  # unused pointer
    grid = (triton.cdiv(n, block_n), b * h)
    _iha_fwd_kernel[grid](
        query, key, value, mask_u8, alpha_q.contiguous(), alpha_k.contiguous(), alpha_v.contiguous(),
        collapse.contiguous(), out,
        n, s, h, g, float(scaling),
        *query.stride(), *key.stride(), *value.stride(), smb, smn, sms, *out.stride(),
        D=d, P=p, PP=pp, BLOCK_N=block_n, BLOCK_S=block_s, BLOCK_D=block_d,
        HAS_MASK=mask is not None, PER_HEAD=per_head,
    )
    return out.to(query.dtype)
