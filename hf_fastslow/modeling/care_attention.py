"""Latent K/V attention of a CARE-converted model: the cache holds only the latents c_k = x W_k,down and
c_v = x W_v,down ([B, 1, S, r_k] and [B, 1, S, r_v] through a stock DynamicCache), and every call rebuilds
K = RoPE(k_norm(c_k W_k,up)) and V = c_v W_v,up for all cached tokens before the model's own attention function.

RoPE has to be re-applied to the rebuilt keys (it sits after the up-projection, so it cannot be folded into the
latent). Keys are rotated at their index in the cache and queries at theirs; RoPE scores depend only on the distance
between the two, so this equals the stock model whatever `position_ids` it was given (left padding shifts every real
token's position by the same amount per row, and padding is masked).

The converted module keeps the stock instance (q_proj, o_proj, q_norm/k_norm, scaling, sliding window, ...) and
swaps `k_proj`/`v_proj` for `k_down`/`k_up`/`v_down`/`v_up`; its class becomes a subclass of the stock class made on
the fly, so `isinstance` checks and the modeling module's RoPE/eager functions keep working.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ..integrations import apply_rotary_fn, attention_modules, rotary_embeddings, rotary_module
from ..integrations.care_seam import attention_function, cache_layer_length, cache_update, query_offset

# model_type -> stock attention class name the latent forward reproduces (q/k/v/o projections, optional per-head
# q_norm/k_norm before RoPE, full-width RoPE, optional sliding window)
SUPPORTED_ATTENTION = {
    "llama": "LlamaAttention",
    "mistral": "MistralAttention",
    "qwen2": "Qwen2Attention",
    "qwen3": "Qwen3Attention",
    "gemma3_text": "Gemma3Attention",
}
_SUBCLASSES: dict[type, type] = {}


class CARELatentAttentionMixin:
    """Forward of a converted attention module (put in front of the stock class by `install_latent_attention`)."""

    _care_stock_class: type

    def forward(self, hidden_states, position_embeddings=None, attention_mask=None, cache=None,
                past_key_values=None, **kwargs):
        cache = cache if cache is not None else past_key_values
        batch, q_len = hidden_states.shape[:2]
        query = self.q_proj(hidden_states).view(batch, q_len, -1, self.head_dim)
        if getattr(self, "q_norm", None) is not None:
            query = self.q_norm(query)
        query = query.transpose(1, 2)
        latent_k = self.k_down(hidden_states).unsqueeze(1)  # [B, 1, T, r_k]: what the cache stores
        latent_v = self.v_down(hidden_states).unsqueeze(1)
        past_len = cache_layer_length(cache, self.layer_idx)
        if cache is not None:
            latent_k, latent_v = cache_update(cache, latent_k, latent_v, self.layer_idx, kwargs)
        k_len = latent_k.shape[-2]
        key = self.k_up(latent_k[:, 0]).view(batch, k_len, -1, self.head_dim)
        if getattr(self, "k_norm", None) is not None:
            key = self.k_norm(key)
        key = key.transpose(1, 2)
        value = self.v_up(latent_v[:, 0]).view(batch, k_len, -1, self.head_dim).transpose(1, 2)

        offset = query_offset(cache, self.layer_idx, past_len, k_len, q_len)
        positions = torch.arange(k_len, device=hidden_states.device).unsqueeze(0)
        cos, sin = rotary_embeddings(self._care_rope_holder, self, key, positions)
        rotate = apply_rotary_fn(self)
        key, _ = rotate(key, key, cos, sin)
        query, _ = rotate(query, query, cos[:, offset : offset + q_len], sin[:, offset : offset + q_len])

        extra = {"sliding_window": self.sliding_window} if hasattr(self, "sliding_window") else {}
        attn_output, attn_weights = attention_function(self)(
            self, query, key, value, attention_mask,
            dropout=self.attention_dropout if self.training else 0.0, scaling=self.scaling, **extra, **kwargs,
        )
        attn_output = attn_output.reshape(batch, q_len, -1).contiguous()
        return self.o_proj(attn_output), attn_weights


def _latent_class(stock: type) -> type:
    if stock not in _SUBCLASSES:
        _SUBCLASSES[stock] = type(f"CARE{stock.__name__}", (CARELatentAttentionMixin, stock),
                                  {"__module__": stock.__module__, "_care_stock_class": stock})
    return _SUBCLASSES[stock]


def check_supported(model: nn.Module) -> list[nn.Module]:
    """The attention modules CARE converts; a clear error naming what is missing otherwise (nothing is changed)."""
    model_type = getattr(model.config, "model_type", None)
    text_config = getattr(model.config, "text_config", None)
    if model_type not in SUPPORTED_ATTENTION and text_config is not None:
        model_type = getattr(text_config, "model_type", model_type)
    if model_type not in SUPPORTED_ATTENTION:
        raise NotImplementedError(
            f"CARE supports {sorted(SUPPORTED_ATTENTION)} attention (q/k/v/o projections, optional q/k RMSNorm, full "
            f"RoPE); got model_type={model_type!r} ({type(model).__name__})."
        )
    try:
        attns = attention_modules(model)
    except (NotImplementedError, AttributeError) as err:
        raise NotImplementedError(f"CARE: {type(model).__name__} has no decoder layers with `self_attn`.") from err
    if rotary_module(model) is None:
        raise NotImplementedError(f"CARE: {type(model).__name__} has no `rotary_emb` module (RoPE is rebuilt on keys).")
    for i, attn in enumerate(attns):
        if isinstance(attn, CARELatentAttentionMixin):
            raise ValueError(f"CARE: layer {i} is already converted (call convert on the original model).")
        if type(attn).__name__ != SUPPORTED_ATTENTION[model_type]:
            raise NotImplementedError(f"CARE: layer {i} attention is {type(attn).__name__}, expected "
                                      f"{SUPPORTED_ATTENTION[model_type]} (its forward is what CARE reproduces).")
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            if not isinstance(getattr(attn, name, None), nn.Linear):
                raise NotImplementedError(f"CARE: layer {i} attention has no nn.Linear `{name}`.")
        if getattr(attn, "v_norm", None) is not None:
            raise NotImplementedError(f"CARE: layer {i} has a `v_norm`; latent values with a norm are not supported.")
        partial = getattr(model.config, "partial_rotary_factor", 1.0)
        if partial not in (None, 1.0):
            raise NotImplementedError(f"CARE: partial RoPE (partial_rotary_factor={partial}) is not supported.")
    return attns


def install_latent_attention(model: nn.Module, attn: nn.Module, k_factors: tuple, v_factors: tuple) -> None:
    """Turn stock `attn` into latent attention. `*_factors = (down [r, D], down_bias [r] | None, up [gd, r],
    up_bias [gd] | None)` tensors (already in the model's dtype and device)."""
    for prefix, (down, down_bias, up, up_bias) in (("k", k_factors), ("v", v_factors)):
        rank, hidden = down.shape
        down_mod = nn.Linear(hidden, rank, bias=down_bias is not None, device=down.device, dtype=down.dtype)
        up_mod = nn.Linear(rank, up.shape[0], bias=up_bias is not None, device=up.device, dtype=up.dtype)
        with torch.no_grad():
            down_mod.weight.copy_(down)
            up_mod.weight.copy_(up)
            if down_bias is not None:
                down_mod.bias.copy_(down_bias)
            if up_bias is not None:
                up_mod.bias.copy_(up_bias)
        delattr(attn, f"{prefix}_proj")
        setattr(attn, f"{prefix}_down", down_mod)
        setattr(attn, f"{prefix}_up", up_mod)
    # the model's rotary module, reached without registering it a second time (not a submodule, not in state_dict)
    attn._care_rope_holder = types.SimpleNamespace(rotary_emb=rotary_module(model))
    attn.__class__ = _latent_class(type(attn))


def latent_widths(model: nn.Module) -> tuple[list[int], list[int]]:
    """(K latent widths, V latent widths) per layer of a converted model."""
    attns = attention_modules(model)
    return [a.k_down.out_features for a in attns], [a.v_down.out_features for a in attns]
