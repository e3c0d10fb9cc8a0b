"""What the vision models need from transformers: Auto-class registration (so `AutoModel.from_pretrained(folder)`
reloads a custom model without `trust_remote_code`), and a nested backbone config that serialises and reloads the
same way on every supported release.

Owned by the concept bottleneck model (H4); other vision models (pruned trackers, Conv4) add their registrations here
as functions of their own. Version facts checked in the sources: transformers 5.17 declares nested configs as the
class attribute `sub_configs = {"backbone_config": AutoConfig}`; 5.24 replaced it with `sub_configs_defaults`
(`SubConfigSpec`, in `configuration_utils`) and turned `sub_configs` into a read-only class property, so assigning
the old attribute there would shadow the property. Both releases walk `sub_configs` to propagate the attention
implementation to sub-configs; neither converts a plain dict backbone for a config class that declares nothing,
hence `backbone_config_from`.
"""

from __future__ import annotations

from typing import Any

from transformers import AutoConfig, AutoModel, PreTrainedConfig, PreTrainedModel, configuration_utils


def register_auto_model(config_class: type[PreTrainedConfig], model_class: type[PreTrainedModel]) -> None:
    """Register `config_class.model_type` with `AutoConfig` and `model_class` with `AutoModel`.

    Idempotent for the same pair (a module imported twice, e.g. under two test collectors); registering a different
    class under a taken model type is an error, so two models cannot silently shadow each other.
    """
    _register_config(config_class)
    AutoModel.register(config_class, model_class, exist_ok=True)


def _register_config(config_class: type[PreTrainedConfig]) -> None:
    """`AutoConfig.register`, idempotent for the same class, refusing a model type taken by another class."""
    model_type = config_class.model_type
    if not model_type:
        raise ValueError(f"{config_class.__name__} has no model_type; Auto classes register by model_type.")
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    if model_type in CONFIG_MAPPING:
        existing = CONFIG_MAPPING[model_type]
        if existing is not config_class and existing.__qualname__ != config_class.__qualname__:
            raise ValueError(f"model_type {model_type!r} is already registered to {existing.__name__}.")
    AutoConfig.register(model_type, config_class, exist_ok=True)


def declare_backbone_sub_config(default_model_type: str):
    """Class decorator: declare `backbone_config` a nested config the way this release expects."""

    def declare(config_class: type[PreTrainedConfig]) -> type[PreTrainedConfig]:
        spec_class = getattr(configuration_utils, "SubConfigSpec", None)
        if spec_class is not None:  # transformers >= 5.2x: the spec carries a default model type
            config_class.sub_configs_defaults = {
                "backbone_config": spec_class(config_class=AutoConfig, model_type=default_model_type, optional=True)
            }
        else:  # transformers 5.17: a plain class-attribute mapping
            config_class.sub_configs = {"backbone_config": AutoConfig}
        return config_class

    return declare


def backbone_config_from(
    value: dict | PreTrainedConfig | None, default_model_type: str, default_kwargs: dict[str, Any] | None = None
) -> PreTrainedConfig:
    """A backbone config from a config, a dict (as `to_dict` wrote it: `model_type` inside) or None (the default)."""
    if isinstance(value, PreTrainedConfig):
        return value
    if value is None:
        return AutoConfig.for_model(default_model_type, **(default_kwargs or {}))
    if isinstance(value, dict):
        kwargs = dict(value)
        model_type = kwargs.pop("model_type", default_model_type)
        return AutoConfig.for_model(model_type, **kwargs)
    raise TypeError(f"backbone_config must be a PreTrainedConfig, a dict or None, got {type(value).__name__}.")


def backbone_from_config(config: PreTrainedConfig) -> PreTrainedModel:
    """The bare vision backbone (`AutoModel`, no task head) for `config`, randomly initialised."""
    return AutoModel.from_config(config)


def register_image_classification_model(
    config_class: type[PreTrainedConfig], model_class: type[PreTrainedModel]
) -> None:
    """Register `config_class` with `AutoConfig` and `model_class` with `AutoModelForImageClassification` (added for
    the few-shot Conv4 of MetaDOCK, H6), idempotently and refusing a model type taken by another class."""
    from transformers import AutoModelForImageClassification

    _register_config(config_class)
    AutoModelForImageClassification.register(config_class, model_class, exist_ok=True)
