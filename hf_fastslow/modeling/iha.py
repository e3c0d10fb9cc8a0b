"""Interleaved Head Attention (Duvvuri et al., arXiv 2602.21371) as a conversion of a pretrained HF causal LM.

Every attention head h gets P pseudo-heads whose queries, keys and values are learned mixtures of all heads'
Q/K/V; the P pseudo-tokens of each position are interleaved into a P-times longer sequence, one softmax attention
runs over it, and a learned collapse folds the P outputs of head h back into one head output before `o_proj`.

The conversion attaches an `IHAMixer` (the mixing and collapse weights) to every converted `self_attn` as
`self_attn.iha` and switches the model to `attn_implementation="iha"`; nothing else in the model changes, the
cache keeps the original post-RoPE keys and values, and `generate`, `save_pretrained`, PEFT and the HF/TRL trainers
work as usual. With `init_noise=0` the converted model computes the original function exactly.

    model = apply_iha(model, IHAConfig(num_pseudo_heads=3, init_noise=0.0))    # exact conversion
    model.save_pretrained(path)                                                 # IHA settings in config.json
    model = from_pretrained_iha(path)                                           # no trust_remote_code
"""

from __future__ import annotations

import torch
from torch import nn

from hf_fastslow.integrations import decoder_layers
from hf_fastslow.integrations.attention import sdpa_attention_function, set_attention_implementation
from hf_fastslow.integrations.iha_seam import (
    from_pretrained_with_modules,
    iha_unsupported_reason,
    register_iha_attention,
)
from hf_fastslow.kernels.iha import iha_attend, iha_attend_reference

from .iha_config import COLLAPSES, CONFIG_KEY, IHAConfig

ATTN_IMPLEMENTATION = "iha"
# PEFT: LoraConfig(..., modules_to_save=IHA_MODULES_TO_SAVE) trains (and saves) the mixers beside the adapters.
IHA_MODULES_TO_SAVE = ["iha"]

__all__ = [
    "ATTN_IMPLEMENTATION",
    "IHA_MODULES_TO_SAVE",
    "IHAConfig",
    "IHAMixer",
    "apply_iha",
    "from_pretrained_iha",
    "iha_attention_forward",
    "iha_param_group",
    "iha_parameters",
    "is_iha_model",
    "mark_only_iha_trainable",
]


