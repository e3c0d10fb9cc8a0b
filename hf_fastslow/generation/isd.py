"""I-DLM introspective strided decoding (ISD) as a `generate(custom_generate=...)` callable, and lossless R-ISD.

Yu et al., "Introspective Diffusion Language Models" (arXiv 2604.11035). A causal LM trained (or converted) to draft
at mask slots keeps strict causal attention and the AR logit shift, so ONE forward over
`[pending, last round's N-1 drafts, N-1 mask slots]` both verifies the drafts (as the AR model would) and drafts N-1
new tokens. Acceptance is speculative sampling, so the output follows the model's own causal distribution; greedy
ISD returns exactly what greedy `generate` returns, for any causal LM (converted or not).

Usage::

    from hf_fastslow.generation.isd import isd_generate
    out = model.generate(ids, custom_generate=isd_generate, gen_block_size=4, mask_token_id=mask_id,
                         max_new_tokens=256, return_dict_in_generate=True)
    out.sequences, out.tokens_per_forward, out.acceptance_rate

R-ISD: give the model a peft activated LoRA (`LoraConfig(alora_invocation_tokens=[mask_id], ...)`); ISD then passes
`alora_offsets=[N-1] * B` on every round, so the adapter acts only on the mask slots and every verified position runs
the base weights bit for bit: the output is the base model's (greedy: token for token).

Batches (left padding) accept ragged counts: each row verifies its own drafts in one padded forward; rejected slots of
rows behind the leader stay in the cache as masked holes (compacted now and then), the tail no row needs is cropped
(`cache.crop(-n)`), and each row keeps its own position ids. Per row, valid cache entries = prompt + committed - 1.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import logging
from dataclasses import dataclass

import torch
from transformers.generation.utils import GenerateDecoderOnlyOutput

from ..integrations import (
    cache_from_kwargs,
    generate_special_tokens,
    model_is_stateful,
    output_cache,
    speculative_cache_check,
    speculative_cache_compactable,
    speculative_compact_cache,
    speculative_crop,
    speculative_forward,
    speculative_prepare_cache,
    split_stopping_criteria,
)
from ..integrations.isd_seam import alora_offsets, unwrap_peft_model, uses_alora
from .isd_config import ISDConfig
from .isd_round import ISDRows, isd_round
from .padding import pad_token_id
from .speculative_processors import RoundProcessors

logger = logging.getLogger(__name__)

__all__ = ["IDLMGenerationMixin", "ISDGenerateOutput", "check_isd_call", "introspective_acceptance_rate",
           "isd_generate", "resolve_isd_config"]

# Holes (masked cache columns) are compacted once they exceed this many columns, or 1/8 of the cache width if more.
_COMPACT_MIN_HOLES = 16
_HANDLED_KWARGS = {
    "attention_mask", "position_ids", "cache", "past_key_values", "use_cache", "logits_to_keep", "cache_position"
}


@dataclass
class ISDGenerateOutput(GenerateDecoderOnlyOutput):
    """`generate`'s decoder-only output plus ISD's per-row counters.

    tokens_per_forward: [B] float, new tokens / forwards the row took part in (prefill included; AR decoding = 1).
    acceptance_rate: [B] float, accepted drafts / verified drafts (NaN for a row that verified none).
    num_forwards: [B] long, forwards the row took part in (prefill + rounds).
    """

    tokens_per_forward: torch.FloatTensor | None = None
    acceptance_rate: torch.FloatTensor | None = None
    num_forwards: torch.LongTensor | None = None


def _block_diffusion_dict(model) -> dict | None:
    value = getattr(getattr(model, "config", None), "block_diffusion", None)
    return value if isinstance(value, dict) else None


def resolve_isd_config(model, gen_block_size=None, mask_token_id=None, verify_alpha=None, proposal=None,
                       isd_config: ISDConfig | None = None) -> ISDConfig:
    """Explicit arguments, else `isd_config`, else the model's attached block-diffusion config (mask id), else the
    `ISDConfig` defaults; validated, with the mask id checked against the model."""
    base = isd_config.to_dict() if isd_config is not None else ISDConfig().to_dict()
    for key, value in (("gen_block_size", gen_block_size), ("mask_token_id", mask_token_id),
                       ("verify_alpha", verify_alpha), ("proposal", proposal)):
        if value is not None:
            base[key] = value
    attached = _block_diffusion_dict(model)
    if base["mask_token_id"] is None and attached is not None:
        base["mask_token_id"] = attached.get("mask_token_id")
    config = ISDConfig.from_dict(base)
    if config.mask_token_id is None:
        raise ValueError(
            "isd_generate needs a mask token: pass `mask_token_id=` (or attach a BlockDiffusionConfig to the model)."
        )
    vocab = model.get_input_embeddings().num_embeddings
    if config.mask_token_id >= vocab:
        raise ValueError(f"mask_token_id {config.mask_token_id} is outside the model's vocabulary (size {vocab}).")
    return config


def check_isd_call(model, input_ids, config: ISDConfig, generation_config, synced_gpus, streamer, assistant_model,
                   cache) -> None:
    """Every refusal of an ISD call, before anything is run or changed (shared with the stationary batch)."""
    if assistant_model is not None or getattr(generation_config, "prompt_lookup_num_tokens", None):
        raise ValueError(
            "isd_generate drafts with the model itself (mask slots): it takes no `assistant_model` / "
            "`prompt_lookup_num_tokens`."
        )
    if (generation_config.num_beams or 1) > 1:
        raise ValueError("isd_generate does not support beam search (`num_beams > 1`).")
    if synced_gpus:
        raise NotImplementedError("isd_generate does not support `synced_gpus=True` (DeepSpeed ZeRO-3/FSDP).")
    if model.config.is_encoder_decoder:
        raise ValueError("isd_generate supports decoder-only (causal) models only.")
    if model_is_stateful(model):
        raise ValueError(f"{type(model).__name__} is stateful (recurrent): rejected drafts cannot be rolled back.")
    attached = _block_diffusion_dict(model)
    if attached is not None and (attached.get("attention", "causal") != "causal"
                                 or not attached.get("logit_shift", True)):
        raise ValueError(
            "isd_generate needs strict causal attention with the AR logit shift (an I-DLM or any causal LM); this "
            f"model is a block-diffusion model with attention={attached.get('attention')!r}, "
            f"logit_shift={attached.get('logit_shift')}: use block_diffusion_generate instead."
        )
    for flag in ("output_attentions", "output_hidden_states", "output_scores", "output_logits"):
        if getattr(generation_config, flag, False):
            raise ValueError(f"isd_generate does not return per-step tensors (`{flag}=True`).")
    if getattr(generation_config, "prefill_chunk_size", None) is not None:
        raise ValueError("isd_generate does not support `prefill_chunk_size`.")
    if streamer is not None and input_ids.shape[0] > 1:
        raise ValueError("Streaming is only supported for batch size 1.")
    eos = generate_special_tokens(generation_config).eos_token_id
    if config.mask_token_id in eos:
        raise ValueError(
            f"mask_token_id {config.mask_token_id} is also an EOS token: a drafted mask would end generation. "
            "Use a dedicated mask token."
        )
    speculative_cache_check(cache, input_ids.shape[0])
    uses_alora(model)  # raises for a merged aLoRA


_check_call = check_isd_call  # the name the stationary batch imported first


class _ISDRun:
    """The state of one `isd_generate` call: prefill, rounds (`step`), finish."""

    def __init__(self, model, input_ids, config, logits_processor, stopping_criteria, generation_config, streamer,
                 model_kwargs):
        self.model, self.config, self.streamer = model, config, streamer
        self.model_kwargs = model_kwargs
        self.cache = cache_from_kwargs(model_kwargs)
        self.batch_size, self.prompt_width = batch, width = input_ids.shape
        self.input_ids = input_ids
        self.device = device = input_ids.device
        self.do_sample = bool(generation_config.do_sample)
        self.logits_processor = logits_processor
        self.processors = RoundProcessors(logits_processor)
        self.r_isd = uses_alora(model)
        special = generate_special_tokens(generation_config)
        self.eos_ids = set(special.eos_token_id)
        self.pad_id = pad_token_id(special, default=0)
        max_length, self.other_criteria = split_stopping_criteria(stopping_criteria)
        if max_length is None:  # a direct call: generate did not turn the length settings into a criterion
            max_length = generation_config.max_length
            if generation_config.max_new_tokens is not None:
                max_length = input_ids.shape[1] + generation_config.max_new_tokens
        self.max_length = max_length if max_length is not None else input_ids.shape[1] + 20
        self.return_dict = bool(generation_config.return_dict_in_generate)

        attention_mask = model_kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        attention_mask = attention_mask.to(device=device, dtype=torch.long)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"isd_generate needs `input_ids` to hold the whole sequence its attention mask covers (got ids "
                f"{tuple(input_ids.shape)}, mask {tuple(attention_mask.shape)})."
            )
        self.left_pad = (attention_mask == 0).long().cumprod(dim=1).sum(dim=1)
        if not bool((attention_mask.sum(dim=1) == width - self.left_pad).all()):
            raise ValueError("isd_generate expects left padding (pad tokens only at the start of each row).")
        self.attention_mask = attention_mask
        self.prompt_lengths = width - self.left_pad

        n = config.gen_block_size
        capacity = max(self.max_length, width + 1) + 2 * n + 1
        tokens = torch.full((batch, capacity), self.pad_id, dtype=torch.long, device=device)
        tokens[:, :width] = input_ids
        self.rows = ISDRows(
            tokens=tokens,
            lengths=torch.full((batch,), width, dtype=torch.long, device=device),
            num_specs=torch.zeros(batch, dtype=torch.long, device=device),
            active=torch.ones(batch, dtype=torch.bool, device=device),
        )
        self.n_cached = torch.zeros(batch, dtype=torch.long, device=device)  # valid cache entries per row
        self.forwards = torch.zeros(batch, dtype=torch.long, device=device)
        self.proposed = torch.zeros(batch, dtype=torch.long, device=device)
        self.accepted = torch.zeros(batch, dtype=torch.long, device=device)
        self.mask_full = False
        self.compactable = False
        self.compacted = False
        self.rounds = 0

    # ---- helpers ----------------------------------------------------------------------------------------------------
    def forward(self, ids, attention_mask, position_ids, logits_to_keep, offsets, **extra):
        if not self.r_isd:
            return speculative_forward(self.model, ids, attention_mask, position_ids, self.cache, logits_to_keep,
                                       **extra)
        with alora_offsets(self.model, offsets):
            return speculative_forward(self.model, ids, attention_mask, position_ids, self.cache, logits_to_keep,
                                       **extra)

    def commit(self, start: torch.Tensor, count: torch.Tensor) -> list[list[int]]:
        """Rows committed `count[i]` tokens at `tokens[i, start[i]:]`: each row ends at `start + count`, or earlier
        where it stops (EOS, max_length, a stopping criterion: truncated after the stopping token, row finished).
        Returns the tokens kept per row."""
        rows = self.rows
        starts, counts = start.tolist(), count.tolist()
        lengths = [s + c for s, c in zip(starts, counts)]
        kept_rows: list[list[int]] = []
        for i in range(self.batch_size):
            kept: list[int] = []
            new = rows.tokens[i, starts[i] : starts[i] + counts[i]].tolist() if counts[i] else []
            for pos, tok in enumerate(new):
                kept.append(tok)
                end = starts[i] + pos + 1
                stop = tok in self.eos_ids or end >= self.max_length
                if stop or any(bool(c(rows.tokens[i : i + 1, :end], None).reshape(-1)[0]) for c in self.other_criteria):
                    rows.active[i] = False
                    lengths[i] = end
                    break
            kept_rows.append(kept)
        rows.lengths = torch.tensor(lengths, dtype=torch.long, device=self.device)
        return kept_rows

    # ---- prefill ----------------------------------------------------------------------------------------------------
    def prefill(self) -> None:
        """Feed the prompt (its uncached tail) and pick every row's first token, exactly as `generate` does."""
        input_ids, batch = self.input_ids, self.batch_size
        past = self.cache.get_seq_length()
        if past >= self.prompt_width:
            raise ValueError(
                f"The cache already holds {past} tokens but the prompt has {self.prompt_width}: pass the whole "
                "conversation (cached tokens + at least one new token) as `input_ids`."
            )
        position_ids = (self.attention_mask.cumsum(-1) - 1).clamp(min=0)
        self.mask_full = bool(self.attention_mask.all())
        extra = {k: v for k, v in self.model_kwargs.items() if k not in _HANDLED_KWARGS and v is not None}
        outputs = self.forward(
            input_ids[:, past:], None if self.mask_full else self.attention_mask, position_ids[:, past:], 1,
            [0] * batch, **extra,
        )
        self.cache = output_cache(outputs) or self.cache
        speculative_prepare_cache(self.cache)  # sliding-window layers keep what a later crop needs
        self.compactable = batch > 1 and speculative_cache_compactable(self.cache)
        logits = outputs.logits[:, -1].to(dtype=torch.float32)
        scores = self.logits_processor(input_ids, logits) if self.processors else logits
        if self.do_sample:
            first = torch.multinomial(torch.softmax(scores, dim=-1), num_samples=1).squeeze(1)
        else:
            first = scores.argmax(dim=-1)
        self.rows.tokens[:, self.prompt_width] = first
        self.n_cached += self.prompt_lengths
        self.forwards += 1
        kept = self.commit(self.rows.lengths.clone(), torch.ones(batch, dtype=torch.long, device=self.device))
        self._stream(kept)

    # ---- one round --------------------------------------------------------------------------------------------------
    def step(self) -> None:
        """One forward over every live row's [pending, specs, masks], the round's decisions, commit, cache."""
        rows, config, device, batch = self.rows, self.config, self.device, self.batch_size
        n = config.gen_block_size
        active = rows.active.clone()
        num_specs = torch.where(active, rows.num_specs, torch.zeros_like(rows.num_specs))
        k_max = int(num_specs.max())
        width = 1 + k_max + (n - 1)
        cols = torch.arange(width, device=device)
        # Physical layout per row: [pending, specs (K_i), filler (k_max - K_i, masked out), masks (N-1)]: the mask
        # slots always end the row (aLoRA offsets count from the end).
        spec_ids = rows.specs(k_max) if k_max else torch.zeros(batch, 0, dtype=torch.long, device=device)
        pending = rows.tokens.gather(1, (rows.lengths - 1)[:, None])
        ids = torch.cat([pending, spec_ids, torch.full((batch, n - 1), config.mask_token_id, device=device)], dim=1)
        is_spec_col = (cols[None, :] >= 1) & (cols[None, :] <= k_max)
        valid = (~is_spec_col | (cols[None, :] <= num_specs[:, None])) & active[:, None]
        logical = torch.where(cols[None, :] <= k_max, cols[None, :], cols[None, :] - (k_max - num_specs[:, None]))
        position_ids = self.n_cached[:, None] + logical
        ids = torch.where(valid, ids, torch.full_like(ids, self.pad_id))
        uniform = bool(active.all()) and bool((num_specs == k_max).all())
        step_mask = valid.long()
        full_mask = None if (self.mask_full and uniform) else torch.cat([self.attention_mask, step_mask], dim=1)
        outputs = self.forward(ids, full_mask, position_ids, width, [n - 1] * batch)
        self.cache = output_cache(outputs) or self.cache
        logits = outputs.logits.to(dtype=torch.float32)
        # Logical layout for the round: slot j <= K_i at column j, mask slot K_i + m at column k_max + m.
        gather_cols = torch.arange(k_max + n, device=device)[None, :]
        gather_cols = torch.where(gather_cols <= num_specs[:, None], gather_cols,
                                  gather_cols + (k_max - num_specs[:, None])).clamp(max=width - 1)
        logical_logits = logits.gather(1, gather_cols[:, :, None].expand(-1, -1, logits.shape[-1]))
        del outputs, logits

        start = rows.lengths.clone()
        result = isd_round(logical_logits, rows, config, do_sample=self.do_sample, processors=self.processors)
        self.rounds += 1
        self.forwards += active.long()
        self.proposed += result.proposed
        self.accepted += result.accepted
        # Cache: row i keeps its pending + accepted specs (= committed tokens); the rest of its slots become holes.
        kept = self.commit(start, result.committed)
        self._update_cache(step_mask, result.committed, width, uniform)
        self._stream(kept)

    def _update_cache(self, step_mask, keep, width, uniform) -> None:
        keep_cols = int(keep.max())
        cols = torch.arange(width, device=self.device)
        kept_mask = step_mask * (cols[None, :] < keep[:, None])
        self.attention_mask = torch.cat([self.attention_mask, kept_mask[:, :keep_cols]], dim=1)
        self.mask_full = self.mask_full and uniform and bool((keep == keep_cols).all())
        speculative_crop(self.cache, width - keep_cols)
        self.n_cached += keep
        holes = self.attention_mask.shape[1] - int(self.n_cached.max())
        if self.compactable and holes >= max(_COMPACT_MIN_HOLES, self.attention_mask.shape[1] // 8):
            cols_all = torch.arange(self.attention_mask.shape[1], device=self.device)
            order = torch.where(self.attention_mask.bool(), cols_all, -1).argsort(dim=1, stable=True)[:, holes:]
            speculative_compact_cache(self.cache, order)
            self.attention_mask = self.attention_mask.gather(1, order)
            self.mask_full, self.compacted = bool(self.attention_mask.all()), True

    def _stream(self, kept: list[list[int]]) -> None:
        if self.streamer is not None and kept[0]:
            self.streamer.put(torch.tensor(kept[0], dtype=torch.long))

    # ---- finish -----------------------------------------------------------------------------------------------------
    def finish(self):
        if self.streamer is not None:
            self.streamer.end()
        width, device = self.prompt_width, self.device
        lengths = self.rows.lengths
        longest = int(lengths.max())
        sequences = self.rows.tokens[:, :longest].clone()
        sequences.masked_fill_(torch.arange(longest, device=device)[None, :] >= lengths[:, None], self.pad_id)
        if not self.return_dict:
            return sequences
        new_tokens = (lengths - width).float()
        cache = None
        if self.batch_size == 1:
            # generate leaves prompt + generated - 1 entries; a stop inside accepted drafts kept a few more.
            extra = int(self.n_cached[0]) - (int(self.prompt_lengths[0]) + int(lengths[0]) - width - 1)
            speculative_crop(self.cache, max(extra, 0))
            cache = self.cache
        fields = ISDGenerateOutput.__dataclass_fields__
        kwargs = {"cache" if "cache" in fields else "past_key_values": cache}
        proposed = self.proposed.float()
        return ISDGenerateOutput(
            sequences=sequences,
            tokens_per_forward=new_tokens / self.forwards.clamp(min=1).float(),
            acceptance_rate=torch.where(proposed > 0, self.accepted.float() / proposed.clamp(min=1),
                                        torch.full_like(proposed, float("nan"))),
            num_forwards=self.forwards.clone(),
            **kwargs,
        )

    def cache_invariant_holds(self) -> bool:
        """Valid cache entries == prompt + committed - 1 for every live row (the tokens in flight are not cached)."""
        committed = self.rows.lengths - self.prompt_width
        want = self.prompt_lengths + committed - 1
        live = self.rows.active
        valid = self.attention_mask.sum(dim=1)
        physical_ok = self.cache.get_seq_length() == self.attention_mask.shape[1]
        return physical_ok and bool(((self.n_cached == want) & (valid == want))[live].all())


@torch.no_grad()
def isd_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor=None,
    stopping_criteria=None,
    generation_config=None,
    synced_gpus: bool = False,
    streamer=None,
    gen_block_size: int | None = None,
    mask_token_id: int | None = None,
    verify_alpha: float | None = None,
    proposal: str | None = None,
    isd_config: ISDConfig | None = None,
    assistant_model=None,
    **model_kwargs,
):
    r"""Introspective strided decoding, as a `generate(custom_generate=...)` callable.

    Args:
        gen_block_size (`int`): N (>= 2): drafts verified and drafted per forward + 1. Default 4.
        mask_token_id (`int`): the mask id (default: the model's attached block-diffusion config).
        verify_alpha (`float`): 1.0 (exact) or < 1 (lossy, accepts more).
        proposal (`str`): "sample" (default) or "argmax" draft proposals; both exact.
        isd_config (`ISDConfig`): all of the above at once (explicit arguments win).

    Note: transformers does not forward `streamer` / `assistant_model` to a callable `custom_generate`; pass
    `custom_generate=functools.partial(isd_generate, streamer=...)` or use `IDLMGenerationMixin`, which does.

    Returns:
        A `LongTensor` of sequences (rows padded with `pad_token_id` after they stop), or with
        `return_dict_in_generate=True` an `ISDGenerateOutput` (`sequences`, `tokens_per_forward`, `acceptance_rate`,
        `num_forwards`, and the cache for batch size 1).
    """
    from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

    model = unwrap_peft_model(model)
    generation_config = copy.deepcopy(generation_config) if generation_config is not None else GenerationConfig()
    for key in ("max_new_tokens", "max_length", "do_sample"):  # a direct call may pass these beside the config
        if key in model_kwargs:
            setattr(generation_config, key, model_kwargs.pop(key))
    logits_processor = logits_processor if logits_processor is not None else LogitsProcessorList()
    stopping_criteria = stopping_criteria if stopping_criteria is not None else StoppingCriteriaList()
    config = resolve_isd_config(model, gen_block_size, mask_token_id, verify_alpha, proposal, isd_config)
    if model_kwargs.get("inputs_embeds") is not None or input_ids.shape[-1] == 0:
        raise ValueError("isd_generate needs the prompt as `input_ids` (mask slots and drafts are fed as token ids).")
    cache = cache_from_kwargs(model_kwargs)
    check_isd_call(model, input_ids, config, generation_config, synced_gpus, streamer, assistant_model, cache)
    run = _ISDRun(model, input_ids, config, logits_processor, stopping_criteria, generation_config, streamer,
                  model_kwargs)
    run.prefill()
    while bool(run.rows.active.any()):
        run.step()
    return run.finish()


