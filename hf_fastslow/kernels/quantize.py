"""Group-wise asymmetric (min/max) integer quantization with bit packing, and dequantize(+project) on read.

Used by the XQuant caches (Tomar et al., "XQuant: Breaking the Memory Wall for LLM Inference with KV Cache
Rematerialization", arXiv 2508.10395). Quantization always runs along the last dimension; callers move the axis
they quantize along (feature axis = per-token, token axis = per-channel) to the end first.

Storage format of a `QuantizedTensor` with `n` values per row, `b` bits and group size `g`:
- `packed`: uint8 `(..., n * b // 8)`. Every 8 consecutive values form one little-endian `8 * b`-bit word
  (value j in bits [b*j, b*j + b)), stored as `b` bytes. Works for b in {2, 3, 4, 8}; `n % 8 == 0`.
- `scale`, `minimum`: float16 `(..., n // g)`; value = q * scale + minimum, q in [0, 2**b - 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dispatch import kernel

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass
class QuantizedTensor:
    packed: torch.Tensor
    scale: torch.Tensor
    minimum: torch.Tensor
    nbits: int
    group_size: int
    numel_last: int

    @property
    def shape(self) -> tuple[int, ...]:
        return (*self.packed.shape[:-1], self.numel_last)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.packed, self.scale, self.minimum))

    def index_select(self, dim: int, index: torch.Tensor) -> QuantizedTensor:
        if dim < 0:
            dim = len(self.shape) + dim
        if dim >= len(self.shape) - 1:
            raise ValueError("cannot index the quantized (last) dimension")
        return QuantizedTensor(
            self.packed.index_select(dim, index),
            self.scale.index_select(dim, index),
            self.minimum.index_select(dim, index),
            self.nbits,
            self.group_size,
            self.numel_last,
        )

    def to(self, device) -> QuantizedTensor:
        return QuantizedTensor(
            self.packed.to(device), self.scale.to(device), self.minimum.to(device), self.nbits, self.group_size,
            self.numel_last,
        )


def check_quant_args(n: int, nbits: int, group_size: int) -> None:
    if nbits not in SUPPORTED_BITS:
        raise ValueError(f"nbits must be one of {SUPPORTED_BITS}, got {nbits}.")
    if group_size <= 0 or group_size % 8 != 0:
        raise ValueError(f"group_size must be a positive multiple of 8, got {group_size}.")
    if n % group_size != 0:
        raise ValueError(f"group_size {group_size} does not divide the quantized dimension {n}.")


def pack_bits(q: torch.Tensor, nbits: int) -> torch.Tensor:
    """Pack codes in [0, 2**nbits) along the last dim (a multiple of 8) into uint8: `nbits` bytes per 8 codes."""
    if nbits not in SUPPORTED_BITS:
        raise ValueError(f"nbits must be one of {SUPPORTED_BITS}, got {nbits}.")
    n = q.shape[-1]
    if n % 8 != 0:
        raise ValueError(f"the packed dimension must be a multiple of 8, got {n}.")
    if nbits == 8:
        return q.to(torch.uint8)
    words = q.to(torch.int32).reshape(*q.shape[:-1], n // 8, 8)
    shifts = torch.arange(8, device=q.device, dtype=torch.int32) * nbits
    word = (words << shifts).sum(dim=-1)  # 8*nbits <= 32 bits; for 4 bit the top bit wraps into the sign, harmlessly
    byte_shifts = torch.arange(nbits, device=q.device, dtype=torch.int32) * 8
    out = (word.unsqueeze(-1) >> byte_shifts) & 0xFF
    return out.to(torch.uint8).reshape(*q.shape[:-1], n // 8 * nbits)


def unpack_bits(packed: torch.Tensor, nbits: int, n: int) -> torch.Tensor:
    """Inverse of `pack_bits`: uint8 `(..., n*nbits/8)` -> int32 codes `(..., n)`."""
    if nbits == 8:
        return packed.to(torch.int32)
    b = packed.to(torch.int32).reshape(*packed.shape[:-1], n // 8, nbits)
    byte_shifts = torch.arange(nbits, device=packed.device, dtype=torch.int32) * 8
    word = (b << byte_shifts).sum(dim=-1)
    shifts = torch.arange(8, device=packed.device, dtype=torch.int32) * nbits
    codes = (word.unsqueeze(-1) >> shifts) & ((1 << nbits) - 1)
    return codes.reshape(*packed.shape[:-1], n)


def quantize_pack_reference(x: torch.Tensor, nbits: int, group_size: int) -> QuantizedTensor:
    """Quantize `x` (..., n) group-wise along the last dim and pack the codes (PyTorch reference)."""
    n = x.shape[-1]
    check_quant_args(n, nbits, group_size)
    xg = x.float().reshape(*x.shape[:-1], n // group_size, group_size)
    mn = xg.amin(dim=-1)
    mx = xg.amax(dim=-1)
    qmax = (1 << nbits) - 1
    # Scale and minimum are stored in fp16; quantize against the stored (rounded) values so that
    # dequantization reproduces exactly what the error bound promises.
    scale16 = ((mx - mn) / qmax).clamp_min(1e-6).to(torch.float16)
    min16 = mn.to(torch.float16)
    q = torch.round((xg - min16.float().unsqueeze(-1)) / scale16.float().unsqueeze(-1)).clamp_(0, qmax)
    packed = pack_bits(q.reshape(*x.shape[:-1], n).to(torch.int32), nbits)
    return QuantizedTensor(packed, scale16, min16, nbits, group_size, n)


def dequantize_reference(q: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unpack and dequantize a `QuantizedTensor` to `(..., n)` in `dtype` (PyTorch reference)."""
    codes = unpack_bits(q.packed, q.nbits, q.numel_last).float()
    g = q.group_size
    codes = codes.reshape(*codes.shape[:-1], q.numel_last // g, g)
    out = codes * q.scale.float().unsqueeze(-1) + q.minimum.float().unsqueeze(-1)
    return out.reshape(*q.packed.shape[:-1], q.numel_last).to(dtype)


def dequant_matmul_reference(
    q: QuantizedTensor, weight: torch.Tensor, bias: torch.Tensor | None = None, transposed: bool = False
) -> torch.Tensor:
    """`dequant(q) @ weight (+ bias)` in `weight.dtype`.

    `q` holds rows `(..., T, n)` (per-token layout) with `weight` `(n, m)`; with `transposed=True` it holds
    `(..., n, T)` (per-channel layout: quantized along tokens) and is transposed before the product.
    """
    x = dequantize_reference(q, weight.dtype)
    if transposed:
        x = x.transpose(-1, -2)
    out = x @ weight
    if bias is not None:
        out = out + bias
    return out


quantize_pack = kernel(quantize_pack_reference, "hf_fastslow.kernels.quantize_triton:quantize_pack_triton",
                       name="quantize_pack")
dequantize = kernel(dequantize_reference, "hf_fastslow.kernels.quantize_triton:dequantize_triton", name="dequantize")
dequant_matmul = kernel(dequant_matmul_reference, "hf_fastslow.kernels.quantize_triton:dequant_matmul_triton",
                        name="dequant_matmul")
