"""The one seam between hf_fastslow and transformers/trl internals: registries, patches, version gates.

Everything here is version-gated and tested against every transformers release we support (5.17 → <6).
Other modules never reach into private transformers/trl APIs; they call the helpers below.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import inspect
import logging
import threading
import warnings
from collections.abc import Callable
from typing import Any

import torch
import transformers
from packaging.version import Version

logger = logging.getLogger(__name__)

TRANSFORMERS_VERSION = Version(transformers.__version__)
MIN_TRANSFORMERS = Version("5.17.0")
MAX_TRANSFORMERS = Version("6.0.0")

if not (MIN_TRANSFORMERS <= Version(TRANSFORMERS_VERSION.base_version) < MAX_TRANSFORMERS):
    warnings.warn(
        f"hf_fastslow is tested with transformers>={MIN_TRANSFORMERS},<{MAX_TRANSFORMERS}; "
        f"found {transformers.__version__}.",
        stacklevel=2,
    )


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


# --------------------------------------------------------------------------------------------------------------------
# Attention: AttentionInterface + AttentionMaskInterface
# --------------------------------------------------------------------------------------------------------------------
def register_attention(name: str, fn: Callable, mask_fn: Callable | None = None) -> None:
    """Register `fn(module, q, k, v, attention_mask, scaling, dropout, **kw)` as `attn_implementation=name`.

    A custom attention name also needs a mask builder; by default we reuse the SDPA one (boolean mask).
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, mask_fn if mask_fn is not None else sdpa_mask)


