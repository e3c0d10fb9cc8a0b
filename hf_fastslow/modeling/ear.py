"""SVG-EAR attention in models: the registered `"ear"` attention function for transformers LLMs (long prefill) and a
Wan self-attention processor for diffusers video DiTs. The op itself is `hf_fastslow.kernels.ear.ear_attention`.

LLMs (`enable_ear_attention(model, EARConfig(...))`): a forward whose query length is at least `min_q_len` runs EAR
in causal chunk mode (chunk 0, the attention sinks, and each query's own chunk exact; earlier chunks routed and
compensated; no token changes an earlier output); shorter forwards, decode steps included, run transformers' SDPA
unchanged. Padding reaches the function through the SDPA mask registered with the name: each batch row's padded
positions are taken out before EAR (so chunk 0 is the row's first real tokens). Masks that are not causal + padding
(sliding windows, packed sequences), dropout in training, and non-causal modules fall back to SDPA.
The KV cache is untouched: EAR changes the prefill compute, not what is stored.

Video DiTs (`apply_ear(transformer, EARConfig(...))`): every Wan self-attention runs non-causal EAR on the rotated
q/k/v; k-means is warm-started from the previous call of the same layer (`kmeans_warm_iters` iterations after the
first `kmeans_iters`), as SVG2 does across denoising steps; the first `dense_layers` blocks stay dense.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hf_fastslow.integrations.attention import (
    attention_implementation,
    register_attention,
    sdpa_attention_function,
    set_attention_implementation,
)
from hf_fastslow.integrations.attention_capture import attention_modules
from hf_fastslow.integrations.diffusers import (
    WanSelfAttentionProcessor,
    check_wan_transformer,
    restore_wan_self_attention_processors,
    set_wan_self_attention_processors,
    wan_apply_rotary,
)
from hf_fastslow.kernels.ear import ROUTERS, EARState, ear_attention

EAR_ATTENTION = "ear"


@dataclass
class EARConfig:
    density: float = 0.2  # fraction of routed (query, key) pairs computed exactly
    num_q_clusters: int = 32  # per query chunk (LLM) / per sequence (DiT); capped at the tokens
    num_k_clusters: int = 64  # per key chunk (LLM) / per sequence (DiT); capped at the tokens
    router: str = "error"  # "error" (EAR) or "score" (SVG2-style)
    compensate: bool = True  # False: skipped blocks are dropped (SVG2)
    causal_chunk: int = 512  # LLM: chunk length of the causal mode
    min_q_len: int = 2048  # LLM: forwards with fewer query tokens run dense SDPA
    kmeans_iters: int = 10
    kmeans_warm_iters: int = 2  # DiT: iterations when warm-started from the layer's previous call
    dense_layers: int = 0  # DiT: the first blocks stay dense
    seed: int = 0

    def __post_init__(self):
        if not 0.0 <= float(self.density) <= 1.0:
            raise ValueError(f"EARConfig.density must be in [0, 1]; got {self.density!r}.")
        if self.router not in ROUTERS:
            raise ValueError(f"EARConfig.router must be one of {ROUTERS}; got {self.router!r}.")
        for name in ("num_q_clusters", "num_k_clusters", "causal_chunk"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EARConfig.{name} must be >= 1; got {getattr(self, name)!r}.")
        for name in ("min_q_len", "kmeans_iters", "kmeans_warm_iters", "dense_layers"):
            if int(getattr(self, name)) < 0:
                raise ValueError(f"EARConfig.{name} must be >= 0; got {getattr(self, name)!r}.")

    def op_kwargs(self) -> dict:
        return dict(density=float(self.density), num_q_clusters=int(self.num_q_clusters),
                    num_k_clusters=int(self.num_k_clusters), router=self.router, compensate=bool(self.compensate),
                    seed=int(self.seed))


# -- transformers LLMs ----------------------------------------------------------------------------------------------
def _key_padding(mask: torch.Tensor | None, nq: int, nk: int) -> torch.Tensor | None | bool:
    """(B, Nk) valid keys if `mask` is causal + key padding, None if there is no mask, False if it is anything else."""
    if mask is None:
        return None
    if mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[-2:] != (nq, nk):
        return False
    key_valid = mask[:, 0].any(dim=-2)
    causal = torch.ones(nq, nk, dtype=torch.bool, device=mask.device).tril(nk - nq)
    expected = causal.unsqueeze(0) & key_valid.unsqueeze(1)
    query_valid = key_valid[:, nk - nq:]
    if not torch.equal(mask[:, 0][query_valid], expected[query_valid]):
        return False
    return key_valid


def ear_attention_forward(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
    """transformers attention function (q (B, H, N, D), k/v (B, Hk, S, D)) -> ((B, N, H, D), None)."""
    cfg: EARConfig | None = getattr(module, "_ear_config", None)
    sdpa = sdpa_attention_function()
    nq, nk = query.shape[2], key.shape[2]
    dense = (
        cfg is None or nq < max(cfg.min_q_len, 1) or not getattr(module, "is_causal", True)
        or (module.training and dropout > 0) or kwargs.get("softcap") is not None
    )
    key_valid = None if dense else _key_padding(attention_mask, nq, nk)
    if dense or key_valid is False:
        return sdpa(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)
    op = dict(cfg.op_kwargs(), causal=True, causal_chunk=int(cfg.causal_chunk), kmeans_iters=int(cfg.kmeans_iters),
              scale=scaling)
    if key_valid is None or bool(key_valid.all()):
        out = ear_attention(query, key, value, **op)
    else:
        out = torch.zeros_like(query)
        for b in range(query.shape[0]):
            keys = key_valid[b].nonzero().squeeze(-1)
            rows = key_valid[b, nk - nq:].nonzero().squeeze(-1)
            if rows.numel() == 0:
                continue
            out[b:b + 1, :, rows] = ear_attention(query[b:b + 1, :, rows], key[b:b + 1, :, keys],
                                                  value[b:b + 1, :, keys], **op)
    return out.transpose(1, 2).contiguous(), None


def enable_ear_attention(model: torch.nn.Module, config: EARConfig | None = None) -> torch.nn.Module:
    """Register `"ear"` (with the SDPA mask builder) and switch `model` to it; returns the model."""
    config = config or EARConfig()
    register_attention(EAR_ATTENTION, ear_attention_forward)
    modules = attention_modules(model)
    if not hasattr(model, "_ear_previous_attention"):
        model._ear_previous_attention = attention_implementation(model)
    for module in modules:
        module._ear_config = config
    set_attention_implementation(model, EAR_ATTENTION)
    return model


def disable_ear_attention(model: torch.nn.Module) -> torch.nn.Module:
    """Put back the attention implementation `enable_ear_attention` replaced."""
    previous = getattr(model, "_ear_previous_attention", None)
    if previous is None:
        return model
    for module in attention_modules(model):
        if hasattr(module, "_ear_config"):
            del module._ear_config
    set_attention_implementation(model, previous)
    del model._ear_previous_attention
    return model


# -- diffusers Wan video DiTs ---------------------------------------------------------------------------------------
class EARWanProcessor(WanSelfAttentionProcessor):
    """Wan self-attention with non-causal SVG-EAR on the rotated q/k/v (per layer warm-started clustering)."""

    def __init__(self, layer_index: int = 0, config: EARConfig | None = None):
        super().__init__(layer_index)
        self.config = config or EARConfig()
        self.state = EARState()
        self.last_density: float | None = None

    def attend(self, attn, query, key, value, rotary_emb, attention_mask):
        cfg = self.config
        if attention_mask is not None or self.layer_index < cfg.dense_layers:
            return super().attend(attn, query, key, value, rotary_emb, attention_mask)
        if rotary_emb is not None:
            query, key = wan_apply_rotary(query, rotary_emb), wan_apply_rotary(key, rotary_emb)
        q, k, v = (t.transpose(1, 2) for t in (query, key, value))
        kc = self.state.k_centroids
        warm = kc is not None and kc.shape[:2] == k.shape[:2] and kc.shape[-1] == k.shape[-1]
        if not warm:  # first call, or a new batch layout (CFG doubling): cluster from scratch
            self.state = EARState()
        iters = cfg.kmeans_warm_iters if warm else cfg.kmeans_iters
        out, info = ear_attention(q, k, v, **cfg.op_kwargs(), kmeans_iters=int(iters), state=self.state,
                                  return_info=True)
        self.last_density = info.density
        return out.transpose(1, 2)


def apply_ear(transformer, config: EARConfig | None = None):
    """Install an `EARWanProcessor` on every self-attention of a diffusers Wan transformer; returns the transformer."""
    check_wan_transformer(transformer, "apply_ear")
    config = config or EARConfig()
    if getattr(transformer, "_ear_previous_processors", None) is not None:
        remove_ear(transformer)
    transformer._ear_previous_processors = set_wan_self_attention_processors(
        transformer, lambda index: EARWanProcessor(index, config)
    )
    return transformer


def remove_ear(transformer):
    """Put back the processors `apply_ear` replaced (a no-op if EAR is not applied)."""
    previous = getattr(transformer, "_ear_previous_processors", None)
    if previous is not None:
        restore_wan_self_attention_processors(transformer, previous)
        transformer._ear_previous_processors = None
    return transformer
