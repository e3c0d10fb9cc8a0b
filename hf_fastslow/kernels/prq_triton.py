"""Triton kernels of QVG's progressive residual quantization (Xi et al., Quant VideoGen, arXiv 2602.02958), behind the
dispatchers in `prq.py` and bit-identical to their PyTorch references:
- `prq_encode_triton`: minus every stage's centroid + block absmax (or min/max) + bf16 scale rounded up + codes +
  bit packing, one program per (token tile, channel block, row);
- `prq_decode_triton`: unpack + dequantize + add every stage's centroid in registers, one write of the output.

Format and rounding rules are documented in `prq.py`. The kernels run on CUDA and on the CPU under
`TRITON_INTERPRET=1`; floating-point contraction is disabled so that every rounding happens where the reference's
does, and bf16 conversions are spelled out in integer ops (the interpreter truncates where the GPU rounds).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .prq import check_prq_args
from .quantize_triton import _cast, _device_guard, _next_pow2, _round_half_even

_TINY = 1.1754943508222875e-38  # smallest normal fp32 = bf16 number


@triton.jit
def _residual_tile(x_ptr, c_ptr, l_ptr, rows64, toks, col, mask, tok_ok, n_tok, n_rows, n_clusters, dim, n_stages):
    """x - sum_t c_t[l_t] for a (tokens, words, 8) tile, in fp32, stage by stage."""
    r = tl.load(x_ptr + (rows64 * n_tok + toks)[:, None, None] * dim + col[None, :, :], mask=mask, other=0.0)
    r = r.to(tl.float32)
    for t in range(n_stages):
        lab = tl.load(l_ptr + (t * n_rows + rows64) * n_tok + toks, mask=tok_ok, other=0).to(tl.int64)
        c_row = (t * n_rows + rows64) * n_clusters + lab
        c = tl.load(c_ptr + c_row[:, None, None] * dim + col[None, :, :], mask=mask, other=0.0).to(tl.float32)
        r = r - c
    return r


@triton.jit
def _bf16_up(v):
    bits = v.to(tl.int32, bitcast=True)
    inexact = (bits & 0xFFFF) != 0
    bits = (bits & -65536) + tl.where(inexact, 65536, 0)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _bf16_down(v):
    bits = v.to(tl.int32, bitcast=True)
    bump = ((bits & 0xFFFF) != 0) & (bits < 0)
    bits = (bits & -65536) + tl.where(bump, 65536, 0)
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _to_bf16_exact(v):
    # v already holds a bf16 value: keep its top 16 bits (no rounding involved, identical on GPU and interpreter)
    return (v.to(tl.uint32, bitcast=True) >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _prq_encode_kernel(
    x_ptr, c_ptr, l_ptr, packed_ptr, scale_ptr, zero_ptr,
    n_tok, n_rows, n_clusters, dim, n_blocks, n_stages,
    NBITS: tl.constexpr, BLOCK: tl.constexpr, WORDS_P: tl.constexpr, BLOCK_T: tl.constexpr, ASYM: tl.constexpr,
    TINY: tl.constexpr,
):
    WORDS: tl.constexpr = BLOCK // 8
    pid_t = tl.program_id(0)
    g = tl.program_id(1)
    rows64 = tl.program_id(2).to(tl.int64)
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    w = tl.arange(0, WORDS_P)
    j = tl.arange(0, 8)
    tok_ok = toks < n_tok
    w_ok = w < WORDS
    col = g * BLOCK + w[:, None] * 8 + j[None, :]
    mask = tok_ok[:, None, None] & w_ok[None, :, None] & (j[None, None, :] < 8)
    r = _residual_tile(x_ptr, c_ptr, l_ptr, rows64, toks, col, mask, tok_ok, n_tok, n_rows, n_clusters, dim,
                       n_stages)

    if ASYM:
        QMAX: tl.constexpr = (1 << NBITS) - 1
        mn = tl.min(tl.min(tl.where(mask, r, float("inf")), axis=2), axis=1)
        mx = tl.max(tl.max(tl.where(mask, r, float("-inf")), axis=2), axis=1)
        mn = tl.where(tok_ok, mn, 0.0)
        mx = tl.where(tok_ok, mx, 0.0)
        zero = _bf16_down(mn)
        scale = _bf16_up(tl.maximum(tl.math.div_rn(mx - zero, QMAX * 1.0), TINY))
        v = tl.math.div_rn(r - zero[:, None, None], scale[:, None, None])
        q = tl.minimum(tl.maximum(_round_half_even(v), 0.0), QMAX * 1.0)
        tl.store(zero_ptr + (rows64 * n_tok + toks) * n_blocks + g, _to_bf16_exact(zero), mask=tok_ok)
    else:
        QP: tl.constexpr = (1 << (NBITS - 1)) - 1
        amax = tl.max(tl.max(tl.where(mask, tl.abs(r), 0.0), axis=2), axis=1)
        scale = _bf16_up(tl.maximum(tl.math.div_rn(amax, QP * 1.0), TINY))
        v = tl.math.div_rn(r, scale[:, None, None])
        a = _round_half_even(tl.abs(v))  # round half to even is symmetric: round(v) = sign(v) round(|v|)
        q = tl.minimum(tl.maximum(tl.where(v < 0, -a, a), -QP * 1.0), QP * 1.0) + QP
    tl.store(scale_ptr + (rows64 * n_tok + toks) * n_blocks + g, _to_bf16_exact(scale), mask=tok_ok)

    row_bytes = dim // 8 * NBITS
    base = (rows64 * n_tok + toks) * row_bytes
    if NBITS == 8:
        tl.store(packed_ptr + base[:, None, None] + col[None, :, :], q.to(tl.uint8), mask=mask)
    else:
        shifts = (j * NBITS).to(tl.uint32)
        word = tl.sum(q.to(tl.uint32) << shifts[None, None, :], axis=2)
        out_ptr = packed_ptr + base[:, None] + (g * WORDS + w)[None, :] * NBITS
        wmask = tok_ok[:, None] & w_ok[None, :]
        for k in tl.static_range(NBITS):
            tl.store(out_ptr + k, ((word >> (8 * k)) & 0xFF).to(tl.uint8), mask=wmask)


@triton.jit
def _prq_decode_kernel(
    packed_ptr, scale_ptr, zero_ptr, c_ptr, l_ptr, out_ptr,
    n_tok, n_rows, n_clusters, dim, n_blocks, n_stages,
    NBITS: tl.constexpr, BLOCK: tl.constexpr, WORDS_P: tl.constexpr, BLOCK_T: tl.constexpr, ASYM: tl.constexpr,
):
    WORDS: tl.constexpr = BLOCK // 8
    QMAX: tl.constexpr = (1 << NBITS) - 1
    pid_t = tl.program_id(0)
    g = tl.program_id(1)
    rows64 = tl.program_id(2).to(tl.int64)
    toks = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    w = tl.arange(0, WORDS_P)
    j = tl.arange(0, 8)
    tok_ok = toks < n_tok
    w_ok = w < WORDS
    col = g * BLOCK + w[:, None] * 8 + j[None, :]
    mask = tok_ok[:, None, None] & w_ok[None, :, None] & (j[None, None, :] < 8)
    row_bytes = dim // 8 * NBITS
    base = (rows64 * n_tok + toks) * row_bytes
    if NBITS == 8:
        codes = tl.load(packed_ptr + base[:, None, None] + col[None, :, :], mask=mask, other=0).to(tl.int32)
    else:
        word_ptr = packed_ptr + base[:, None] + (g * WORDS + w)[None, :] * NBITS
        wmask = tok_ok[:, None] & w_ok[None, :]
        word = tl.zeros((BLOCK_T, WORDS_P), dtype=tl.int32)
        for k in tl.static_range(NBITS):
            word = word | (tl.load(word_ptr + k, mask=wmask, other=0).to(tl.int32) << (8 * k))
        codes = (word[:, :, None] >> (j * NBITS)[None, None, :]) & QMAX
    sidx = (rows64 * n_tok + toks) * n_blocks + g
    scale = tl.load(scale_ptr + sidx, mask=tok_ok, other=0.0).to(tl.float32)
    if ASYM:
        zero = tl.load(zero_ptr + sidx, mask=tok_ok, other=0.0).to(tl.float32)
        val = codes.to(tl.float32) * scale[:, None, None] + zero[:, None, None]
    else:
        QP: tl.constexpr = (1 << (NBITS - 1)) - 1
        val = (codes.to(tl.float32) - QP * 1.0) * scale[:, None, None]
    for t in range(n_stages):
        lab = tl.load(l_ptr + (t * n_rows + rows64) * n_tok + toks, mask=tok_ok, other=0).to(tl.int64)
        c_row = (t * n_rows + rows64) * n_clusters + lab
        val = val + tl.load(c_ptr + c_row[:, None, None] * dim + col[None, :, :], mask=mask, other=0.0).to(tl.float32)
    out = _cast(val, out_ptr.dtype.element_ty)
    tl.store(out_ptr + (rows64 * n_tok + toks)[:, None, None] * dim + col[None, :, :], out, mask=mask)


def _tile(block_size: int) -> tuple[int, int]:
    words_p = _next_pow2(block_size // 8)
    block_t = max(1, min(64, 2048 // (words_p * 8)))
    return words_p, block_t


def _check_stage_tensors(centroids: torch.Tensor, labels: torch.Tensor, rows: int, n: int, d: int) -> None:
    s = centroids.shape[0]
    if centroids.dim() != 4 or centroids.shape[1] != rows or centroids.shape[-1] != d:
        raise ValueError(f"centroids must be (S, {rows}, C, {d}), got {tuple(centroids.shape)}.")
    if tuple(labels.shape) != (s, rows, n):
        raise ValueError(f"labels must be ({s}, {rows}, {n}), got {tuple(labels.shape)}.")


def prq_encode_triton(
    x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, nbits: int, block_size: int, asymmetric: bool
):
    """Triton twin of `prq_encode_reference` (same outputs, bit for bit)."""
    rows, n, d = x.shape
    check_prq_args(d, nbits, block_size)
    _check_stage_tensors(centroids, labels, rows, n, d)
    n_blocks = d // block_size
    packed = torch.empty((rows, n, d * nbits // 8), dtype=torch.uint8, device=x.device)
    scales = torch.empty((rows, n, n_blocks), dtype=torch.bfloat16, device=x.device)
    zeros = torch.empty((rows, n, n_blocks), dtype=torch.bfloat16, device=x.device) if asymmetric else None
    if rows and n:
        s = centroids.shape[0]
        words_p, block_t = _tile(block_size)
        x_c = x.contiguous()
        c_c = centroids.contiguous() if s else x_c  # a valid pointer even with no stage (never read)
        l_c = labels.contiguous() if s else x_c
        grid = (triton.cdiv(n, block_t), n_blocks, rows)
        with _device_guard(x):
            _prq_encode_kernel[grid](
                x_c, c_c, l_c, packed, scales, zeros if asymmetric else scales,
                n, rows, centroids.shape[-2], d, n_blocks, s,
                NBITS=nbits, BLOCK=block_size, WORDS_P=words_p, BLOCK_T=block_t, ASYM=bool(asymmetric), TINY=_TINY,
                enable_fp_fusion=False,
            )
    return packed, scales, zeros


def prq_decode_triton(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    centroids: torch.Tensor,
    labels: torch.Tensor,
    nbits: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Triton twin of `prq_decode_reference`: one fused pass (unpack, dequantize, add centroids, cast)."""
    rows, n, n_blocks = scales.shape
    d = codes.shape[-1] * 8 // nbits
    block_size = d // n_blocks
    check_prq_args(d, nbits, block_size)
    _check_stage_tensors(centroids, labels, rows, n, d)
    if dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}.")
    out = torch.empty((rows, n, d), dtype=dtype, device=codes.device)
    if rows and n:
        s = centroids.shape[0]
        words_p, block_t = _tile(block_size)
        sc = scales.contiguous()
        c_c = centroids.contiguous() if s else sc
        l_c = labels.contiguous() if s else sc
        grid = (triton.cdiv(n, block_t), n_blocks, rows)
        with _device_guard(codes):
            _prq_decode_kernel[grid](
                codes.contiguous(), sc, zeros.contiguous() if zeros is not None else sc, c_c, l_c, out,
                n, rows, centroids.shape[-2], d, n_blocks, s,
                NBITS=nbits, BLOCK=block_size, WORDS_P=words_p, BLOCK_T=block_t, ASYM=zeros is not None,
                enable_fp_fusion=False,
            )
    return out


__all__ = ["prq_decode_triton", "prq_encode_triton"]