# --------------------------------------------------------------------------------------------------------------------
# Modeling helpers (attention modules, rotary)
# --------------------------------------------------------------------------------------------------------------------
def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The decoder blocks of a causal LM (`model.model.layers` for the Llama family)."""
    base = getattr(model, "model", model)
    base = getattr(base, "language_model", base)
    layers = getattr(base, "layers", None)
    if layers is None:
        raise NotImplementedError(f"{type(model).__name__}: cannot locate decoder layers (expected `model.layers`).")
    return list(layers)


def rotary_module(model: torch.nn.Module) -> torch.nn.Module | None:
    base = getattr(model, "model", model)
    base = getattr(base, "language_model", base)
    return getattr(base, "rotary_emb", None)


def rotary_embeddings(model: torch.nn.Module, attn: torch.nn.Module, x: torch.Tensor, position_ids: torch.Tensor):
    """(cos, sin) for `position_ids` as the model computes them for attention module `attn`."""
    rope = rotary_module(model)
    if rope is None:
        raise NotImplementedError(f"{type(model).__name__}: no `rotary_emb` module found.")
    layer_type = getattr(attn, "layer_type", None)
    params = inspect.signature(rope.forward).parameters
    if layer_type is not None and "layer_type" in params:
        return rope(x, position_ids, layer_type)
    return rope(x, position_ids)


def apply_rotary_fn(attn: torch.nn.Module) -> Callable:
    """The `apply_rotary_pos_emb` of the modeling module that defines `attn` (keeps each model's RoPE convention)."""
    import sys

    mod = sys.modules[type(attn).__module__]
    fn = getattr(mod, "apply_rotary_pos_emb", None)
    if fn is None:
        raise NotImplementedError(f"{type(attn).__name__}: its modeling module has no `apply_rotary_pos_emb`.")
    return fn


def strip_gguf_quantization(model: torch.nn.Module) -> torch.nn.Module:
    """Drop the GGUF quantizer of a GGUF-loaded model (its weights are already dense) so it can `save_pretrained`."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    if getattr(model.config, "quantization_config", None) is not None:
        del model.config.quantization_config
    for attr in ("is_quantized", "_is_quantized"):
        if getattr(model, attr, False) is True:
            try:
                setattr(model, attr, False)
            except AttributeError:
                pass
    return model


# --------------------------------------------------------------------------------------------------------------------
# trl seam (trainers and rollouts): sections below are owned by the respective features.
# --------------------------------------------------------------------------------------------------------------------
# [speculative decoding / TRL rollouts] -- section start
def speculative_cache_check(cache: Any, batch_size: int) -> None:
    """Raise a ValueError unless `cache` can be rolled back (`crop(-n)`) the way the speculative loop needs.

    Batched verification leaves masked "holes" (rejected drafts of rows behind the leader) inside the cache; that is
    exact for full-attention layers only, so sliding-window and linear-attention caches are refused for batch > 1.
    """
    if cache is None:
        raise ValueError(
            "speculative_generate needs a KV cache to roll back rejected drafts: do not pass `use_cache=False`."
        )
    if not callable(getattr(cache, "crop", None)) or getattr(cache, "is_croppable", True) is False:
        raise ValueError(
            f"speculative_generate cannot use a {type(cache).__name__}: rejected draft tokens are removed with "
            "`cache.crop(-n)`, which this cache does not support. Use a DynamicCache or another croppable cache "
            "(e.g. hf_fastslow's XQuant cache)."
        )
    if batch_size > 1 and (any(getattr(cache, "is_sliding", ()) or ()) or any(getattr(cache, "is_linear", ()) or ())):
        raise ValueError(
            "speculative_generate with batch size > 1 supports full-attention caches only (got a "
            f"{type(cache).__name__} "
            "with sliding-window or linear-attention layers): generate one sequence at a time instead."
        )


def speculative_prepare_cache(cache: Any) -> None:
    """Let sliding-window / linear-attention layers keep the states a later `crop` needs (no-op elsewhere)."""
    if hasattr(cache, "activate_past_recording") and (
        any(getattr(cache, "is_sliding", ()) or ()) or any(getattr(cache, "is_linear", ()) or ())
    ):
        cache.activate_past_recording()


def speculative_crop(cache: Any, tokens_to_remove: int) -> None:
    """Drop the last `tokens_to_remove` cache positions (5.17 and 5.24 both take a negative count)."""
    if tokens_to_remove < 0:
        raise ValueError("tokens_to_remove must be >= 0")
    # crop(0) is still called on sliding/linear caches: it trims the states recorded for a possible rollback.
    windowed = any(getattr(cache, "is_sliding", ()) or ()) or any(getattr(cache, "is_linear", ()) or ())
    if tokens_to_remove > 0 or windowed:
        cache.crop(-tokens_to_remove)


def speculative_cache_compactable(cache: Any) -> bool:
    """Whether `speculative_compact_cache` can move this cache's columns: plain `DynamicLayer`s only (keys/values
    tensors of shape (batch, heads, length, head_dim)); quantized, sliding, offloaded or custom layers (e.g. XQuant)
    keep their holes."""
    from transformers.cache_utils import DynamicLayer

    layers = getattr(cache, "layers", None)
    return bool(layers) and all(type(layer) is DynamicLayer for layer in layers)


def speculative_compact_cache(cache: Any, index: torch.Tensor) -> None:
    """Keep, for every row b, the cache columns `index[b]` (in that order): the speculative loop gathers each row's
    valid columns to the right end. Keys already carry their RoPE rotation, so moving them is exact as long as the
    caller keeps each row's position ids (and moves its attention mask the same way)."""
    for layer in cache.layers:
        if not layer.is_initialized or layer.keys.numel() == 0:
            continue
        gather = index.to(layer.keys.device)[:, None, :, None]
        layer.keys = layer.keys.gather(2, gather.expand(-1, layer.keys.shape[1], -1, layer.keys.shape[3]))
        layer.values = layer.values.gather(2, gather.expand(-1, layer.values.shape[1], -1, layer.values.shape[3]))


# Logits processors that give every row what they give it in `generate` when the rows of a batch are shifted right
# by different amounts behind filler ids: the warpers never read `input_ids`; n-gram blocking reads token content and
# no window with the filler id (= the logits' vocabulary size) can match; the repetition penalty counts a set of ids
# (the filler is replaced by a token the row already holds for it). Anything else (length dependent like
# min_new_tokens, or unknown) is called on `generate`'s exact view of each row instead.
_SHIFT_SAFE_PROCESSORS = (
    "TemperatureLogitsWarper", "TopKLogitsWarper", "TopPLogitsWarper", "MinPLogitsWarper", "TypicalLogitsWarper",
    "EpsilonLogitsWarper", "EtaLogitsWarper", "SuppressTokensLogitsProcessor", "InfNanRemoveLogitsProcessor",
    "LogitNormalization", "NoRepeatNGramLogitsProcessor", "RepetitionPenaltyLogitsProcessor",
)


