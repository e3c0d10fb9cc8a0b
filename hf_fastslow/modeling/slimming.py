"""Structured pruning with learned masks: ViT-Slim (Chavan et al., CVPR 2022) for transformers ViT and Llama-family
models, network slimming (Liu et al., ICCV 2017) for transformers ResNets, as used for light-weight trackers by
Aggarwal et al. (ICASSP 2023, arXiv 2211.13769).

    masks = attach_slim_masks(model, SlimConfig(attn_granularity="head"))   # real-valued masks, all ones
    ... train with SlimSearchTrainer (task loss + w_attn * sum|zeta_attn| + w_mlp * sum|zeta_mlp|) ...
    masks.binarize(attn_budget=0.5, mlp_budget=0.5)                       # keep the top 50 % by |zeta|
    child = slice_model(model, masks)                                     # physically smaller; save_pretrained works
    AutoModelForCausalLM.from_pretrained(folder)                          # reloads through a registered Slim class

Masks per family (which dimensions are tied, and why):
- ViT: attention `head` (one zeta per head) or `dim` (one zeta per head dimension, shared by all heads so the
  child keeps a uniform head_dim; the softmax scale of the original head_dim is kept), multiplied into the q, k and
  v outputs; MLP one zeta per channel of fc2's input (after the activation).
- Llama: MLP one zeta per channel of down_proj's input; attention only as whole KV groups (`kv_group`): a group's
  mask multiplies the output of every query head that reads it, so removing it removes its K/V head and those query
  heads together and never splits a RoPE pair. Per-head or per-dim masks are refused (GQA/RoPE ties).
- ResNet: the BatchNorm gammas are the (L1-penalised) scores; channels whose BatchNorm outputs are summed by a
  residual connection form one group and are scored (sum of |gamma|) and removed together. Binarising adds an
  explicit 0/1 mask after each BatchNorm, so the masked model equals the sliced one (a pruned channel's beta would
  otherwise still leak a constant).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ..integrations.slimming_seam import drop_quantizer, register_slim_models, slim_class_for

__all__ = ["SlimConfig", "SlimMasks", "MaskGroup", "attach_slim_masks", "slice_model", "select_units",
           "count_params_flops", "check_budget"]

register_slim_models()

ATTN_GRANULARITIES = ("head", "dim", "kv_group", None)
THRESHOLDS = ("global", "layerwise", "floor")


@dataclass
class SlimConfig:
    """What to mask and how to cut.

    Parameters:
        attn_granularity: "head" | "dim" (ViT) | "kv_group" (Llama; "head" means the same when every KV group holds one
            query head) | None (attention not pruned).
        mlp: mask the MLP channels.
        mlp_backend: "hook" (a forward pre-hook multiplies the down/fc2 input) or "ia3" (PEFT IA3 on down_proj / fc2
            as a feed-forward module: its `ia3_l` vector *is* the MLP mask).
        channels: ResNets: network slimming over BatchNorm channels.
        w_attn, w_mlp, w_channel: L1 weights of the sparsity penalty (ViT-Slim's OSTrack values; network slimming's s).
        threshold: "global" (one ranking over all layers; every layer keeps >= 1 unit), "layerwise" (each layer keeps
            its own share) or "floor" (global, each layer keeps >= ceil(floor * its units)).
        rescale: "reset" (kept masks become exactly 1: the learned magnitudes are discarded, as ViT-Slim does) or
            "keep" (kept magnitudes are folded into the weights at slicing).
    """

    attn_granularity: str | None = "head"
    mlp: bool = True
    mlp_backend: str = "hook"
    channels: bool = True
    w_attn: float = 1.5e-4
    w_mlp: float = 7.5e-5
    w_channel: float = 1e-5
    threshold: str = "global"
    floor: float = 0.002
    rescale: str = "reset"

    def __post_init__(self):
        if self.attn_granularity not in ATTN_GRANULARITIES:
            raise ValueError(f"attn_granularity must be one of {ATTN_GRANULARITIES}, got {self.attn_granularity!r}.")
        if self.mlp_backend not in ("hook", "ia3"):
            raise ValueError(f"mlp_backend must be 'hook' or 'ia3', got {self.mlp_backend!r}.")
        if self.threshold not in THRESHOLDS:
            raise ValueError(f"threshold must be one of {THRESHOLDS}, got {self.threshold!r}.")
        if self.rescale not in ("reset", "keep"):
            raise ValueError(f"rescale must be 'reset' or 'keep', got {self.rescale!r}.")
        if not 0.0 <= self.floor <= 1.0:
            raise ValueError(f"floor must be in [0, 1], got {self.floor}.")
        for name in ("w_attn", "w_mlp", "w_channel"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")


@dataclass
class MaskGroup:
    """One prunable dimension of one layer: `units` entries, scored by |param| (or by `score_fn`)."""

    kind: str  # "attn" | "mlp" | "channel"
    name: str
    layer: int
    units: int
    param: torch.Tensor | None = None  # the zeta (trainable during search); None for ResNet channels
    score_fn: object = None  # callable -> per-unit scores (ResNet: sum of |gamma| over coupled BatchNorms)
    info: dict = field(default_factory=dict)  # family-specific handles used by slicing
    kept: torch.Tensor | None = None  # sorted kept unit indices after binarize

    def scores(self) -> torch.Tensor:
        if self.score_fn is not None:
            return self.score_fn().detach().float()
        return self.param.detach().reshape(-1).abs().float()


def check_budget(name: str, budget) -> float | None:
    """A budget is the kept fraction, in (0, 1]; None leaves that kind unpruned."""
    if budget is None:
        return None
    if isinstance(budget, bool) or not isinstance(budget, (int, float)) or not 0.0 < float(budget) <= 1.0:
        raise ValueError(f"{name} must be a kept fraction in (0, 1] (e.g. 0.5 keeps half), got {budget!r}.")
    return float(budget)


def select_units(scores: Sequence[torch.Tensor], budget: float, threshold: str = "global",
                 floor: float = 0.002) -> list[torch.Tensor]:
    """Kept indices per layer: the top `round(budget * N)` units by score (N summed over layers for global/floor,
    per layer for layerwise), never fewer than one unit per layer (floor: ceil(floor * N_l)). Ties go to the lower
    index, so the result is deterministic."""
    budget = check_budget("budget", budget)
    if threshold not in THRESHOLDS:
        raise ValueError(f"threshold must be one of {THRESHOLDS}, got {threshold!r}.")
    sizes = [int(s.numel()) for s in scores]
    if threshold == "layerwise":
        return [_top(s, max(1, min(n, round(budget * n)))) for s, n in zip(scores, sizes)]
    minimum = [1 if threshold == "global" else max(1, math.ceil(floor * n)) for n in sizes]
    minimum = [min(m, n) for m, n in zip(minimum, sizes)]
    total = max(sum(minimum), round(budget * sum(sizes)))
    kept = [_top(s, m) for s, m in zip(scores, minimum)]
    rest = total - sum(minimum)
    if rest > 0:
        # Global ranking over the units not already kept (ties: lower layer, then lower index).
        cand_scores, cand_ids = [], []
        for layer, (s, k) in enumerate(zip(scores, kept)):
            free = torch.ones(s.numel(), dtype=torch.bool)
            free[k] = False
            idx = free.nonzero().flatten()
            cand_scores.append(s.flatten()[idx].float())
            cand_ids.append(torch.stack([torch.full_like(idx, layer), idx], 1))
        cs, ci = torch.cat(cand_scores), torch.cat(cand_ids)
        order = torch.sort(-cs, stable=True).indices[:rest]
        for layer in range(len(scores)):
            extra = ci[order][ci[order][:, 0] == layer, 1]
            kept[layer] = torch.sort(torch.cat([kept[layer], extra])).values
    return kept


def _top(score: torch.Tensor, k: int) -> torch.Tensor:
    order = torch.sort(-score.flatten().float(), stable=True).indices[:k]
    return torch.sort(order).values


class SlimMasks(nn.Module):
    """The masks attached to one model (see `attach_slim_masks`). Its own parameters are the hook-backend zetas; with
    the IA3 backend the MLP zetas live in the model's IA3 layers and are listed in `mask_parameters()` too."""

    def __init__(self, model: nn.Module, config: SlimConfig, family: str):
        super().__init__()
        self.config = config
        self.family = family
        self.zetas = nn.ParameterDict()
        self.groups: list[MaskGroup] = []
        self.handles: list = []
        self.binarized = False
        self._model_ref = [model]  # a list, so the model is not registered as a submodule of its own masks

    @property
    def model(self) -> nn.Module:
        return self._model_ref[0]

    def add_zeta(self, name: str, shape) -> nn.Parameter:
        device, dtype = _device_dtype(self.model)
        p = nn.Parameter(torch.ones(shape, device=device, dtype=torch.float32 if dtype == torch.float16 else dtype))
        self.zetas[name.replace(".", "_")] = p
        return p

    def mask_parameters(self) -> list[torch.Tensor]:
        """Every trainable mask (the zetas; for ResNets, the BatchNorm gammas are model weights and not listed)."""
        return [g.param for g in self.groups if g.param is not None]

    def kinds(self) -> list[str]:
        return sorted({g.kind for g in self.groups})

    def l1(self) -> dict[str, torch.Tensor]:
        """Sum of |zeta| per kind (ResNet channels: sum of |gamma| over every BatchNorm), differentiable."""
        out: dict[str, torch.Tensor] = {}
        for g in self.groups:
            if g.kind == "channel":
                continue
            out[g.kind] = out.get(g.kind, 0) + g.param.abs().sum()
        if "channel" in self.kinds():
            out["channel"] = sum(bn.weight.abs().sum() for bn in self._batchnorms())
        return out

    def penalty(self) -> torch.Tensor:
        """w_attn * sum|zeta_attn| + w_mlp * sum|zeta_mlp| + w_channel * sum|gamma| (zero after binarize)."""
        if self.binarized:
            return torch.zeros(())
        weights = {"attn": self.config.w_attn, "mlp": self.config.w_mlp, "channel": self.config.w_channel}
        terms = [weights[k] * v for k, v in self.l1().items()]
        return sum(terms) if terms else torch.zeros(())

    def _batchnorms(self) -> list[nn.BatchNorm2d]:
        seen, out = set(), []
        for g in self.groups:
            for bn in g.info.get("bns", []):
                if id(bn) not in seen:
                    seen.add(id(bn))
                    out.append(bn)
        return out

    def summary(self) -> dict[str, float]:
        """Mean |zeta| per kind and, after binarize, the kept fraction per kind (for logging)."""
        out = {}
        for kind in self.kinds():
            groups = [g for g in self.groups if g.kind == kind]
            scores = torch.cat([g.scores() for g in groups])
            out[f"slim/{kind}_mean_abs"] = float(scores.mean())
            if self.binarized:
                out[f"slim/{kind}_kept"] = sum(len(g.kept) for g in groups) / sum(g.units for g in groups)
        return out

    def binarize(self, attn_budget: float | None = None, mlp_budget: float | None = None,
                 channel_budget: float | None = None, *, budget: float | None = None) -> dict[str, float]:
        """Keep the top units by |zeta| (kept fraction per kind), set the masks to exact 0/1 (or, with
        rescale="keep", zero the pruned ones and keep the learned magnitudes), freeze them. `budget` sets every kind
        not given explicitly. Returns the kept fraction per kind."""
        budgets = {"attn": check_budget("attn_budget", attn_budget), "mlp": check_budget("mlp_budget", mlp_budget),
                   "channel": check_budget("channel_budget", channel_budget)}
        common = check_budget("budget", budget)
        kinds = self.kinds()
        for kind, b in list(budgets.items()):
            if b is None and common is not None:
                budgets[kind] = common if kind in kinds else None
            elif b is not None and kind not in kinds:
                raise ValueError(f"{kind}_budget given but no {kind} masks are attached (attached: {kinds}).")
        fractions = {}
        for kind in kinds:
            groups = [g for g in self.groups if g.kind == kind]
            b = budgets[kind]
            if b is None:
                kept = [torch.arange(g.units) for g in groups]
            else:
                kept = select_units([g.scores() for g in groups], b, self.config.threshold, self.config.floor)
            for g, idx in zip(groups, kept):
                g.kept = idx
                self._write_binary(g)
            fractions[kind] = sum(len(k) for k in kept) / sum(g.units for g in groups)
        self.binarized = True
        return fractions

    @torch.no_grad()
    def _write_binary(self, g: MaskGroup) -> None:
        keep = torch.zeros(g.units, dtype=torch.bool, device=g.kept.device)
        keep[g.kept] = True
        if g.param is not None:
            flat = g.param.data.view(-1)
            new = torch.ones_like(flat) if self.config.rescale == "reset" else flat.clone()
            new[~keep.to(flat.device)] = 0
            flat.copy_(new)
            g.param.requires_grad_(False)
        else:  # ResNet channels: a 0/1 buffer multiplied after every BatchNorm of the group
            g.info["binary"].copy_(keep.to(g.info["binary"].dtype))

    def remove(self) -> None:
        """Detach the hooks (the model computes as if every mask were 1 again, unless it was sliced)."""
        for h in self.handles:
            h.remove()
        self.handles.clear()


