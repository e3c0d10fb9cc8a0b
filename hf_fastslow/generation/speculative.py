"""Lossless speculative decoding loop for `generate(custom_generate=...)` (Leviathan et al., "Fast Inference from
Transformers via Speculative Decoding", ICML 2023), batched, with pluggable `Drafter`s.

Usage::

    out = model.generate(ids, attention_mask=mask, custom_generate=speculative_generate, drafter=drafter,
                         max_new_tokens=256)
    drafter.last_stats.tokens_per_forward

Batch > 1 (HF's assisted loop is batch-1 only) uses a "holey" cache: every row verifies its own draft in one padded
target pass, rows then advance by different amounts, the rejected positions of rows behind the leader stay in the
cache but are masked out, each row keeps its own position ids, and only the tail that no row needs is cropped. With
batch size 1 this is exactly HF's assisted loop (crop the rejected tail).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Hashable, Sequence
from typing import Any

import torch

from ..integrations import (
    cache_from_kwargs,
    decoder_only_generate_output,
    output_cache,
    speculative_cache_check,
    speculative_cache_compactable,
    speculative_compact_cache,
    speculative_crop,
    speculative_forward,
    speculative_prepare_cache,
    split_stopping_criteria,
)
from .drafter import DraftContext, Drafter, DraftFeedback, SpeculativeStats, problem_id_for
from .speculative_processors import RoundProcessors

logger = logging.getLogger(__name__)

__all__ = ["speculative_generate"]

_call_counter = itertools.count()
# The batched cache is compacted (each row's valid columns gathered to the right end) once its width exceeds the
# longest row by this many columns, or by 1/8 of its width if more: a copy of the cache every so often, amortised.
_COMPACT_MIN_HOLES = 16
# model_kwargs that generate() prepares and this loop rebuilds itself every round.
# (`cache_position`, 5.17: the model derives it from the cache, which may already hold part of the prompt.)
_HANDLED_KWARGS = {
    "attention_mask", "position_ids", "cache", "past_key_values", "use_cache", "logits_to_keep", "cache_position"
}


def _as_id_list(value: Any, batch_size: int, name: str) -> list | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"`{name}` must be a list with one id per row, got {type(value).__name__}.")
    if len(value) != batch_size:
        raise ValueError(f"`{name}` has {len(value)} entries but the batch has {batch_size} rows.")
    return list(value)


@torch.no_grad()
def speculative_generate(
    model,
    input_ids: torch.LongTensor,
    logits_processor,
    stopping_criteria,
    generation_config,
    synced_gpus: bool = False,
    streamer=None,
    drafter: Drafter | None = None,
    problem_ids: Sequence[Hashable] | None = None,
    request_ids: Sequence[Hashable] | None = None,
    **model_kwargs,
):
    r"""Speculative decoding with a `Drafter`, as a `generate(custom_generate=...)` callable.

    Greedy decoding returns the same tokens as plain greedy `generate` (up to floating-point differences between a
    one-token and a multi-token forward, which do not show on the models we test); sampling draws from the same
    distribution as plain sampling (point-mass speculative sampling: draft token d is kept iff the target's own sample
    at that position equals d), but not the same random stream.

    Args:
        drafter (`Drafter`): the draft source (required). Its `last_stats` / `stats` are updated.
        problem_ids (`list`, *optional*): one id per row grouping requests that share history (DAS); defaults to a
            hash of each row's prompt tokens.
        request_ids (`list`, *optional*): unique id per row; defaults to `(call index, row)`.

    Returns:
        What `generate` returns: a `LongTensor` of sequences, or a `GenerateDecoderOnlyOutput` when
        `return_dict_in_generate=True` (with `scores` / `logits` if requested; rows that already finished hold
        `-inf` scores; the cache is returned only when it has no masked holes, i.e. batch size 1).
    """
    if drafter is None:
        raise ValueError(
            "speculative_generate needs a draft source: call `generate(..., custom_generate=speculative_generate, "
            "drafter=<hf_fastslow.generation.Drafter>)`."
        )
    if not isinstance(drafter, Drafter):
        raise TypeError(f"`drafter` must be a hf_fastslow.generation.Drafter, got {type(drafter).__name__}.")
    if synced_gpus:
        raise NotImplementedError("speculative_generate does not support `synced_gpus=True` (DeepSpeed ZeRO-3/FSDP).")
    if model.config.is_encoder_decoder:
        raise ValueError("speculative_generate supports decoder-only models only.")
    if getattr(model, "_is_stateful", False):
        raise ValueError(f"{type(model).__name__} is stateful (recurrent); its state cannot be rolled back.")
    if generation_config.num_beams not in (None, 1):
        raise ValueError("speculative_generate does not support beam search (`num_beams > 1`).")
    if generation_config.output_attentions or generation_config.output_hidden_states:
        raise ValueError(
            "speculative_generate does not return attentions or hidden states "
            "(`output_attentions` / `output_hidden_states`); drafters that need hidden states set "
            "`needs_hidden_states = True` instead."
        )
    if getattr(generation_config, "prefill_chunk_size", None) is not None:
        raise ValueError("speculative_generate does not support `prefill_chunk_size`.")
    if streamer is not None and input_ids.shape[0] > 1:
        raise ValueError("Streaming is only supported for batch size 1.")
    drafter.check_compatible(model)

    cache = cache_from_kwargs(model_kwargs)
    batch_size, prompt_width = input_ids.shape
    speculative_cache_check(cache, batch_size)
    device = input_ids.device
    do_sample = bool(generation_config.do_sample)

    # --- special tokens, lengths, ids -------------------------------------------------------------------------------
    eos = generation_config._eos_token_tensor if hasattr(generation_config, "_eos_token_tensor") else None
    if eos is None and generation_config.eos_token_id is not None:
        eos = torch.as_tensor(generation_config.eos_token_id)
    eos_ids = tuple(int(t) for t in eos.reshape(-1).tolist()) if eos is not None else ()
    pad = getattr(generation_config, "_pad_token_tensor", None)
    if pad is None and generation_config.pad_token_id is not None:
        pad = torch.as_tensor(generation_config.pad_token_id)
    pad_id = int(pad.reshape(-1)[0]) if pad is not None else (eos_ids[0] if eos_ids else 0)
    max_length, other_criteria = split_stopping_criteria(stopping_criteria)
    if max_length is None:
        max_length = generation_config.max_length

    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    attention_mask = attention_mask.to(device=device, dtype=torch.long)
    if attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"speculative_generate needs `input_ids` to hold the whole sequence its attention mask covers (got ids "
            f"{tuple(input_ids.shape)}, mask {tuple(attention_mask.shape)}); with a prefilled cache, pass the cached "
            "tokens too."
        )
    valid = attention_mask.bool()
    prompts = [input_ids[i][valid[i]] for i in range(batch_size)]
    left_pad = [int((~valid[i]).sum()) for i in range(batch_size)]
    if any(bool(valid[i, left_pad[i]:].all()) is False for i in range(batch_size)):
        raise ValueError("speculative_generate expects left padding (pad tokens only at the start of each row).")

    call = next(_call_counter)
    request_ids = _as_id_list(request_ids, batch_size, "request_ids") or [(call, i) for i in range(batch_size)]
    problem_ids = _as_id_list(problem_ids, batch_size, "problem_ids") or [problem_id_for(p) for p in prompts]

    extra_kwargs = {k: v for k, v in model_kwargs.items() if k not in _HANDLED_KWARGS and v is not None}
    want_hidden = bool(drafter.needs_hidden_states)
    layers = tuple(drafter.hidden_state_layers)
    want_target_logits = bool(drafter.needs_target_logits)
    return_dict = bool(generation_config.return_dict_in_generate)
    keep_scores = return_dict and bool(generation_config.output_scores)
    keep_logits = return_dict and bool(generation_config.output_logits)

    vocab_size = model.get_input_embeddings().num_embeddings
    stats = SpeculativeStats(sequences=batch_size)
    drafter.reset()

    # --- per-row state ----------------------------------------------------------------------------------------------
    # `tokens[i, :lengths[i]]` is row i as plain `generate` shows it (left pads + prompt + generated); a round writes
    # the row's draft right after it, so accepted drafts are already in place. Committed tokens never pass
    # `max_length` (drafts stop one short of it); the spare columns absorb the padding of shorter drafts. The buffer
    # grows by doubling (views handed out earlier keep the old storage, whose committed part never changes).
    spare = drafter.max_draft_tokens + 1
    buffer_width = min(max(max_length, prompt_width + 1), prompt_width + 256) + spare
    tokens = torch.full((batch_size, buffer_width), pad_id, dtype=torch.long, device=device)
    tokens[:, :prompt_width] = input_ids
    lengths = [prompt_width] * batch_size
    finished = [False] * batch_size
    row_scores: list[list[torch.Tensor]] = [[] for _ in range(batch_size)]
    row_logits: list[list[torch.Tensor]] = [[] for _ in range(batch_size)]
    # Number of real (non-pad) tokens of each row that are in the cache.
    n_cached = [0] * batch_size
    processors = RoundProcessors(logits_processor)

    def committed(i: int) -> torch.Tensor:
        """Row i without padding (prompt + generated): a view, never written again."""
        return tokens[i, left_pad[i] : lengths[i]]

    def select(scores: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The target's token (argmax or a sample) for every row of `scores` (..., V), or only for `rows` (others 0:
        their scores may be garbage, e.g. all -inf)."""
        if not do_sample:
            return scores.argmax(dim=-1)
        if rows is None:
            probs = torch.softmax(scores.reshape(-1, scores.shape[-1]), dim=-1)
            return torch.multinomial(probs, num_samples=1).reshape(scores.shape[:-1])
        out = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
        out[rows] = torch.multinomial(torch.softmax(scores[rows], dim=-1), num_samples=1).squeeze(-1)
        return out

    def append(i: int, new: list[int]) -> list[int]:
        """Commit `new` to row i (already written at `tokens[i, lengths[i]:]`) until the row stops; returns the
        tokens actually kept."""
        kept = []
        for tok in new:
            kept.append(tok)
            lengths[i] += 1
            stop = tok in eos_ids or lengths[i] >= max_length
            # Other criteria (stop strings, max time) see the row exactly as plain generate would show it.
            if stop or any(bool(c(tokens[i : i + 1, : lengths[i]], None).reshape(-1)[0]) for c in other_criteria):
                finished[i] = True
                break
        return kept

    # --- prefill ----------------------------------------------------------------------------------------------------
    # A cache that already holds the first `past` columns of the prompt (multi-turn reuse, a prompt cache) is kept:
    # only the uncached tail is fed, at its own positions, as `generate` does.
    past = cache.get_seq_length()
    if past >= prompt_width:
        raise ValueError(
            f"The cache already holds {past} tokens but the prompt has {prompt_width}: pass the whole conversation "
            "(cached tokens + at least one new token) as `input_ids`."
        )
    position_ids = model_kwargs.get("position_ids")
    if position_ids is None or position_ids.shape[-1] != prompt_width:
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    mask_arg = None if bool(attention_mask.all()) else attention_mask
    outputs = speculative_forward(
        model, input_ids[:, past:], mask_arg, position_ids[..., past:], cache, logits_to_keep=1,
        output_hidden_states=want_hidden, **extra_kwargs,
    )
    stats.target_forwards += 1
    cache = output_cache(outputs) or cache
    speculative_cache_check(cache, batch_size)
    speculative_prepare_cache(cache)
    compactable, compacted = batch_size > 1 and speculative_cache_compactable(cache), False
    first_logits = outputs.logits[:, -1].to(dtype=torch.float32)
    first_scores = logits_processor(input_ids, first_logits) if processors else first_logits
    first_tokens = select(first_scores)
    tokens[:, prompt_width] = first_tokens
    first_tokens = first_tokens.tolist()
    hidden = [None] * batch_size
    offsets = [0] * batch_size
    if want_hidden:
        hs = torch.stack([outputs.hidden_states[j] for j in layers], dim=2)  # (B, P, L, H)
        # Hidden states exist for the fed tail only: row i's first real fed token is at column lp_i - past (if > 0).
        hidden = [hs[i, max(left_pad[i] - past, 0):].detach() for i in range(batch_size)]
        offsets = [max(past - left_pad[i], 0) for i in range(batch_size)]
    for i in range(batch_size):
        n_cached[i] = len(prompts[i])
        if keep_scores:
            row_scores[i].append(first_scores[i])
        if keep_logits:
            row_logits[i].append(first_logits[i])
        stats.new_tokens += len(append(i, [first_tokens[i]]))
    if streamer is not None:
        streamer.put(tokens[0, prompt_width : lengths[0]].cpu())
    del outputs
    # A finished row still needs one feedback call (the contract: exactly one `finished=True` per row).
    pending_feedback = [i for i in range(batch_size) if finished[i]]
    empty = torch.empty(0, dtype=torch.long, device=device)
    prompt_lengths = [len(p) for p in prompts]
    if pending_feedback:
        drafter.observe(
            DraftFeedback(
                request_ids=[request_ids[i] for i in pending_feedback],
                problem_ids=[problem_ids[i] for i in pending_feedback],
                proposed=[empty for _ in pending_feedback],
                num_accepted=[0 for _ in pending_feedback],
                appended=[tokens[i, prompt_width : lengths[i]] for i in pending_feedback],
                finished=[True for _ in pending_feedback],
                round=0,
                prompt_lengths=[prompt_lengths[i] for i in pending_feedback],
                sequences=[committed(i) for i in pending_feedback],
            )
        )

    # --- verify rounds ----------------------------------------------------------------------------------------------
    # A round in which no row drafts costs what a plain `generate` step costs: one batched forward, batched choice,
    # no per-row tensors beyond the views the drafter contract hands out.
    round_index = 0
    mask_full = bool(attention_mask.all())  # kept in Python: no device sync to decide whether to pass the mask
    while not all(finished):
        round_index += 1
        active = [i for i in range(batch_size) if not finished[i]]
        everyone = len(active) == batch_size
        budgets = [0] * batch_size
        for i in active:
            budgets[i] = max(0, min(drafter.max_draft_tokens, max_length - lengths[i] - 1, spare - 1))
        context = DraftContext(
            input_ids=[committed(i) for i in range(batch_size)],
            budgets=budgets,
            request_ids=request_ids,
            problem_ids=problem_ids,
            prompt_lengths=prompt_lengths,
            round=round_index,
            do_sample=do_sample,
            eos_token_ids=eos_ids,
            hidden_states=hidden if want_hidden else None,
            hidden_offsets=offsets if want_hidden else None,
        )
        proposals = drafter.propose(context)
        if len(proposals) != batch_size:
            raise ValueError(
                f"{type(drafter).__name__}.propose returned {len(proposals)} drafts for {batch_size} rows."
            )
        draft_len = [0] * batch_size
        drafts: dict[int, list[int]] = {}
        for i in active:
            d = proposals[i]
            if budgets[i] == 0 or len(d) == 0:
                continue
            d = d.reshape(-1).tolist() if isinstance(d, torch.Tensor) else [int(t) for t in d]
            d = d[: budgets[i]]
            if not (0 <= min(d) and max(d) < vocab_size):
                raise ValueError(
                    f"{type(drafter).__name__}.propose returned token ids outside the model's vocabulary "
                    f"[0, {vocab_size}) for row {i}: {d}"
                )
            drafts[i], draft_len[i] = d, len(d)
        width = 1 + max(draft_len)
        if max(lengths) + spare > tokens.shape[1]:
            grown = min(2 * tokens.shape[1], max_length + spare) - tokens.shape[1]
            tokens = torch.cat([tokens, tokens.new_full((batch_size, grown), pad_id)], dim=1)
        length_t = torch.tensor(lengths, device=device)
        if width > 1:
            cols = torch.arange(width, device=device)
            draft_t = torch.tensor(
                [drafts.get(i, []) + [pad_id] * (width - 1 - draft_len[i]) for i in range(batch_size)], device=device
            )
            tokens.scatter_(1, length_t[:, None] + cols[None, :-1], draft_t)
            # Row i feeds its last committed token (not yet in the cache) and its draft, padded to `width`.
            step_ids = tokens.gather(1, length_t[:, None] - 1 + cols[None, :])
            step_mask = cols[None, :] <= torch.tensor(draft_len, device=device)[:, None]
            step_pos = torch.tensor(n_cached, device=device)[:, None] + cols[None, :]
        else:
            step_ids = tokens.gather(1, length_t[:, None] - 1)
            step_mask = torch.ones((batch_size, 1), dtype=torch.bool, device=device)
            step_pos = torch.tensor(n_cached, device=device)[:, None]
        if not everyone:
            active_t = torch.zeros(batch_size, dtype=torch.bool, device=device)
            active_t[active] = True
            step_mask &= active_t[:, None]
        else:
            active_t = step_mask[:, 0]
        step_mask = step_mask.long()
        full_mask = torch.cat([attention_mask, step_mask], dim=1)
        uniform = everyone and all(n == width - 1 for n in draft_len)
        outputs = speculative_forward(
            model, step_ids, None if mask_full and uniform else full_mask, step_pos, cache, logits_to_keep=width,
            output_hidden_states=want_hidden,
        )
        stats.target_forwards += 1
        cache = output_cache(outputs) or cache
        logits = outputs.logits.to(dtype=torch.float32)  # (B, width, V)

        # --- verify: the target's own choice at every position, processors batched over rows per position ---------
        if not processors:
            scores = logits
            choice = select(scores)
        else:
            scores = torch.empty_like(logits)
            choice = torch.zeros((batch_size, width), dtype=torch.long, device=device)
            processors.begin_round(tokens, length_t, active_t, width)
            live = active_t  # rows whose drafts so far all match: position j's prefix is what the row would be
            for j in range(width):
                scores[:, j] = processors.position(j, logits[:, j].clone(), live)
                choice[:, j] = select(scores[:, j], live)
                if j + 1 < width:
                    live = live & (choice[:, j] == step_ids[:, j + 1]) & (step_mask[:, j + 1] == 1)
                    if not bool(live.any()):
                        break
        if width > 1:
            matches = (choice[:, :-1] == step_ids[:, 1:]) & (step_mask[:, 1:] == 1)
            accepted_t = matches.long().cumprod(dim=1).sum(dim=1)
            # The target's token after the accepted drafts goes right behind them.
            tokens.scatter_(1, (length_t + accepted_t)[:, None], choice.gather(1, accepted_t[:, None]))
            accepted_rows = accepted_t.tolist()
        else:
            tokens.scatter_(1, length_t[:, None], choice)
            accepted_rows = [0] * batch_size
        choice_rows = choice.tolist()

        num_accepted = [0] * batch_size
        judged = list(draft_len)  # drafts each row used: all of them, unless it stopped on one
        appended: list[torch.Tensor] = [empty] * batch_size
        verified_logits: list[torch.Tensor | None] = [None] * batch_size
        for i in active:
            n = accepted_rows[i]
            start = lengths[i]
            kept = append(i, choice_rows[i][: n + 1])
            if len(kept) <= n:  # stopped on an accepted draft (EOS, a criterion): later drafts are not kept
                n = judged[i] = len(kept)
            num_accepted[i] = n
            appended[i] = tokens[i, start : lengths[i]]
            if keep_scores or keep_logits:
                for j in range(len(kept)):
                    if keep_scores:
                        row_scores[i].append(scores[i, j])
                    if keep_logits:
                        row_logits[i].append(logits[i, j])
            if want_target_logits:
                verified_logits[i] = scores[i, : n + 1].detach()
            stats.proposed += draft_len[i]
            stats.accepted += n
            stats.emitted += len(kept)
            stats.new_tokens += len(kept)
        stats.rounds += len(active)

        # Cache bookkeeping: row i keeps its fed token + accepted drafts; the rest of its segment becomes a hole.
        keep_cols = 1 + max(num_accepted)
        if width > 1:
            step_mask = step_mask * (cols[None, :] <= torch.tensor(num_accepted, device=device)[:, None])
        attention_mask = torch.cat([attention_mask, step_mask[:, :keep_cols]], dim=1)
        mask_full = mask_full and everyone and all(n == keep_cols - 1 for n in num_accepted)
        speculative_crop(cache, width - keep_cols)
        if want_hidden:
            hs = torch.stack([outputs.hidden_states[j] for j in layers], dim=2)  # (B, width, L, H)
            hidden = [None] * batch_size
            for i in active:
                hidden[i] = hs[i, : 1 + num_accepted[i]].detach()
                offsets[i] = n_cached[i]
        for i in active:
            n_cached[i] += 1 + num_accepted[i]
        del outputs, logits
        holes = attention_mask.shape[1] - max(n_cached)
        if compactable and holes >= max(_COMPACT_MIN_HOLES, attention_mask.shape[1] // 8):
            # Each row's valid columns (in order) go to the right end, re-left-padded to the longest row.
            cols_all = torch.arange(attention_mask.shape[1], device=device)
            order = torch.where(attention_mask.bool(), cols_all, -1).argsort(dim=1, stable=True)[:, holes:]
            speculative_compact_cache(cache, order)
            attention_mask = attention_mask.gather(1, order)
            mask_full, compacted = bool(attention_mask.all()), True

        if streamer is not None:  # batch size 1
            streamer.put(appended[0].cpu())
        drafter.observe(
            DraftFeedback(
                request_ids=[request_ids[i] for i in active],
                problem_ids=[problem_ids[i] for i in active],
                proposed=[step_ids[i, 1 : 1 + judged[i]] if judged[i] else empty for i in active],
                num_accepted=[num_accepted[i] for i in active],
                appended=[appended[i] for i in active],
                finished=[finished[i] for i in active],
                round=round_index,
                target_logits=[verified_logits[i] for i in active] if want_target_logits else None,
                prompt_lengths=[prompt_lengths[i] for i in active],
                sequences=[committed(i) if finished[i] else None for i in active],
            )
        )

    if streamer is not None:
        streamer.end()

    # --- output -----------------------------------------------------------------------------------------------------
    longest = max(lengths) - prompt_width
    sequences = tokens[:, : prompt_width + longest].clone()
    ends = torch.tensor(lengths, device=device)[:, None]
    sequences.masked_fill_(torch.arange(prompt_width + longest, device=device)[None, :] >= ends, pad_id)

    drafter.last_stats = stats
    drafter.stats += stats
    if not return_dict:
        return sequences
    # The cache is `generate`'s (prompt + output minus the last token) unless rows left holes or were compacted.
    has_holes = compacted or not bool(attention_mask[:, prompt_width:].all())
    return decoder_only_generate_output(
        sequences,
        scores=_stack_steps(row_scores, longest) if keep_scores else None,
        logits=_stack_steps(row_logits, longest) if keep_logits else None,
        cache=None if has_holes else cache,
    )


def _stack_steps(per_row: list[list[torch.Tensor]], steps: int) -> tuple[torch.Tensor, ...]:
    """Per-row token scores -> one (batch, vocab) tensor per step, like `generate` (finished rows: -inf)."""
    template = next(t for row in per_row for t in row)
    out = []
    for s in range(steps):
        out.append(
            torch.stack([row[s] if s < len(row) else torch.full_like(template, float("-inf")) for row in per_row])
        )
    return tuple(out)
