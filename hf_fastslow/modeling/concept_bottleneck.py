"""Concept bottleneck models on any transformers vision backbone (Koh et al., ICML 2020), the model half of
interactive CBMs (Chauhan et al., "Interactive Concept Bottleneck Models", AAAI 2023, arXiv 2212.07430).

X -> C: a backbone built from its config (`AutoModel.from_config`: ResNet, ViT, ConvNeXt...) + a linear concept head
giving k concept logits. C -> Y: a linear (or small MLP) label head reading only the bottleneck. Bottlenecks:

- `"independent"`: the label head is trained on the ground-truth concepts, the concept head on BCE; at test time
  the label head reads sigmoid(concept logits).
- `"joint"`: trained end to end on the logits (loss `concept_loss_weight * BCE + CE`).
- `"joint_sigmoid"`: end to end on sigmoid(logits).

A test-time intervention overwrites some bottleneck entries: `intervene(bottleneck, mask, values)`; the values for a
revealed concept come from `hf_fastslow.evaluation.interaction.InterventionStats` (the card's 5th/95th percentiles,
not hard 0/1, so an intervened value stays in the range the label head saw). Importing this module registers the
model with `AutoConfig` / `AutoModel`, so `AutoModel.from_pretrained(folder)` reloads it without remote code.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from huggingface_hub.dataclasses import strict
from torch import nn
from transformers import PreTrainedConfig, PreTrainedModel
from transformers.utils import ModelOutput

from hf_fastslow.integrations.vision_seam import (
    backbone_config_from,
    backbone_from_config,
    declare_backbone_sub_config,
    register_auto_model,
)

BOTTLENECKS = ("independent", "joint", "joint_sigmoid")
INTERVENTION_FORMATS = ("probs", "logits", "binary")
# A small single-channel ResNet: the default backbone when none is given (8x8 to 32x32 grey images).
DEFAULT_BACKBONE = {
    "num_channels": 1, "embedding_size": 16, "hidden_sizes": [32, 64], "depths": [1, 1], "layer_type": "basic",
}


def validate_concept_groups(groups: Sequence[Sequence[int]], n_concepts: int) -> list[list[int]]:
    """`groups` as lists of ints, checked to partition `range(n_concepts)` (ValueError naming what is wrong)."""
    if n_concepts < 1:
        raise ValueError(f"n_concepts must be >= 1, got {n_concepts}.")
    out, seen = [], {}
    for g, group in enumerate(groups):
        group = [int(j) for j in group]
        if not group:
            raise ValueError(f"concept group {g} is empty; every group must hold at least one concept.")
        for j in group:
            if not 0 <= j < n_concepts:
                raise ValueError(f"concept group {g} holds index {j}, outside 0..{n_concepts - 1}.")
            if j in seen:
                raise ValueError(
                    f"concept {j} is in group {seen[j]} and group {g}: concept groups must not overlap "
                    "(they must partition the concepts)."
                )
            seen[j] = g
        out.append(group)
    missing = sorted(set(range(n_concepts)) - set(seen))
    if missing:
        raise ValueError(f"concepts {missing} are in no group: concept groups must partition 0..{n_concepts - 1}.")
    return out


def intervene(bottleneck: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """`mask * values + (1 - mask) * bottleneck`: the label head's input with the revealed entries overwritten."""
    if mask.shape != bottleneck.shape or values.shape != bottleneck.shape:
        raise ValueError(
            f"intervention mask {tuple(mask.shape)} and values {tuple(values.shape)} must both match the bottleneck "
            f"{tuple(bottleneck.shape)}."
        )
    return torch.where(mask.bool(), values.to(bottleneck.dtype), bottleneck)


