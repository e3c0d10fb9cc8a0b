"""ViT-Slim masks and slicing for Llama-family decoders: MLP channels and whole KV groups (GQA / RoPE tied)."""

from __future__ import annotations

import torch
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from .slimming import (
    MaskGroup,
    SlimConfig,
    SlimMasks,
    attach_mlp_mask,
    input_mask_hook,
    kept_scale,
    mlp_fold_and_unwrap,
    slice_linear,
)

__all__ = ["attach_llama", "slice_llama"]


def _llama_layers(model) -> list[tuple[str, LlamaDecoderLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, LlamaDecoderLayer)]


def _heads(attn) -> tuple[int, int, int]:
    """(query heads, KV heads, head_dim) of an attention module, read from its projections."""
    head_dim = attn.head_dim
    return attn.q_proj.out_features // head_dim, attn.k_proj.out_features // head_dim, head_dim


def attach_llama(model, cfg: SlimConfig, masks: SlimMasks) -> None:
    granularity = cfg.attn_granularity
    for i, (name, layer) in enumerate(_llama_layers(model)):
        attn = layer.self_attn
        heads, kv_heads, head_dim = _heads(attn)
        n_rep = heads // kv_heads
        if granularity == "dim":
            raise ValueError(
                "attn_granularity='dim' on a RoPE decoder would prune q/k dimensions that RoPE rotates in pairs "
                f"(i and i + {head_dim // 2}) and that GQA shares across {n_rep} query heads; use 'kv_group' (whole "
                "KV groups) or None (MLP channels only).")
        if granularity == "head" and n_rep > 1:
            raise ValueError(
                f"attn_granularity='head' on a GQA decoder ({heads} query heads share {kv_heads} KV heads): a query "
                "head cannot be removed without its KV group's other heads being kept consistent; use 'kv_group'.")
        if granularity is not None:
            zeta = masks.add_zeta(f"{name}.attn", (kv_heads,))
            width = n_rep * head_dim

            def expand(z, width=width):  # a group's zeta on every query head that reads it, all of its dims
                return z.repeat_interleave(width)

            # Masking o_proj's input per group == removing the group's K/V head and its query heads (their q, k, v
            # reach the output only through these columns), so RoPE pairs and GQA sharing stay intact.
            masks.handles.append(attn.o_proj.register_forward_pre_hook(input_mask_hook(zeta, expand)))
            masks.groups.append(MaskGroup("attn", f"{name}.attn", i, kv_heads, zeta,
                                          info={"attention": attn, "expand": expand}))
        if cfg.mlp:
            attach_mlp_mask(masks, layer.mlp, "down_proj", name, i)


@torch.no_grad()
def slice_llama(model, masks: SlimMasks) -> dict:
    layers = _llama_layers(model)
    for g in masks.groups:
        if g.kind == "attn":
            attn = g.info["attention"]
            heads, kv_heads, d = _heads(attn)
            n_rep = heads // kv_heads
            kept = g.kept.to(attn.q_proj.weight.device)
            ar = torch.arange(d, device=kept.device)
            kv_rows = (kept[:, None] * d + ar).flatten()
            q_heads = (kept[:, None] * n_rep + torch.arange(n_rep, device=kept.device)).flatten()
            q_rows = (q_heads[:, None] * d + ar).flatten()
            scale = kept_scale(masks, g, g.info["expand"])
            attn.q_proj = slice_linear(attn.q_proj, q_rows, 0)
            attn.k_proj = slice_linear(attn.k_proj, kv_rows, 0)
            attn.v_proj = slice_linear(attn.v_proj, kv_rows, 0)
            attn.o_proj = slice_linear(attn.o_proj, q_rows, 1, None if scale is None else scale.index_select(0, q_rows))
        else:
            mlp = g.info["parent"]
            down, scale = mlp_fold_and_unwrap(masks, g)
            mlp.gate_proj = slice_linear(mlp.gate_proj, g.kept, 0)
            mlp.up_proj = slice_linear(mlp.up_proj, g.kept, 0)
            mlp.down_proj = slice_linear(down, g.kept, 1, scale)
            mlp.intermediate_size = len(g.kept)
    per_layer = {}
    head_dim = None
    for i, (_, layer) in enumerate(layers):
        heads, kv_heads, head_dim = _heads(layer.self_attn)
        per_layer[i] = {"num_attention_heads": heads, "num_key_value_heads": kv_heads,
                        "intermediate_size": layer.mlp.down_proj.in_features}
    return {"per_layer_config": per_layer, "head_dim": int(head_dim)}
