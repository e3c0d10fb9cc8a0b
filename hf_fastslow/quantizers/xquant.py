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

Layout: `xquant_plan.py` (per-layer plans, the shared SVD factors), `xquant_storage.py` (the quantized streams), this
module (the cache, its layers, the hooks and the `cache_implementation` factories).
"""

from __future__ import annotations

import copy
import weakref

import torch
from torch import nn
from transformers.cache_utils import Cache, DynamicLayer

from ..evaluation.memory import storage_bytes
from ..integrations import cache_from_kwargs, rotary_embeddings
from .attention_hooks import attach_pre_hooks, detach_pre_hooks
from .xquant_config import XQuantConfig
from .xquant_plan import (
    _build_plans,
    _check_supported,
    _LayerPlan,
    _shared_factors,
    compute_xquant_factors,
    release_xquant_factors,
    xquant_factor_nbytes,
)
from .xquant_storage import _own, _Stream

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
    if getattr(model, _HOOKS_ATTR, None):
        return getattr(model, _HOOKS_ATTR)
    return attach_pre_hooks(model, _HOOKS_ATTR, _xquant_pre_hook, _check_supported(model))


def detach_xquant(model: nn.Module) -> None:
    """Remove the hooks added by `attach_xquant`."""
    detach_pre_hooks(model, _HOOKS_ATTR)


def xquant_cache_factory(model: nn.Module, cache_config: dict) -> XQuantCache:
    """Factory for `generate(cache_implementation="xquant", cache_config={...})`."""
    return XQuantCache(model, XQuantConfig.from_dict(dict(cache_config)))


def xquant_cl_cache_factory(model: nn.Module, cache_config: dict) -> XQuantCache:
    """Factory for `cache_implementation="xquant_cl"` (XQuant-CL: `mode="cl"` unless cache_config says otherwise)."""
    cfg = {"mode": "cl", **dict(cache_config)}
    return XQuantCache(model, XQuantConfig.from_dict(cfg))