@functools.cache
def _repetition_penalty_takes_row_boundaries() -> bool:
    """5.24 gives the repetition penalty per-row prompt boundaries (the padding lengths); 5.17 takes one int."""
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    try:
        RepetitionPenaltyLogitsProcessor(1.5, prompt_ignore_length=torch.zeros(1, dtype=torch.long))
    except (TypeError, ValueError):
        return False
    return True


def speculative_processor_shift_safe(processor: Any) -> bool:
    """Whether `speculative_call_shifted` gives each row of a right-shifted batch the same result as `generate`."""
    from transformers.generation import logits_process

    safe = tuple(getattr(logits_process, name) for name in _SHIFT_SAFE_PROCESSORS if hasattr(logits_process, name))
    if type(processor) is not logits_process.RepetitionPenaltyLogitsProcessor:
        return type(processor) in safe  # exact type: a subclass may read more than its parent does
    # A prompt boundary counted from the left moves with the shift: only where it can be given per row.
    return getattr(processor, "prompt_ignore_length", None) is None or _repetition_penalty_takes_row_boundaries()


def speculative_call_shifted(processor: Any, ids: torch.Tensor, scores: torch.Tensor, shift: torch.Tensor):
    """Call a shift-safe processor on `ids` whose row i is `generate`'s row shifted right by `shift[i]` filler ids
    (the logits' vocabulary size).

    For the repetition penalty the filler becomes the row's own first token (already counted, so nothing changes;
    5.17 indexes the scores with every id) and its per-row prompt boundary (`prompt_ignore_length`: the left-padding
    lengths `generate` gives it on 5.24, or a user's int/tensor) moves with the shift for this call.
    """
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    if type(processor) is not RepetitionPenaltyLogitsProcessor:
        return processor(ids, scores)
    first = ids.gather(1, shift.to(ids.device)[:, None].clamp(max=ids.shape[1] - 1))
    ids = torch.where(ids >= scores.shape[-1], first, ids)
    original = getattr(processor, "prompt_ignore_length", None)
    if original is None:
        return processor(ids, scores)
    processor.prompt_ignore_length = torch.as_tensor(original, device=ids.device) + shift.to(ids.device)
    try:
        return processor(ids, scores)
    finally:
        processor.prompt_ignore_length = original


def speculative_forward(
    model: torch.nn.Module,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor | None,
    position_ids: torch.Tensor,
    cache: Any,
    logits_to_keep: int,
    output_hidden_states: bool = False,
    **extra: Any,
):
    """One target forward with an explicit cache, mask and positions (the cache keyword differs across versions)."""
    kwargs = dict(extra)
    kwargs.update(cache_kwargs(model, cache))
    if output_hidden_states:
        kwargs["output_hidden_states"] = True
    return model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=True,
        logits_to_keep=logits_to_keep,
        return_dict=True,
        **kwargs,
    )


def split_stopping_criteria(stopping_criteria: Any) -> tuple[int | None, list]:
    """(max_length, other criteria): the speculative loop enforces length and EOS per row itself."""
    from transformers.generation.stopping_criteria import EosTokenCriteria, MaxLengthCriteria

    max_length, rest = None, []
    for criterion in stopping_criteria or ():
        if isinstance(criterion, MaxLengthCriteria):
            max_length = criterion.max_length if max_length is None else min(max_length, criterion.max_length)
        elif isinstance(criterion, EosTokenCriteria):
            continue
        else:
            rest.append(criterion)
    return max_length, rest


