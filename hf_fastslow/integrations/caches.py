"""Caches and `generate`: the cache keyword of this transformers version, `cache_implementation=` registry."""

from __future__ import annotations

import copy
import functools
import inspect
import logging
import threading
from collections.abc import Callable
from typing import Any

import torch
import transformers

logger = logging.getLogger(__name__)


# --------------------------------------------------------------------------------------------------------------------
# Cache keyword: `cache=` (5.24+) vs `past_key_values=` (5.17 ... 5.2x)
# --------------------------------------------------------------------------------------------------------------------
@functools.cache
def _forward_accepts_cache_kwarg(model_cls: type) -> bool:
    try:
        params = inspect.signature(model_cls.forward).parameters
    except (TypeError, ValueError):
        return False
    return "cache" in params


@functools.lru_cache(maxsize=1)
def _library_cache_kwarg() -> str:
    # The reference decoder-only model of the installed transformers tells which name the library uses.
    from transformers.models.llama.modeling_llama import LlamaModel

    return "cache" if _forward_accepts_cache_kwarg(LlamaModel) else "past_key_values"


def cache_kwarg_name(model: torch.nn.Module | None = None) -> str:
    """Name of the keyword that carries a `Cache` into `forward`/`generate`: `"cache"` or `"past_key_values"`."""
    if model is not None and _forward_accepts_cache_kwarg(type(model)):
        return "cache"
    if model is not None:
        return "past_key_values"
    return _library_cache_kwarg()


def cache_kwargs(model: torch.nn.Module | None, cache: Any) -> dict[str, Any]:
    """`{"cache": cache}` or `{"past_key_values": cache}`, whichever this transformers/model expects."""
    return {cache_kwarg_name(model): cache}


def cache_from_kwargs(kwargs: dict[str, Any]) -> Any:
    """The cache object in a forward's kwargs, whichever name carried it (None if absent)."""
    cache = kwargs.get("cache")
    if cache is None:
        cache = kwargs.get("past_key_values")
    return cache


def output_cache(outputs: Any) -> Any:
    """The cache returned by a model forward (`outputs.cache` in 5.24+, `outputs.past_key_values` before)."""
    for name in ("cache", "past_key_values"):
        value = getattr(outputs, name, None)
        if value is not None:
            return value
    return None


# --------------------------------------------------------------------------------------------------------------------
# Cache implementations: generate(cache_implementation=<our name>, cache_config={...})
# --------------------------------------------------------------------------------------------------------------------
CacheFactory = Callable[[torch.nn.Module, dict], Any]
_CACHE_FACTORIES: dict[str, CacheFactory] = {}
_patch_lock = threading.RLock()
_original_prepare_cache = None
_original_to_json_string = None


def _valid_names_module():
    from transformers.generation import configuration_utils

    return configuration_utils


def _patched_prepare_cache_for_generation(
    self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs
):
    name = getattr(generation_config, "cache_implementation", None)
    if name not in _CACHE_FACTORIES:
        return _original_prepare_cache(
            self, generation_config, model_kwargs, generation_mode, batch_size, max_cache_length, *args, **kwargs
        )
    cache_name = "cache" if "cache" in model_kwargs or _library_cache_kwarg() == "cache" else "past_key_values"
    if model_kwargs.get(cache_name) is not None:
        raise ValueError(
            f"Passing both `cache_implementation` (used to initialize certain caches) and `{cache_name}` (a Cache "
            "object) is unsupported. Please use only one of the two."
        )
    if generation_config.use_cache is False:
        return
    if self.config.is_encoder_decoder:
        raise ValueError(f"cache_implementation={name!r} supports decoder-only models only.")
    cache_config = copy.deepcopy(generation_config.cache_config) if generation_config.cache_config else {}
    cache = _CACHE_FACTORIES[name](self, dict(cache_config))
    model_kwargs[cache_name] = cache
    if getattr(generation_config, "is_assistant", False) and hasattr(cache, "activate_past_recording"):
        cache.activate_past_recording()


def _patched_to_json_string(self, *args, **kwargs):
    # A generation_config.json naming our cache would not load for users without hf_fastslow: never write it.
    name = getattr(self, "cache_implementation", None)
    if name not in _CACHE_FACTORIES:
        return _original_to_json_string(self, *args, **kwargs)
    with _patch_lock:
        saved = (self.cache_implementation, self.cache_config)
        logger.warning(
            "Not serializing cache_implementation=%r (an hf_fastslow cache): the saved generation config would not "
            "load without hf_fastslow. Pass it to generate() at call time instead.",
            name,
        )
        try:
            self.cache_implementation, self.cache_config = None, None
            return _original_to_json_string(self, *args, **kwargs)
        finally:
            self.cache_implementation, self.cache_config = saved


def _install_cache_patches() -> None:
    global _original_prepare_cache, _original_to_json_string
    from transformers.generation import GenerationConfig
    from transformers.generation.utils import GenerationMixin

    with _patch_lock:
        if _original_prepare_cache is None:
            params = list(inspect.signature(GenerationMixin._prepare_cache_for_generation).parameters)
            expected = [
                "self", "generation_config", "model_kwargs", "generation_mode", "batch_size", "max_cache_length"
            ]
            if params[: len(expected)] != expected:
                raise RuntimeError(
                    f"transformers {transformers.__version__}: GenerationMixin._prepare_cache_for_generation has "
                    f"signature {params}; hf_fastslow cannot register cache implementations on it."
                )
            _original_prepare_cache = GenerationMixin._prepare_cache_for_generation
            GenerationMixin._prepare_cache_for_generation = _patched_prepare_cache_for_generation
        if _original_to_json_string is None:
            _original_to_json_string = GenerationConfig.to_json_string
            GenerationConfig.to_json_string = _patched_to_json_string


def register_cache_implementation(name: str, factory: CacheFactory) -> None:
    """Make `model.generate(..., cache_implementation=name, cache_config={...})` build `factory(model, cache_config)`.

    transformers has no registry for cache implementations: extending its list of valid names alone would make
    `generate` silently build a `DynamicCache`, so the cache preparation step is wrapped as well (the wrapper defers
    to the original for every name it does not own).
    """
    if not isinstance(name, str) or not name:
        raise ValueError("`name` must be a non-empty string.")
    if not callable(factory):
        raise TypeError("`factory` must be callable as factory(model, cache_config: dict) -> Cache.")
    mod = _valid_names_module()
    with _patch_lock:
        if name in mod.ALL_CACHE_IMPLEMENTATIONS and name not in _CACHE_FACTORIES:
            raise ValueError(f"{name!r} is a built-in transformers cache implementation and cannot be overridden.")
        _install_cache_patches()
        _CACHE_FACTORIES[name] = factory
        if name not in mod.ALL_CACHE_IMPLEMENTATIONS:
            mod.ALL_CACHE_IMPLEMENTATIONS = tuple(mod.ALL_CACHE_IMPLEMENTATIONS) + (name,)


def unregister_cache_implementation(name: str) -> None:
    """Remove a name added by `register_cache_implementation` (no-op for unknown names)."""
    mod = _valid_names_module()
    with _patch_lock:
        if _CACHE_FACTORIES.pop(name, None) is not None:
            mod.ALL_CACHE_IMPLEMENTATIONS = tuple(n for n in mod.ALL_CACHE_IMPLEMENTATIONS if n != name)


def registered_cache_implementations() -> tuple[str, ...]:
    return tuple(_CACHE_FACTORIES)
