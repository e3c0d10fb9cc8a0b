"""Triton kernels for XQuant's group quantization (Tomar et al., XQuant, arXiv 2508.10395).

Three kernels sit behind the dispatchers in `quantize.py` and reproduce their PyTorch references:
- `quantize_pack_triton`: group min/max, fp16 scale/minimum, codes, bit packing; bit-identical to the reference.
- `dequantize_triton`: unpack + dequantize.
- `dequant_matmul_triton`: `deq(q) @ weight (+ bias)` with the dequantized operand built in registers tile by tile,
  for the per-token layout (quantized along the reduction axis) and the per-channel layout (quantized along tokens).

The storage format is the one documented in `quantize.py`. The kernels run natively on CUDA and on the CPU under
`TRITON_INTERPRET=1` (set before this module is imported); they avoid anything the interpreter lacks.
"""

from __future__ import annotations

import contextlib
import math

import torch
import triton
import triton.language as tl

from .dispatch import interpreter_enabled
from .quantize import QuantizedTensor, check_quant_args

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _next_pow2(v: int) -> int:
    return 1 << max(0, (int(v) - 1).bit_length())


def _device_guard(t: torch.Tensor):
    # Triton launches on the current CUDA device, which need not be the tensor's.
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


@triton.jit
def _round_half_even(v):
    # torch.round rounds half to even. The floor-based form is exact for the range that survives the clamp to
    # [0, 2**b - 1] (v - floor(v) is exact for v >= 0 by Sterbenz) and needs no libdevice call, which keeps the
    # interpreter and the GPU on the same arithmetic.
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    up = (d > 0.5) | ((d == 0.5) & odd)
    return tl.where(up, f + 1.0, f)


@triton.jit
def _cast(v, DTYPE: tl.constexpr):
    # fp32 -> bf16 with round-to-nearest-even spelled out in integer ops: the GPU's cvt rounds this way, but the
    # interpreter truncates, and the kernels must agree with torch's `.to(torch.bfloat16)` on both.
    if DTYPE == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return v.to(DTYPE)