def _device_dtype(model: nn.Module):
    p = next(model.parameters())
    return p.device, p.dtype


def _family(model: nn.Module) -> str:
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer
    from transformers.models.resnet.modeling_resnet import ResNetConvLayer
    from transformers.models.vit.modeling_vit import ViTLayer

    found = set()
    for m in model.modules():
        if isinstance(m, ViTLayer):
            found.add("vit")
        elif isinstance(m, LlamaDecoderLayer):
            found.add("llama")
        elif isinstance(m, ResNetConvLayer):
            found.add("resnet")
    if len(found) != 1:
        what = "several families: " + ", ".join(sorted(found)) if found else "no ViTLayer, LlamaDecoderLayer or ResNet"
        raise TypeError(
            f"attach_slim_masks cannot prune {type(model).__name__}: it holds {what}. Supported: transformers ViT "
            "(ViTModel and models holding its layers), Llama-family decoders (LlamaDecoderLayer) and ResNets "
            "(ResNetModel / ResNetForImageClassification, or modules holding one)."
        )
    return found.pop()


def attach_slim_masks(model: nn.Module, cfg: SlimConfig | None = None) -> SlimMasks:
    """Attach ViT-Slim masks (ViT / Llama) or network-slimming channel groups (ResNet) to `model`, all equal to 1:
    the model's outputs are unchanged until the masks move. Returns the `SlimMasks`."""
    cfg = cfg or SlimConfig()
    family = _family(model)
    if getattr(model, "_slim_masks_attached", False):
        raise ValueError("this model already carries slim masks: call masks.remove() (or slice it) first.")
    masks = SlimMasks(model, cfg, family)
    if family == "vit":
        from .slimming_vit import attach_vit
        attach_vit(model, cfg, masks)
    elif family == "llama":
        from .slimming_llama import attach_llama
        attach_llama(model, cfg, masks)
    else:
        from .slimming_resnet import attach_resnet
        attach_resnet(model, cfg, masks)
    if not masks.groups:
        raise ValueError(f"SlimConfig {cfg} attaches no masks to {type(model).__name__} (nothing to prune).")
    model._slim_masks_attached = True
    return masks


