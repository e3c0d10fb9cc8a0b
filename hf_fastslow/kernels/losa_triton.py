"""Triton kernel of LOSA's union-sparse prefix attention (see `losa.py` for the contract and the PyTorch reference).

One program per (KV head g, tile of rows), where the rows of KV head g are its G = Hq / Hkv query heads times the A
active queries, flattened head-major (they are contiguous in the [Hq, A, d] query). The program walks g's page list
once: each selected page's keys and values are loaded a single time for every query head of the group and every
active query (GQA without repeating KV), entries of -1 are skipped, the last page may be partial (keys >= P masked)
and keys with `key_valid` False are masked. An online softmax keeps the running max, sum and output in registers;
the program writes the output and the natural-log LSE of scale * q.k over the selected valid keys (out 0 and
lse -inf for a row that saw none), ready for `lse_merge` with the block part.

fp32 inputs use IEEE dot products (the interpreter and the GPU agree with the reference to ~1e-6); half inputs use
the tensor cores with fp32 accumulation; fp64 inputs are computed in fp32 (outputs keep the reference's dtypes).
Runs natively on CUDA and on the CPU under `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .losa import check_losa_page_size, check_losa_qkv

NEG_INF = float("-inf")


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


@triton.jit
def _union_sparse_kernel(
    q_ptr, k_ptr, v_ptr, page_ptr, valid_ptr, out_ptr, lse_ptr,
    n_rows, num_keys, num_slots, page_size, dim, scale,
    HAS_VALID: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):
    g = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    r_ok = rows < n_rows
    d = tl.arange(0, BLOCK_D)
    d_ok = d < dim
    q_rows = g * n_rows + rows  # row index into the flattened [Hq * A, d] query
    q = tl.load(q_ptr + q_rows[:, None] * dim + d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + g * num_keys * dim
    v_base = v_ptr + g * num_keys * dim
    n_idx = tl.arange(0, BLOCK_N)
    m = tl.full((BLOCK_M,), NEG_INF, tl.float32)
    l_sum = tl.zeros((BLOCK_M,), tl.float32)
    acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
    for slot in range(0, num_slots):
        page = tl.load(page_ptr + g * num_slots + slot)
        if page >= 0:
            for n0 in range(0, page_size, BLOCK_N):
                keys = page * page_size + n0 + n_idx
                ok = (n0 + n_idx < page_size) & (keys < num_keys)
                if HAS_VALID:
                    ok = ok & (tl.load(valid_ptr + keys, mask=ok, other=0) != 0)
                kt = tl.load(k_base + keys[None, :] * dim + d[:, None], mask=d_ok[:, None] & ok[None, :], other=0.0)
                s = tl.dot(q, kt, input_precision=PREC) * scale
                s = tl.where(ok[None, :], s, NEG_INF)
                vals = tl.load(v_base + keys[:, None] * dim + d[None, :], mask=ok[:, None] & d_ok[None, :],
                               other=0.0)
                # Online softmax; rows that have seen no valid key yet (m = -inf) stay at 0 instead of NaN.
                m_new = tl.maximum(m, tl.max(s, axis=1))
                m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
                alpha = tl.exp(m - m_safe)
                p = tl.exp(s - m_safe[:, None])
                l_sum = l_sum * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(vals.dtype), vals, input_precision=PREC)
                m = m_new
    has = l_sum > 0
    out = tl.where(has[:, None], acc / tl.where(has, l_sum, 1.0)[:, None], 0.0)
    lse = tl.where(has, m + tl.log(tl.where(has, l_sum, 1.0)), NEG_INF)
    tl.store(out_ptr + q_rows[:, None] * dim + d[None, :], out.to(out_ptr.dtype.element_ty),
             mask=r_ok[:, None] & d_ok[None, :])
    tl.store(lse_ptr + q_rows, lse.to(lse_ptr.dtype.element_ty), mask=r_ok)


def union_sparse_prefix_attention_triton(query, key, value, page_index, page_size, scale, key_valid=None):
    """Triton twin of `hf_fastslow.kernels.losa.union_sparse_prefix_attention` (same arguments, same outputs)."""
    _check_args(query, key, value, page_index, page_size, key_valid)
    hq, active, dim = query.shape
    hkv, num_keys, _ = key.shape
    out = torch.empty(hq, active, dim, dtype=query.dtype, device=query.device)
    # The reference's lse dtype: fp32, fp64 for fp64 inputs (computed here in fp32 all the same).
    lse = torch.empty(hq, active, dtype=torch.promote_types(query.dtype, torch.float32), device=query.device)
    n_rows = (hq // hkv) * active
    if n_rows == 0:
        return out, lse
    dtype = torch.float32 if key.dtype == torch.float64 else key.dtype
    precision = "ieee" if dtype == torch.float32 else "tf32"
    block_m = 16 if n_rows <= 16 else (32 if n_rows <= 32 else 64)
    valid = key_valid.to(torch.int8).contiguous() if key_valid is not None else page_index  # unread when None
    guard = torch.cuda.device(query.device) if query.is_cuda else contextlib.nullcontext()
    with guard:
        _union_sparse_kernel[(hkv, triton.cdiv(n_rows, block_m))](
            query.to(dtype).contiguous(), key.to(dtype).contiguous(), value.to(dtype).contiguous(),
            page_index.long().contiguous(), valid, out, lse,
            n_rows, num_keys, page_index.shape[1], int(page_size), dim, float(scale),
            HAS_VALID=key_valid is not None, BLOCK_M=block_m,
            BLOCK_N=min(64, max(16, _next_pow2(page_size))), BLOCK_D=max(16, _next_pow2(dim)), PREC=precision,
        )
    return out, lse


def _check_args(query, key, value, page_index, page_size, key_valid):
    # Shape checks shared with the reference; the page list's range and uniqueness are checked there too (they cost a
    # device sync, so only the cheap ones are repeated here).
    check_losa_qkv("union_sparse_prefix_attention", query, key, value)
    check_losa_page_size("union_sparse_prefix_attention", page_size)
    if page_index.dim() != 2 or page_index.shape[0] != key.shape[0] or page_index.dtype != torch.long:
        raise ValueError(f"union_sparse_prefix_attention: page_index must be ({key.shape[0]}, M) long; got "
                         f"{tuple(page_index.shape)} {page_index.dtype}.")
    if key_valid is not None and (key_valid.shape != (key.shape[1],) or key_valid.dtype != torch.bool):
        raise ValueError(f"union_sparse_prefix_attention: key_valid must be ({key.shape[1]},) bool; got "
                         f"{tuple(key_valid.shape)} {key_valid.dtype}.")