@triton.jit
def _quantize_pack_kernel(
    x_ptr, packed_ptr, scale_ptr, min_ptr,
    n_rows, row_len, n_groups,
    NBITS: tl.constexpr, GROUP: tl.constexpr, WORDS_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    # Tile: BLOCK_R rows x one group, viewed as (words, 8 codes) so each packed word is one row of the tile.
    WORDS: tl.constexpr = GROUP // 8
    QMAX: tl.constexpr = (1 << NBITS) - 1
    pid_r = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    w = tl.arange(0, WORDS_P)
    j = tl.arange(0, 8)
    row_ok = rows < n_rows
    w_ok = w < WORDS
    rows64 = rows.to(tl.int64)

    col = g * GROUP + w[:, None] * 8 + j[None, :]
    mask = row_ok[:, None, None] & w_ok[None, :, None] & (j[None, None, :] < 8)
    x = tl.load(x_ptr + rows64[:, None, None] * row_len + col[None, :, :], mask=mask, other=0.0).to(tl.float32)

    mn = tl.min(tl.min(tl.where(mask, x, float("inf")), axis=2), axis=1)
    mx = tl.max(tl.max(tl.where(mask, x, float("-inf")), axis=2), axis=1)
    # Rows past the end would carry +-inf into inf - inf; give them finite values (their stores are masked).
    mn = tl.where(row_ok, mn, 0.0)
    mx = tl.where(row_ok, mx, 0.0)
    # IEEE division (div_rn): plain `/` may lower to an approximate divide on the GPU, which would change codes.
    scale16 = tl.maximum(tl.math.div_rn(mx - mn, QMAX * 1.0), 1e-6).to(tl.float16)
    min16 = mn.to(tl.float16)
    # Codes are computed against the fp16-rounded scale/minimum, exactly as the reference does.
    v = tl.math.div_rn(x - min16.to(tl.float32)[:, None, None], scale16.to(tl.float32)[:, None, None])
    q = tl.minimum(tl.maximum(_round_half_even(v), 0.0), QMAX * 1.0)

    if NBITS == 8:
        tl.store(packed_ptr + rows64[:, None, None] * row_len + col[None, :, :], q.to(tl.uint8), mask=mask)
    else:
        # Fields are disjoint, so the sum is the bitwise OR; uint32 keeps the 4-bit top field out of the sign bit.
        shifts = (j * NBITS).to(tl.uint32)
        word = tl.sum(q.to(tl.uint32) << shifts[None, None, :], axis=2)
        row_bytes = row_len // 8 * NBITS
        word_idx = g * WORDS + w
        out_ptr = packed_ptr + rows64[:, None] * row_bytes + word_idx[None, :] * NBITS
        wmask = row_ok[:, None] & w_ok[None, :]
        for k in tl.static_range(NBITS):
            tl.store(out_ptr + k, ((word >> (8 * k)) & 0xFF).to(tl.uint8), mask=wmask)

    tl.store(scale_ptr + rows64 * n_groups + g, scale16, mask=row_ok)
    tl.store(min_ptr + rows64 * n_groups + g, min16, mask=row_ok)


@triton.jit
def _dequantize_kernel(
    packed_ptr, scale_ptr, min_ptr, out_ptr,
    n_rows, row_len, n_groups,
    NBITS: tl.constexpr, GROUP: tl.constexpr, WORDS_P: tl.constexpr, BLOCK_R: tl.constexpr,
):
    WORDS: tl.constexpr = GROUP // 8
    QMAX: tl.constexpr = (1 << NBITS) - 1
    pid_r = tl.program_id(0)
    g = tl.program_id(1)
    rows = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    w = tl.arange(0, WORDS_P)
    j = tl.arange(0, 8)
    row_ok = rows < n_rows
    w_ok = w < WORDS
    rows64 = rows.to(tl.int64)
    col = g * GROUP + w[:, None] * 8 + j[None, :]
    mask = row_ok[:, None, None] & w_ok[None, :, None] & (j[None, None, :] < 8)

    if NBITS == 8:
        codes = tl.load(packed_ptr + rows64[:, None, None] * row_len + col[None, :, :], mask=mask, other=0)
        codes = codes.to(tl.int32)
    else:
        # A word's NBITS bytes (3 for 3-bit, so codes straddle bytes) are joined into one int32 before shifting.
        row_bytes = row_len // 8 * NBITS
        word_ptr = packed_ptr + rows64[:, None] * row_bytes + (g * WORDS + w)[None, :] * NBITS
        wmask = row_ok[:, None] & w_ok[None, :]
        word = tl.zeros((BLOCK_R, WORDS_P), dtype=tl.int32)
        for k in tl.static_range(NBITS):
            word = word | (tl.load(word_ptr + k, mask=wmask, other=0).to(tl.int32) << (8 * k))
        codes = (word[:, :, None] >> (j * NBITS)[None, None, :]) & QMAX

    scale = tl.load(scale_ptr + rows64 * n_groups + g, mask=row_ok, other=0.0).to(tl.float32)
    minimum = tl.load(min_ptr + rows64 * n_groups + g, mask=row_ok, other=0.0).to(tl.float32)
    val = codes.to(tl.float32) * scale[:, None, None] + minimum[:, None, None]
    out = _cast(val, out_ptr.dtype.element_ty)
    tl.store(out_ptr + rows64[:, None, None] * row_len + col[None, :, :], out, mask=mask)


@triton.jit
def _dequant_matmul_kernel(
    packed_ptr, scale_ptr, min_ptr, w_ptr, bias_ptr, out_ptr,
    M, N_OUT, K, row_bytes, n_groups, stride_wk, stride_wn,
    NBITS: tl.constexpr, GROUP: tl.constexpr, TRANSPOSED: tl.constexpr, HAS_BIAS: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, ONE_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    # A is (M, K) per batch. Per-token layout: packed row = m, position along it = k (groups along K).
    # Per-channel layout: packed row = batch * K + k, position along it = m (groups along M, the token axis).
    # ONE_GROUP: tiles never cross a group boundary along the quantized axis (BLOCK_K, or BLOCK_M when
    # TRANSPOSED, divides GROUP), so scale and minimum are one vector per tile instead of a gather per element.
    QMAX: tl.constexpr = (1 << NBITS) - 1
    pid = tl.program_id(0)
    batch = tl.program_id(1)
    n_tiles_n = tl.cdiv(N_OUT, BLOCK_N)
    # Neighbouring programs share one A tile (the costly one to decode) and sweep the small weight from L2.
    pid_m = pid // n_tiles_n
    pid_n = pid % n_tiles_n
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok = offs_m < M
    n_ok = offs_n < N_OUT

    j = tl.arange(0, 8)

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    # Codes are unpacked a word (8 codes, NBITS bytes; 3 bytes for 3 bits, so codes straddle bytes) at a time:
    # the bytes are joined into an int32 before shifting, then the (words, 8) block is flattened to the tile.
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_ok = offs_k < K
        a_mask = m_ok[:, None] & k_ok[None, :]
        if TRANSPOSED:
            # Packed rows are the features k; words of 8 codes run along the tokens m.
            rows = (batch * K + offs_k).to(tl.int64)
            if NBITS == 8:
                codes = tl.load(packed_ptr + rows[None, :] * row_bytes + offs_m[:, None], mask=a_mask, other=0)
                codes = codes.to(tl.int32)
            else:
                w_idx = pid_m * (BLOCK_M // 8) + tl.arange(0, BLOCK_M // 8)
                word_ptr = packed_ptr + rows[None, :] * row_bytes + w_idx[:, None] * NBITS
                word_mask = (w_idx < M // 8)[:, None] & k_ok[None, :]
                word = tl.zeros((BLOCK_M // 8, BLOCK_K), dtype=tl.int32)
                for byte in tl.static_range(NBITS):
                    word = word | (tl.load(word_ptr + byte, mask=word_mask, other=0).to(tl.int32) << (8 * byte))
                codes = (word[:, None, :] >> (j * NBITS)[None, :, None]) & QMAX
                codes = tl.reshape(codes, (BLOCK_M, BLOCK_K))
            if ONE_GROUP:
                gidx = rows * n_groups + (pid_m * BLOCK_M) // GROUP
                scale = tl.load(scale_ptr + gidx, mask=k_ok, other=0.0).to(tl.float32)[None, :]
                minimum = tl.load(min_ptr + gidx, mask=k_ok, other=0.0).to(tl.float32)[None, :]
            else:
                gidx = rows[None, :] * n_groups + offs_m[:, None] // GROUP
                scale = tl.load(scale_ptr + gidx, mask=a_mask, other=0.0).to(tl.float32)
                minimum = tl.load(min_ptr + gidx, mask=a_mask, other=0.0).to(tl.float32)
        else:
            # Packed rows are the tokens m; words of 8 codes run along the features k.
            rows = offs_m.to(tl.int64)
            if NBITS == 8:
                codes = tl.load(packed_ptr + rows[:, None] * row_bytes + offs_k[None, :], mask=a_mask, other=0)
                codes = codes.to(tl.int32)
            else:
                w_idx = k0 // 8 + tl.arange(0, BLOCK_K // 8)
                word_ptr = packed_ptr + rows[:, None] * row_bytes + w_idx[None, :] * NBITS
                word_mask = m_ok[:, None] & (w_idx < K // 8)[None, :]
                word = tl.zeros((BLOCK_M, BLOCK_K // 8), dtype=tl.int32)
                for byte in tl.static_range(NBITS):
                    word = word | (tl.load(word_ptr + byte, mask=word_mask, other=0).to(tl.int32) << (8 * byte))
                codes = (word[:, :, None] >> (j * NBITS)[None, None, :]) & QMAX
                codes = tl.reshape(codes, (BLOCK_M, BLOCK_K))
            if ONE_GROUP:
                gidx = rows * n_groups + k0 // GROUP
                scale = tl.load(scale_ptr + gidx, mask=m_ok, other=0.0).to(tl.float32)[:, None]
                minimum = tl.load(min_ptr + gidx, mask=m_ok, other=0.0).to(tl.float32)[:, None]
            else:
                gidx = rows[:, None] * n_groups + offs_k[None, :] // GROUP
                scale = tl.load(scale_ptr + gidx, mask=a_mask, other=0.0).to(tl.float32)
                minimum = tl.load(min_ptr + gidx, mask=a_mask, other=0.0).to(tl.float32)
        b = tl.load(w_ptr + offs_k[:, None] * stride_wk + offs_n[None, :] * stride_wn,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        # Round to the weight dtype before the product, as the reference dequantizes to weight.dtype first.
        a = _cast(tl.where(a_mask, codes.to(tl.float32) * scale + minimum, 0.0), b.dtype)
        if UPCAST_DOT:
            # The interpreter multiplies bf16 tiles as raw uint16; products of bf16 values are exact in fp32, so
            # an fp32 product gives what the tensor cores would.
            acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out_rows = (batch * M + offs_m).to(tl.int64)
    tl.store(out_ptr + out_rows[:, None] * N_OUT + offs_n[None, :], _cast(acc, out_ptr.dtype.element_ty),
             mask=m_ok[:, None] & n_ok[None, :])


def _row_tile(group_size: int) -> tuple[int, int]:
    words_p = _next_pow2(group_size // 8)
    # About 2K elements per program: enough bytes in flight per program without spilling registers.
    block_r = max(1, min(64, 2048 // (words_p * 8)))
    return words_p, block_r


def _check_quantized(q: QuantizedTensor) -> None:
    check_quant_args(q.numel_last, q.nbits, q.group_size)
    lead = tuple(q.packed.shape[:-1])
    if q.packed.dtype != torch.uint8 or q.packed.shape[-1] != q.numel_last * q.nbits // 8:
        raise ValueError(f"packed must be uint8 (..., {q.numel_last * q.nbits // 8}), got {q.packed.dtype} "
                         f"{tuple(q.packed.shape)}.")
    want = (*lead, q.numel_last // q.group_size)
    for name, t in (("scale", q.scale), ("minimum", q.minimum)):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}.")
        if t.device != q.packed.device:
            raise ValueError(f"{name} is on {t.device} but packed is on {q.packed.device}.")


def quantize_pack_triton(x: torch.Tensor, nbits: int, group_size: int) -> QuantizedTensor:
    """Quantize `x` (..., n) group-wise along the last dim and pack the codes (Triton; same output as the reference)."""
    n = x.shape[-1]
    check_quant_args(n, nbits, group_size)
    if x.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x must be float32, float16 or bfloat16, got {x.dtype}.")
    lead = tuple(x.shape[:-1])
    rows = math.prod(lead)
    n_groups = n // group_size
    x2 = x.contiguous().reshape(rows, n)
    packed = torch.empty((rows, n * nbits // 8), dtype=torch.uint8, device=x.device)
    scale = torch.empty((rows, n_groups), dtype=torch.float16, device=x.device)
    minimum = torch.empty((rows, n_groups), dtype=torch.float16, device=x.device)
    if rows > 0 and n > 0:
        words_p, block_r = _row_tile(group_size)
        grid = (triton.cdiv(rows, block_r), n_groups)
        with _device_guard(x):
            _quantize_pack_kernel[grid](
                x2, packed, scale, minimum, rows, n, n_groups,
                NBITS=nbits, GROUP=group_size, WORDS_P=words_p, BLOCK_R=block_r,
                # Bit-identical codes need the reference's exact sequence of roundings, with no contraction.
                enable_fp_fusion=False,
            )
    return QuantizedTensor(
        packed.reshape(*lead, n * nbits // 8), scale.reshape(*lead, n_groups), minimum.reshape(*lead, n_groups),
        nbits, group_size, n,
    )


def dequantize_triton(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unpack and dequantize a `QuantizedTensor` to `(..., n)` in `dtype` (Triton; same output as the reference)."""
    _check_quantized(q)
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dtype must be float32, float16 or bfloat16, got {dtype}.")
    lead = tuple(q.packed.shape[:-1])
    rows = math.prod(lead)
    n = q.numel_last
    n_groups = n // q.group_size
    out = torch.empty((rows, n), dtype=dtype, device=q.packed.device)
    if rows > 0 and n > 0:
        words_p, block_r = _row_tile(q.group_size)
        grid = (triton.cdiv(rows, block_r), n_groups)
        with _device_guard(q.packed):
            _dequantize_kernel[grid](
                q.packed.contiguous(), q.scale.contiguous(), q.minimum.contiguous(), out, rows, n, n_groups,
                NBITS=q.nbits, GROUP=q.group_size, WORDS_P=words_p, BLOCK_R=block_r,
                # The reference multiplies, rounds, then adds; a fused multiply-add would differ in the last bit.
                enable_fp_fusion=False,
            )
    return out.reshape(*lead, n)


def dequant_matmul_triton(
    q: QuantizedTensor, weight: torch.Tensor, bias: torch.Tensor | None = None, transposed: bool = False
) -> torch.Tensor:
    """Fused `dequant(q) @ weight (+ bias)` (Triton; same contract as `dequant_matmul_reference`).

    `transposed=False`: `q` holds `(..., T, n)` rows quantized along `n`. `transposed=True`: `q` holds `(..., n, T)`
    quantized along `T`, and the product uses its transpose. `weight` is `(n, m)`; the output is `(..., T, m)`.
    """
    _check_quantized(q)
    if weight.dim() != 2:
        raise ValueError(f"weight must be 2-D (n, m), got shape {tuple(weight.shape)}.")
    if weight.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"weight must be float32, float16 or bfloat16, got {weight.dtype}.")
    if weight.device != q.packed.device:
        raise ValueError(f"weight is on {weight.device} but q is on {q.packed.device}.")
    shape = q.shape
    if transposed:
        if len(shape) < 2:
            raise ValueError("transposed=True needs q of shape (..., n, T).")
        lead, n_feat, tokens = tuple(shape[:-2]), shape[-2], shape[-1]
        batches = math.prod(lead)
    else:
        lead, n_feat, tokens = tuple(shape[:-1]), shape[-1], None
        batches = 1
    if weight.shape[0] != n_feat:
        raise ValueError(f"weight has {weight.shape[0]} rows but q has {n_feat} features.")
    m_out = weight.shape[1]
    out_dtype = weight.dtype
    if bias is not None:
        if tuple(bias.shape) != (m_out,):
            raise ValueError(f"bias must have shape ({m_out},), got {tuple(bias.shape)}.")
        if bias.device != weight.device:
            raise ValueError(f"bias is on {bias.device} but weight is on {weight.device}.")
        # Keep the reference's dtype promotion of `x @ weight + bias`.
        out_dtype = torch.promote_types(weight.dtype, bias.dtype)
        if out_dtype not in _FLOAT_DTYPES:
            raise ValueError(f"bias dtype {bias.dtype} is not supported.")

    rows_m = tokens if transposed else math.prod(lead)
    out_shape = (*lead, tokens, m_out) if transposed else (*lead, m_out)
    out = torch.empty((batches * rows_m, m_out), dtype=out_dtype, device=weight.device)
    if out.numel() == 0:
        return out.reshape(out_shape)
    if n_feat == 0:
        out.zero_()
        if bias is not None:
            out += bias
        return out.reshape(out_shape)

    group = q.group_size
    # The block along the quantized axis divides the group where the group allows a large enough block (16 is the
    # smallest tl.dot tile), so that scale/minimum load once per tile (ONE_GROUP in the kernel).
    aligned = group & -group  # largest power of two dividing the group
    # 64 x 32 A tiles with 4 warps: ptxas (sm_90, triton 3.9) reports no spills for any bit width, layout or dtype,
    # while 64 x 64 spills in the per-token layout unless the warps double.
    block_m = min(64, max(16, _next_pow2(rows_m)))
    block_k = min(32, max(16, _next_pow2(n_feat)))
    if transposed and aligned >= 32:  # keep >= 32 token rows for the product; smaller groups gather instead
        block_m = min(block_m, aligned)
    if not transposed and aligned >= 16:
        block_k = min(block_k, aligned)
    one_group = group % (block_m if transposed else block_k) == 0
    block_n = min(64, max(16, _next_pow2(m_out)))
    # fp32 weights get the ieee product: tf32 would miss the reference by ~1e-3 relative.
    precision = "ieee" if weight.dtype == torch.float32 else "tf32"
    upcast = weight.dtype == torch.bfloat16 and interpreter_enabled()
    grid = (triton.cdiv(rows_m, block_m) * triton.cdiv(m_out, block_n), batches)
    with _device_guard(weight):
        _dequant_matmul_kernel[grid](
            q.packed.contiguous(), q.scale.contiguous(), q.minimum.contiguous(), weight,
            bias.contiguous() if bias is not None else weight, out,
            rows_m, m_out, n_feat, q.numel_last * q.nbits // 8, q.numel_last // q.group_size,
            weight.stride(0), weight.stride(1),
            NBITS=q.nbits, GROUP=q.group_size, TRANSPOSED=bool(transposed), HAS_BIAS=bias is not None,
            DOT_PRECISION=precision, UPCAST_DOT=upcast, ONE_GROUP=one_group,
            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
            # Keeps the A tile equal to the reference's dequantized values; the dot's own FMAs are unaffected.
            enable_fp_fusion=False,
        )
    return out.reshape(out_shape)


__all__ = ["dequant_matmul_triton", "dequantize_triton", "quantize_pack_triton"]