@declare_backbone_sub_config("resnet")
@strict
class ConceptBottleneckConfig(PreTrainedConfig):
    """Settings of a `ConceptBottleneckModel`.

    Parameters:
        backbone_config: any transformers vision config (or its `to_dict()`); None: a small 1-channel ResNet.
        n_concepts / n_classes: bottleneck width k and number of labels m (>= 2).
        concept_groups: a partition of `range(n_concepts)`; one query reveals a whole group. None: singletons.
        concept_names: optional names, one per concept.
        bottleneck: `"independent"`, `"joint"` or `"joint_sigmoid"` (module docstring).
        label_head_hidden_sizes: hidden widths of an MLP label head; empty: linear (the paper's default).
        concept_loss_weight: lambda in `lambda * BCE(concepts) + CE(label)`.
        backbone_hidden_size: width of the backbone's pooled feature; None: read from the backbone config
            (`pooler_output_size`, else `hidden_sizes[-1]`, else `hidden_size`).
    """

    model_type = "concept_bottleneck"

    backbone_config: dict | PreTrainedConfig | None = None
    n_concepts: int = 7
    n_classes: int = 10
    concept_groups: list[list[int]] | None = None
    concept_names: list[str] | None = None
    bottleneck: str = "independent"
    label_head_hidden_sizes: list[int] | None = None
    concept_loss_weight: float = 1.0
    backbone_hidden_size: int | None = None
    initializer_range: float = 0.02

    def __post_init__(self, **kwargs):
        self.backbone_config = backbone_config_from(self.backbone_config, "resnet", DEFAULT_BACKBONE)
        if self.bottleneck not in BOTTLENECKS:
            raise ValueError(f"bottleneck must be one of {BOTTLENECKS}, got {self.bottleneck!r}.")
        if self.n_classes < 2:
            raise ValueError(f"n_classes must be >= 2 (a softmax label head), got {self.n_classes}.")
        if self.concept_groups is None:
            self.concept_groups = [[j] for j in range(self.n_concepts)]
        self.concept_groups = validate_concept_groups(self.concept_groups, self.n_concepts)
        if self.concept_names is not None and len(self.concept_names) != self.n_concepts:
            raise ValueError(f"{len(self.concept_names)} concept_names for {self.n_concepts} concepts.")
        self.label_head_hidden_sizes = list(self.label_head_hidden_sizes or [])
        if self.concept_loss_weight < 0:
            raise ValueError(f"concept_loss_weight must be >= 0, got {self.concept_loss_weight}.")
        super().__post_init__(**kwargs)

    @property
    def intervention_format(self) -> str:
        """What the label head reads: `"logits"` for a joint bottleneck, `"probs"` (sigmoid) otherwise."""
        return "logits" if self.bottleneck == "joint" else "probs"


def backbone_feature_width(config: ConceptBottleneckConfig) -> int:
    if config.backbone_hidden_size is not None:
        return int(config.backbone_hidden_size)
    backbone = config.backbone_config
    for name in ("pooler_output_size", "hidden_sizes", "hidden_size"):
        value = getattr(backbone, name, None)
        if value:
            return int(value[-1] if isinstance(value, (list, tuple)) else value)
    raise ValueError(
        f"cannot read the feature width of a {type(backbone).__name__}; set backbone_hidden_size in the config."
    )


