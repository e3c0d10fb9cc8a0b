"""Lossless speculative decoding loop for `generate(custom_generate=...)` (Leviathan et al., "Fast Inference from
Transformers via Speculative Decoding", ICML 2023), batched, with pluggable `Drafter`s.

Usage::

    out = model.generate(ids, attention_mask=mask, custom_generate=speculative_generate, drafter=drafter,
                         max_new_tokens=256)
    drafter.last_stats.tokens_per_forward

Batch > 1 (HF's assisted loop is batch-1 only) uses a "holey" cache: every row verifies its own draft in one padded
target pass, rows then advance by different amounts, the rejected positions of rows behind the leader stay in the
cache but are masked out, each row keeps its own position ids, and only the tail that no row needs is cropped; the
holes are compacted now and then. With batch size 1 this is exactly HF's assisted loop (crop the rejected tail).

One call is a `_SpeculativeRun` going through named steps: `prefill` (the uncached prompt tail, the first token),
then rounds of `propose` (the drafter's tokens, checked and written behind each row), `verify` (one target forward
over every row's last token + draft, the target's own choice at every position, processors batched) and `accept`
(commit each row's accepted drafts + the target's token, stop rows, cache bookkeeping, drafter feedback), and
`finish` (the `generate`-shaped output).
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..integrations import (
    cache_from_kwargs,
    decoder_only_generate_output,
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
from .drafter import DraftContext, Drafter, DraftFeedback, SpeculativeStats, problem_id_for
from .padding import pad_token_id
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
        `-inf` scores; the cache is returned only when it is laid out as `generate` leaves it: no masked holes
        and never compacted, which batch size 1 always is).
    """
    _check_call(model, input_ids, generation_config, synced_gpus, streamer, drafter)
    run = _SpeculativeRun(
        model, input_ids, logits_processor, stopping_criteria, generation_config, streamer, drafter, problem_ids,
        request_ids, model_kwargs,
    )
    run.prefill()
    while not all(run.finished):
        step = run.propose()
        run.verify(step)
        run.accept(step)
    return run.finish()


def _check_call(model, input_ids, generation_config, synced_gpus, streamer, drafter) -> None:
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
    if model_is_stateful(model):
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


@dataclass
class _Round:
    """One verification round: what `propose` prepared, what `verify` found."""

    index: int
    active: list[int]  # rows still generating
    everyone: bool  # every row is active
    draft_len: list[int]  # draft tokens of each row (after the budget), 0 for finished rows
    width: int  # 1 + the longest draft: tokens fed per row
    length_t: torch.Tensor | None = None  # rows' lengths (plain layout) before the round
    cols: torch.Tensor | None = None  # arange(width), when width > 1
    step_ids: torch.Tensor | None = None  # (B, width): last committed token + draft, padded
    step_mask: torch.Tensor | None = None  # (B, width) long: real fed tokens
    outputs: Any = None
    logits: torch.Tensor | None = None  # (B, width, V) float32
    scores: torch.Tensor | None = None  # processed logits (the logits themselves without processors)
    choice_rows: list[list[int]] | None = None  # the target's own token at every position
    accepted_rows: list[int] | None = None  # leading drafts equal to the target's choice