class IHAMixer(nn.Module):
    """The IHA weights of one attention layer and its mix-attend-collapse forward.

    alpha_q [H, H, P]: pseudo-query (h, p) = sum_m alpha_q[m, h, p] q_m; alpha_k, alpha_v [G, H, P] likewise over the
    G key/value heads; collapse [H, P] (per-head) or [H, H, P] (global). `reset_parameters(noise)` sets the identity
    (alpha = one-hot on the head's own (KV) head, collapse = 1/P) plus Gaussian noise.
    """

    def __init__(self, num_heads: int, num_kv_heads: int, num_pseudo_heads: int, collapse: str = "per_head",
                 device=None, dtype=None):
        super().__init__()
        if num_heads % num_kv_heads:
            raise ValueError(f"IHA needs num_heads % num_kv_heads == 0; got {num_heads} and {num_kv_heads}.")
        if collapse not in COLLAPSES or num_pseudo_heads < 1:
            raise ValueError(f"IHAMixer: collapse must be one of {COLLAPSES} and P >= 1; got {collapse!r}, "
                             f"{num_pseudo_heads}.")
        h, g, p = num_heads, num_kv_heads, num_pseudo_heads
        self.num_heads, self.num_kv_heads, self.num_pseudo_heads, self.collapse_mode = h, g, p, collapse
        kw = {"device": device, "dtype": dtype}
        self.alpha_q = nn.Parameter(torch.empty(h, h, p, **kw))
        self.alpha_k = nn.Parameter(torch.empty(g, h, p, **kw))
        self.alpha_v = nn.Parameter(torch.empty(g, h, p, **kw))
        shape = (h, p) if collapse == "per_head" else (h, h, p)
        self.collapse = nn.Parameter(torch.empty(*shape, **kw))
        self.reset_parameters(0.0)

    @torch.no_grad()
    def reset_parameters(self, noise: float = 0.0, generator: torch.Generator | None = None) -> None:
        h, g, p = self.num_heads, self.num_kv_heads, self.num_pseudo_heads
        heads = torch.arange(h)
        eye_q = (torch.arange(h)[:, None] == heads[None, :]).float()  # [m, h]
        eye_kv = (torch.arange(g)[:, None] == (heads // (h // g))[None, :]).float()  # [g, h]: head h reads KV h // r
        self.alpha_q.copy_(eye_q[:, :, None].expand(h, h, p))
        self.alpha_k.copy_(eye_kv[:, :, None].expand(g, h, p))
        self.alpha_v.copy_(eye_kv[:, :, None].expand(g, h, p))
        if self.collapse_mode == "per_head":
            self.collapse.fill_(1.0 / p)
        else:
            self.collapse.copy_(eye_q[:, :, None].expand(h, h, p) / p)
        if noise > 0 and not self.alpha_q.is_meta:
            for param, scale in ((self.alpha_q, noise), (self.alpha_k, noise), (self.alpha_v, noise),
                                 (self.collapse, noise / p)):
                param.add_(torch.randn(param.shape, generator=generator).to(param) * scale)

    def forward(self, query, key, value, attention_mask, scaling: float, dropout: float = 0.0) -> torch.Tensor:
        """q [B,H,N,d], k/v [B,G,S,d], boolean mask [B,1,N,S] or None -> [B,N,H,d]."""
        args = (query, key, value, attention_mask, self.alpha_q, self.alpha_k, self.alpha_v, self.collapse, scaling)
        # The fused Triton kernel is forward-only: training (or dropout) takes the differentiable reference.
        needs_grad = torch.is_grad_enabled() and any(t.requires_grad for t in args[:3] + args[4:8])
        if needs_grad or dropout > 0:
            return iha_attend_reference(*args, dropout=dropout)
        return iha_attend(*args)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_kv_heads}, pseudo_heads={self.num_pseudo_heads}, "
                f"collapse={self.collapse_mode}")


def _boolean_mask(attention_mask, key: torch.Tensor):
    if attention_mask is None:
        return None
    mask = attention_mask[:, :, :, : key.shape[-2]]
    if mask.dtype != torch.bool:  # an additive float mask: 0 where attended, a large negative value elsewhere
        mask = mask > torch.finfo(mask.dtype).min / 2
    return mask


def iha_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0, scaling=None,
                          softcap=None, **kwargs):
    """`attn_implementation="iha"`: layers with an `iha` mixer run IHA, the others stock SDPA."""
    mixer = getattr(module, "iha", None)
    if mixer is None:
        return sdpa_attention_function()(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling,
                              softcap=softcap, **kwargs)
    if softcap is not None:
        raise NotImplementedError(f"IHA attention has no logit soft-capping (got softcap={softcap}).")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    out = mixer(query, key, value, _boolean_mask(attention_mask, key), scaling=scaling, dropout=dropout)
    return out, None


def _layer_indices(num_layers: int, layers) -> list[int]:
    if layers == "all":
        return list(range(num_layers))
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"IHAConfig.layers {bad} out of range: the model has {num_layers} decoder layers.")
    return list(layers)


def _build_mixers(model, cfg: IHAConfig) -> tuple[dict[int, IHAMixer], IHAConfig]:
    """Mixers for the layers `cfg` names (nothing attached yet) and the config with P and layers resolved."""
    reason = iha_unsupported_reason(model)
    if reason is not None:
        raise NotImplementedError(reason)
    config = model.config
    layers = decoder_layers(model)
    if any(getattr(layer.self_attn, "iha", None) is not None for layer in layers):
        raise ValueError(f"{type(model).__name__} is already IHA-converted (its attention modules have `iha`).")
    h = config.num_attention_heads
    g = getattr(config, "num_key_value_heads", None) or h
    if h % g:
        raise ValueError(f"IHA needs num_attention_heads % num_key_value_heads == 0; got {h} and {g}.")
    p = cfg.num_pseudo_heads or h
    indices = _layer_indices(len(layers), cfg.layers)
    generator = torch.Generator().manual_seed(cfg.seed) if cfg.seed is not None else None
    mixers = {}
    for i in indices:
        weight = layers[i].self_attn.q_proj.weight
        mixer = IHAMixer(h, g, p, cfg.collapse, device=weight.device, dtype=weight.dtype)
        mixer.reset_parameters(cfg.init_noise, generator)
        mixers[i] = mixer
    layers_field = "all" if cfg.layers == "all" else indices
    resolved = IHAConfig(num_pseudo_heads=p, collapse=cfg.collapse, init_noise=cfg.init_noise, layers=layers_field,
                         seed=cfg.seed)
    return mixers, resolved


