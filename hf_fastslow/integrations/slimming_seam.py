"""Registered model classes for physically sliced (non-uniform width) models, so `AutoModel*.from_pretrained(folder)`
reloads a pruned child without `trust_remote_code`.

Llama and ViT children keep their widths in transformers' own `per_layer_config` (the heterogeneity mixin of 5.24):
stock `LlamaModel` / `ViTModel` read the global `intermediate_size` etc. and refuse a heterogeneous config, so the
Slim classes opt into global access while the stock constructor runs and then rebuild every layer from its own
per-layer config. ResNet has no per-layer notion (its block widths derive from `hidden_sizes`), so its child stores
the width of every convolution it resized (`slim_conv_shapes`) and rebuilds those modules.

Private pieces touched here: `config._heterogeneity_spec` (read through the public `per_layer_config` view and
`allow_global_per_layer_attribute_access`), and the module layout of LlamaModel / ViTModel / ResNet (5.17 and 5.24).
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageClassification,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    ResNetConfig,
    ResNetForImageClassification,
    ResNetModel,
    ViTConfig,
    ViTForImageClassification,
    ViTModel,
)
from transformers.models.llama.modeling_llama import LlamaDecoderLayer
from transformers.models.vit.modeling_vit import ViTLayer

__all__ = [
    "SlimLlamaConfig", "SlimLlamaModel", "SlimLlamaForCausalLM",
    "SlimViTConfig", "SlimViTModel", "SlimViTForImageClassification",
    "SlimResNetConfig", "SlimResNetModel", "SlimResNetForImageClassification",
    "layer_config", "slim_class_for", "register_slim_models",
]


def layer_config(config, index: int):
    """The config layer `index` is built from: its per-layer view when the config is heterogeneous, else itself."""
    if getattr(config, "is_heterogeneous", False):
        return config.per_layer_config[index]
    return config


class _GlobalAccess:
    """Lets a stock constructor read the global value of per-layer attributes (the layers are rebuilt after)."""

    def __init__(self, config):
        self.config = config

    def __enter__(self):
        self.before = self.config.__dict__.get("allow_global_per_layer_attribute_access", False)
        self.config.__dict__["allow_global_per_layer_attribute_access"] = True
        return self.config

    def __exit__(self, *exc):
        self.config.__dict__["allow_global_per_layer_attribute_access"] = self.before
        return False


def _allow_global_access(config) -> None:
    # Stock code reads global values of per-layer attributes (config validation, cache sizing, generation): in a Slim
    # config the global value is the widest (original) one, and every layer is built from its own per-layer view.
    config.__dict__["allow_global_per_layer_attribute_access"] = True


# ---------------------------------------------------------------------------------------------------------- Llama
class SlimLlamaConfig(LlamaConfig):
    """`LlamaConfig` whose `per_layer_config` may set `intermediate_size`, `num_attention_heads` and
    `num_key_value_heads` per layer (head_dim stays global: only whole KV groups are removed)."""

    model_type = "slim_llama"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _allow_global_access(self)


def _rebuild_llama_layers(model: LlamaModel, config) -> None:
    if getattr(config, "is_heterogeneous", False):
        model.layers = nn.ModuleList(
            [LlamaDecoderLayer(layer_config(config, i), i) for i in range(config.num_hidden_layers)]
        )


class SlimLlamaModel(LlamaModel):
    config_class = SlimLlamaConfig

    def __init__(self, config):
        with _GlobalAccess(config):
            super().__init__(config)
        _rebuild_llama_layers(self, config)
        self.post_init()


class SlimLlamaForCausalLM(LlamaForCausalLM):
    config_class = SlimLlamaConfig

    def __init__(self, config):
        with _GlobalAccess(config):
            super().__init__(config)
        _rebuild_llama_layers(self.model, config)
        self.post_init()


# ------------------------------------------------------------------------------------------------------------ ViT
class SlimViTConfig(ViTConfig):
    """`ViTConfig` whose `per_layer_config` may set `num_attention_heads`, `head_dim` and `intermediate_size` per
    layer. `slim_scaling_head_dim` keeps the softmax scale of the original model (ViT-Slim keeps it when it removes
    head dimensions: q.k of the kept dims must be scaled exactly as before)."""

    model_type = "slim_vit"

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        _allow_global_access(self)


def _rebuild_vit_layers(model: ViTModel, config) -> None:
    if getattr(config, "is_heterogeneous", False):
        model.layers = nn.ModuleList([ViTLayer(layer_config(config, i)) for i in range(config.num_hidden_layers)])
    scaling_dim = getattr(config, "slim_scaling_head_dim", None)
    if scaling_dim:
        for layer in model.layers:
            layer.attention.scaling = float(scaling_dim) ** -0.5


class SlimViTModel(ViTModel):
    config_class = SlimViTConfig

    def __init__(self, config, add_pooling_layer: bool = True, use_mask_token: bool = False):
        with _GlobalAccess(config):
            super().__init__(config, add_pooling_layer=add_pooling_layer, use_mask_token=use_mask_token)
        _rebuild_vit_layers(self, config)
        self.post_init()


class SlimViTForImageClassification(ViTForImageClassification):
    config_class = SlimViTConfig

    def __init__(self, config):
        with _GlobalAccess(config):
            super().__init__(config)
        _rebuild_vit_layers(self.vit, config)
        self.post_init()


# --------------------------------------------------------------------------------------------------------- ResNet
class SlimResNetConfig(ResNetConfig):
    """`ResNetConfig` plus `slim_conv_shapes`: {module path of a sliced Conv2d: [out_channels, in_channels]} (paths
    relative to the `ResNetModel`); the BatchNorm after each conv and the classifier follow the conv widths."""

    model_type = "slim_resnet"


def _resize_resnet(model: ResNetModel, shapes: dict) -> None:
    for path, (out_ch, in_ch) in shapes.items():
        parent_path, _, name = path.rpartition(".")
        parent = model.get_submodule(parent_path) if parent_path else model
        old = getattr(parent, name)
        conv = nn.Conv2d(int(in_ch), int(out_ch), old.kernel_size, stride=old.stride, padding=old.padding,
                         dilation=old.dilation, groups=old.groups, bias=old.bias is not None)
        setattr(parent, name, conv)
        if hasattr(parent, "normalization"):
            parent.normalization = nn.BatchNorm2d(int(out_ch), eps=parent.normalization.eps,
                                                  momentum=parent.normalization.momentum)


def _last_width(model: ResNetModel, config) -> int:
    last = model.encoder.stages[-1].layers[-1]
    conv = last.layer[-1].convolution
    return conv.out_channels if conv is not None else config.hidden_sizes[-1]


class SlimResNetModel(ResNetModel):
    config_class = SlimResNetConfig

    def __init__(self, config):
        super().__init__(config)
        _resize_resnet(self, getattr(config, "slim_conv_shapes", None) or {})
        self.post_init()


class SlimResNetForImageClassification(ResNetForImageClassification):
    config_class = SlimResNetConfig

    def __init__(self, config):
        super().__init__(config)
        _resize_resnet(self.resnet, getattr(config, "slim_conv_shapes", None) or {})
        if config.num_labels > 0:
            self.classifier[-1] = nn.Linear(_last_width(self.resnet, config), config.num_labels)
        self.post_init()


# ---------------------------------------------------------------------------------------------------- registration
_SLIM_CLASSES = {
    LlamaForCausalLM: (SlimLlamaForCausalLM, SlimLlamaConfig),
    LlamaModel: (SlimLlamaModel, SlimLlamaConfig),
    ViTForImageClassification: (SlimViTForImageClassification, SlimViTConfig),
    ViTModel: (SlimViTModel, SlimViTConfig),
    ResNetForImageClassification: (SlimResNetForImageClassification, SlimResNetConfig),
    ResNetModel: (SlimResNetModel, SlimResNetConfig),
}
_registered = False


def slim_class_for(model: nn.Module):
    """(model class, config class) a sliced `model` is rebuilt as, or None for a module that is not a stock HF model
    of a supported family (a tracker holding a ViT, say: it is sliced in place)."""
    for base, pair in _SLIM_CLASSES.items():
        if type(model) is base or type(model) is pair[0]:
            return pair
    return None


def register_slim_models() -> None:
    """Register the Slim configs and models with the Auto classes (idempotent; runs on import of
    `hf_fastslow.modeling.slimming`)."""
    global _registered
    if _registered:
        return
    for config_cls in (SlimLlamaConfig, SlimViTConfig, SlimResNetConfig):
        AutoConfig.register(config_cls.model_type, config_cls, exist_ok=True)
    AutoModel.register(SlimLlamaConfig, SlimLlamaModel, exist_ok=True)
    AutoModelForCausalLM.register(SlimLlamaConfig, SlimLlamaForCausalLM, exist_ok=True)
    AutoModel.register(SlimViTConfig, SlimViTModel, exist_ok=True)
    AutoModelForImageClassification.register(SlimViTConfig, SlimViTForImageClassification, exist_ok=True)
    AutoModel.register(SlimResNetConfig, SlimResNetModel, exist_ok=True)
    AutoModelForImageClassification.register(SlimResNetConfig, SlimResNetForImageClassification, exist_ok=True)
    _registered = True


def drop_quantizer(model: nn.Module) -> None:
    """A model loaded with `gguf_file=` keeps its GGUF quantizer, whose `save_pretrained` refuses to serialise the
    (dense) sliced child: forget it."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    config = getattr(model, "config", None)
    if config is not None and getattr(config, "quantization_config", None) is not None:
        try:
            del config.quantization_config
        except AttributeError:
            config.quantization_config = None
    if hasattr(model, "is_quantized"):
        try:
            model.is_quantized = False
        except AttributeError:
            pass


def module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(module.parameters())
    return p.device, p.dtype