@torch.no_grad()
def slice_model(model: nn.Module, masks: SlimMasks) -> nn.Module:
    """Physically remove every unit the binarised `masks` zeroed (folding kept magnitudes when rescale="keep"),
    detach the masks, and return the smaller model. A stock transformers model (LlamaForCausalLM, ViTModel,
    ResNetForImageClassification...) comes back as its registered Slim class, whose config records the new widths
    (`per_layer_config`, or the conv shapes for ResNets) so `save_pretrained` / `AutoModel*.from_pretrained` round-trip
    it; any other module (a tracker holding a ViT, say) is sliced in place."""
    if masks.model is not model:
        raise ValueError("these masks were attached to a different model.")
    if not masks.binarized:
        raise ValueError("binarize the masks first: masks.binarize(attn_budget=..., mlp_budget=...).")
    masks.remove()
    if masks.family == "vit":
        from .slimming_vit import slice_vit as slicer
    elif masks.family == "llama":
        from .slimming_llama import slice_llama as slicer
    else:
        from .slimming_resnet import slice_resnet as slicer
    config_update = slicer(model, masks)
    model._slim_masks_attached = False
    drop_quantizer(model)
    target = slim_class_for(model)
    if target is None:
        return model
    return _rebuild(model, target, config_update)


def _rebuild(model: nn.Module, target, config_update: dict) -> nn.Module:
    model_cls, config_cls = target
    base = model.config.to_dict()
    for key in ("model_type", "architectures", "transformers_version", "per_layer_config", "quantization_config"):
        base.pop(key, None)
    base.update(config_update)
    attn = model.config._attn_implementation
    config = config_cls(**base)
    config._attn_implementation = attn
    device, dtype = _device_dtype(model)
    with torch.device(device):
        child = model_cls(config)
    child.to(dtype)
    missing, unexpected = child.load_state_dict(model.state_dict(), strict=False)
    real_missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if real_missing or unexpected:
        raise RuntimeError(f"sliced state does not fit the rebuilt {model_cls.__name__}: missing {real_missing}, "
                           f"unexpected {unexpected}")
    if getattr(model, "generation_config", None) is not None and hasattr(child, "generation_config"):
        child.generation_config = model.generation_config
    child.train(model.training)
    return child


