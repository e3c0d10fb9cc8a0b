"""Triton kernel of the LSE merge (see `lse_merge.py` for the math and conventions), one program per block of rows.

Runs natively on CUDA and on the CPU under `TRITON_INTERPRET=1` (set before this module is imported).
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .lse_merge import check_lse_merge_args


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


@triton.jit
def _lse_merge_kernel(
    o1_ptr, l1_ptr, o2_ptr, l2_ptr, out_ptr, lse_ptr, n_rows, dim,
    BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_D)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    l1 = tl.load(l1_ptr + rows64, mask=row_ok, other=float("-inf")).to(tl.float32)
    l2 = tl.load(l2_ptr + rows64, mask=row_ok, other=float("-inf")).to(tl.float32)
    m = tl.maximum(l1, l2)
    m_safe = tl.where(m > float("-inf"), m, 0.0)
    w1 = tl.exp(l1 - m_safe)
    w2 = tl.exp(l2 - m_safe)
    total = w1 + w2
    inv = tl.where(total > 0, 1.0 / tl.where(total > 0, total, 1.0), 0.0)
    mask = row_ok[:, None] & (cols[None, :] < dim)
    offs = rows64[:, None] * dim + cols[None, :]
    o1 = tl.load(o1_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    o2 = tl.load(o2_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    a1 = (w1 * inv)[:, None]
    a2 = (w2 * inv)[:, None]
    out = tl.where(a1 > 0, o1 * a1, 0.0) + tl.where(a2 > 0, o2 * a2, 0.0)
    tl.store(out_ptr + offs, out.to(out_ptr.dtype.element_ty), mask=mask)
    lse = tl.where(total > 0, m_safe + tl.log(tl.where(total > 0, total, 1.0)), float("-inf"))
    tl.store(lse_ptr + rows64, lse, mask=row_ok)


def lse_merge_triton(
    o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor, lse2: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    check_lse_merge_args(o1, lse1, o2, lse2)
    dim = o1.shape[-1]
    a1, a2 = o1.reshape(-1, dim).contiguous(), o2.reshape(-1, dim).contiguous()
    b1, b2 = lse1.reshape(-1).contiguous(), lse2.reshape(-1).contiguous()
    n_rows = a1.shape[0]
    out = torch.empty_like(a1)
    lse = torch.empty(n_rows, dtype=torch.float32, device=o1.device)
    if n_rows:
        block_d = max(16, _next_pow2(dim))
        block_r = max(1, min(64, 4096 // block_d))
        guard = torch.cuda.device(o1.device) if o1.is_cuda else contextlib.nullcontext()
        with guard:
            _lse_merge_kernel[(triton.cdiv(n_rows, block_r),)](
                a1, b1, a2, b2, out, lse, n_rows, dim, BLOCK_R=block_r, BLOCK_D=block_d
            )
    return out.reshape(o1.shape), lse.reshape(lse1.shape)