def decoder_only_generate_output(
    sequences: torch.Tensor, scores=None, logits=None, cache: Any = None
):
    """A `GenerateDecoderOnlyOutput` whose cache field has this version's name (`cache` or `past_key_values`)."""
    from transformers.generation.utils import GenerateDecoderOnlyOutput

    fields = GenerateDecoderOnlyOutput.__dataclass_fields__
    kwargs = {"sequences": sequences, "scores": scores, "logits": logits}
    kwargs["cache" if "cache" in fields else "past_key_values"] = cache
    return GenerateDecoderOnlyOutput(**kwargs)


def trl_tokenize_prompts(trainer: Any, prompts: list, who: str = "This feature") -> list[list[int]]:
    """Prompt token ids exactly as GRPOTrainer builds its rollout prompts (chat template, tools); text-only prompts."""
    prompt_ids, images, multimodal_fields = trainer._tokenize_prompts(prompts)
    if images is not None or multimodal_fields:
        raise NotImplementedError(f"{who} supports text-only prompts (these prompts carry images or other media).")
    return [list(map(int, ids)) for ids in prompt_ids]


def trl_generation_context(trainer: Any):
    """The context GRPOTrainer generates under: unwrapped model, no grad, training generation kwargs applied."""
    import contextlib

    from trl.models.utils import unwrap_model_for_generation

    stack = contextlib.ExitStack()
    unwrap_kwargs = {"gather_deepspeed3_params": trainer.args.ds3_gather_for_generation}
    params = inspect.signature(unwrap_model_for_generation).parameters
    if "generation_kwargs" in params:
        unwrap_kwargs["generation_kwargs"] = getattr(trainer, "generation_kwargs", None)
    if "gradient_checkpointing_kwargs" in params:
        unwrap_kwargs["gradient_checkpointing_kwargs"] = trainer.args.gradient_checkpointing_kwargs
    model = stack.enter_context(
        unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator, **unwrap_kwargs)
    )
    stack.enter_context(torch.no_grad())
    dist = getattr(trainer, "_dist", None)
    if dist is not None and hasattr(dist, "summon_full_params"):
        stack.enter_context(dist.summon_full_params(trainer.model_wrapped, recurse=False))
    return stack, model


def trl_pad_token_id(trainer: Any) -> int:
    tok = getattr(trainer, "_tokenizer", None) or trainer.processing_class
    tok = getattr(tok, "tokenizer", tok)
    return tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id


# [speculative decoding / TRL rollouts] -- section end

# [trainers] -- section start
# --- FST (hf_fastslow.trainers.fst_trainer): the trl 1.16 GRPOTrainer internals FSTTrainer relies on -------------
FST_GRPO_HOOKS = {
    # method -> leading parameters FSTTrainer's override expects (checked once, so a trl refactor fails loudly)
    "_generate_and_score_completions": ["self", "inputs"],
    "_load_optimizer_and_scheduler": ["self", "checkpoint"],
    "_tokenize_prompts": ["self", "prompts"],
}


def check_grpo_hooks(hooks: dict[str, list[str]], trainer_name: str) -> None:
    """Raise a clear error if this trl's GRPOTrainer lacks a hook (method and leading parameters) a subclass
    overrides: a trl refactor then fails at construction, not mid-training."""
    import trl
    from trl import GRPOTrainer

    for name, expected in hooks.items():
        fn = getattr(GRPOTrainer, name, None)
        params = list(inspect.signature(fn).parameters)[: len(expected)] if fn is not None else None
        if params != expected:
            raise RuntimeError(
                f"trl {trl.__version__}: GRPOTrainer.{name} is {'missing' if fn is None else params}; {trainer_name} "
                f"needs {name}({', '.join(expected)}, ...). Supported: trl>=1.10,<2."
            )


def grpo_metric_buffer(trainer) -> dict:
    """GRPOTrainer's per-logging-step metric lists for the current mode (name -> list of floats), averaged and
    logged with `reward`, `kl`, ..."""
    return trainer._metrics["train" if trainer.model.training else "eval"]


