"""XQuant storage: one stream of vectors per stored quantity, quantized in whole blocks with the newest tokens in full
precision. Part of `hf_fastslow.quantizers.xquant` (Tomar et al., arXiv 2508.10395)."""

from __future__ import annotations

import torch

from ..kernels.quantize import QuantizedTensor, dequant_matmul, dequantize, quantize_pack


# ---------------------------------------------------------------------------------------------------------------------
# Storage: one stream of vectors per stored quantity, quantized in whole blocks, newest tokens in full precision
# ---------------------------------------------------------------------------------------------------------------------
def _own(t: torch.Tensor | None) -> torch.Tensor | None:
    """`t` in a storage of its own size: a view would keep the whole buffer it was cut from alive."""
    if t is None or t.numel() == 0:
        return None
    if t.is_contiguous() and t.untyped_storage().nbytes() == t.numel() * t.element_size():
        return t
    return t.clone(memory_format=torch.contiguous_format)


def _cat_quantized(a: QuantizedTensor | None, b: QuantizedTensor, token_dim: int) -> QuantizedTensor:
    if a is None:
        return b
    return QuantizedTensor(
        torch.cat([a.packed, b.packed], dim=token_dim),
        torch.cat([a.scale, b.scale], dim=token_dim),
        torch.cat([a.minimum, b.minimum], dim=token_dim),
        b.nbits, b.group_size, a.numel_last + b.numel_last if token_dim == -1 else b.numel_last,
    )


def _slice_quantized(q: QuantizedTensor, start: int, stop: int, per_channel: bool) -> QuantizedTensor:
    """Tokens [start, stop) of `q` in storages of their own (start and stop are multiples of the block size)."""
    if not per_channel:
        return QuantizedTensor(_own(q.packed[:, start:stop]), _own(q.scale[:, start:stop]),
                               _own(q.minimum[:, start:stop]), q.nbits, q.group_size, q.numel_last)
    b0, b1 = start * q.nbits // 8, stop * q.nbits // 8
    g0, g1 = start // q.group_size, stop // q.group_size
    return QuantizedTensor(_own(q.packed[..., b0:b1]), _own(q.scale[..., g0:g1]), _own(q.minimum[..., g0:g1]),
                           q.nbits, q.group_size, stop - start)


class _Stream:
    """Vectors of one width for every cached token: a quantized prefix (whole blocks) and a full-precision tail.

    `per_channel=True` quantizes each channel along tokens (groups of `group_size` tokens, the paper's choice for the
    key latent); otherwise each token along its features. bits == 16 keeps the prefix unquantized. Every tensor a
    stream holds owns its storage (no views of larger buffers), so what it holds is what it needs.
    """

    def __init__(self, bits: int, group_size: int, per_channel: bool = False, outlier_channel: bool = False):
        self.bits, self.group_size = bits, group_size
        self.per_channel, self.outlier_channel = per_channel, outlier_channel
        self.q: QuantizedTensor | torch.Tensor | None = None
        self.outlier: torch.Tensor | None = None  # (B, Tq) fp16, channel 0 kept out of the quantizer
        self.res: torch.Tensor | None = None
        self.n_quantized = 0

    @property
    def n_residual(self) -> int:
        return 0 if self.res is None else self.res.shape[1]

    # -- writes -----------------------------------------------------------------------------------------------------
    def append(self, x: torch.Tensor) -> None:
        self.res = _own(x) if self.res is None else torch.cat([self.res, x], dim=1)

    def pop_blocks(self, block: int) -> torch.Tensor | None:
        """Remove and return the oldest whole blocks of the residual, or None if it holds less than one block."""
        n = (self.n_residual // block) * block
        if n == 0:
            return None
        out, self.res = self.res[:, :n], _own(self.res[:, n:])
        return out

    def store(self, x: torch.Tensor) -> None:
        """Quantize `x` (B, n, w) (n a multiple of the block size) and append it to the quantized prefix."""
        n = x.shape[1]
        if self.outlier_channel:
            out = x[..., 0].to(torch.float16)
            self.outlier = _own(out) if self.outlier is None else torch.cat([self.outlier, out], dim=1)
            x = x[..., 1:]
        if self.bits == 16:
            self.q = _own(x) if self.q is None else torch.cat([self.q, x], dim=1)
        elif self.per_channel:
            new = quantize_pack(x.transpose(1, 2).contiguous(), self.bits, self.group_size)
            self.q = _cat_quantized(self.q, new, token_dim=-1)
        else:
            new = quantize_pack(x.contiguous(), self.bits, self.group_size)
            self.q = _cat_quantized(self.q, new, token_dim=1)
        self.n_quantized += n

    # -- reads ------------------------------------------------------------------------------------------------------
    def dequant(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The quantized prefix as (B, Tq, w)."""
        if self.q is None:
            return None
        if self.bits == 16:
            x = self.q.to(dtype)
        elif self.per_channel:
            x = dequantize(self.q, dtype).transpose(1, 2)
        else:
            x = dequantize(self.q, dtype)
        if self.outlier_channel:
            x = torch.cat([self.outlier.to(dtype).unsqueeze(-1), x], dim=-1)
        return x

    def project(self, weight: torch.Tensor) -> torch.Tensor | None:
        """dequant(prefix) @ weight as (B, Tq, m), through the fused dequant+matmul kernel where available."""
        if self.q is None:
            return None
        w = weight[1:] if self.outlier_channel else weight
        if self.bits == 16:
            out = self.q.to(weight.dtype) @ w
        else:
            out = dequant_matmul(self.q, w, None, self.per_channel)
        if self.outlier_channel:
            out = out + self.outlier.to(weight.dtype).unsqueeze(-1) * weight[0]
        return out

    # -- edits ------------------------------------------------------------------------------------------------------
    def truncate(self, n_quantized: int, residual: torch.Tensor | None) -> None:
        """Keep the first `n_quantized` quantized tokens and make `residual` the full-precision tail."""
        if n_quantized == 0:
            self.q, self.outlier = None, None
        elif n_quantized < self.n_quantized:
            if self.bits == 16:
                self.q = _own(self.q[:, :n_quantized])
            else:
                self.q = _slice_quantized(self.q, 0, n_quantized, self.per_channel)
            if self.outlier is not None:
                self.outlier = _own(self.outlier[:, :n_quantized])
        self.n_quantized = n_quantized
        self.res = _own(residual)

    def drop_front(self, n: int) -> None:
        """Forget the oldest `n` quantized tokens (a multiple of the block size)."""
        if n == 0:
            return
        if n >= self.n_quantized:
            self.q, self.outlier = None, None
        elif isinstance(self.q, QuantizedTensor):
            self.q = _slice_quantized(self.q, n, self.n_quantized, self.per_channel)
        else:
            self.q = _own(self.q[:, n:])
        if self.outlier is not None:
            self.outlier = _own(self.outlier[:, n:])
        self.n_quantized -= n

    def map_batch(self, fn) -> None:
        if isinstance(self.q, QuantizedTensor):
            self.q = QuantizedTensor(fn(self.q.packed), fn(self.q.scale), fn(self.q.minimum), self.q.nbits,
                                     self.q.group_size, self.q.numel_last)
        elif self.q is not None:
            self.q = fn(self.q)
        if self.outlier is not None:
            self.outlier = fn(self.outlier)
        if self.res is not None:
            self.res = fn(self.res)
