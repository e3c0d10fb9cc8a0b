"""Generation loops: what speculative decoding needs from `generate` internals (caches, processors, outputs)."""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import torch

from hf_fastslow.integrations.caches import cache_kwargs


# [speculative decoding / TRL rollouts] -- section start
class GenerateSpecialTokens(NamedTuple):
    """The special tokens a `generate` call stops and pads with (named like the `GenerationConfig` fields)."""

    pad_token_id: int | None
    eos_token_id: tuple[int, ...]


def generate_special_tokens(generation_config: Any) -> GenerateSpecialTokens:
    """What `generate` pads with and stops on for this call.

    Inside a `custom_generate` loop, `generate` has already resolved them (model defaults merged, pad falling back to
    the first EOS) into the private `_pad_token_tensor` / `_eos_token_tensor`; outside one, the public fields are read.
    """
    eos = getattr(generation_config, "_eos_token_tensor", None)
    if eos is None:
        eos = generation_config.eos_token_id
    pad = getattr(generation_config, "_pad_token_tensor", None)
    if pad is None:
        pad = generation_config.pad_token_id
    pad_ids = _as_ids(pad)
    return GenerateSpecialTokens(pad_ids[0] if pad_ids else None, _as_ids(eos))


def _as_ids(value: Any) -> tuple[int, ...]:
    return () if value is None else tuple(int(t) for t in torch.as_tensor(value).reshape(-1).tolist())


def model_is_stateful(model: Any) -> bool:
    """Whether `model` keeps a recurrent state that cannot be rolled back (the private flag `generate` checks before
    assisted decoding)."""
    return bool(getattr(model, "_is_stateful", False))


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