@functools.lru_cache(maxsize=1)
def grpo_loss_types() -> tuple[str, ...]:
    """The `loss_type` values this trl's GRPOConfig documents (trl only rejects unknown ones at the first loss)."""
    import dataclasses
    import re

    from trl import GRPOConfig

    field = {f.name: f for f in dataclasses.fields(GRPOConfig)}["loss_type"]
    help_text = field.metadata.get("help", "")
    match = re.search(r"Supported values are (.*?)\.\s", help_text)
    names = tuple(re.findall(r"'([a-z_]+)'", match.group(1))) if match else ()
    return names or ("grpo", "dr_grpo", "dapo", "bnpo", "cispo")


@contextlib.contextmanager
def fst_generation_model(trainer):
    """The trainer's policy unwrapped for `generate` (DeepSpeed/FSDP aware), in eval mode, without gradients.

    FST's fast rounds roll out outside GRPO's own generation path, which would count the tokens as training input
    and log them as training completions.
    """
    from trl.models import unwrap_model_for_generation

    with unwrap_model_for_generation(
        trainer.model_wrapped,
        trainer.accelerator,
        gather_deepspeed3_params=getattr(trainer.args, "ds3_gather_for_generation", True),
        gradient_checkpointing_kwargs=getattr(trainer.args, "gradient_checkpointing_kwargs", None),
    ) as model, torch.no_grad():
        was_training = model.training
        model.eval()
        try:
            yield model
        finally:
            model.train(was_training)


def fst_log_metric(trainer, name: str, value: float) -> None:
    """Add a scalar to the GRPOTrainer's per-logging-step metric buffer (averaged and logged with `reward`, `kl`...)."""
    grpo_metric_buffer(trainer)[name].append(float(value))


# --- PairRL (hf_fastslow.trainers.pairrl_trainer): two GRPO generation phases merged into one batch -------------
PAIRRL_GRPO_HOOKS = {
    "_generate_and_score_completions": ["self", "inputs"],
    "_calculate_rewards": ["self", "inputs", "prompts", "completions", "completion_ids_list"],
}
# Per-row tensors of GRPO's generation batch (trl 1.16) and how each pads when two batches are stacked:
# (side, pad value; None = the tokenizer's pad id). Anything else in the batch is refused (e.g. images).
_PAIRRL_PADDED_KEYS = {
    "prompt_ids": ("left", None),
    "prompt_mask": ("left", 0),
    "completion_ids": ("right", None),
    "completion_mask": ("right", 0),
    "tool_mask": ("right", 1),
    "old_per_token_logps": ("right", 0.0),
    "ref_per_token_logps": ("right", 0.0),
    "sampling_per_token_logps": ("right", 0.0),
    "importance_sampling_ratio": ("right", 1.0),
}


def pairrl_merge_generation_batches(first: dict, second: dict, pad_token_id: int) -> dict:
    """Stack two outputs of `GRPOTrainer._generate_and_score_completions` into one generation batch.

    Prompts are left-padded and completions right-padded to common widths (the layout GRPO's loss expects);
    `num_items_in_batch` (loss tokens over all processes, the DAPO/CISPO normaliser) is summed.
    """
    if set(first) != set(second):
        raise ValueError(f"PairRL: the two phases produced different batch keys: {sorted(set(first) ^ set(second))}.")
    merged = {}
    for key, a in first.items():
        b = second[key]
        if key == "num_items_in_batch":
            merged[key] = a + b
        elif key == "advantages":
            merged[key] = torch.cat([a, b], dim=0)
        elif key in _PAIRRL_PADDED_KEYS:
            side, value = _PAIRRL_PADDED_KEYS[key]
            value = pad_token_id if value is None else value
            if a.dim() == 1 or a.shape[1:] == b.shape[1:]:
                merged[key] = torch.cat([a, b], dim=0)
                continue
            width = max(a.shape[1], b.shape[1])
            parts = []
            for t in (a, b):
                extra = width - t.shape[1]
                filler = torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device)
                parts.append(torch.cat([filler, t] if side == "left" else [t, filler], dim=1))
            merged[key] = torch.cat(parts, dim=0)
        else:
            raise NotImplementedError(
                f"PairRL: cannot merge generation-batch entry {key!r} (multimodal/tool inputs are not supported)."
            )
    return merged


# [trainers] -- section end
