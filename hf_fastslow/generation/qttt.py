"""qTTT, query-only test-time training on the given long context (Bansal et al., arXiv 2512.13898).

Prefill the context once and freeze its keys/values; take a few next-token gradient steps on random spans of that
context that update only the attention query projections (the span queries attend over the frozen cache); answer
with the adapted queries over the same cache; restore the weights bit for bit afterwards, also when anything raises.
With `steps=0` `qttt_generate` is plain greedy generation over the same tokens.

    from hf_fastslow.generation.qttt import QTTTConfig, qttt_generate
    answer = qttt_generate(model, tokenizer, context, question, QTTTConfig(steps=16, span_len=128, lr=1e-4))
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import torch

from ..integrations import cache_kwargs, output_cache
from ..modeling.block_diffusion import additive_attention_mask
from ..modeling.frozen_cache import (
    FrozenContextCache,
    dynamic_cache_from_layers,
    span_attention_mask,
)

__all__ = ["QTTTConfig", "QueryOnlyTTT", "TTTState", "qttt_generate", "encode_context_question", "trainable_parameters"]

_OPTIMIZERS = ("adamw", "sgd")
_TARGETS = ("q_proj", "all")


@dataclass
class QTTTConfig:
    """Test-time training settings.

    Args:
        steps: gradient steps on context spans (0 = plain in-context answering).
        span_len: tokens per span (clamped to the context; the paper's default is 128).
        lr: learning rate (sensitive: choose it on a dev split).
        optimizer: "adamw" or "sgd".
        target: "q_proj" (qTTT: every attention query projection, weight and bias) or "all" (full-parameter TTT,
            the stability peer the paper compares against; keys/values of the context stay frozen either way).
        weight_decay, max_grad_norm: optimizer settings (`max_grad_norm=None` disables clipping).
        seed: seeds the span sampler.
    """

    steps: int = 16
    span_len: int = 128
    lr: float = 1e-4
    optimizer: str = "adamw"
    target: str = "q_proj"
    weight_decay: float = 0.0
    max_grad_norm: float | None = 1.0
    seed: int = 0

    def __post_init__(self):
        if self.steps < 0:
            raise ValueError(f"steps must be >= 0, got {self.steps}.")
        if self.span_len < 1:
            raise ValueError(f"span_len must be >= 1, got {self.span_len}.")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}.")
        if self.optimizer not in _OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {_OPTIMIZERS}, got {self.optimizer!r}.")
        if self.target not in _TARGETS:
            raise ValueError(f"target must be one of {_TARGETS}, got {self.target!r}.")


@dataclass
class TTTState:
    """What `adapt` leaves behind: the frozen context cache, its length and the loss of every step."""

    cache: FrozenContextCache
    context_len: int
    losses: list[float] = field(default_factory=list)
    spans: list[tuple[int, int]] = field(default_factory=list)


def trainable_parameters(model: torch.nn.Module, target: str) -> dict[str, torch.nn.Parameter]:
    """The parameters test-time training updates: every `*.q_proj.*` parameter, or all of them for `target="all"`."""
    if target not in _TARGETS:
        raise ValueError(f"target must be one of {_TARGETS}, got {target!r}.")
    params = dict(model.named_parameters())
    if target == "all":
        return params
    chosen = {name: p for name, p in params.items() if ".q_proj." in f".{name}"}
    if not chosen:
        fused = [name for name in params if "qkv" in name]
        hint = f" (it fuses q/k/v: {fused[0]})" if fused else ""
        raise NotImplementedError(f"{type(model).__name__} has no `q_proj` parameters{hint}; qTTT needs separate "
                                  "query projections. Use target='all' for full-parameter TTT.")
    return chosen


class QueryOnlyTTT:
    """Adapts a model's query projections to one context; a context manager that restores the weights on exit.

        with QueryOnlyTTT(model, QTTTConfig(steps=16)) as ttt:
            state = ttt.adapt(prefix_ids, span_start=context_start)
            out = ttt.generate(full_ids, state, max_new_tokens=16, do_sample=False)

    `prefix_ids` [1, T] ends with the context (anything before `span_start`, e.g. a chat template's header, is
    prefilled but never trained on); `full_ids` starts with `prefix_ids` and adds the question.
    """

    def __init__(self, model: torch.nn.Module, config: QTTTConfig | None = None):
        self.model = model
        self.config = config or QTTTConfig()
        self.params = trainable_parameters(model, self.config.target)
        self._saved: dict[str, torch.Tensor] | None = None
        self._flags: dict[str, bool] = {}
        self._training = model.training

    # -- weights ---------------------------------------------------------------------------------------------------
    def __enter__(self) -> QueryOnlyTTT:
        self._saved = {name: p.detach().clone() for name, p in self.params.items()}
        self._flags = {name: p.requires_grad for name, p in self.model.named_parameters()}
        self._training = self.model.training
        return self

    def __exit__(self, *exc) -> None:
        self.reset()

    def reset(self) -> None:
        """Put back the weights (bit for bit), the requires_grad flags and the train/eval mode."""
        if self._saved is None:
            return
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(self._saved[name])
        for name, p in self.model.named_parameters():
            p.requires_grad_(self._flags.get(name, p.requires_grad))
        self.model.train(self._training)
        self._saved = None

    # -- adaptation ------------------------------------------------------------------------------------------------
    def prefill(self, prefix_ids: torch.Tensor) -> FrozenContextCache:
        with torch.no_grad():
            out = self.model(input_ids=prefix_ids, use_cache=True)
        return FrozenContextCache.from_cache(output_cache(out))

    def sample_spans(self, context_len: int, span_start: int = 0) -> list[tuple[int, int]]:
        """`steps` spans (start, length) inside [span_start, context_len): each span's inputs and its next-token
        targets both lie in the context, so length <= context_len - 1 - span_start (clamped, never an error)."""
        room = context_len - span_start
        if room < 2:
            raise ValueError(f"qTTT needs a context of at least 2 tokens to train on; got {room} "
                             f"(context length {context_len}, span_start {span_start}).")
        length = min(self.config.span_len, room - 1)
        rng = random.Random(self.config.seed)
        return [(rng.randint(span_start, context_len - 1 - length), length) for _ in range(self.config.steps)]

    def span_loss(self, ids: torch.Tensor, cache: FrozenContextCache, start: int, length: int) -> torch.Tensor:
        """Mean next-token NLL of ids[:, start : start+length+1] with the span's queries over the frozen cache."""
        context_len = cache.layers[0].keys.shape[-2]
        span = ids[:, start:start + length]
        allowed = span_attention_mask(start, length, context_len, ids.shape[0], ids.device)
        mask = additive_attention_mask(allowed, cache.layers[0].keys.dtype)
        positions = torch.arange(start, start + length, device=ids.device)[None].expand(ids.shape[0], -1)
        out = self.model(input_ids=span, attention_mask=mask, position_ids=positions, use_cache=True,
                         **cache_kwargs(self.model, cache))
        logits = out.logits.float()
        targets = ids[:, start + 1:start + length + 1]
        return torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))

    def adapt(self, prefix_ids: torch.Tensor, span_start: int = 0) -> TTTState:
        if self._saved is None:
            raise RuntimeError("use QueryOnlyTTT as a context manager (`with QueryOnlyTTT(...) as ttt:`), so the "
                               "weights are restored afterwards.")
        if prefix_ids.dim() != 2 or prefix_ids.shape[0] != 1:
            raise ValueError(f"prefix_ids must be [1, T] (one context at a time), got {tuple(prefix_ids.shape)}.")
        context_len = prefix_ids.shape[1]
        spans = self.sample_spans(context_len, span_start)
        cache = self.prefill(prefix_ids)
        state = TTTState(cache=cache, context_len=context_len, spans=spans)
        if not spans:
            return state
        wanted = set(map(id, self.params.values()))
        for p in self.model.parameters():
            p.requires_grad_(id(p) in wanted)
        # eval(): no dropout while adapting; gradients are enabled explicitly below.
        self.model.eval()
        params = list(self.params.values())
        cfg = self.config
        if cfg.optimizer == "adamw":
            optimizer = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        else:
            optimizer = torch.optim.SGD(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        with torch.enable_grad():
            for start, length in spans:
                optimizer.zero_grad(set_to_none=True)
                loss = self.span_loss(prefix_ids, cache, start, length)
                loss.backward()
                if cfg.max_grad_norm is not None:
                    torch.nn.utils.clip_grad_norm_(params, cfg.max_grad_norm)
                optimizer.step()
                state.losses.append(float(loss.detach()))
        optimizer.zero_grad(set_to_none=True)
        return state

    def generate(self, full_ids: torch.Tensor, state: TTTState, **generate_kwargs) -> torch.Tensor:
        """`model.generate` over the adapted weights, reusing the frozen context (copied, so `state` stays valid)."""
        if full_ids.shape[1] <= state.context_len:
            raise ValueError("full_ids must extend the adapted context with at least one question token.")
        cache = dynamic_cache_from_layers(state.cache.layer_tensors())
        with torch.no_grad():
            return self.model.generate(full_ids, **cache_kwargs(self.model, cache), **generate_kwargs)


def encode_context_question(tokenizer, context: str, question: str, separator: str = "\n\n",
                            chat_template: bool | None = None) -> tuple[torch.Tensor, int, int]:
    """Token ids of the prompt, the index where the context starts and where it ends.

    With a chat template (the default when the tokenizer has one) the user turn is `context + separator + question`.
    The pieces are tokenized apart and concatenated, so the context's token range is exact by construction.
    Returns (ids [1, N], context_start, context_end).
    """
    use_template = getattr(tokenizer, "chat_template", None) is not None if chat_template is None else chat_template
    marker = "\x00QTTT_CONTEXT\x00"
    if use_template:
        text = tokenizer.apply_chat_template([{"role": "user", "content": marker}], tokenize=False,
                                             add_generation_prompt=True)
        head, tail = text.split(marker)
    else:
        head, tail = "", ""
    pieces = [head, context, separator + question + tail]
    encoded = [tokenizer(piece, add_special_tokens=False)["input_ids"] if piece else [] for piece in pieces]
    ids = [t for part in encoded for t in part]
    start = len(encoded[0])
    end = start + len(encoded[1])
    return torch.tensor([ids], dtype=torch.long), start, end


def qttt_generate(model, tokenizer, context: str, question: str, config: QTTTConfig | None = None,
                  return_state: bool = False, **generate_kwargs):
    """Answer `question` about `context` after query-only test-time training on the context; returns the answer
    text (and the `TTTState` with `return_state=True`). Weights are restored bit for bit before returning.

    Generation defaults to greedy (`do_sample=False`) and `max_new_tokens=64`; any `generate` kwarg overrides them.
    """
    config = config or QTTTConfig()
    ids, start, end = encode_context_question(tokenizer, context, question)
    if end - start < 2:
        raise ValueError(f"the context must hold at least 2 tokens; it tokenized to {end - start}.")
    device = next(model.parameters()).device
    ids = ids.to(device)
    generate_kwargs.setdefault("do_sample", False)
    generate_kwargs.setdefault("max_new_tokens", 64)
    generate_kwargs.setdefault("attention_mask", torch.ones_like(ids))
    with QueryOnlyTTT(model, config) as ttt:
        state = ttt.adapt(ids[:, :end], span_start=start)
        out = ttt.generate(ids, state, **generate_kwargs)
    answer = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return (answer, state) if return_state else answer