class IDLMGenerationMixin:
    """Mix into a causal LM class (before its transformers base) so that `generate` decodes with ISD.

    `isd_config` (an `ISDConfig`, set on the instance or passed per call) gives N, the mask id, verify_alpha and the
    proposal; `generate(..., isd=False)` falls back to plain decoding.
    """

    isd_config: ISDConfig | None = None

    def generate(self, *args, isd: bool = True, isd_config: ISDConfig | None = None, streamer=None,
                 assistant_model=None, **kwargs):
        if not isd or kwargs.get("custom_generate") is not None:  # plain decoding, or the caller's own loop
            return super().generate(*args, streamer=streamer, assistant_model=assistant_model, **kwargs)
        if assistant_model is not None:
            raise ValueError("ISD drafts with the model itself: it takes no `assistant_model`.")
        config = isd_config if isd_config is not None else self.isd_config
        custom = functools.partial(isd_generate, streamer=streamer, isd_config=config)
        return super().generate(*args, custom_generate=custom, **kwargs)


@torch.no_grad()
def introspective_acceptance_rate(
    model,
    input_ids: torch.LongTensor,
    gen_block_size: int,
    *,
    prompt_length: int,
    attention_mask: torch.Tensor | None = None,
    mask_token_id: int | None = None,
    temperature: float = 1.0,
) -> float:
    """The I-DLM card's alpha = mean over drafted tokens of min(1, p(x) / q(x)) on a reference continuation.

    `input_ids[:, prompt_length:]` is the continuation (e.g. greedy `generate` output; columns with attention mask 0
    after the prompt are skipped). It is tiled as ISD tiles it when every draft is accepted: the first two tokens are
    exact, then each round has one exact token and N-1 drafted ones; the drafts of a round come from the N-1 mask
    slots fed after its exact token (q = softmax(z / T)), their anchors p from the causal logits of the next round.
    1.0 for a model whose mask slots predict the AR distribution exactly; R-ISD models are handled as in decoding.
    """
    model = unwrap_peft_model(model)
    config = resolve_isd_config(model, gen_block_size, mask_token_id)
    n, mask_id = config.gen_block_size, config.mask_token_id
    batch, total = input_ids.shape
    device = input_ids.device
    if not 0 < prompt_length < total:
        raise ValueError(f"prompt_length must be in (0, {total}), got {prompt_length}.")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    r_isd = uses_alora(model)
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)

    def run(ids, mask, pos, offsets, keep):
        with alora_offsets(model, offsets) if r_isd else contextlib.nullcontext():
            return speculative_forward(model, ids, mask, pos, cache, keep)

    masks = torch.full((batch, n - 1), mask_id, dtype=torch.long, device=device)
    ones = torch.ones_like(masks)
    run(input_ids[:, :prompt_length], attention_mask[:, :prompt_length], positions[:, :prompt_length], [0] * batch, 1)
    total_ratio, count = 0.0, 0
    start, drafts_q, drafts_at = prompt_length, None, None  # `start`: the column of the round's exact token
    while start < total:
        real = input_ids[:, start : start + (n if drafts_q is not None else 1)]
        width = real.shape[1]
        ids = torch.cat([real, masks], dim=1)
        real_mask = attention_mask[:, start : start + width]
        mask = torch.cat([attention_mask[:, :start], real_mask, ones * real_mask[:, -1:]], dim=1)
        last = positions[:, start + width - 1 : start + width]
        pos = torch.cat([positions[:, start : start + width], last + torch.arange(1, n, device=device)[None]], dim=1)
        logits = run(ids, mask, pos, [n - 1] * batch, ids.shape[1]).logits.float() / temperature
        speculative_crop(cache, n - 1)
        if drafts_q is not None:  # anchors of the previous round's drafts: logits after the exact token
            p = torch.softmax(logits[:, : width - 1], dim=-1)
            cols = drafts_at[: width - 1]
            x = input_ids[:, cols]
            ok = attention_mask[:, cols].bool() & attention_mask[:, start : start + 1].bool()
            p_x = p.gather(2, x[..., None]).squeeze(-1)
            q_x = drafts_q[:, : width - 1].gather(2, x[..., None]).squeeze(-1)
            ratio = torch.clamp(p_x / q_x, max=1.0)
            total_ratio += float(ratio[ok].sum())
            count += int(ok.sum())
        # This round's mask slot m predicts the token m + 1 columns after the round's last real token.
        nxt = start + width
        drafts_at = torch.arange(nxt + 1, nxt + n, device=device)
        drafts_at = drafts_at[drafts_at < total]
        drafts_q = torch.softmax(logits[:, width:], dim=-1)
        if drafts_at.numel() == 0:
            break
        start = nxt
    if count == 0:
        raise ValueError("The continuation is too short to hold a drafted token: give more tokens.")
    return total_ratio / count

