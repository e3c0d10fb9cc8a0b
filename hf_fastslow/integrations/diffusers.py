"""diffusers: the Wan video transformer internals our attention processors build on (QVG video cache, SVG-EAR).

diffusers is optional (`pip install 'hf_fastslow[video]'`); nothing here imports it at module import. Checked
against diffusers 0.42. The only diffusers internals other modules need are reached through this file:
- a Wan self-attention's projections, QK norms and output projection (`wan_qkv`, `wan_attention_output`);
- Wan's rotary embedding at absolute frame positions (`wan_rotary`, `wan_frame_offset`): a chunk-by-chunk
  autoregressive driver denoises frames [t, t + F) but Wan's `rope` always starts at frame 0;
- installing a processor on every self-attention (`set_wan_self_attention_processors`) and putting the old ones back.
`WanSelfAttentionProcessor` is the base class: subclasses override `attend` and get exactly diffusers' q/k/v.
"""

from __future__ import annotations

import contextlib
import importlib.util
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

VIDEO_EXTRA_HINT = "pip install 'hf_fastslow[video]'"


def diffusers_available() -> bool:
    return importlib.util.find_spec("diffusers") is not None


def require_diffusers(feature: str = "This feature") -> Any:
    """Import diffusers or raise an ImportError that says how to install it."""
    if not diffusers_available():
        raise ImportError(f"{feature} needs diffusers, which is not installed: `{VIDEO_EXTRA_HINT}`.")
    import diffusers

    return diffusers


def _is_wan_transformer(transformer: Any) -> bool:
    return type(transformer).__name__.startswith("Wan") and hasattr(transformer, "blocks") and hasattr(
        transformer, "rope"
    )


def check_wan_transformer(transformer: Any, feature: str = "This feature") -> None:
    require_diffusers(feature)
    if not _is_wan_transformer(transformer):
        raise TypeError(
            f"{feature} supports diffusers' Wan video transformers (WanTransformer3DModel and its variants); "
            f"got {type(transformer).__name__}."
        )


def wan_self_attention_modules(transformer: Any) -> list[torch.nn.Module]:
    """The self-attention (`attn1`) of every Wan block, in block order."""
    check_wan_transformer(transformer)
    return [block.attn1 for block in transformer.blocks]


def wan_qkv(attn: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Self-attention q, k, v of shape (B, S, heads, head_dim), QK-normed as Wan does, before the rotary embedding."""
    if getattr(attn, "fused_projections", False):
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query, key = attn.norm_q(query), attn.norm_k(key)
    return tuple(t.unflatten(2, (attn.heads, -1)) for t in (query, key, value))


def wan_apply_rotary(x: torch.Tensor, rotary_emb: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Wan's rotary embedding on (B, S, heads, head_dim): channel pairs (2i, 2i+1) rotated by the position's angle."""
    cos, sin = rotary_emb
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = cos[..., 0::2], sin[..., 1::2]
    out = torch.stack((even * cos - odd * sin, even * sin + odd * cos), dim=-1).flatten(-2)
    return out.type_as(x)


def wan_attention_output(attn: torch.nn.Module, attended: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B, S, heads, head_dim) attention output -> the block's hidden states (output projection and dropout)."""
    hidden = attended.flatten(2, 3).type_as(like)
    return attn.to_out[1](attn.to_out[0](hidden))


def sdpa_bshd(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None):
    """Dense attention on (B, S, heads, head_dim) tensors, as diffusers' native backend computes it."""
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask)
    return out.transpose(1, 2)