@torch.no_grad()
def count_params_flops(model: nn.Module, *args, **kwargs) -> dict[str, int]:
    """Parameters and forward FLOPs (2 x multiply-adds) of one call `model(*args, **kwargs)`, measured with hooks
    on every nn.Linear and nn.Conv2d plus the two attention matmuls (QK^T and AV, full n x n) of every module that
    has q_proj / k_proj / o_proj."""
    flops = [0]
    handles = []

    def linear_hook(mod, inp, out):
        flops[0] += 2 * out.numel() * mod.in_features

    def conv_hook(mod, inp, out):
        k = mod.kernel_size[0] * mod.kernel_size[1]
        flops[0] += 2 * out.numel() * (mod.in_channels // mod.groups) * k

    def attn_hook(mod, inp, out):
        n = out.shape[-2]
        flops[0] += 2 * 2 * out.numel() * n  # QK^T and AV: B*n*(H*d) * n each

    for m in model.modules():
        if isinstance(m, nn.Linear):
            handles.append(m.register_forward_hook(linear_hook))
        elif isinstance(m, nn.Conv2d):
            handles.append(m.register_forward_hook(conv_hook))
        if all(hasattr(m, a) for a in ("q_proj", "k_proj", "o_proj")) and isinstance(m.q_proj, nn.Module):
            handles.append(m.q_proj.register_forward_hook(attn_hook))
    try:
        model(*args, **kwargs)
    finally:
        for h in handles:
            h.remove()
    params = sum(p.numel() for p in model.parameters())
    return {"params": int(params), "flops": int(flops[0])}


# ------------------------------------------------------------------------------------------ shared by ViT and Llama
def slice_linear(linear: nn.Linear, index: torch.Tensor, dim: int, scale: torch.Tensor | None = None) -> nn.Linear:
    """A new nn.Linear keeping output rows (dim=0, bias too) or input columns (dim=1) `index`, optionally scaling the
    kept rows / columns by `scale` (a folded mask)."""
    index = index.to(linear.weight.device)
    weight = linear.weight.index_select(dim, index).clone()
    bias = linear.bias
    if dim == 0 and bias is not None:
        bias = bias.index_select(0, index).clone()
    elif bias is not None:
        bias = bias.clone()
    if scale is not None:
        scale = scale.to(weight)
        weight = weight * (scale[:, None] if dim == 0 else scale[None, :])
        if dim == 0 and bias is not None:
            bias = bias * scale
    out = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device=weight.device, dtype=weight.dtype)
    out.weight.copy_(weight)
    if bias is not None:
        out.bias.copy_(bias)
    out.weight.requires_grad_(linear.weight.requires_grad)
    return out


