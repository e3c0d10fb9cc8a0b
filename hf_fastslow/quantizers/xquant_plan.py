"""XQuant plans and factors: what each layer of an `XQuantCache` stores and how K and V are rebuilt from it, and the
SVD factors (computed once per model, layer, mode and dtype, kept on the model and shared by every cache). Part of
`hf_fastslow.quantizers.xquant` (Tomar et al., arXiv 2508.10395)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from ..evaluation.memory import storage_bytes
from ..integrations import apply_rotary_fn, decoder_layers
from .xquant_config import XQuantConfig

_FACTORS_ATTR = "_hf_fastslow_xquant_factors"


# ---------------------------------------------------------------------------------------------------------------------
# Per-layer static plan: what a layer stores and how K and V are rebuilt from it (no tensors: weights stay in the
# model, factors in the model's shared store)
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class _LayerPlan:
    layer_idx: int
    kind: str  # "x" | "latent" | "cl_base" | "cl_delta"
    bits: int
    attn: nn.Module
    hidden_size: int
    num_kv_heads: int
    head_dim: int
    rope: Callable
    k_norm: nn.Module | None = None
    sliding_window: int | None = None

    @property
    def d_kv(self) -> int:
        return self.num_kv_heads * self.head_dim

    @property
    def cl_projected(self) -> bool:
        """CL deltas live in the span of [W_k | W_v] (2*d_kv values) when that is narrower than X."""
        return self.kind == "cl_delta" and 2 * self.d_kv < self.hidden_size

    @property
    def factor_names(self) -> tuple[str, ...]:
        if self.kind == "latent":
            return ("u_k", "m_k", "u_v", "m_v")
        return ("u_kv",) if self.cl_projected else ()


def _check_supported(model: nn.Module) -> list[nn.Module]:
    config = model.config.get_text_config(decoder=True) if hasattr(model.config, "get_text_config") else model.config
    if getattr(config, "is_encoder_decoder", False):
        raise NotImplementedError("XQuantCache supports decoder-only causal LMs only.")
    if getattr(config, "kv_lora_rank", None) or getattr(config, "q_lora_rank", None):
        raise NotImplementedError(
            f"{type(model).__name__} uses multi-head latent attention (MLA): it already caches a latent, which "
            "XQuant does not re-quantize."
        )
    attns = []
    for layer in decoder_layers(model):
        attn = getattr(layer, "self_attn", None)
        if attn is None:
            raise NotImplementedError(f"{type(model).__name__}: decoder layer without `self_attn` is not supported.")
        for fused in ("qkv_proj", "query_key_value", "c_attn", "Wqkv", "kv_proj"):
            if hasattr(attn, fused):
                raise NotImplementedError(
                    f"{type(model).__name__} has fused projections (`{fused}`); XQuant needs separate `k_proj` and "
                    "`v_proj` Linear layers to rebuild K and V."
                )
        if not isinstance(getattr(attn, "k_proj", None), nn.Linear) or not isinstance(
            getattr(attn, "v_proj", None), nn.Linear
        ):
            raise NotImplementedError(f"{type(attn).__name__}: expected `k_proj` and `v_proj` nn.Linear layers.")
        if hasattr(attn, "v_norm") and not isinstance(attn.v_norm, nn.Identity):
            raise NotImplementedError(f"{type(attn).__name__}: value normalization (`v_norm`) is not supported.")
        if getattr(attn, "is_kv_shared_layer", False):
            raise NotImplementedError(f"{type(attn).__name__}: KV-sharing layers are not supported.")
        apply_rotary_fn(attn)  # raises if the modeling module has no RoPE helper
        attns.append(attn)
    return attns


def _build_plans(model: nn.Module, config: XQuantConfig) -> list[_LayerPlan]:
    attns = _check_supported(model)
    n_layers = len(attns)
    if config.mode == "cl" and config.base_layer >= n_layers:
        raise ValueError(f"XQuantConfig.base_layer={config.base_layer} but the model has {n_layers} layers.")
    plans = []
    for i, attn in enumerate(attns):
        head_dim = getattr(attn, "head_dim", None)
        d_kv, d = attn.k_proj.weight.shape
        if head_dim is None or d_kv % head_dim:
            raise NotImplementedError(f"{type(attn).__name__}: cannot infer the KV head layout (head_dim={head_dim}).")
        latent_ok = d_kv < d
        if config.mode == "x":
            kind = "x"
        elif config.mode == "latent":
            if not latent_ok:
                raise ValueError(
                    f"mode='latent' needs a KV width below the hidden size (GQA); layer {i} has d_kv={d_kv}, d={d}. "
                    "Use mode='x' or 'auto'."
                )
            kind = "latent"
        elif config.mode == "auto":
            kind = "latent" if latent_ok else "x"
        elif i < config.base_layer:
            kind = "latent" if latent_ok else "x"
        else:
            kind = "cl_base" if i == config.base_layer else "cl_delta"
        plan = _LayerPlan(
            layer_idx=i, kind=kind, bits=config.bits_for_layer(i), attn=attn, hidden_size=d,
            num_kv_heads=d_kv // head_dim, head_dim=head_dim, rope=apply_rotary_fn(attn),
            k_norm=getattr(attn, "k_norm", None), sliding_window=getattr(attn, "sliding_window", None) or None,
        )
        _check_group(config, plan)
        plans.append(plan)
    return plans


def _check_group(config: XQuantConfig, plan: _LayerPlan) -> None:
    if plan.bits == 16:
        return
    what, width = {
        "x": ("X", plan.hidden_size),
        "cl_base": ("X", plan.hidden_size),
        "latent": ("the value latent", plan.d_kv),
        "cl_delta": ("the CL delta", 2 * plan.d_kv if plan.cl_projected else plan.hidden_size),
    }[plan.kind]
    if width % config.group_size:
        raise ValueError(
            f"group_size {config.group_size} does not divide the width of {what} ({width}) at layer "
            f"{plan.layer_idx}; pick a group size that divides it (e.g. 64 or 32)."
        )


# ---------------------------------------------------------------------------------------------------------------------
# Factors: computed once per model, layer, mode and dtype, kept on the model, shared by every cache
# ---------------------------------------------------------------------------------------------------------------------
class _FactorStore:
    """`{(layer_idx, kind, dtype): (weights key, {name: tensor})}` attached to a model. The weights key (storage
    pointer, version counter, shape, dtype and device of W_k and W_v) changes when the weights are replaced or updated
    in place, which makes the entry stale."""

    def __init__(self):
        self.entries: dict[tuple, tuple[tuple, dict[str, torch.Tensor]]] = {}


def _weights_key(attn: nn.Module) -> tuple:
    key = []
    for linear in (attn.k_proj, attn.v_proj):
        w = linear.weight
        try:
            version = w._version
        except RuntimeError:  # inference-mode tensors have no version counter: only a replacement is noticed
            version = None
        key.append((w.data_ptr(), version, tuple(w.shape), w.dtype, str(w.device)))
    return tuple(key)


def _svd_factors(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (d, r<=d) = U S B^T  ->  (U, S B^T) with X U (S B^T) = X W; computed in float64."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return u, s[:, None] * vh


def _compute_layer_factors(attn: nn.Module, names: tuple[str, ...], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    w_k = attn.k_proj.weight.detach().t().double()
    w_v = attn.v_proj.weight.detach().t().double()
    out: dict[str, torch.Tensor] = {}
    if "u_k" in names:
        out["u_k"], out["m_k"] = _svd_factors(w_k)
        out["u_v"], out["m_v"] = _svd_factors(w_v)
    if "u_kv" in names:
        w_kv = torch.cat([w_k, w_v], dim=1)
        out["u_kv"] = _svd_factors(w_kv)[0]
        if "m_kv" in names:
            out["m_kv"] = out["u_kv"].t() @ w_kv
    return {k: v.to(dtype).contiguous() for k, v in out.items()}


def _shared_factors(model: nn.Module, plan: _LayerPlan, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The factors `plan` needs, from the model's shared store (computed on first use or after a weight change)."""
    names = plan.factor_names
    if not names:
        return {}
    store = model.__dict__.get(_FACTORS_ATTR)
    if store is None:
        store = _FactorStore()
        model.__dict__[_FACTORS_ATTR] = store
    key, weights = (plan.layer_idx, plan.kind, dtype), _weights_key(plan.attn)
    hit = store.entries.get(key)
    if hit is None or hit[0] != weights:
        hit = (weights, _compute_layer_factors(plan.attn, names, dtype))
        store.entries[key] = hit
    return hit[1]


