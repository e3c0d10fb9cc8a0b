"""ViT-Slim masks and slicing for transformers ViT layers (ViTModel, ViTForImageClassification, or any module that
holds `ViTLayer`s, such as the one-stream tracker)."""

from __future__ import annotations

import torch
from transformers.models.vit.modeling_vit import ViTLayer

from .slimming import (
    MaskGroup,
    SlimConfig,
    SlimMasks,
    attach_mlp_mask,
    kept_scale,
    mlp_fold_and_unwrap,
    output_mask_hook,
    slice_linear,
)

__all__ = ["attach_vit", "slice_vit"]


def _vit_layers(model) -> list[tuple[str, ViTLayer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ViTLayer)]


def _expander(granularity: str, heads: int, head_dim: int):
    if granularity == "head":  # one zeta per head, over its head_dim rows (q/k/v rows are head-major)
        return lambda z: z.repeat_interleave(head_dim)
    return lambda z: z.repeat(heads)  # "dim": one zeta per head dimension, shared by every head


def attach_vit(model, cfg: SlimConfig, masks: SlimMasks) -> None:
    if cfg.attn_granularity == "kv_group":
        raise ValueError("attn_granularity='kv_group' is for grouped-query decoders (Llama); ViT takes 'head' or "
                         "'dim'.")
    for i, (name, layer) in enumerate(_vit_layers(model)):
        attn = layer.attention
        heads, head_dim = attn.num_attention_heads, attn.head_dim
        if cfg.attn_granularity is not None:
            units = heads if cfg.attn_granularity == "head" else head_dim
            zeta = masks.add_zeta(f"{name}.attn", (units,))
            expand = _expander(cfg.attn_granularity, heads, head_dim)
            for proj in (attn.q_proj, attn.k_proj, attn.v_proj):  # same mask on q, k and v of a head (ViT-Slim)
                masks.handles.append(proj.register_forward_hook(output_mask_hook(zeta, expand)))
            masks.groups.append(MaskGroup("attn", f"{name}.attn", i, units, zeta,
                                          info={"attention": attn, "granularity": cfg.attn_granularity}))
        if cfg.mlp:
            attach_mlp_mask(masks, layer.mlp, "fc2", name, i)


@torch.no_grad()
def slice_vit(model, masks: SlimMasks) -> dict:
    """Slice q/k/v rows, o_proj columns, fc1 rows and fc2 columns; returns the child's config update."""
    layers = _vit_layers(model)
    first = layers[0][1].attention
    scaling_dim = getattr(getattr(model, "config", None), "slim_scaling_head_dim", None) or first.head_dim
    for g in masks.groups:
        if g.kind == "attn":
            attn = g.info["attention"]
            heads, head_dim = attn.num_attention_heads, attn.head_dim
            kept = g.kept.to(attn.q_proj.weight.device)
            if g.info["granularity"] == "head":
                rows = (kept[:, None] * head_dim + torch.arange(head_dim, device=kept.device)).flatten()
                heads = len(kept)
            else:
                rows = (torch.arange(heads, device=kept.device)[:, None] * head_dim + kept[None, :]).flatten()
                head_dim = len(kept)
            scale = kept_scale(masks, g, _expander(g.info["granularity"], attn.num_attention_heads, attn.head_dim))
            scale = None if scale is None else scale.index_select(0, rows)
            attn.q_proj = slice_linear(attn.q_proj, rows, 0, scale)
            attn.k_proj = slice_linear(attn.k_proj, rows, 0, scale)
            attn.v_proj = slice_linear(attn.v_proj, rows, 0, scale)
            attn.o_proj = slice_linear(attn.o_proj, rows, 1)
            attn.num_attention_heads, attn.head_dim = heads, head_dim
            # attn.scaling is left as it is: q.k over the kept dims keeps the original model's softmax scale.
        else:
            mlp = g.info["parent"]
            down, scale = mlp_fold_and_unwrap(masks, g)
            mlp.fc1 = slice_linear(mlp.fc1, g.kept, 0)
            mlp.fc2 = slice_linear(down, g.kept, 1, scale)
    per_layer = {}
    for i, (_, layer) in enumerate(layers):
        attn = layer.attention
        per_layer[i] = {"num_attention_heads": attn.num_attention_heads, "head_dim": attn.head_dim,
                        "intermediate_size": layer.mlp.fc1.out_features}
    return {"per_layer_config": per_layer, "slim_scaling_head_dim": int(scaling_dim),
            "head_dim": int(scaling_dim)}