def output_mask_hook(param: torch.Tensor, expand=None):
    """Forward hook multiplying a module's output by the mask (last dim), `expand` mapping the zeta to that dim."""

    def hook(module, inputs, output):
        m = param if expand is None else expand(param)
        return output * m.to(output.dtype)

    return hook


def input_mask_hook(param: torch.Tensor, expand=None):
    """Forward pre-hook multiplying a module's input by the mask (last dim)."""

    def hook(module, inputs):
        m = param if expand is None else expand(param)
        return (inputs[0] * m.to(inputs[0].dtype), *inputs[1:])

    return hook


def attach_mlp_mask(masks: SlimMasks, parent: nn.Module, down_name: str, name: str, layer: int) -> None:
    """The MLP mask of one layer: a zeta over the input channels of `parent.<down_name>` (fc2 / down_proj), applied
    by a pre-hook, or (mlp_backend="ia3") PEFT IA3's feed-forward vector on that module."""
    down = getattr(parent, down_name)
    units = down.in_features if isinstance(down, nn.Linear) else down.base_layer.in_features
    if masks.config.mlp_backend == "ia3":
        zeta = _ia3_vector(parent, down_name)
    else:
        zeta = masks.add_zeta(f"{name}.mlp", (units,))
        masks.handles.append(down.register_forward_pre_hook(input_mask_hook(zeta)))
    masks.groups.append(MaskGroup("mlp", f"{name}.mlp", layer, units, zeta, info={"parent": parent,
                                                                                  "down": down_name}))


