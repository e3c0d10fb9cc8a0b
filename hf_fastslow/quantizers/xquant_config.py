"""Configuration of the XQuant caches (Tomar et al., "XQuant: Breaking the Memory Wall for LLM Inference with KV Cache
Rematerialization", arXiv 2508.10395)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import torch

XQUANT_MODES = ("auto", "x", "latent", "cl")
XQUANT_BITS = (2, 3, 4, 8, 16)


@dataclass
class XQuantConfig:
    """How an `XQuantCache` stores the attention input X.

    Args:
        nbits: bits per stored value (2, 3, 4, 8; 16 = no quantization, stored in the compute dtype).
        group_size: values sharing one fp16 (scale, minimum) pair; a positive multiple of 8 that divides the quantized
            width (per-token groups) and `residual_length` (per-channel groups, which run along tokens).
        residual_length: the newest tokens kept unquantized (KIVI-style window); full blocks of this many tokens are
            quantized at once. A positive multiple of `group_size`.
        mode: "x" caches X itself (best for multi-head attention), "latent" caches X projected on the left singular
            vectors of W_k and W_v (GQA: same size as a KV cache, quantizes better), "cl" caches low-bit cross-layer
            deltas of X (XQuant-CL), "auto" picks "latent" when the KV width is below the hidden size, else "x".
        base_layer: XQuant-CL's base layer, stored at full width and `high_precision_bits`; deltas start after it.
        high_precision_layers: the first layers stored at `high_precision_bits` (the paper keeps 3 layers at 4 bit).
        high_precision_bits: bits for those layers and for the CL base layer.
        fp16_outlier_channel: keep channel 0 of the key latent (the top singular direction of W_k, which carries
            massive outliers) in fp16 ("latent" layers only).
        compute_dtype: dtype of rematerialized K/V and of the unquantized window; defaults to the model's dtype.
    """

    nbits: int = 4
    group_size: int = 64
    residual_length: int = 128
    mode: str = "auto"
    base_layer: int = 2
    high_precision_layers: int = 3
    high_precision_bits: int = 4
    fp16_outlier_channel: bool = False
    compute_dtype: torch.dtype | None = None

    def __post_init__(self):
        if self.nbits not in XQUANT_BITS:
            raise ValueError(f"XQuantConfig.nbits must be one of {XQUANT_BITS}, got {self.nbits}.")
        if self.high_precision_bits not in XQUANT_BITS:
            raise ValueError(
                f"XQuantConfig.high_precision_bits must be one of {XQUANT_BITS}, got {self.high_precision_bits}."
            )
        if self.mode not in XQUANT_MODES:
            raise ValueError(f"XQuantConfig.mode must be one of {XQUANT_MODES}, got {self.mode!r}.")
        if not isinstance(self.group_size, int) or self.group_size <= 0 or self.group_size % 8:
            raise ValueError(f"XQuantConfig.group_size must be a positive multiple of 8, got {self.group_size}.")
        if not isinstance(self.residual_length, int) or self.residual_length <= 0:
            raise ValueError(f"XQuantConfig.residual_length must be a positive int, got {self.residual_length}.")
        if self.residual_length % self.group_size:
            raise ValueError(
                f"XQuantConfig.residual_length ({self.residual_length}) must be a multiple of group_size "
                f"({self.group_size}): whole blocks of residual_length tokens are quantized at once."
            )
        if self.base_layer < 0 or self.high_precision_layers < 0:
            raise ValueError("XQuantConfig.base_layer and high_precision_layers must be >= 0.")
        if isinstance(self.compute_dtype, str):
            self.compute_dtype = getattr(torch, self.compute_dtype)

    def bits_for_layer(self, layer_idx: int) -> int:
        """Bits used for `layer_idx` (high-precision first layers and the CL base never go below `nbits`)."""
        if layer_idx < self.high_precision_layers or (self.mode == "cl" and layer_idx == self.base_layer):
            return max(self.nbits, self.high_precision_bits)
        return self.nbits

    def to_dict(self) -> dict:
        out = asdict(self)
        if out["compute_dtype"] is not None:
            out["compute_dtype"] = str(out["compute_dtype"]).replace("torch.", "")
        return out

    @classmethod
    def from_dict(cls, data: dict) -> XQuantConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown XQuantConfig keys: {sorted(unknown)}. Valid keys: {sorted(known)}.")
        return cls(**data)
