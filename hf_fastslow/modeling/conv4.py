"""Backbones for few-shot meta-learning: the Conv4 of MAML / iMAML / MetaDOCK as a transformers model class, and a
transformers ResNet built from its config with BatchNorm switched to batch statistics.

Conv4: four blocks `Conv3x3(stride 2, pad 1) -> BatchNorm(affine, batch statistics) -> ReLU` and a linear head on the
flattened map. BatchNorm keeps no running statistics: meta-learning normalises every support and query batch with its
own statistics (transductive, as MAML/iMAML do), and running-stat buffers are updated in place, which
`torch.func.grad` over `functional_call` rejects. `Conv4Config` / `Conv4ForImageClassification` are registered with
`AutoConfig` / `AutoModelForImageClassification` on import, so `AutoModelForImageClassification.from_pretrained(folder)`
reloads a saved Conv4 without `trust_remote_code`.
"""

from __future__ import annotations

import torch
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.modeling_outputs import ImageClassifierOutput


class Conv4Config(PreTrainedConfig):
    r"""Conv4 backbone + linear head.

    Args:
        num_channels (`int`, defaults to 1): input image channels.
        image_size (`int`, defaults to 16): input side in pixels (fixes the head's input size).
        hidden_sizes (`list[int]`, defaults to `[64, 64, 64, 64]`): channels of the conv blocks (the paper's
            Conv4-64; `[32] * 4` is the narrow peer).
        num_labels (`int`): classes of the head (the ways of an episode).
    """

    model_type = "fastslow_conv4"

    def __init__(self, num_channels: int = 1, image_size: int = 16, hidden_sizes=None, **kwargs):
        self.num_channels = int(num_channels)
        self.image_size = int(image_size)
        self.hidden_sizes = list(hidden_sizes) if hidden_sizes is not None else [64, 64, 64, 64]
        if not self.hidden_sizes or any(int(h) < 1 for h in self.hidden_sizes):
            raise ValueError(f"Conv4Config: hidden_sizes must be positive channel counts, got {self.hidden_sizes}.")
        if self.image_size < 1 or self.num_channels < 1:
            raise ValueError("Conv4Config: image_size and num_channels must be >= 1.")
        super().__init__(**kwargs)

    @property
    def feature_side(self) -> int:
        side = self.image_size
        for _ in self.hidden_sizes:
            side = (side + 2 - 3) // 2 + 1  # 3x3 conv, stride 2, padding 1
        return side


class Conv4Block(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=2, padding=1)
        self.norm = nn.BatchNorm2d(out_channels, affine=True, track_running_stats=False)
        self.act = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


class Conv4PreTrainedModel(PreTrainedModel):
    config_class = Conv4Config
    base_model_prefix = "conv4"
    main_input_name = "pixel_values"

    def _init_weights(self, module):
        # PyTorch's default initialisation of Conv2d / Linear / BatchNorm is the one the Conv4 literature uses.
        return


class Conv4ForImageClassification(Conv4PreTrainedModel):
    def __init__(self, config: Conv4Config):
        super().__init__(config)
        widths = [config.num_channels, *config.hidden_sizes]
        self.blocks = nn.ModuleList(Conv4Block(a, b) for a, b in zip(widths[:-1], widths[1:]))
        self.classifier = nn.Linear(config.hidden_sizes[-1] * config.feature_side**2, config.num_labels)
        self.post_init()

    def forward(
        self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None, **kwargs
    ) -> ImageClassifierOutput:
        hidden = pixel_values
        for block in self.blocks:
            hidden = block(hidden)
        logits = self.classifier(hidden.flatten(1))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return ImageClassifierOutput(loss=loss, logits=logits)


def conv_parameter_count(hidden_sizes: list[int], num_channels: int = 1, kernel: int = 3) -> int:
    """Conv weights of a Conv4 of these widths (no bias, no norm, no head): the quantity gates prune."""
    widths = [num_channels, *hidden_sizes]
    return sum(kernel * kernel * a * b for a, b in zip(widths[:-1], widths[1:]))


def narrow_width_for_budget(width: int, budget: float, num_channels: int = 1, depth: int = 4) -> int:
    """The Conv4 width whose dense conv weights match `budget` of a Conv4-`width`'s (the equal-active-parameters
    peer of a gated model at that kept fraction)."""
    target = budget * conv_parameter_count([width] * depth, num_channels)
    return min(range(1, width + 1), key=lambda w: abs(conv_parameter_count([w] * depth, num_channels) - target))


def use_batch_statistics(model: nn.Module) -> nn.Module:
    """Replace every `nn.BatchNorm2d` of `model` (e.g. a transformers ResNet's) by one without running statistics,
    keeping its affine weight and bias. In place; returns `model`."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.BatchNorm2d) and child.track_running_stats:
                norm = nn.BatchNorm2d(child.num_features, eps=child.eps, affine=child.affine, track_running_stats=False)
                if child.affine:
                    norm.weight = child.weight
                    norm.bias = child.bias
                setattr(module, child_name, norm.to(child.weight.device if child.affine else "cpu"))
    return model


def resnet_for_few_shot(num_labels: int, num_channels: int = 1, width: int = 32, depth: int = 4):
    """A small transformers `ResNetForImageClassification` built from its config (basic blocks, one per stage) with
    batch-statistics BatchNorm: the HF-native backbone for `IMAMLTrainer` and kernel gates."""
    from transformers import ResNetConfig, ResNetForImageClassification

    config = ResNetConfig(
        num_channels=num_channels,
        embedding_size=width,
        hidden_sizes=[width] * depth,
        depths=[1] * depth,
        layer_type="basic",
        downsample_in_first_stage=False,
        num_labels=num_labels,
    )
    return use_batch_statistics(ResNetForImageClassification(config))


def _register() -> None:
    from hf_fastslow.integrations.vision_seam import register_image_classification_model

    register_image_classification_model(Conv4Config, Conv4ForImageClassification)


_register()