@dataclass
class ConceptBottleneckOutput(ModelOutput):
    """`loss` (when labels are given), label `logits` [B, m], `concept_logits` [B, k] and the `bottleneck` [B, k]
    the label head read (after any intervention)."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    concept_logits: torch.Tensor | None = None
    bottleneck: torch.Tensor | None = None


class ConceptBottleneckModel(PreTrainedModel):
    """X -> concepts -> label with a transformers vision backbone; `forward` accepts interventions."""

    config_class = ConceptBottleneckConfig
    config: ConceptBottleneckConfig
    main_input_name = "pixel_values"
    base_model_prefix = "concept_bottleneck"

    def __init__(self, config: ConceptBottleneckConfig):
        super().__init__(config)
        self.backbone = backbone_from_config(config.backbone_config)
        self.concept_head = nn.Linear(backbone_feature_width(config), config.n_concepts)
        layers, width = [], config.n_concepts
        for hidden in config.label_head_hidden_sizes:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        layers.append(nn.Linear(width, config.n_classes))
        self.label_head = nn.Sequential(*layers) if len(layers) > 1 else layers[0]
        self.post_init()

    def _init_weights(self, module):
        if isinstance(module, nn.Linear) and (module is self.concept_head or module in self.label_head.modules()):
            module.weight.data.normal_(0.0, self.config.initializer_range)
            module.bias.data.zero_()
        elif hasattr(self, "backbone") and any(module is m for m in self.backbone.modules()):
            self.backbone._init_weights(module)

    def backbone_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """The backbone's pooled feature [B, width] (its pooler output, else the mean / first token of its last
        hidden state)."""
        out = self.backbone(pixel_values=pixel_values)
        pooled = getattr(out, "pooler_output", None)
        if pooled is None:
            hidden = out.last_hidden_state
            pooled = hidden.mean(dim=(2, 3)) if hidden.dim() == 4 else hidden[:, 0]
        return pooled.flatten(1)

    def bottleneck_input(self, concept_logits: torch.Tensor) -> torch.Tensor:
        """What the label head reads without intervention: the logits (joint) or their sigmoid."""
        return concept_logits if self.config.intervention_format == "logits" else torch.sigmoid(concept_logits)

    def forward(
        self,
        pixel_values: torch.Tensor | None = None,
        concept_labels: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        intervention_mask: torch.Tensor | None = None,
        concept_values: torch.Tensor | None = None,
        concept_logits: torch.Tensor | None = None,
        return_dict: bool | None = None,
    ) -> ConceptBottleneckOutput | tuple:
        """Concept logits from `pixel_values` (or given as `concept_logits`, skipping the backbone), then labels.

        `intervention_mask` / `concept_values` [B, k]: revealed entries and their bottleneck values (in the space
        the label head reads). Loss: `concept_loss_weight * BCE(concept_logits, concept_labels) + CE(logits, labels)`
        (either term when only its labels are given); an independent bottleneck in training mode computes CE on
        the label head applied to the ground-truth concepts.
        """
        if concept_logits is None:
            if pixel_values is None:
                raise ValueError("pass pixel_values or concept_logits.")
            concept_logits = self.concept_head(self.backbone_features(pixel_values))
        bottleneck = self.bottleneck_input(concept_logits)
        if (intervention_mask is None) != (concept_values is None):
            raise ValueError("intervention_mask and concept_values go together.")
        if intervention_mask is not None:
            bottleneck = intervene(bottleneck, intervention_mask, concept_values)
        logits = self.label_head(bottleneck)

        loss = None
        if concept_labels is not None:
            if concept_labels.shape != concept_logits.shape:
                raise ValueError(f"concept_labels {tuple(concept_labels.shape)} != {tuple(concept_logits.shape)}.")
            loss = self.config.concept_loss_weight * F.binary_cross_entropy_with_logits(
                concept_logits, concept_labels.to(concept_logits.dtype)
            )
        if labels is not None:
            label_logits = logits
            if self.config.bottleneck == "independent" and self.training:
                if concept_labels is None:
                    raise ValueError("an independent bottleneck trains its label head on concept_labels: pass them.")
                label_logits = self.label_head(concept_labels.to(logits.dtype))
            label_loss = F.cross_entropy(label_logits, labels)
            loss = label_loss if loss is None else loss + label_loss

        return_dict = return_dict if return_dict is not None else self.config.return_dict
        output = ConceptBottleneckOutput(loss=loss, logits=logits, concept_logits=concept_logits, bottleneck=bottleneck)
        return output if return_dict else output.to_tuple()


register_auto_model(ConceptBottleneckConfig, ConceptBottleneckModel)