def wan_rotary(
    transformer: Any, num_frames: int, height: int, width: int, frame_offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Wan's (cos, sin) tables, each (1, F*H*W, 1, head_dim), for latent frames [frame_offset, frame_offset + F).

    `num_frames`, `height` and `width` count patches (after the transformer's patch size).
    """
    rope = transformer.rope
    end = frame_offset + num_frames
    if frame_offset < 0 or end > rope.max_seq_len or height > rope.max_seq_len or width > rope.max_seq_len:
        raise ValueError(
            f"frames [{frame_offset}, {end}) x {height} x {width} patches exceed Wan's rotary table "
            f"(rope_max_seq_len={rope.max_seq_len})."
        )
    sizes = [rope.t_dim, rope.h_dim, rope.w_dim]
    tables = []
    for table in (rope.freqs_cos, rope.freqs_sin):
        t, h, w = table.split(sizes, dim=1)
        grid = (num_frames, height, width)
        parts = [
            t[frame_offset:end].view(num_frames, 1, 1, -1).expand(*grid, -1),
            h[:height].view(1, height, 1, -1).expand(*grid, -1),
            w[:width].view(1, 1, width, -1).expand(*grid, -1),
        ]
        tables.append(torch.cat(parts, dim=-1).reshape(1, num_frames * height * width, 1, -1))
    return tables[0], tables[1]


@contextlib.contextmanager
def wan_frame_offset(transformer: Any, frame_offset: int):
    """Within the block, `transformer(...)` embeds its latent frames at positions [frame_offset, ...).

    Wan's rope module always numbers the frames of its input from 0; a chunk-by-chunk driver needs absolute
    positions so that a chunk's queries and the cached keys of earlier chunks keep their true distance.
    """
    check_wan_transformer(transformer, "wan_frame_offset")
    rope = transformer.rope
    p_t, p_h, p_w = rope.patch_size

    def forward(hidden_states: torch.Tensor):
        _, _, frames, height, width = hidden_states.shape
        return wan_rotary(transformer, frames // p_t, height // p_h, width // p_w, frame_offset)

    rope.forward = forward  # instance attribute shadows the class method for this module only
    try:
        yield
    finally:
        del rope.forward


class WanSelfAttentionProcessor:
    """A Wan self-attention processor whose attention step is `attend` (dense SDPA here, as diffusers does).

    Subclasses override `attend(attn, query, key, value, rotary_emb, attention_mask)`: q/k/v are (B, S, heads,
    head_dim) before the rotary embedding, so a cache can store pre-RoPE keys; `wan_apply_rotary` rotates them.
    """

    def __init__(self, layer_index: int = 0):
        self.layer_index = layer_index

    def attend(self, attn, query, key, value, rotary_emb, attention_mask):
        if rotary_emb is not None:
            query, key = wan_apply_rotary(query, rotary_emb), wan_apply_rotary(key, rotary_emb)
        return sdpa_bshd(query, key, value, attention_mask)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        if encoder_hidden_states is not None or getattr(attn, "is_cross_attention", False):
            raise ValueError(f"{type(self).__name__} is a self-attention processor; it was called for cross-attention.")
        query, key, value = wan_qkv(attn, hidden_states)
        attended = self.attend(attn, query, key, value, rotary_emb, attention_mask)
        return wan_attention_output(attn, attended, like=query)


def set_wan_self_attention_processors(
    transformer: Any, make_processor: Callable[[int], Any]
) -> list[Any]:
    """Install `make_processor(layer_index)` on every Wan self-attention; returns the processors it replaced."""
    modules = wan_self_attention_modules(transformer)
    previous = [module.processor for module in modules]
    for index, module in enumerate(modules):
        module.set_processor(make_processor(index))
    return previous


def restore_wan_self_attention_processors(transformer: Any, previous: list[Any]) -> None:
    """Put back the processors `set_wan_self_attention_processors` returned."""
    modules = wan_self_attention_modules(transformer)
    if len(previous) != len(modules):
        raise ValueError(f"expected {len(modules)} processors to restore (one per block); got {len(previous)}.")
    for module, processor in zip(modules, previous):
        module.set_processor(processor)


def wan_patch_grid(transformer: Any, hidden_states: torch.Tensor) -> tuple[int, int, int]:
    """(frames, height, width) of `hidden_states` (B, C, T, H, W) in patches, the grid Wan's rope numbers."""
    p_t, p_h, p_w = transformer.config.patch_size
    if hidden_states.dim() != 5:
        raise ValueError(f"Wan latents are (B, C, frames, height, width); got shape {tuple(hidden_states.shape)}.")
    _, _, frames, height, width = hidden_states.shape
    return frames // p_t, height // p_h, width // p_w


def watch_wan_input_grid(transformer: Any, callback: Callable[[tuple[int, int, int]], None]):
    """Call `callback((frames, height, width))` (in patches) before every forward of `transformer`.

    A video cache needs the grid of the chunk it is about to see (its processors only get flat tokens). The callback
    may raise to refuse a forward before anything runs. Returns the hook handle (`handle.remove()` detaches it).
    """
    check_wan_transformer(transformer, "watch_wan_input_grid")

    def hook(module, args, kwargs):
        hidden_states = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        callback(wan_patch_grid(module, hidden_states))

    return transformer.register_forward_pre_hook(hook, with_kwargs=True)


class _MaskedWanDefaultProcessor:
    """diffusers' own Wan processor, called with a fixed self-attention mask (Wan's blocks never pass one)."""

    def __init__(self, mask: torch.Tensor):
        from diffusers.models.transformers.transformer_wan import WanAttnProcessor

        self.inner = WanAttnProcessor()
        self.mask = mask

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None, **kw):
        return self.inner(attn, hidden_states, encoder_hidden_states, self.mask, rotary_emb, **kw)


def set_wan_self_attention_mask(transformer: Any, mask: torch.Tensor) -> list[Any]:
    """Every Wan self-attention runs diffusers' default processor with `mask` (bool, True = may attend; shape
    broadcastable to (B, heads, S, S)). A reference for masked attention patterns (e.g. block-causal chunks)
    computed by diffusers' own code; returns the replaced processors for `restore_wan_self_attention_processors`."""
    return set_wan_self_attention_processors(transformer, lambda index: _MaskedWanDefaultProcessor(mask))


def wan_to_dtype(transformer: Any, dtype: torch.dtype) -> Any:
    """Cast a Wan transformer's parameters to `dtype` the way `from_pretrained(torch_dtype=dtype)` leaves them: the
    modules the class keeps in fp32 (`_keep_in_fp32_modules`: rope, time embedder, modulation tables, norms) stay
    fp32, and buffers (the rope tables) are left as they are. A plain `.to(dtype)` would round the rope tables."""
    check_wan_transformer(transformer, "wan_to_dtype")
    keep = set(getattr(transformer, "_keep_in_fp32_modules", None) or ())
    for name, param in transformer.named_parameters():
        if not keep.intersection(name.split(".")):
            param.data = param.data.to(dtype)
    return transformer