def _ia3_vector(parent: nn.Module, down_name: str) -> nn.Parameter:
    from peft import IA3Config, inject_adapter_in_model

    base = getattr(parent, down_name)
    trainable = {n: p.requires_grad for n, p in parent.named_parameters()}
    holder = nn.Module()
    holder.add_module(down_name, base)
    inject_adapter_in_model(IA3Config(target_modules=[down_name], feedforward_modules=[down_name]), holder)
    wrapped = getattr(holder, down_name)
    setattr(parent, down_name, wrapped)
    for n, p in parent.named_parameters():  # peft freezes everything but the adapter: the search trains weights too
        if n in trainable:
            p.requires_grad_(trainable[n])
    vector = wrapped.ia3_l["default"]
    vector.requires_grad_(True)
    return vector


def mlp_fold_and_unwrap(masks: SlimMasks, group: MaskGroup) -> tuple[nn.Linear, torch.Tensor | None]:
    """The plain down/fc2 Linear of a group (an IA3 wrapper is replaced by its base layer) and the kept magnitudes
    to fold into its columns (None with rescale="reset", where kept masks are exactly 1)."""
    parent, name = group.info["parent"], group.info["down"]
    down = getattr(parent, name)
    if not isinstance(down, nn.Linear):  # IA3 layer
        down = down.base_layer
        setattr(parent, name, down)
    scale = None
    if masks.config.rescale == "keep":
        scale = group.param.detach().reshape(-1).index_select(0, group.kept.to(group.param.device))
    return down, scale


def kept_scale(masks: SlimMasks, group: MaskGroup, expand=None) -> torch.Tensor | None:
    """The learned magnitudes of the kept units (rescale="keep"), expanded to rows; None with rescale="reset"."""
    if masks.config.rescale != "keep":
        return None
    z = group.param.detach().reshape(-1)
    z = z if expand is None else expand(z)
    return z
