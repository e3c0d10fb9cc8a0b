"""Where test-time steering hooks attach (CREST, SEAL-style steering): each decoder layer's attention output
projection (`self_attn.o_proj`), the decoder layer's output hidden state, and the input ids / cache of a top-level
`forward` call. The attribute names are the Llama / Qwen2 / Qwen3 / Gemma 3 layout of transformers 5.x; a model
without it is refused here with an error that names what is missing.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from .caches import cache_from_kwargs
from .modeling import decoder_layers


@dataclass(frozen=True)
class AttentionOutputSites:
    """The `o_proj` Linear of every decoder layer and the head layout of its input (`num_heads` x `head_dim`)."""

    projections: tuple[torch.nn.Linear, ...]
    num_heads: int
    head_dim: int
    hidden_size: int
    model_type: str

    @property
    def num_layers(self) -> int:
        return len(self.projections)


def _text_config(model: torch.nn.Module):
    config = model.config
    getter = getattr(config, "get_text_config", None)
    return getter() if callable(getter) else config


def attention_output_sites(model: torch.nn.Module) -> AttentionOutputSites:
    """The attention output projections a steering hook attaches to, checked against the config's head layout."""
    name = type(model).__name__
    try:
        layers = decoder_layers(model)
    except NotImplementedError as err:
        raise NotImplementedError(f"{name}: test-time head steering needs decoder layers; {err}") from err
    config = _text_config(model)
    heads = getattr(config, "num_attention_heads", None)
    hidden = getattr(config, "hidden_size", None)
    if not heads or not hidden:
        raise NotImplementedError(f"{name}: its config has no `num_attention_heads`/`hidden_size`.")
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    projections = []
    for i, layer in enumerate(layers):
        proj = getattr(getattr(layer, "self_attn", None), "o_proj", None)
        if not isinstance(proj, torch.nn.Linear):
            raise NotImplementedError(
                f"{name}: decoder layer {i} ({type(layer).__name__}) has no `self_attn.o_proj` Linear. Head steering "
                "rotates the output of the attention output projection of Llama / Qwen2 / Qwen3 / Gemma 3-style "
                "models (`model.layers[i].self_attn.o_proj`)."
            )
        if proj.in_features != heads * head_dim or proj.out_features != hidden:
            raise NotImplementedError(
                f"{name}: layer {i} o_proj maps {proj.in_features} -> {proj.out_features}, not num_attention_heads * "
                f"head_dim = {heads} * {head_dim} -> hidden_size {hidden}; the per-head split is unknown."
            )
        projections.append(proj)
    return AttentionOutputSites(tuple(projections), int(heads), int(head_dim), int(hidden),
                                str(getattr(config, "model_type", name)))


def layer_hidden_output(output: Any) -> torch.Tensor:
    """The hidden state a decoder layer returned (a tensor in transformers 5.x; the first item of a tuple before)."""
    return output[0] if isinstance(output, tuple) else output


def with_layer_hidden_output(output: Any, hidden: torch.Tensor) -> Any:
    """`output` with its hidden state replaced by `hidden`, in the same form (tensor or tuple)."""
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def call_input_ids(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The `input_ids` of a top-level causal-LM forward call (None when it was given `inputs_embeds` only)."""
    ids = kwargs.get("input_ids")
    if ids is None and args and isinstance(args[0], torch.Tensor) and not args[0].is_floating_point():
        ids = args[0]
    return ids


def call_cache_length(kwargs: dict) -> int:
    """How many tokens the cache passed to this forward call already holds (0 without a cache)."""
    cache = cache_from_kwargs(kwargs)
    if cache is None:
        return 0
    return int(cache.get_seq_length())
