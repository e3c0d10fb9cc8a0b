"""Triton kernels of SVG-EAR (see `ear.py` for the math), each reproducing its PyTorch reference there:
- `ear_probe_triton`: the fused routing probe. One program per (batch, query head, tile of query centroids) streams
  the cluster-sorted keys twice: once for the row max and Z, once cluster by cluster accumulating E_ij in registers
  and subtracting the centroid term; logits are never written to memory.
- `block_sparse_attention_triton`: variable-size block-sparse attention over the cluster-sorted tokens. One program
  per (batch, query head, query cluster, tile of that cluster's queries) walks the key clusters its block map marks,
  then adds the compensation terms of all other non-empty clusters from the centroid row, in the same online-softmax
  state; it writes the output and the log-sum-exp (for `lse_merge`).

fp32 inputs use IEEE dot products (so the interpreter and the GPU agree with the reference to ~1e-6); half inputs
use the tensor cores with fp32 accumulation. Runs natively on CUDA and on the CPU under `TRITON_INTERPRET=1`.
"""

from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

NEG_INF = float("-inf")


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _guard(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _precision(t: torch.Tensor) -> str:
    return "ieee" if t.dtype == torch.float32 else "tf32"


@triton.jit
def _probe_kernel(
    qc_ptr, k_ptr, v_ptr, koff_ptr, kc_ptr, vm_ptr, err_ptr,
    n_q_heads, group, num_qc, num_k, num_kc, dim, scale,
    BLOCK_C: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr,
):
    bh = tl.program_id(0)
    b = bh // n_q_heads
    h = bh % n_q_heads
    g = b * (n_q_heads // group) + h // group  # flat (batch, kv head)
    ci = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    d = tl.arange(0, BLOCK_D)
    c_ok = ci < num_qc
    d_ok = d < dim
    qc = tl.load(qc_ptr + (bh.to(tl.int64) * num_qc + ci[:, None]) * dim + d[None, :],
                 mask=c_ok[:, None] & d_ok[None, :], other=0.0)
    k_base = k_ptr + g.to(tl.int64) * num_k * dim
    v_base = v_ptr + g.to(tl.int64) * num_k * dim
    n_idx = tl.arange(0, BLOCK_N)

    # Pass 1: row max and Z over all keys.
    m = tl.full((BLOCK_C,), NEG_INF, tl.float32)
    z = tl.zeros((BLOCK_C,), tl.float32)
    for n0 in range(0, num_k, BLOCK_N):
        n = n0 + n_idx
        n_ok = n < num_k
        kt = tl.load(k_base + n[None, :] * dim + d[:, None], mask=d_ok[:, None] & n_ok[None, :], other=0.0)
        s = tl.dot(qc, kt, input_precision=PREC) * scale
        s = tl.where(n_ok[None, :], s, NEG_INF)
        m_new = tl.maximum(m, tl.max(s, axis=1))
        z = z * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
        m = m_new

    # Pass 2: per key cluster, E_ij in registers, minus the centroid term.
    inv_z2 = 1.0 / (z * z)
    for j in range(0, num_kc):
        start = tl.load(koff_ptr + g.to(tl.int64) * (num_kc + 1) + j)
        end = tl.load(koff_ptr + g.to(tl.int64) * (num_kc + 1) + j + 1)
        acc = tl.zeros((BLOCK_C, BLOCK_D), tl.float32)
        for n0 in range(start, end, BLOCK_N):
            n = n0 + n_idx
            n_ok = n < end
            kt = tl.load(k_base + n[None, :] * dim + d[:, None], mask=d_ok[:, None] & n_ok[None, :], other=0.0)
            s = tl.dot(qc, kt, input_precision=PREC) * scale
            p = tl.where(n_ok[None, :], tl.exp(s - m[:, None]), 0.0)
            vt = tl.load(v_base + n[:, None] * dim + d[None, :], mask=n_ok[:, None] & d_ok[None, :], other=0.0)
            acc += tl.dot(p.to(vt.dtype), vt, input_precision=PREC)
        kc = tl.load(kc_ptr + (g.to(tl.int64) * num_kc + j) * dim + d, mask=d_ok, other=0.0).to(tl.float32)
        vm = tl.load(vm_ptr + (g.to(tl.int64) * num_kc + j) * dim + d, mask=d_ok, other=0.0).to(tl.float32)
        cl = tl.sum(qc.to(tl.float32) * kc[None, :], axis=1) * scale
        w = (end - start).to(tl.float32) * tl.exp(cl - m)
        diff = acc - w[:, None] * vm[None, :]
        e = tl.sum(diff * diff, axis=1) * inv_z2
        tl.store(err_ptr + (bh.to(tl.int64) * num_qc + ci) * num_kc + j, e, mask=c_ok)


def ear_probe_triton(q_centroids, k_perm, v_perm, k_offsets, k_centroids, v_means, scale):
    bsz, hq, cq, dim = q_centroids.shape
    hk, nk, ck = k_perm.shape[1], k_perm.shape[2], k_centroids.shape[2]
    err = torch.empty(bsz, hq, cq, ck, dtype=torch.float32, device=q_centroids.device)
    dtype = k_perm.dtype
    qc = q_centroids.to(dtype).contiguous()
    block_d = max(16, _next_pow2(dim))
    with _guard(k_perm):
        _probe_kernel[(bsz * hq, triton.cdiv(cq, 16))](
            qc, k_perm.contiguous(), v_perm.to(dtype).contiguous(), k_offsets.contiguous(),
            k_centroids.float().contiguous(), v_means.float().contiguous(), err,
            hq, hq // hk, cq, nk, ck, dim, float(scale),
            BLOCK_C=16, BLOCK_N=32, BLOCK_D=block_d, PREC=_precision(k_perm),
        )
    return err


@triton.jit
def _online_update(s, vals, m, l_sum, acc, PREC: tl.constexpr):
    # One online-softmax step; rows that have seen no key yet (m = -inf) stay at 0 instead of NaN.
    m_new = tl.maximum(m, tl.max(s, axis=1))
    m_safe = tl.where(m_new == NEG_INF, 0.0, m_new)
    alpha = tl.exp(m - m_safe)
    p = tl.exp(s - m_safe[:, None])
    l_sum = l_sum * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(vals.dtype), vals, input_precision=PREC)
    return m_new, l_sum, acc


@triton.jit
def _block_sparse_kernel(
    q_ptr, k_ptr, v_ptr, qoff_ptr, koff_ptr, mask_ptr, kc_ptr, vm_ptr, out_ptr, lse_ptr,
    n_q_heads, group, num_q, num_k, num_qc, num_kc, dim, scale,
    COMPENSATE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    PREC: tl.constexpr,
):
    bh = tl.program_id(0)
    i = tl.program_id(1)
    b = bh // n_q_heads
    h = bh % n_q_heads
    g = (b * (n_q_heads // group) + h // group).to(tl.int64)
    q_start = tl.load(qoff_ptr + g * (num_qc + 1) + i)
    q_end = tl.load(qoff_ptr + g * (num_qc + 1) + i + 1)
    rows = q_start + tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    if q_start + tl.program_id(2) * BLOCK_M < q_end:
        d = tl.arange(0, BLOCK_D)
        d_ok = d < dim
        r_ok = rows < q_end
        q_rows = bh.to(tl.int64) * num_q + rows
        q = tl.load(q_ptr + q_rows[:, None] * dim + d[None, :], mask=r_ok[:, None] & d_ok[None, :], other=0.0)
        k_base = k_ptr + g * num_k * dim
        v_base = v_ptr + g * num_k * dim
        n_idx = tl.arange(0, BLOCK_N)
        m = tl.full((BLOCK_M,), NEG_INF, tl.float32)
        l_sum = tl.zeros((BLOCK_M,), tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), tl.float32)
        mask_row = mask_ptr + (g * num_qc + i) * num_kc
        for j in range(0, num_kc):
            if tl.load(mask_row + j) != 0:
                start = tl.load(koff_ptr + g * (num_kc + 1) + j)
                end = tl.load(koff_ptr + g * (num_kc + 1) + j + 1)
                for n0 in range(start, end, BLOCK_N):
                    n = n0 + n_idx
                    n_ok = n < end
                    kt = tl.load(k_base + n[None, :] * dim + d[:, None], mask=d_ok[:, None] & n_ok[None, :],
                                 other=0.0)
                    s = tl.dot(q, kt, input_precision=PREC) * scale
                    s = tl.where(n_ok[None, :], s, NEG_INF)
                    vt = tl.load(v_base + n[:, None] * dim + d[None, :], mask=n_ok[:, None] & d_ok[None, :],
                                 other=0.0)
                    m, l_sum, acc = _online_update(s, vt, m, l_sum, acc, PREC)
        if COMPENSATE:
            qf = q.to(tl.float32)
            for c0 in range(0, num_kc, BLOCK_N):
                c = c0 + n_idx
                c_ok = c < num_kc
                start = tl.load(koff_ptr + g * (num_kc + 1) + c, mask=c_ok, other=0)
                end = tl.load(koff_ptr + g * (num_kc + 1) + c + 1, mask=c_ok, other=0)
                size = (end - start).to(tl.float32)
                chosen = tl.load(mask_row + c, mask=c_ok, other=1) != 0
                use = c_ok & (~chosen) & (size > 0)
                kc = tl.load(kc_ptr + (g * num_kc + c[None, :]) * dim + d[:, None],
                             mask=d_ok[:, None] & c_ok[None, :], other=0.0)
                s = tl.dot(qf, kc, input_precision="ieee") * scale + tl.log(tl.where(use, size, 1.0))[None, :]
                s = tl.where(use[None, :], s, NEG_INF)
                vm = tl.load(vm_ptr + (g * num_kc + c[:, None]) * dim + d[None, :],
                             mask=c_ok[:, None] & d_ok[None, :], other=0.0)
                m, l_sum, acc = _online_update(s, vm, m, l_sum, acc, "ieee")
        has = l_sum > 0
        out = tl.where(has[:, None], acc / tl.where(has, l_sum, 1.0)[:, None], 0.0)
        lse = tl.where(has, m + tl.log(tl.where(has, l_sum, 1.0)), NEG_INF)
        tl.store(out_ptr + q_rows[:, None] * dim + d[None, :], out, mask=r_ok[:, None] & d_ok[None, :])
        tl.store(lse_ptr + q_rows, lse, mask=r_ok)


def block_sparse_attention_triton(
    q_perm, k_perm, v_perm, q_offsets, k_offsets, block_mask, k_centroids, v_means, scale, compensate
):
    bsz, hq, nq, dim = q_perm.shape
    hk, nk = k_perm.shape[1], k_perm.shape[2]
    cq, ck = block_mask.shape[-2], block_mask.shape[-1]
    out = torch.zeros(bsz, hq, nq, dim, dtype=torch.float32, device=q_perm.device)
    lse = torch.full((bsz, hq, nq), NEG_INF, dtype=torch.float32, device=q_perm.device)
    largest = int((q_offsets[..., 1:] - q_offsets[..., :-1]).max())
    if largest == 0:
        return out, lse
    block_m = 16 if largest <= 16 else 32
    dtype = k_perm.dtype
    with _guard(q_perm):
        _block_sparse_kernel[(bsz * hq, cq, triton.cdiv(largest, block_m))](
            q_perm.to(dtype).contiguous(), k_perm.contiguous(), v_perm.to(dtype).contiguous(),
            q_offsets.contiguous(), k_offsets.contiguous(), block_mask.to(torch.int8).contiguous(),
            k_centroids.float().contiguous(), v_means.float().contiguous(), out, lse,
            hq, hq // hk, nq, nk, cq, ck, dim, float(scale),
            COMPENSATE=bool(compensate), BLOCK_M=block_m, BLOCK_N=16, BLOCK_D=max(16, _next_pow2(dim)),
            PREC=_precision(k_perm),
        )
    return out, lse
