"""XQuant and XQuant-CL caches: keep the low-bit attention input X (or its SVD latent, or cross-layer deltas) and
rematerialize K and V on every read (Tomar et al., "XQuant: Breaking the Memory Wall for LLM Inference with KV Cache
Rematerialization", arXiv 2508.10395).

A `Cache` never sees X, so `attach_xquant(model)` registers forward pre-hooks on every `self_attn`: a hook hands X
(the post-norm hidden state) and the position ids to the `XQuantCache` it finds in the call's kwargs, and does nothing
for any other cache. `XQuantCache.update` then returns K and V rebuilt from what the cache holds, with the same
contract as `DynamicLayer.update`.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from ..integrations import apply_rotary_fn, cache_from_kwargs, decoder_layers, rotary_embeddings
from ..kernels.quantize import QuantizedTensor, dequant_matmul, dequantize, quantize_pack
from .xquant_config import XQuantConfig

__all__ = ["XQuantCache", "XQuantConfig", "XQuantLayer", "attach_xquant", "detach_xquant", "compute_xquant_factors"]

_HOOKS_ATTR = "_hf_fastslow_xquant_hooks"
_FACTORS_ATTR = "_hf_fastslow_xquant_factors"


# ---------------------------------------------------------------------------------------------------------------------
# Per-layer static plan: which projection matrices rebuild K and V from what is stored
# ---------------------------------------------------------------------------------------------------------------------
@dataclass
class _LayerPlan:
    layer_idx: int
    kind: str  # "x" | "latent" | "cl_base" | "cl_delta"
    bits: int
    attn: nn.Module
    num_kv_heads: int
    head_dim: int
    w_kv: torch.Tensor  # (d, 2*d_kv): [W_k | W_v] in x @ W form
    b_kv: torch.Tensor | None  # (2*d_kv,)
    u_k: torch.Tensor | None = None  # latent: (d, d_kv) left singular vectors of W_k
    m_k: torch.Tensor | None = None  # latent: (d_kv, d_kv) = diag(S_k) B_k^T, so X U_k M_k = X W_k
    u_v: torch.Tensor | None = None
    m_v: torch.Tensor | None = None
    u_kv: torch.Tensor | None = None  # cl_delta: (d, 2*d_kv) or None when 2*d_kv >= d (deltas kept at full width)
    m_kv: torch.Tensor | None = None  # cl_delta: U_kv^T W_kv
    rope: object = None
    k_norm: nn.Module | None = None
    sliding_window: int | None = None
    extras: dict = field(default_factory=dict)

    @property
    def d_kv(self) -> int:
        return self.num_kv_heads * self.head_dim


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


def _svd_factors(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """W (d, r<=d) = U S B^T  ->  (U, S B^T) with X U (S B^T) = X W; computed in float64."""
    u, s, vh = torch.linalg.svd(w.double(), full_matrices=False)
    return u, s[:, None] * vh


def compute_xquant_factors(model: nn.Module, dtype: torch.dtype | None = None) -> list[dict[str, torch.Tensor]]:
    """Per layer: U_k, M_k, U_v, M_v (latent mode) and U_kv, M_kv (CL deltas) from the model's own weights.

    No calibration data: thin SVDs of W_k, W_v and [W_k | W_v]. Cached on the model (weights do not change during
    inference; call again after changing them).
    """
    attns = _check_supported(model)
    dtype = dtype or next(model.parameters()).dtype
    cache = getattr(model, _FACTORS_ATTR, None)
    key = (dtype, tuple(a.k_proj.weight.data_ptr() for a in attns))
    if cache is not None and cache[0] == key:
        return cache[1]
    factors = []
    for attn in attns:
        w_k = attn.k_proj.weight.detach().t()
        w_v = attn.v_proj.weight.detach().t()
        d, d_kv = w_k.shape
        entry: dict[str, torch.Tensor] = {}
        if d_kv < d:
            u_k, m_k = _svd_factors(w_k)
            u_v, m_v = _svd_factors(w_v)
            entry.update(u_k=u_k, m_k=m_k, u_v=u_v, m_v=m_v)
        w_kv = torch.cat([w_k, w_v], dim=1)
        if 2 * d_kv < d:
            u_kv, _ = _svd_factors(w_kv)
            entry.update(u_kv=u_kv, m_kv=u_kv.t() @ w_kv.double())
        factors.append({k: v.to(dtype) for k, v in entry.items()})
    setattr(model, _FACTORS_ATTR, (key, factors))
    return factors


def _build_plans(model: nn.Module, config: XQuantConfig, dtype: torch.dtype) -> list[_LayerPlan]:
    attns = _check_supported(model)
    factors = compute_xquant_factors(model, dtype) if config.mode in ("auto", "latent", "cl") else None
    n_layers = len(attns)
    if config.mode == "cl" and config.base_layer >= n_layers:
        raise ValueError(f"XQuantConfig.base_layer={config.base_layer} but the model has {n_layers} layers.")
    plans = []
    for i, attn in enumerate(attns):
        head_dim = getattr(attn, "head_dim", None)
        w_k = attn.k_proj.weight.detach().t().to(dtype)
        w_v = attn.v_proj.weight.detach().t().to(dtype)
        d, d_kv = w_k.shape
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
        else:  # cl
            if i < config.base_layer:
                kind = "latent" if latent_ok else "x"
            elif i == config.base_layer:
                kind = "cl_base"
            else:
                kind = "cl_delta"
        b_k, b_v = attn.k_proj.bias, attn.v_proj.bias
        b_kv = None
        if b_k is not None or b_v is not None:
            zeros = torch.zeros(d_kv, dtype=dtype, device=w_k.device)
            b_kv = torch.cat([
                b_k.detach().to(dtype) if b_k is not None else zeros,
                b_v.detach().to(dtype) if b_v is not None else zeros,
            ])
        plan = _LayerPlan(
            layer_idx=i, kind=kind, bits=config.bits_for_layer(i), attn=attn, num_kv_heads=d_kv // head_dim,
            head_dim=head_dim, w_kv=torch.cat([w_k, w_v], dim=1), b_kv=b_kv, rope=apply_rotary_fn(attn),
            k_norm=getattr(attn, "k_norm", None), sliding_window=getattr(attn, "sliding_window", None) or None,
        )
        f = factors[i] if factors is not None else {}
        if kind == "latent":
            plan.u_k, plan.m_k, plan.u_v, plan.m_v = f["u_k"], f["m_k"], f["u_v"], f["m_v"]
        elif kind == "cl_delta":
            plan.u_kv = f.get("u_kv")
            plan.m_kv = f["m_kv"] if plan.u_kv is not None else plan.w_kv
        _check_group(config, plan)
        plans.append(plan)
    return plans


def _check_group(config: XQuantConfig, plan: _LayerPlan) -> None:
    if plan.bits == 16:
        return
    d = plan.w_kv.shape[0]
    widths = {
        "x": [("X", d)],
        "cl_base": [("X", d)],
        "latent": [("the value latent", plan.d_kv)],
        "cl_delta": [("the CL delta", plan.u_kv.shape[1] if plan.u_kv is not None else d)],
    }[plan.kind]
    for what, width in widths:
        if width % config.group_size:
            raise ValueError(
                f"group_size {config.group_size} does not divide the width of {what} ({width}) at layer "
                f"{plan.layer_idx}; pick a group size that divides it (e.g. 64 or 32)."
            )


# ---------------------------------------------------------------------------------------------------------------------
# Storage: one stream of vectors per stored quantity, quantized in whole blocks, newest tokens in full precision
# ---------------------------------------------------------------------------------------------------------------------
def _cat_quantized(a: QuantizedTensor | None, b: QuantizedTensor, token_dim: int) -> QuantizedTensor:
    if a is None:
        return b
    return QuantizedTensor(
        torch.cat([a.packed, b.packed], dim=token_dim),
        torch.cat([a.scale, b.scale], dim=token_dim),
        torch.cat([a.minimum, b.minimum], dim=token_dim),
        b.nbits, b.group_size, a.numel_last + b.numel_last if token_dim == -1 else b.numel_last,
    )


def _slice_quantized(q: QuantizedTensor, n_tokens: int, per_channel: bool) -> QuantizedTensor:
    if not per_channel:
        return QuantizedTensor(q.packed[:, :n_tokens], q.scale[:, :n_tokens], q.minimum[:, :n_tokens], q.nbits,
                               q.group_size, q.numel_last)
    nbytes = n_tokens * q.nbits // 8
    ngroups = n_tokens // q.group_size
    return QuantizedTensor(q.packed[..., :nbytes], q.scale[..., :ngroups], q.minimum[..., :ngroups], q.nbits,
                           q.group_size, n_tokens)


class _Stream:
    """Vectors of one width for every cached token: a quantized prefix (whole blocks) and a full-precision tail.

    `per_channel=True` quantizes each channel along tokens (groups of `group_size` tokens, the paper's choice for the
    key latent); otherwise each token along its features. bits == 16 keeps the prefix unquantized.
    """

    def __init__(self, bits: int, group_size: int, per_channel: bool = False, outlier_channel: bool = False):
        self.bits, self.group_size = bits, group_size
        self.per_channel, self.outlier_channel = per_channel, outlier_channel
        self.q: QuantizedTensor | torch.Tensor | None = None
        self.outlier: torch.Tensor | None = None  # (B, Tq) fp16, channel 0 kept out of the quantizer
        self.res: torch.Tensor | None = None
        self.n_quantized = 0

    # -- sizes ------------------------------------------------------------------------------------------------------
    @property
    def n_residual(self) -> int:
        return 0 if self.res is None else self.res.shape[1]

    def nbytes(self) -> int:
        total = 0
        if isinstance(self.q, QuantizedTensor):
            total += self.q.nbytes()
        elif self.q is not None:
            total += self.q.numel() * self.q.element_size()
        for t in (self.outlier, self.res):
            if t is not None:
                total += t.numel() * t.element_size()
        return total

    # -- writes -----------------------------------------------------------------------------------------------------
    def append(self, x: torch.Tensor) -> None:
        self.res = x if self.res is None else torch.cat([self.res, x], dim=1)

    def pop_blocks(self, block: int) -> torch.Tensor | None:
        """Remove and return the oldest whole blocks of the residual, or None if it holds less than one block."""
        n = (self.n_residual // block) * block
        if n == 0:
            return None
        out, self.res = self.res[:, :n], self.res[:, n:]
        return out

    def store(self, x: torch.Tensor) -> None:
        """Quantize `x` (B, n, w) (n a multiple of the block size) and append it to the quantized prefix."""
        n = x.shape[1]
        if self.outlier_channel:
            out = x[..., 0].to(torch.float16)
            self.outlier = out if self.outlier is None else torch.cat([self.outlier, out], dim=1)
            x = x[..., 1:]
        if self.bits == 16:
            self.q = x if self.q is None else torch.cat([self.q, x], dim=1)
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
        if n_quantized == 0:
            self.q, self.outlier = None, None
        elif n_quantized < self.n_quantized:
            if self.bits == 16:
                self.q = self.q[:, :n_quantized]
            else:
                self.q = _slice_quantized(self.q, n_quantized, self.per_channel)
            if self.outlier is not None:
                self.outlier = self.outlier[:, :n_quantized]
        self.n_quantized = n_quantized
        self.res = residual

    def drop_front(self, n: int) -> None:
        """Forget the oldest `n` quantized tokens (a multiple of the block size); copies so the memory is freed."""
        if n == 0:
            return
        if isinstance(self.q, QuantizedTensor):
            q = self.q
            if self.per_channel:
                self.q = QuantizedTensor(q.packed[..., n * q.nbits // 8 :].clone(),
                                         q.scale[..., n // q.group_size :].clone(),
                                         q.minimum[..., n // q.group_size :].clone(), q.nbits, q.group_size,
                                         q.numel_last - n)
            else:
                self.q = QuantizedTensor(q.packed[:, n:].clone(), q.scale[:, n:].clone(), q.minimum[:, n:].clone(),
                                         q.nbits, q.group_size, q.numel_last)
        else:
            self.q = self.q[:, n:].clone()
        if self.outlier is not None:
            self.outlier = self.outlier[:, n:].clone()
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

    def evict(self, past: int) -> None:
        point = self.eviction_point(past)
        if point > self.evicted:
            for s in self.streams.values():
                s.drop_front(point - self.evicted)
            self.evicted = point

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        past = self.get_seq_length()
        offset = self.eviction_point(past)
        return past - offset + query_length, offset

    def get_max_length(self) -> int:
        return -1

    def nbytes(self) -> int:
        return sum(s.nbytes() for s in self.streams.values())

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
    cache.nbytes()                                        # bytes held: codes, scales, minima, fp window, positions
    ```
    Or, after `import hf_fastslow`: `model.generate(**inputs, cache_implementation="xquant", cache_config={...})`.

    Modes ("x", "latent", "cl", "auto") are described in `XQuantConfig`. The cache is bound to the model it was built
    for (its weights rebuild K and V); `attach_xquant(model)` is called for you.
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
        dtype = config.compute_dtype or next(model.parameters()).dtype
        self.compute_dtype = dtype
        plans = _build_plans(model, config, dtype)
        self._model_ref = weakref.ref(model)
        self._attn_to_layer = {id(p.attn): p.layer_idx for p in plans}
        super().__init__(layers=[XQuantLayer(self, p) for p in plans])
        self.positions: torch.Tensor | None = None  # (B, T) int32, one row of RoPE positions per sequence
        self._stash: dict[int, tuple[torch.Tensor, torch.Tensor | None]] = {}
        self._rope_memo: dict = {}
        self._cl_flush: tuple[int, torch.Tensor] | None = None
        self._cl_read: tuple[int, int, torch.Tensor] | None = None
        attach_xquant(model)

    # -- public ---------------------------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        model = self._model_ref()
        if model is None:
            raise RuntimeError("The model this XQuantCache was built for no longer exists.")
        return model

    def nbytes(self) -> int:
        """Bytes actually held: packed codes, fp16 scales and minima, the full-precision window, outlier channels
        and the per-token RoPE positions."""
        total = sum(layer.nbytes() for layer in self.layers)
        if self.positions is not None:
            total += self.positions.numel() * self.positions.element_size()
        return total

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
        self._rope_memo.clear()
        self._cl_flush = self._cl_read = None

    # -- hook side --------------------------------------------------------------------------------------------------
    def _receive_input(self, attn: nn.Module, hidden_states: torch.Tensor, position_ids: torch.Tensor | None) -> None:
        layer_idx = self._attn_to_layer.get(id(attn))
        if layer_idx is None or self.layers[layer_idx].plan.attn is not attn:
            raise RuntimeError(
                "This XQuantCache was built for another model: K and V are rebuilt from the weights of the model "
                "passed to XQuantCache(model, ...). Build one cache per model."
            )
        self._stash[layer_idx] = (hidden_states.detach(), None if position_ids is None else position_ids.detach())

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
            self._append_positions(position_ids, bsz, n_new, x.device)
        layer.evict(layer.get_seq_length())  # the same point get_mask_sizes announced for this forward
        x = x.to(self.compute_dtype)
        self._append_sources(layer, x)
        self._flush(layer)
        keys, values = self._rematerialize(layer)
        return keys.to(key_states.dtype), values.to(value_states.dtype)

    def _append_positions(self, position_ids, bsz, n_new, device) -> None:
        past = 0 if self.positions is None else self.positions.shape[1]
        if position_ids is None:
            pos = torch.arange(past, past + n_new, device=device).unsqueeze(0)
        else:
            pos = position_ids
        pos = pos.to(torch.int32).expand(bsz, n_new)
        self.positions = pos.clone() if self.positions is None else torch.cat([self.positions, pos], dim=1)
        self._rope_memo.clear()

    def _append_sources(self, layer: XQuantLayer, x: torch.Tensor) -> None:
        plan = layer.plan
        if plan.kind == "latent":
            layer.streams["k"].append(x @ plan.u_k)
            layer.streams["v"].append(x @ plan.u_v)
        elif plan.kind in ("x", "cl_base"):
            layer.streams["x"].append(x)
        else:
            layer.streams["d"].append(x @ plan.u_kv if plan.u_kv is not None else x)

    def _flush(self, layer: XQuantLayer) -> None:
        plan, block = layer.plan, self.config.residual_length
        if plan.kind == "latent":
            for s in layer.streams.values():
                popped = s.pop_blocks(block)
                if popped is not None:
                    s.store(popped)
            return
        if plan.kind == "x":
            popped = layer.streams["x"].pop_blocks(block)
            if popped is not None:
                layer.streams["x"].store(popped)
            return
        if plan.kind == "cl_base":
            s = layer.streams["x"]
            popped = s.pop_blocks(block)
            if popped is not None:
                before = s.n_quantized
                s.store(popped)
                # The flush accumulator carries the reconstructed X of the new block down the layer chain, so that
                # every delta is taken against what will be rebuilt (errors do not accumulate).
                acc = s.dequant(self.compute_dtype)[:, before:]
                self._cl_flush = (plan.layer_idx, acc)
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
        acc = self._cl_flush[1]
        base = acc @ plan.u_kv if plan.u_kv is not None else acc
        before = s.n_quantized
        s.store(popped - base)
        delta = s.dequant(self.compute_dtype)[:, before:]
        acc = acc + (delta @ plan.u_kv.t() if plan.u_kv is not None else delta)
        self._cl_flush = (plan.layer_idx, acc)

    # -- rematerialization ------------------------------------------------------------------------------------------
    def _cl_accumulator(self, layer_idx: int) -> torch.Tensor | None:
        """Reconstructed X of the quantized tokens at CL layer `layer_idx` (base + deltas), reused along the layer
        loop of a forward pass."""
        base_idx = self.config.base_layer
        base_layer: XQuantLayer = self.layers[base_idx]
        n_q = base_layer.streams["x"].n_quantized
        if n_q == 0:
            return None
        if layer_idx == base_idx:
            acc = base_layer.streams["x"].dequant(self.compute_dtype)
        elif self._cl_read is not None and self._cl_read[0] == layer_idx - 1 and self._cl_read[1] == n_q:
            acc = self._cl_read[2] + self._delta_full_width(self.layers[layer_idx])
        else:
            acc = base_layer.streams["x"].dequant(self.compute_dtype)
            for i in range(base_idx + 1, layer_idx + 1):
                acc = acc + self._delta_full_width(self.layers[i])
        self._cl_read = (layer_idx, n_q, acc)
        return acc

    @staticmethod
    def _delta_full_width(layer: XQuantLayer) -> torch.Tensor:
        plan, s = layer.plan, layer.streams["d"]
        if plan.u_kv is not None:
            return s.project(plan.u_kv.t())
        return s.dequant(plan.w_kv.dtype)

    def _rematerialize(self, layer: XQuantLayer) -> tuple[torch.Tensor, torch.Tensor]:
        plan = layer.plan
        d_kv = plan.d_kv
        parts = []
        if plan.kind == "latent":
            sk, sv = layer.streams["k"], layer.streams["v"]
            kq, vq = sk.project(plan.m_k), sv.project(plan.m_v)
            if kq is not None:
                parts.append(torch.cat([kq, vq], dim=-1))
            if sk.res is not None and sk.n_residual:
                parts.append(torch.cat([sk.res @ plan.m_k, sv.res @ plan.m_v], dim=-1))
        elif plan.kind == "x":
            s = layer.streams["x"]
            q = s.project(plan.w_kv)
            if q is not None:
                parts.append(q)
            if s.n_residual:
                parts.append(s.res @ plan.w_kv)
        else:
            s = layer.streams["x" if plan.kind == "cl_base" else "d"]
            acc = self._cl_accumulator(plan.layer_idx)
            if acc is not None:
                parts.append(acc @ plan.w_kv)
            if s.n_residual:
                parts.append(s.res @ (plan.w_kv if plan.kind == "cl_base" else plan.m_kv))
        kv = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
        if plan.b_kv is not None:
            kv = kv + plan.b_kv
        bsz, n = kv.shape[:2]
        keys = kv[..., :d_kv].reshape(bsz, n, plan.num_kv_heads, plan.head_dim)
        values = kv[..., d_kv:].reshape(bsz, n, plan.num_kv_heads, plan.head_dim).transpose(1, 2)
        if plan.k_norm is not None:
            keys = plan.k_norm(keys)
        keys = keys.transpose(1, 2)
        cos, sin = self._rope(plan, keys, layer.evicted)
        keys = plan.rope(keys[:, :1], keys, cos, sin)[1]  # the helper also rotates a query: give it one head
        return keys.contiguous(), values.contiguous()

    def _rope(self, plan: _LayerPlan, like: torch.Tensor, start: int = 0):
        key = (getattr(plan.attn, "layer_type", None), like.dtype, self.positions.shape[1], start)
        hit = self._rope_memo.get(key)
        if hit is None:
            hit = rotary_embeddings(self.model, plan.attn, like, self.positions[:, start:].long())
            self._rope_memo[key] = hit
        return hit

    # -- edits: crop / beams / batch --------------------------------------------------------------------------------
    def crop(self, max_length: int) -> None:
        """Drop the newest tokens: `crop(-n)` removes n tokens (transformers 5.18+ convention); a non-negative value is
        the length to keep (the older convention). Inside the full-precision window this is exact; deeper crops
        dequantize the affected block back into the window."""
        total = self.get_seq_length()
        new_len = max(total + max_length, 0) if max_length < 0 else min(max_length, total)
        if new_len == total:
            return
        block = self.config.residual_length
        keep = (new_len // block) * block
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
        self.positions = self.positions[:, :new_len] if new_len else None
        self._rope_memo.clear()
        self._cl_read = self._cl_flush = None

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
                delta = s.dequant(dtype)[:, keep:new_len]
                latent = (acc @ plan.u_kv if plan.u_kv is not None else acc) + delta
                acc = acc + (delta @ plan.u_kv.t() if plan.u_kv is not None else delta)
                s.truncate(keep, latent)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        if self.positions is not None:
            self.positions = self.positions.index_select(0, beam_idx.to(self.positions.device))
        self._cl_read = None

    def batch_repeat_interleave(self, repeats: int) -> None:
        super().batch_repeat_interleave(repeats)
        if self.positions is not None:
            self.positions = self.positions.repeat_interleave(repeats, dim=0)
        self._cl_read = None

    def batch_select_indices(self, indices: torch.Tensor) -> None:
        super().batch_select_indices(indices)
        if self.positions is not None:
            self.positions = self.positions[indices]
        self._cl_read = None


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