class _SpeculativeRun:
    """The state of one `speculative_generate` call, advanced by its round steps.

    Row i is kept in `generate`'s layout in a token buffer: `tokens[i, :lengths[i]]` = left pads + prompt + generated;
    a round writes the row's draft right behind it, so accepted drafts are already in place. Committed tokens never
    pass `max_length` (drafts stop one short of it); the spare columns absorb the padding of shorter drafts. The buffer
    grows by doubling (views handed out earlier keep the old storage, whose committed part never changes).
    `n_cached[i]` counts the real (non-pad) tokens of row i in the cache; `attention_mask` covers the cache columns.
    """

    def __init__(self, model, input_ids, logits_processor, stopping_criteria, generation_config, streamer, drafter,
                 problem_ids, request_ids, model_kwargs):
        self.model, self.input_ids, self.drafter, self.streamer = model, input_ids, drafter, streamer
        self.logits_processor = logits_processor
        self.model_kwargs = model_kwargs
        self.cache = cache_from_kwargs(model_kwargs)
        self.batch_size, self.prompt_width = batch_size, prompt_width = input_ids.shape
        speculative_cache_check(self.cache, batch_size)
        self.device = device = input_ids.device
        self.do_sample = bool(generation_config.do_sample)

        # Special tokens and lengths.
        special = generate_special_tokens(generation_config)
        self.eos_ids = special.eos_token_id
        self.pad_id = pad_token_id(special, default=0)
        max_length, self.other_criteria = split_stopping_criteria(stopping_criteria)
        self.max_length = max_length if max_length is not None else generation_config.max_length

        # Rows: left padding, prompts, ids.
        attention_mask = model_kwargs.get("attention_mask")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        self.attention_mask = attention_mask = attention_mask.to(device=device, dtype=torch.long)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(
                f"speculative_generate needs `input_ids` to hold the whole sequence its attention mask covers (got ids "
                f"{tuple(input_ids.shape)}, mask {tuple(attention_mask.shape)}); with a prefilled cache, pass the "
                "cached tokens too."
            )
        valid = attention_mask.bool()
        self.prompts = [input_ids[i][valid[i]] for i in range(batch_size)]
        self.left_pad = [int((~valid[i]).sum()) for i in range(batch_size)]
        if any(bool(valid[i, self.left_pad[i]:].all()) is False for i in range(batch_size)):
            raise ValueError("speculative_generate expects left padding (pad tokens only at the start of each row).")
        self.prompt_lengths = [len(p) for p in self.prompts]
        call = next(_call_counter)
        self.request_ids = (_as_id_list(request_ids, batch_size, "request_ids")
                            or [(call, i) for i in range(batch_size)])
        self.problem_ids = (_as_id_list(problem_ids, batch_size, "problem_ids")
                            or [problem_id_for(p) for p in self.prompts])

        # What the drafter and the caller asked for.
        self.want_hidden = bool(drafter.needs_hidden_states)
        self.layers = tuple(drafter.hidden_state_layers)
        self.want_target_logits = bool(drafter.needs_target_logits)
        self.return_dict = bool(generation_config.return_dict_in_generate)
        self.keep_scores = self.return_dict and bool(generation_config.output_scores)
        self.keep_logits = self.return_dict and bool(generation_config.output_logits)
        self.vocab_size = model.get_input_embeddings().num_embeddings
        self.stats = SpeculativeStats(sequences=batch_size)
        drafter.reset()

        # Per-row state.
        self.spare = drafter.max_draft_tokens + 1
        buffer_width = min(max(self.max_length, prompt_width + 1), prompt_width + 256) + self.spare
        self.tokens = torch.full((batch_size, buffer_width), self.pad_id, dtype=torch.long, device=device)
        self.tokens[:, :prompt_width] = input_ids
        self.lengths = [prompt_width] * batch_size
        self.finished = [False] * batch_size
        self.row_scores: list[list[torch.Tensor]] = [[] for _ in range(batch_size)]
        self.row_logits: list[list[torch.Tensor]] = [[] for _ in range(batch_size)]
        self.n_cached = [0] * batch_size
        self.hidden: list[torch.Tensor | None] = [None] * batch_size
        self.offsets = [0] * batch_size
        self.processors = RoundProcessors(logits_processor)
        self.empty = torch.empty(0, dtype=torch.long, device=device)
        self.round_index = 0
        self.compactable = self.compacted = False
        self.mask_full = False  # the attention mask is all ones (kept in Python: no device sync per round)

    # ---- helpers ----------------------------------------------------------------------------------------------------
    def committed(self, i: int) -> torch.Tensor:
        """Row i without padding (prompt + generated): a view, never written again."""
        return self.tokens[i, self.left_pad[i] : self.lengths[i]]

    def select(self, scores: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """The target's token (argmax or a sample) for every row of `scores` (..., V), or only for `rows` (others 0:
        their scores may be garbage, e.g. all -inf)."""
        if not self.do_sample:
            return scores.argmax(dim=-1)
        if rows is None:
            probs = torch.softmax(scores.reshape(-1, scores.shape[-1]), dim=-1)
            return torch.multinomial(probs, num_samples=1).reshape(scores.shape[:-1])
        out = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
        out[rows] = torch.multinomial(torch.softmax(scores[rows], dim=-1), num_samples=1).squeeze(-1)
        return out

    def append(self, i: int, new: list[int]) -> list[int]:
        """Commit `new` to row i (already written at `tokens[i, lengths[i]:]`) until the row stops; returns the
        tokens actually kept."""
        kept = []
        for tok in new:
            kept.append(tok)
            self.lengths[i] += 1
            stop = tok in self.eos_ids or self.lengths[i] >= self.max_length
            # Other criteria (stop strings, max time) see the row exactly as plain generate would show it.
            if stop or any(
                bool(c(self.tokens[i : i + 1, : self.lengths[i]], None).reshape(-1)[0]) for c in self.other_criteria
            ):
                self.finished[i] = True
                break
        return kept

    # ---- prefill ----------------------------------------------------------------------------------------------------
    def prefill(self) -> None:
        """Feed the prompt (only its uncached tail) and pick every row's first token."""
        input_ids, batch_size, prompt_width = self.input_ids, self.batch_size, self.prompt_width
        attention_mask, stats = self.attention_mask, self.stats
        # A cache that already holds the first `past` columns of the prompt (multi-turn reuse, a prompt cache) is
        # kept: only the uncached tail is fed, at its own positions, as `generate` does.
        past = self.cache.get_seq_length()
        if past >= prompt_width:
            raise ValueError(
                f"The cache already holds {past} tokens but the prompt has {prompt_width}: pass the whole "
                "conversation (cached tokens + at least one new token) as `input_ids`."
            )
        position_ids = self.model_kwargs.get("position_ids")
        if position_ids is None or position_ids.shape[-1] != prompt_width:
            position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        self.mask_full = bool(attention_mask.all())
        extra_kwargs = {k: v for k, v in self.model_kwargs.items() if k not in _HANDLED_KWARGS and v is not None}
        outputs = speculative_forward(
            self.model, input_ids[:, past:], None if self.mask_full else attention_mask, position_ids[..., past:],
            self.cache, logits_to_keep=1, output_hidden_states=self.want_hidden, **extra_kwargs,
        )
        stats.target_forwards += 1
        self.cache = cache = output_cache(outputs) or self.cache
        speculative_cache_check(cache, batch_size)
        speculative_prepare_cache(cache)
        self.compactable = batch_size > 1 and speculative_cache_compactable(cache)
        first_logits = outputs.logits[:, -1].to(dtype=torch.float32)
        first_scores = self.logits_processor(input_ids, first_logits) if self.processors else first_logits
        first_tokens = self.select(first_scores)
        self.tokens[:, prompt_width] = first_tokens
        first_tokens = first_tokens.tolist()
        if self.want_hidden:
            hs = torch.stack([outputs.hidden_states[j] for j in self.layers], dim=2)  # (B, P, L, H)
            # Hidden states exist for the fed tail only: row i's first real fed token is at column lp_i - past.
            self.hidden = [hs[i, max(self.left_pad[i] - past, 0):].detach() for i in range(batch_size)]
            self.offsets = [max(past - self.left_pad[i], 0) for i in range(batch_size)]
        for i in range(batch_size):
            self.n_cached[i] = self.prompt_lengths[i]
            if self.keep_scores:
                self.row_scores[i].append(first_scores[i])
            if self.keep_logits:
                self.row_logits[i].append(first_logits[i])
            stats.new_tokens += len(self.append(i, [first_tokens[i]]))
        if self.streamer is not None:
            self.streamer.put(self.tokens[0, prompt_width : self.lengths[0]].cpu())
        # A finished row still needs one feedback call (the contract: exactly one `finished=True` per row).
        done = [i for i in range(batch_size) if self.finished[i]]
        if done:
            self.drafter.observe(
                DraftFeedback(
                    request_ids=[self.request_ids[i] for i in done],
                    problem_ids=[self.problem_ids[i] for i in done],
                    proposed=[self.empty for _ in done],
                    num_accepted=[0 for _ in done],
                    appended=[self.tokens[i, prompt_width : self.lengths[i]] for i in done],
                    finished=[True for _ in done],
                    round=0,
                    prompt_lengths=[self.prompt_lengths[i] for i in done],
                    sequences=[self.committed(i) for i in done],
                )
            )

    # ---- propose ----------------------------------------------------------------------------------------------------
    def propose(self) -> _Round:
        """Ask the drafter for every row's draft (within its budget), check it and write it behind the row."""
        batch_size, drafter, lengths = self.batch_size, self.drafter, self.lengths
        self.round_index += 1
        active = [i for i in range(batch_size) if not self.finished[i]]
        budgets = [0] * batch_size
        for i in active:
            budgets[i] = max(0, min(drafter.max_draft_tokens, self.max_length - lengths[i] - 1, self.spare - 1))
        context = DraftContext(
            input_ids=[self.committed(i) for i in range(batch_size)],
            budgets=budgets,
            request_ids=self.request_ids,
            problem_ids=self.problem_ids,
            prompt_lengths=self.prompt_lengths,
            round=self.round_index,
            do_sample=self.do_sample,
            eos_token_ids=self.eos_ids,
            hidden_states=self.hidden if self.want_hidden else None,
            hidden_offsets=self.offsets if self.want_hidden else None,
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
            if not (0 <= min(d) and max(d) < self.vocab_size):
                raise ValueError(
                    f"{type(drafter).__name__}.propose returned token ids outside the model's vocabulary "
                    f"[0, {self.vocab_size}) for row {i}: {d}"
                )
            drafts[i], draft_len[i] = d, len(d)
        step = _Round(self.round_index, active, len(active) == batch_size, draft_len, 1 + max(draft_len))
        if max(lengths) + self.spare > self.tokens.shape[1]:
            grown = min(2 * self.tokens.shape[1], self.max_length + self.spare) - self.tokens.shape[1]
            self.tokens = torch.cat([self.tokens, self.tokens.new_full((batch_size, grown), self.pad_id)], dim=1)
        step.length_t = torch.tensor(lengths, device=self.device)
        if step.width > 1:
            step.cols = torch.arange(step.width, device=self.device)
            draft_t = torch.tensor(
                [drafts.get(i, []) + [self.pad_id] * (step.width - 1 - draft_len[i]) for i in range(batch_size)],
                device=self.device,
            )
            self.tokens.scatter_(1, step.length_t[:, None] + step.cols[None, :-1], draft_t)
        return step

    # ---- verify -----------------------------------------------------------------------------------------------------
    def verify(self, step: _Round) -> None:
        """One target forward over every row's last committed token + draft; the target's own choice at every
        position (processors batched over rows per position), the number of leading drafts it agrees with, and its
        token behind them written into the buffer."""
        batch_size, device, width = self.batch_size, self.device, step.width
        length_t, cols = step.length_t, step.cols
        # Row i feeds its last committed token (not yet in the cache) and its draft, padded to `width`.
        if width > 1:
            step_ids = self.tokens.gather(1, length_t[:, None] - 1 + cols[None, :])
            step_mask = cols[None, :] <= torch.tensor(step.draft_len, device=device)[:, None]
            step_pos = torch.tensor(self.n_cached, device=device)[:, None] + cols[None, :]
        else:
            step_ids = self.tokens.gather(1, length_t[:, None] - 1)
            step_mask = torch.ones((batch_size, 1), dtype=torch.bool, device=device)
            step_pos = torch.tensor(self.n_cached, device=device)[:, None]
        if not step.everyone:
            active_t = torch.zeros(batch_size, dtype=torch.bool, device=device)
            active_t[step.active] = True
            step_mask &= active_t[:, None]
        else:
            active_t = step_mask[:, 0]
        step_mask = step_mask.long()
        step.step_ids, step.step_mask = step_ids, step_mask
        full_mask = torch.cat([self.attention_mask, step_mask], dim=1)
        uniform = step.everyone and all(n == width - 1 for n in step.draft_len)
        step.outputs = outputs = speculative_forward(
            self.model, step_ids, None if self.mask_full and uniform else full_mask, step_pos, self.cache,
            logits_to_keep=width, output_hidden_states=self.want_hidden,
        )
        self.stats.target_forwards += 1
        self.cache = output_cache(outputs) or self.cache
        step.logits = logits = outputs.logits.to(dtype=torch.float32)  # (B, width, V)

        if not self.processors:
            scores = logits
            choice = self.select(scores)
        else:
            scores = torch.empty_like(logits)
            choice = torch.zeros((batch_size, width), dtype=torch.long, device=device)
            self.processors.begin_round(self.tokens, length_t, active_t, width)
            live = active_t  # rows whose drafts so far all match: position j's prefix is what the row would be
            for j in range(width):
                scores[:, j] = self.processors.position(j, logits[:, j].clone(), live)
                choice[:, j] = self.select(scores[:, j], live)
                if j + 1 < width:
                    live = live & (choice[:, j] == step_ids[:, j + 1]) & (step_mask[:, j + 1] == 1)
                    if not bool(live.any()):
                        break
        step.scores = scores
        if width > 1:
            matches = (choice[:, :-1] == step_ids[:, 1:]) & (step_mask[:, 1:] == 1)
            accepted_t = matches.long().cumprod(dim=1).sum(dim=1)
            # The target's token after the accepted drafts goes right behind them.
            self.tokens.scatter_(1, (length_t + accepted_t)[:, None], choice.gather(1, accepted_t[:, None]))
            step.accepted_rows = accepted_t.tolist()
        else:
            self.tokens.scatter_(1, length_t[:, None], choice)
            step.accepted_rows = [0] * batch_size
        step.choice_rows = choice.tolist()

    # ---- accept -----------------------------------------------------------------------------------------------------
    def accept(self, step: _Round) -> None:
        """Commit every row's accepted drafts + the target's token (until the row stops), update the cache (masked
        holes, crop, compaction) and tell the drafter."""
        batch_size, stats, active = self.batch_size, self.stats, step.active
        num_accepted = [0] * batch_size
        judged = list(step.draft_len)  # drafts each row used: all of them, unless it stopped on one
        appended: list[torch.Tensor] = [self.empty] * batch_size
        verified_logits: list[torch.Tensor | None] = [None] * batch_size
        for i in active:
            n = step.accepted_rows[i]
            start = self.lengths[i]
            kept = self.append(i, step.choice_rows[i][: n + 1])
            if len(kept) <= n:  # stopped on an accepted draft (EOS, a criterion): later drafts are not kept
                n = judged[i] = len(kept)
            num_accepted[i] = n
            appended[i] = self.tokens[i, start : self.lengths[i]]
            if self.keep_scores or self.keep_logits:
                for j in range(len(kept)):
                    if self.keep_scores:
                        self.row_scores[i].append(step.scores[i, j])
                    if self.keep_logits:
                        self.row_logits[i].append(step.logits[i, j])
            if self.want_target_logits:
                verified_logits[i] = step.scores[i, : n + 1].detach()
            stats.proposed += step.draft_len[i]
            stats.accepted += n
            stats.emitted += len(kept)
            stats.new_tokens += len(kept)
        stats.rounds += len(active)
        self._update_cache(step, num_accepted)
        step.outputs = step.logits = None

        if self.streamer is not None:  # batch size 1
            self.streamer.put(appended[0].cpu())
        self.drafter.observe(
            DraftFeedback(
                request_ids=[self.request_ids[i] for i in active],
                problem_ids=[self.problem_ids[i] for i in active],
                proposed=[step.step_ids[i, 1 : 1 + judged[i]] if judged[i] else self.empty for i in active],
                num_accepted=[num_accepted[i] for i in active],
                appended=[appended[i] for i in active],
                finished=[self.finished[i] for i in active],
                round=step.index,
                target_logits=[verified_logits[i] for i in active] if self.want_target_logits else None,
                prompt_lengths=[self.prompt_lengths[i] for i in active],
                sequences=[self.committed(i) if self.finished[i] else None for i in active],
            )
        )

    def _update_cache(self, step: _Round, num_accepted: list[int]) -> None:
        """Row i keeps its fed token + accepted drafts; the rest of its segment becomes a hole (masked), the tail no
        row needs is cropped, and the holes are compacted once they are many."""
        width, device = step.width, self.device
        keep_cols = 1 + max(num_accepted)
        step_mask = step.step_mask
        if width > 1:
            step_mask = step_mask * (step.cols[None, :] <= torch.tensor(num_accepted, device=device)[:, None])
        self.attention_mask = torch.cat([self.attention_mask, step_mask[:, :keep_cols]], dim=1)
        self.mask_full = self.mask_full and step.everyone and all(n == keep_cols - 1 for n in num_accepted)
        speculative_crop(self.cache, width - keep_cols)
        if self.want_hidden:
            hs = torch.stack([step.outputs.hidden_states[j] for j in self.layers], dim=2)  # (B, width, L, H)
            self.hidden = [None] * self.batch_size
            for i in step.active:
                self.hidden[i] = hs[i, : 1 + num_accepted[i]].detach()
                self.offsets[i] = self.n_cached[i]
        for i in step.active:
            self.n_cached[i] += 1 + num_accepted[i]
        holes = self.attention_mask.shape[1] - max(self.n_cached)
        if self.compactable and holes >= max(_COMPACT_MIN_HOLES, self.attention_mask.shape[1] // 8):
            # Each row's valid columns (in order) go to the right end, re-left-padded to the longest row.
            cols_all = torch.arange(self.attention_mask.shape[1], device=device)
            order = torch.where(self.attention_mask.bool(), cols_all, -1).argsort(dim=1, stable=True)[:, holes:]
            speculative_compact_cache(self.cache, order)
            self.attention_mask = self.attention_mask.gather(1, order)
            self.mask_full, self.compacted = bool(self.attention_mask.all()), True

    # ---- finish -----------------------------------------------------------------------------------------------------
    def finish(self):
        """What `generate` returns: sequences padded with `pad_token_id`, or a `GenerateDecoderOnlyOutput`."""
        if self.streamer is not None:
            self.streamer.end()
        prompt_width, device = self.prompt_width, self.device
        longest = max(self.lengths) - prompt_width
        sequences = self.tokens[:, : prompt_width + longest].clone()
        ends = torch.tensor(self.lengths, device=device)[:, None]
        sequences.masked_fill_(torch.arange(prompt_width + longest, device=device)[None, :] >= ends, self.pad_id)

        self.drafter.last_stats = self.stats
        self.drafter.stats += self.stats
        if not self.return_dict:
            return sequences
        # The cache is `generate`'s (prompt + output minus the last token) unless rows left holes or were compacted.
        has_holes = self.compacted or not bool(self.attention_mask[:, prompt_width:].all())
        return decoder_only_generate_output(
            sequences,
            scores=_stack_steps(self.row_scores, longest) if self.keep_scores else None,
            logits=_stack_steps(self.row_logits, longest) if self.keep_logits else None,
            cache=None if has_holes else self.cache,
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