def compute_xquant_factors(model: nn.Module, dtype: torch.dtype | None = None) -> list[dict[str, torch.Tensor]]:
    """Every factor of every layer, computed afresh from the model's weights (for inspection and tests): U_k, M_k,
    U_v, M_v when d_kv < d (latent mode), U_kv and M_kv = U_kv^T [W_k | W_v] when 2*d_kv < d (CL deltas).

    No calibration data: thin SVDs of W_k, W_v and [W_k | W_v]. Caches do not call this: each computes only the
    factors of its own mode, once, into a store on the model shared by every cache (`xquant_factor_nbytes`).
    """
    attns = _check_supported(model)
    dtype = dtype or next(model.parameters()).dtype
    out = []
    for attn in attns:
        d_kv, d = attn.k_proj.weight.shape
        names = (("u_k",) if d_kv < d else ()) + (("u_kv", "m_kv") if 2 * d_kv < d else ())
        out.append(_compute_layer_factors(attn, names, dtype))
    return out


def xquant_factor_nbytes(model: nn.Module) -> int:
    """Bytes of the factors XQuant caches have attached to `model` (shared by all its caches), by the storage walk."""
    return storage_bytes(model.__dict__.get(_FACTORS_ATTR))


def release_xquant_factors(model: nn.Module) -> None:
    """Drop the shared factors from `model` (the next cache or forward that needs them recomputes them)."""
    model.__dict__.pop(_FACTORS_ATTR, None)