def _attach(model, mixers: dict[int, IHAMixer]) -> None:
    layers = decoder_layers(model)
    for i, mixer in mixers.items():
        layers[i].self_attn.add_module("iha", mixer)


def _activate(model, cfg: IHAConfig) -> None:
    register_iha_attention(ATTN_IMPLEMENTATION, iha_attention_forward)
    set_attention_implementation(model, ATTN_IMPLEMENTATION)
    setattr(model.config, CONFIG_KEY, cfg.to_dict())


def apply_iha(model, cfg: IHAConfig | None = None):
    """Convert `model` (in place) to IHA and return it. Every check runs before anything changes: an unsupported
    architecture, an already converted model or bad settings raise and leave the model as it was."""
    cfg = cfg if cfg is not None else IHAConfig()
    if not isinstance(cfg, IHAConfig):
        raise TypeError(f"apply_iha expects an IHAConfig; got {type(cfg).__name__}.")
    mixers, resolved = _build_mixers(model, cfg)
    _attach(model, mixers)
    _activate(model, resolved)
    return model


def is_iha_model(model) -> bool:
    return any(isinstance(m, IHAMixer) for m in model.modules())


def from_pretrained_iha(path, **kwargs):
    """Load a checkpoint written by `save_pretrained` of an IHA model (mixers included; no trust_remote_code).

    `kwargs` go to `from_pretrained` (dtype, device_map, ...)."""
    from transformers import AutoConfig

    config = kwargs.pop("config", None) or AutoConfig.from_pretrained(path)
    settings = getattr(config, CONFIG_KEY, None)
    if not isinstance(settings, dict):
        raise ValueError(f"{path}: config.json has no {CONFIG_KEY!r} settings; it is not an IHA checkpoint "
                         "(load it with from_pretrained and convert it with apply_iha).")
    cfg = IHAConfig.from_dict(settings)
    built = {}

    def attach(model):
        mixers, _ = _build_mixers(model, IHAConfig(**{**cfg.to_dict(), "init_noise": 0.0}))
        _attach(model, mixers)
        built.update(mixers)

    model, info = from_pretrained_with_modules(path, attach, config=config, **kwargs)
    missing = [k for k in info.get("missing_keys", []) if ".iha." in k]
    if missing:
        raise ValueError(f"{path}: the checkpoint lacks IHA weights {missing[:4]}{'...' if len(missing) > 4 else ''}.")
    _activate(model, cfg)
    return model


# -- training helpers ------------------------------------------------------------------------------------------------
def iha_parameters(model) -> list[nn.Parameter]:
    """The mixing and collapse parameters of every converted layer (PEFT copies included)."""
    return [p for m in model.modules() if isinstance(m, IHAMixer) for p in m.parameters()]


def iha_param_group(model, lr: float = 1e-2, weight_decay: float = 0.0) -> dict:
    """An optimizer param group of the mixers (their own lr, no weight decay: they start at the identity)."""
    params = iha_parameters(model)
    if not params:
        raise ValueError(f"{type(model).__name__} has no IHA mixers: convert it with apply_iha first.")
    return {"params": params, "lr": lr, "weight_decay": weight_decay}


def mark_only_iha_trainable(model) -> int:
    """Freeze everything but the mixers; return the number of trainable parameters."""
    mixer_params = {id(p) for p in iha_parameters(model)}
    if not mixer_params:
        raise ValueError(f"{type(model).__name__} has no IHA mixers: convert it with apply_iha first.")
    for p in model.parameters():
        p.requires_grad_(id(p) in mixer_params)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
