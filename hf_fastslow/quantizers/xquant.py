"""XQuant and XQuant-CL caches: keep the low-bit attention input X (or its SVD latent, or cross-layer deltas) and
rematerialize K and V on every read (Tomar et al., "XQuant: Breaking the Memory Wall for LLM Inference with KV Cache
Rematerialization", arXiv 2508.10395).

A `Cache` never sees X, so `attach_xquant(model)` registers forward pre-hooks on every `self_attn`: a hook hands X
(the post-norm hidden state) and the position ids to the `XQuantCache` it finds in the call's kwargs, and does nothing
for any other cache. `XQuantCache.update` stores X and returns K and V with the same contract as
`DynamicLayer.update`: the tokens of earlier calls rebuilt from what the cache holds, the tokens of this call exactly as
the model computed them (as every K/V cache returns them).

Memory: a cache holds only its streams (codes, fp16 scales and minima, the full-precision window) and the RoPE
positions. It holds no copy of the model's weights: K and V are rebuilt with the model's own `k_proj`/`v_proj`
weights, and the SVD factors of the latent and CL modes are computed once per model, layer, mode and dtype, kept on
the model and shared by every cache (`xquant_factor_nbytes(model)`), and recomputed when the weights change.
Everything else (the CL accumulator, RoPE tables) lives only inside one forward pass.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from ..evaluation.memory import storage_bytes
from ..integrations import apply_rotary_fn, cache_from_kwargs, decoder_layers, rotary_embeddings
from ..kernels.quantize import QuantizedTensor, dequant_matmul, dequantize, quantize_pack
from .xquant_config import XQuantConfig

__all__ = [
    "XQuantCache",
    "XQuantConfig",
    "XQuantLayer",
    "attach_xquant",
    "compute_xquant_factors",
    "detach_xquant",
    "release_xquant_factors",
    "xquant_factor_nbytes",
]

_HOOKS_ATTR = "_hf_fastslow_xquant_hooks"
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


# ---------------------------------------------------------------------------------------------------------------------
# Cache
# ---------------------------------------------------------------------------------------------------------------------
class XQuantLayer(DynamicLayer):
    """One layer of an `XQuantCache`. It stores no K/V tensors: `update` rebuilds them from the layer's streams."""

    is_compileable = False
    is_sliding = False
    is_croppable = True

    def __init__(self, owner: XQuantCache, plan: _LayerPlan):
        super().__init__()
        self._owner = weakref.ref(owner)
        self.plan = plan
        cfg = owner.config
        g = cfg.group_size
        if plan.kind == "latent":
            self.streams = {
                "k": _Stream(plan.bits, g, per_channel=True, outlier_channel=cfg.fp16_outlier_channel),
                "v": _Stream(plan.bits, g),
            }
        elif plan.kind in ("x", "cl_base"):
            self.streams = {"x": _Stream(plan.bits, g)}
        else:
            self.streams = {"d": _Stream(plan.bits, g)}
        self.keys = self.values = None
        self.is_initialized = False
        # Sliding-window layers forget whole quantized blocks that no future query can see. Not in CL mode: later
        # layers' deltas are chained on earlier layers, and one mask serves all sliding layers, so none may evict.
        self.is_sliding = plan.sliding_window is not None
        self.can_evict = self.is_sliding and cfg.mode != "cl"
        self.evicted = 0
        # Set by `activate_past_recording` (assisted decoding): forget nothing until the next `crop`, which may undo
        # the last forward.
        self.record_past = getattr(self, "record_past", False)

    def lazy_initialization(self, key_states, value_states) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        return self._owner()._update_layer(self.plan.layer_idx, key_states, value_states)

    def get_seq_length(self) -> int:
        s = next(iter(self.streams.values()))
        return self.evicted + s.n_quantized + s.n_residual

    @property
    def n_quantized_total(self) -> int:
        return self.evicted + next(iter(self.streams.values())).n_quantized

    def eviction_point(self, past: int) -> int:
        """Tokens before this index are invisible to every query from position `past` on (window of the layer)."""
        if not self.can_evict:
            return 0
        block = self._owner().config.residual_length
        visible_from = max(0, past - self.plan.sliding_window + 1)
        return max(self.evicted, min(self.n_quantized_total, visible_from // block * block))

    def evict(self, point: int) -> None:
        """Forget the quantized tokens before `point` (from `eviction_point`)."""
        if point > self.evicted:
            for s in self.streams.values():
                s.drop_front(point - self.evicted)
            self.evicted = point

    def activate_past_recording(self) -> None:
        self.record_past = True

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        past = self.get_seq_length()
        offset = self.eviction_point(past)
        return past - offset + query_length, offset

    def get_max_length(self) -> int:
        return -1

    def reset(self) -> None:
        self.__init__(self._owner(), self.plan)

    # Cache-level methods handle crop / reorder (CL layers depend on each other).
    def crop(self, tokens_to_remove: int) -> None:
        raise RuntimeError("Crop an XQuantCache as a whole (`cache.crop(-n)`), not one of its layers.")

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        for s in self.streams.values():
            s.map_batch(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_repeat_interleave(self, repeats: int) -> None:
        for s in self.streams.values():
            s.map_batch(lambda t: t.repeat_interleave(repeats, dim=0))

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        for s in self.streams.values():
            s.map_batch(lambda t: t[indices])


class XQuantCache(Cache):
    """A transformers `Cache` that stores the (quantized) attention input X instead of K and V.

    ```python
    cache = XQuantCache(model, XQuantConfig(nbits=4))
    out = model.generate(**inputs, cache=cache)          # past_key_values=cache on transformers < 5.24
    cache.nbytes()                                        # bytes this cache holds (every storage it references)
    cache.factor_nbytes()                                 # bytes of the SVD factors it shares with other caches
    ```
    Or, after `import hf_fastslow`: `model.generate(**inputs, cache_implementation="xquant", cache_config={...})`.

    Modes ("x", "latent", "cl", "auto") are described in `XQuantConfig`. The cache is bound to the model it was built
    for (its weights rebuild K and V); `attach_xquant(model)` is called for you. `copy.deepcopy(cache)` copies what
    the cache stores and stays bound to the same model.
    """

    is_compileable = False

    def __init__(self, model: nn.Module, config: XQuantConfig | dict | None = None, **kwargs):
        if config is None:
            config = XQuantConfig(**kwargs)
        elif isinstance(config, dict):
            config = XQuantConfig.from_dict({**config, **kwargs})
        elif kwargs:
            raise TypeError("Pass either an XQuantConfig or keyword arguments, not both.")
        if not isinstance(model, nn.Module) or not hasattr(model, "config"):
            raise TypeError(f"XQuantCache needs the transformers model it will serve, got {type(model).__name__}.")
        self.config = config
        self.compute_dtype = config.compute_dtype or next(model.parameters()).dtype
        plans = _build_plans(model, config)
        self._model_ref = weakref.ref(model)
        self._attn_to_layer = {id(p.attn): p.layer_idx for p in plans}
        super().__init__(layers=[XQuantLayer(self, p) for p in plans])
        self.positions: torch.Tensor | None = None  # (B, T) int32, one row of RoPE positions per sequence
        self._stash: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._clear_transients()
        for plan in plans:  # compute the shared factors now rather than in the first forward
            self._factors(plan)
        attach_xquant(model)

    # -- public ---------------------------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        model = self._model_ref()
        if model is None:
            raise RuntimeError("The model this XQuantCache was built for no longer exists.")
        return model

    def nbytes(self) -> int:
        """Bytes this cache holds: every storage reachable from it, each counted once at its full size (packed codes,
        fp16 scales and minima, the full-precision window, outlier channel, positions). Factors shared through the
        model are not included (`factor_nbytes`)."""
        return storage_bytes(self)

    def factor_nbytes(self) -> int:
        """Bytes of the shared factors this cache uses (kept on the model, shared with every other XQuantCache)."""
        return storage_bytes([self._factors(layer.plan) for layer in self.layers])

    def fp16_kv_nbytes(self) -> int:
        """What an fp16 K/V cache would hold for the same tokens (the paper's reference size)."""
        n_tokens = self.get_seq_length()
        batch = 0 if self.positions is None else self.positions.shape[0]
        total = 0
        for layer in self.layers:
            window = layer.plan.sliding_window
            kept = min(n_tokens, window - 1) if window else n_tokens  # what DynamicSlidingWindowLayer keeps
            total += 2 * batch * kept * layer.plan.d_kv * 2
        return total

    def reset(self) -> None:
        for layer in self.layers:
            layer.reset()
        self.positions = None
        self._stash.clear()
        self._clear_transients()

    def __deepcopy__(self, memo: dict) -> XQuantCache:
        """Copy the stored tensors; share the model binding (plans hold the model's attention modules)."""
        for layer in self.layers:
            memo[id(layer.plan)] = layer.plan
        new = self.__class__.__new__(self.__class__)
        memo[id(self)] = new
        for name, value in self.__dict__.items():
            new.__dict__[name] = copy.deepcopy(value, memo)
        for layer in new.layers:
            layer._owner = weakref.ref(new)
        return new

    # -- hook side --------------------------------------------------------------------------------------------------
    def _receive_input(self, attn: nn.Module, hidden_states: torch.Tensor, position_ids: torch.Tensor | None) -> None:
        layer_idx = self._attn_to_layer.get(id(attn))
        if layer_idx is None or self.layers[layer_idx].plan.attn is not attn:
            raise RuntimeError(
                "This XQuantCache was built for another model: K and V are rebuilt from the weights of the model "
                "passed to XQuantCache(model, ...). Build one cache per model."
            )
        self._stash[layer_idx] = (hidden_states.detach(), None if position_ids is None else position_ids.detach())

    # -- per-forward state ------------------------------------------------------------------------------------------
    def _clear_transients(self) -> None:
        """Forget what lives only inside one forward pass: RoPE tables, the CL accumulators."""
        self._rope_memo: dict = {}
        self._cl_flush: tuple[int, torch.Tensor] | None = None
        self._cl_read: tuple[int, int, torch.Tensor] | None = None

    def _factors(self, plan: _LayerPlan) -> dict[str, torch.Tensor]:
        return _shared_factors(self.model, plan, self.compute_dtype)

    def _kv_weights(self, plan: _LayerPlan):
        """The model's own W_k, W_v as (d, d_kv) views (cast only if the compute dtype differs) and biases."""
        out = []
        for linear in (plan.attn.k_proj, plan.attn.v_proj):
            w = linear.weight.detach().t()
            b = None if linear.bias is None else linear.bias.detach()
            out.append(w if w.dtype == self.compute_dtype else w.to(self.compute_dtype))
            out.append(b if b is None or b.dtype == self.compute_dtype else b.to(self.compute_dtype))
        return out  # w_k, b_k, w_v, b_v

    # -- update -----------------------------------------------------------------------------------------------------
    def _update_layer(self, layer_idx: int, key_states: torch.Tensor, value_states: torch.Tensor):
        layer: XQuantLayer = self.layers[layer_idx]
        stash = self._stash.pop(layer_idx, None)
        if stash is None:
            raise RuntimeError(
                f"XQuantCache.update(layer {layer_idx}) got no attention input: the model running it was not prepared "
                "with attach_xquant(), or this cache belongs to another model."
            )
        x, position_ids = stash
        bsz, n_new = x.shape[0], x.shape[1]
        if key_states.shape[0] != bsz or key_states.shape[-2] != n_new:
            raise ValueError(
                f"XQuantCache: key_states {tuple(key_states.shape)} do not match the attention input "
                f"{tuple(x.shape)} at layer {layer_idx}."
            )
        if self.positions is not None and self.positions.shape[0] != bsz:
            raise ValueError(
                f"XQuantCache holds a batch of {self.positions.shape[0]} sequences, got {bsz}; call cache.reset() "
                "or build a new cache for a new batch."
            )
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        if layer_idx == 0:
            self._clear_transients()
            self._append_positions(position_ids, bsz, n_new, x.device)
        past = layer.get_seq_length()
        start = layer.eviction_point(past)  # the point get_mask_sizes announced for this forward
        if not layer.record_past:
            layer.evict(start)
        factors = self._factors(layer.plan)
        self._append_sources(layer, x.to(self.compute_dtype), factors)
        self._flush(layer, factors)
        if past > start:
            old_k, old_v = self._rematerialize(layer, factors, start, past)
            keys = torch.cat([old_k.to(key_states.dtype), key_states], dim=-2)
            values = torch.cat([old_v.to(value_states.dtype), value_states], dim=-2)
        else:
            keys, values = key_states, value_states
        if layer_idx == len(self.layers) - 1:
            self._clear_transients()
        return keys, values

    def _append_positions(self, position_ids, bsz, n_new, device) -> None:
        past = 0 if self.positions is None else self.positions.shape[1]
        if position_ids is None:
            pos = torch.arange(past, past + n_new, device=device).unsqueeze(0)
        else:
            pos = position_ids
        pos = pos.to(torch.int32).expand(bsz, n_new)
        self.positions = pos.clone() if self.positions is None else torch.cat([self.positions, pos], dim=1)

    def _append_sources(self, layer: XQuantLayer, x: torch.Tensor, factors: dict) -> None:
        plan = layer.plan
        if plan.kind == "latent":
            layer.streams["k"].append(x @ factors["u_k"])
            layer.streams["v"].append(x @ factors["u_v"])
        elif plan.kind in ("x", "cl_base"):
            layer.streams["x"].append(x)
        else:
            layer.streams["d"].append(x @ factors["u_kv"] if plan.cl_projected else x)

    def _flush(self, layer: XQuantLayer, factors: dict) -> None:
        plan, block = layer.plan, self.config.residual_length
        if plan.kind in ("latent", "x"):
            for s in layer.streams.values():
                popped = s.pop_blocks(block)
                if popped is not None:
                    s.store(popped)
            return
        if plan.kind == "cl_base":
            s = layer.streams["x"]
            popped = s.pop_blocks(block)
            if popped is not None:
                before = s.n_quantized
                s.store(popped)
                # The flush accumulator carries the reconstructed X of the new block down the layer chain, so that
                # every delta is taken against what will be rebuilt (errors do not accumulate).
                self._cl_flush = (plan.layer_idx, s.dequant(self.compute_dtype)[:, before:])
            return
        s = layer.streams["d"]
        popped = s.pop_blocks(block)
        if popped is None:
            return
        flush = self._cl_flush
        if flush is None or flush[0] != plan.layer_idx - 1 or flush[1].shape[1] != popped.shape[1]:
            raise RuntimeError(
                "XQuantCache (mode='cl'): layers must be updated in order within a forward pass; got layer "
                f"{plan.layer_idx} out of sequence."
            )
        acc = flush[1]
        u_kv = factors.get("u_kv")
        before = s.n_quantized
        s.store(popped - (acc @ u_kv if u_kv is not None else acc))
        delta = s.dequant(self.compute_dtype)[:, before:]
        self._cl_flush = (plan.layer_idx, acc + (delta @ u_kv.t() if u_kv is not None else delta))

    # -- rematerialization ------------------------------------------------------------------------------------------
    def _cl_accumulator(self, layer_idx: int, factors: dict) -> torch.Tensor | None:
        """Reconstructed X of the quantized tokens at CL layer `layer_idx` (base + deltas), carried along the layer
        loop of one forward pass (and dropped at its end)."""
        base_idx = self.config.base_layer
        base_stream = self.layers[base_idx].streams["x"]
        n_q = base_stream.n_quantized
        if n_q == 0:
            return None
        if layer_idx == base_idx:
            acc = base_stream.dequant(self.compute_dtype)
        elif self._cl_read is not None and self._cl_read[0] == layer_idx - 1 and self._cl_read[1] == n_q:
            acc = self._cl_read[2] + self._delta_full_width(self.layers[layer_idx], factors)
        else:
            acc = base_stream.dequant(self.compute_dtype)
            for i in range(base_idx + 1, layer_idx + 1):
                acc = acc + self._delta_full_width(self.layers[i], self._factors(self.layers[i].plan))
        self._cl_read = (layer_idx, n_q, acc)
        return acc

    def _delta_full_width(self, layer: XQuantLayer, factors: dict) -> torch.Tensor:
        s = layer.streams["d"]
        if layer.plan.cl_projected:
            return s.project(factors["u_kv"].t())
        return s.dequant(self.compute_dtype)

    def _rematerialize(self, layer: XQuantLayer, factors: dict, start: int, stop: int):
        """K (post-RoPE) and V of tokens [start, stop), as (B, n_kv_heads, stop - start, head_dim)."""
        plan, ev, n_qt = layer.plan, layer.evicted, layer.n_quantized_total
        q_rows = slice(start - ev, min(stop, n_qt) - ev) if start < n_qt else None
        r_rows = slice(max(start, n_qt) - n_qt, stop - n_qt) if stop > n_qt else None
        w_k, b_k, w_v, b_v = self._kv_weights(plan)
        k_parts, v_parts = [], []
        if plan.kind == "latent":
            sk, sv, m_k, m_v = layer.streams["k"], layer.streams["v"], factors["m_k"], factors["m_v"]
            if q_rows is not None:
                k_parts.append(sk.project(m_k)[:, q_rows])
                v_parts.append(sv.project(m_v)[:, q_rows])
            if r_rows is not None:
                k_parts.append(sk.res[:, r_rows] @ m_k)
                v_parts.append(sv.res[:, r_rows] @ m_v)
        elif plan.kind == "x":
            s = layer.streams["x"]
            if q_rows is not None:
                k_parts.append(s.project(w_k)[:, q_rows])
                v_parts.append(s.project(w_v)[:, q_rows])
            if r_rows is not None:
                k_parts.append(s.res[:, r_rows] @ w_k)
                v_parts.append(s.res[:, r_rows] @ w_v)
        else:
            if q_rows is not None:
                acc = self._cl_accumulator(plan.layer_idx, factors)[:, q_rows]
                k_parts.append(acc @ w_k)
                v_parts.append(acc @ w_v)
            if r_rows is not None:
                s = layer.streams["x" if plan.kind == "cl_base" else "d"]
                x = s.res[:, r_rows]
                if plan.cl_projected:
                    x = x @ factors["u_kv"].t()
                k_parts.append(x @ w_k)
                v_parts.append(x @ w_v)
        k = torch.cat(k_parts, dim=1) if len(k_parts) > 1 else k_parts[0]
        v = torch.cat(v_parts, dim=1) if len(v_parts) > 1 else v_parts[0]
        if b_k is not None:
            k = k + b_k
        if b_v is not None:
            v = v + b_v
        bsz, n = k.shape[:2]
        keys = k.reshape(bsz, n, plan.num_kv_heads, plan.head_dim)
        values = v.reshape(bsz, n, plan.num_kv_heads, plan.head_dim).transpose(1, 2)
        if plan.k_norm is not None:
            keys = plan.k_norm(keys)
        keys = keys.transpose(1, 2)
        cos, sin = self._rope(plan, keys, start, stop)
        keys = plan.rope(keys[:, :1], keys, cos, sin)[1]  # the helper also rotates a query: give it one head
        return keys.contiguous(), values.contiguous()

    def _rope(self, plan: _LayerPlan, like: torch.Tensor, start: int, stop: int):
        key = (getattr(plan.attn, "layer_type", None), like.dtype, start, stop)
        hit = self._rope_memo.get(key)
        if hit is None:
            hit = rotary_embeddings(self.model, plan.attn, like, self.positions[:, start:stop].long())
            self._rope_memo[key] = hit
        return hit

    # -- edits: crop / beams / batch --------------------------------------------------------------------------------
    def crop(self, max_length: int) -> None:
        """Drop the newest tokens with `DynamicCache.crop` semantics: `crop(-n)` removes n tokens and `crop(0)`
        removes none. A positive value is the number of tokens to keep (the convention before transformers 5.18;
        `DynamicCache` 5.24 rejects it). Sliding-window layers that record their past (assisted decoding) then forget
        the blocks no later query can see, as `DynamicSlidingWindowLayer.crop` trims its states.

        Inside the full-precision window a crop is exact; deeper crops dequantize the affected block back into the
        window."""
        total = self.get_seq_length()
        new_len = max(total + max_length, 0) if max_length <= 0 else min(max_length, total)
        if new_len < total:
            self._truncate(new_len)
        for layer in self.layers:
            if layer.record_past:
                layer.evict(layer.eviction_point(new_len))

    def _truncate(self, new_len: int) -> None:
        keep = (new_len // self.config.residual_length) * self.config.residual_length
        for layer in self.layers:
            if layer.n_quantized_total > new_len and keep < layer.evicted:
                raise RuntimeError(
                    f"Cannot crop to {new_len} tokens: sliding-window layer {layer.plan.layer_idx} already forgot the "
                    f"first {layer.evicted} tokens."
                )
        if all(layer.n_quantized_total <= new_len for layer in self.layers):
            for layer in self.layers:
                for s in layer.streams.values():
                    s.truncate(s.n_quantized, s.res[:, : new_len - layer.n_quantized_total])
        else:
            self._crop_into_quantized(keep, new_len)
        self.positions = _own(self.positions[:, :new_len])
        self._clear_transients()

    def _crop_into_quantized(self, keep: int, new_len: int) -> None:
        dtype = self.compute_dtype
        acc = None
        for layer in self.layers:
            plan, off = layer.plan, layer.evicted
            if plan.kind in ("x", "latent"):
                for s in layer.streams.values():
                    tail = s.dequant(dtype)[:, keep - off : new_len - off]
                    s.truncate(keep - off, tail)
            elif plan.kind == "cl_base":
                s = layer.streams["x"]
                acc = s.dequant(dtype)[:, keep:new_len]
                s.truncate(keep, acc)
            else:
                s = layer.streams["d"]
                u_kv = self._factors(plan).get("u_kv")
                delta = s.dequant(dtype)[:, keep:new_len]
                latent = (acc @ u_kv if u_kv is not None else acc) + delta
                acc = acc + (delta @ u_kv.t() if u_kv is not None else delta)
                s.truncate(keep, latent)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))
        self._clear_transients()

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)
        self._clear_transients()

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.positions is not None:
            self.positions = self.positions[indices]
        self._clear_transients()


# ---------------------------------------------------------------------------------------------------------------------
# Hooks
# ---------------------------------------------------------------------------------------------------------------------
def _xquant_pre_hook(module: nn.Module, args: tuple, kwargs: dict):
    cache = cache_from_kwargs(kwargs)
    if not isinstance(cache, XQuantCache):
        return None
    hidden_states = kwargs.get("hidden_states", args[0] if args else None)
    if hidden_states is None:
        raise RuntimeError(f"{type(module).__name__}: could not find the attention input (hidden_states).")
    cache._receive_input(module, hidden_states, kwargs.get("position_ids"))
    return None


def attach_xquant(model: nn.Module) -> list:
    """Register (once) the pre-hooks that hand each attention input X to an `XQuantCache`. Idempotent; the hooks do
    nothing when a forward runs with any other cache (or none)."""
    handles = getattr(model, _HOOKS_ATTR, None)
    if handles:
        return handles
    attns = _check_supported(model)
    handles = [attn.register_forward_pre_hook(_xquant_pre_hook, with_kwargs=True) for attn in attns]
    setattr(model, _HOOKS_ATTR, handles)
    return handles


def detach_xquant(model: nn.Module) -> None:
    """Remove the hooks added by `attach_xquant`."""
    for handle in getattr(model, _HOOKS_ATTR, None) or []:
        handle.remove()
    if hasattr(model, _HOOKS_ATTR):
        delattr(model, _HOOKS_ATTR)


def xquant_cache_factory(model: nn.Module, cache_config: dict) -> XQuantCache:
    """Factory for `generate(cache_implementation="xquant", cache_config={...})`."""
    return XQuantCache(model, XQuantConfig.from_dict(dict(cache_config)))


def xquant_cl_cache_factory(model: nn.Module, cache_config: dict) -> XQuantCache:
    """Factory for `cache_implementation="xquant_cl"` (XQuant-CL: `mode="cl"` unless cache_config says otherwise)."""
    cfg = {"mode": "cl", **dict(cache_config)}
    return XQuantCache(model, XQuantConfig.from_dict(cfg))
