"""Progressive residual quantization (PRQ) encode and fused decode, the two hot ops of QVG (Xi et al., "Quant VideoGen:
Auto-Regressive Long Video Generation via 2-Bit KV-Cache Quantization", arXiv 2602.02958): PyTorch references,
each behind a dispatcher with its Triton twin in `prq_triton.py`.

Layout: rows `R` (every leading dim flattened, e.g. batch x heads), `N` tokens, `D` channels, `S` stages.
- `centroids`: (S, R, C, D), any float dtype (the codec stores bf16); `labels`: (S, R, N) integer (uint8 stored).
- The residual is `x - c_1[l_1] - ... - c_S[l_S]`, subtracted stage by stage in fp32.
- It is quantized per token in blocks of `block_size` channels. Symmetric: code = round(r / s) + qpos in
  [0, 2 qpos], qpos = 2^(b-1) - 1, value = (code - qpos) * s. Asymmetric: code = round((r - z) / s) in [0, 2^b - 1],
  value = code * s + z.
- Scales cannot underflow: they are bfloat16 (fp32's exponent range), clamped to at least the smallest normal
  float (so never zero) and rounded *up* to bf16, so no value is clipped by the rounding of its scale; the zero
  point `z` is rounded *down* to bf16. Codes are computed against the stored (rounded) scale and zero point.
  (The paper stores FP8 E4M3 scales, which the method card found underflowing on LLM caches.)
- `codes`: uint8 (R, N, D * b / 8), packed along D with `pack_bits` (8 codes per `b` bytes, little-endian).
- Decode: `value + sum_t c_t[l_t]` in fp32 (added in stage order), cast to the output dtype (round to nearest even).
"""

from __future__ import annotations

import torch

from .dispatch import kernel
from .quantize import pack_bits, unpack_bits

PRQ_BITS = (2, 3, 4, 8)
_TINY = torch.finfo(torch.float32).tiny  # smallest normal fp32 (and bf16) number


def check_prq_args(dim: int, nbits: int, block_size: int) -> None:
    if nbits not in PRQ_BITS:
        raise ValueError(f"nbits must be one of {PRQ_BITS}, got {nbits}.")
    if not isinstance(block_size, int) or block_size <= 0 or block_size % 8:
        raise ValueError(f"block_size must be a positive multiple of 8, got {block_size}.")
    if dim % block_size:
        raise ValueError(f"block_size {block_size} does not divide the head dim {dim} (D % block_size != 0).")


def qpos(nbits: int) -> int:
    """Largest symmetric code magnitude: 2^(b-1) - 1 (1 at 2 bit: the three levels -1, 0, 1)."""
    return (1 << (nbits - 1)) - 1


def bf16_round_up(v: torch.Tensor) -> torch.Tensor:
    """Smallest bf16 value >= v for v >= 0 (fp32 in, fp32 out holding a bf16-exact value)."""
    bits = v.float().contiguous().view(torch.int32)
    inexact = (bits & 0xFFFF) != 0
    return ((bits & -65536) + inexact.to(torch.int32) * 65536).view(torch.float32)


def bf16_round_down(v: torch.Tensor) -> torch.Tensor:
    """Largest bf16 value <= v (any sign; fp32 in, fp32 out holding a bf16-exact value)."""
    bits = v.float().contiguous().view(torch.int32)
    # Truncating the low 16 bits rounds toward zero: down for positives, up (in value) for negatives, which then
    # need one more unit of magnitude.
    bump = ((bits & 0xFFFF) != 0) & (bits < 0)
    return ((bits & -65536) + bump.to(torch.int32) * 65536).view(torch.float32)


def prq_residual_reference(x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """x (R, N, D) minus each stage's centroid of each token, in fp32, stage by stage."""
    r = x.float()
    for t in range(centroids.shape[0]):
        c = centroids[t].float()
        r = r - torch.gather(c, -2, labels[t].long().unsqueeze(-1).expand(*labels[t].shape, c.shape[-1]))
    return r


def quantize_residual(r: torch.Tensor, nbits: int, block_size: int, asymmetric: bool):
    """Block-quantize r (R, N, D) fp32: (codes int32 (R, N, D), scales fp32, zeros fp32 or None), bf16-exact scales."""
    rows, n, d = r.shape
    rb = r.reshape(rows, n, d // block_size, block_size)
    if asymmetric:
        qmax = (1 << nbits) - 1
        zero = bf16_round_down(rb.amin(-1))
        scale = bf16_round_up(((rb.amax(-1) - zero) / qmax).clamp_min(_TINY))
        codes = torch.round((rb - zero.unsqueeze(-1)) / scale.unsqueeze(-1)).clamp_(0, qmax)
    else:
        qp = qpos(nbits)
        zero = None
        scale = bf16_round_up((rb.abs().amax(-1) / qp).clamp_min(_TINY))
        codes = torch.round(rb / scale.unsqueeze(-1)).clamp_(-qp, qp) + qp
    return codes.reshape(rows, n, d).to(torch.int32), scale, zero


def prq_encode_reference(
    x: torch.Tensor, centroids: torch.Tensor, labels: torch.Tensor, nbits: int, block_size: int, asymmetric: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Minus-centroids + block quantization + packing of x (R, N, D).

    Returns (codes uint8 (R, N, D*b/8), scales bf16 (R, N, D/B), zeros bf16 (R, N, D/B) or None).
    """
    check_prq_args(x.shape[-1], nbits, block_size)
    codes, scale, zero = quantize_residual(prq_residual_reference(x, centroids, labels), nbits, block_size, asymmetric)
    packed = pack_bits(codes, nbits)
    return packed, scale.to(torch.bfloat16), None if zero is None else zero.to(torch.bfloat16)


def prq_decode_reference(
    codes: torch.Tensor,
    scales: torch.Tensor,
    zeros: torch.Tensor | None,
    centroids: torch.Tensor,
    labels: torch.Tensor,
    nbits: int,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Unpack + dequantize the residual and add every stage's centroid: (R, N, D) in `dtype`."""
    rows, n, nblocks = scales.shape
    d = codes.shape[-1] * 8 // nbits
    block = d // nblocks
    q = unpack_bits(codes, nbits, d).float().reshape(rows, n, nblocks, block)
    if zeros is None:
        val = (q - float(qpos(nbits))) * scales.float().unsqueeze(-1)
    else:
        val = q * scales.float().unsqueeze(-1) + zeros.float().unsqueeze(-1)
    out = val.reshape(rows, n, d)
    for t in range(centroids.shape[0]):
        c = centroids[t].float()
        out = out + torch.gather(c, -2, labels[t].long().unsqueeze(-1).expand(*labels[t].shape, d))
    return out.to(dtype)


prq_encode = kernel(prq_encode_reference, "hf_fastslow.kernels.prq_triton:prq_encode_triton", name="prq_encode")
prq_decode = kernel(prq_decode_reference, "hf_fastslow.kernels.prq_triton:prq_decode_triton", name="prq_decode")

__all__ = [
    "PRQ_BITS",
    "bf16_round_down",
    "bf16_round_up",
    "check_prq_args",
    "prq_decode",
    "prq_decode_reference",
    "prq_encode",
    "prq_encode_reference",
    "prq_residual_reference",
    "qpos",
    "quantize_residual",
]
