"""Stationary-batch I-DLM decoding: many concurrent requests in fixed-shape [B, 2N-1] rounds, continuous batching.

`isd_generate` serves one `generate` call: its rows start together, and each round's width follows the longest draft.
A server instead keeps B slots busy with a stream of requests of different prompt lengths. `StationaryBatchISD` feeds
every slot the same 2N-1 columns every round, so the forward never changes shape (a `StaticCache`, and with it
torch.compile / CUDA graphs, become possible; the I-DLM card's "stationary batch"):

* a decoding slot feeds `[pending, spec_1..spec_K, filler x (N-1-K), M x (N-1)]` (the mask slots end the row, as
  in `isd_generate`, so R-ISD's aLoRA offsets are N-1 for every decoding row); its decisions are `isd_round`'s (the
  same verify through `kernels.isd_verify`, the same batched logits processors), nothing is re-implemented here;
* every slot appends 2N-1 KV columns per round; the columns it does not keep (rejected drafts, mask slots, filler)
  are masked out instead of cropped, so rows stay equal length. When the cache is full, each row's valid columns are
  gathered to its right end (`integrations.isd_batch_seam.compact_cache_columns`) and the round goes on;
* each slot keeps its own position ids (valid columns so far + offset in the round) and a 4D mask: query j of a slot
  sees the slot's valid cache columns and the round's kept-able columns up to j (strict causal);
* a finished slot takes the next waiting request at once: the newcomer's prompt (all but its last token) goes in
  through the same rounds, 2N-1 tokens at a time, beside slots that keep decoding; then its last prompt token is the
  "pending" token of a cold-start round (K = 0), which yields its first token exactly and its first N-1 drafts.
  The first B requests are prefilled together in one wider forward.

Per request the output is what `isd_generate` would return for that prompt alone (greedy: token for token, the
same as greedy `generate`; sampling: the same distribution). Only processors that read a row's own tokens and scores
are accepted (sampling warpers, repetition penalty, n-gram blocking: `RoundProcessors`' shift-safe set), because the
slots' prompts, lengths and owners change under them.
"""

from __future__ import annotations

import contextlib
from collections import deque
from dataclasses import dataclass

import torch

from ..integrations import output_cache, speculative_forward, speculative_processor_shift_safe
from ..integrations.isd_batch_seam import check_stationary_cache, compact_cache_columns, make_stationary_cache
from ..integrations.isd_seam import alora_offsets, unwrap_peft_model, uses_alora
from ..modeling.block_diffusion import model_attention_mask
from .isd import check_isd_call, resolve_isd_config
from .isd_config import ISDConfig
from .isd_round import ISDRows, isd_round
from .padding import token_ids
from .speculative_processors import RoundProcessors

__all__ = ["StationaryBatchISD", "StationaryBatchOutput"]

_EMPTY, _PREFILL, _DECODE = 0, 1, 2


@dataclass
class StationaryBatchOutput:
    """One `StationaryBatchISD.generate` call.

    sequences: per request (input order), prompt + generated tokens, cut after EOS / `max_new_tokens`.
    new_tokens: [R] long, generated tokens per request.
    num_forwards: [R] long, forwards each request took part in (prefill chunks + decoding rounds).
    tokens_per_forward: [R] float, new_tokens / num_forwards.
    acceptance_rate: [R] float, accepted / verified drafts (NaN for a request that verified none).
    forwards: model forwards of the whole run; compactions: times the cache was compacted.
    """

    sequences: list[torch.LongTensor]
    new_tokens: torch.LongTensor
    num_forwards: torch.LongTensor
    tokens_per_forward: torch.FloatTensor
    acceptance_rate: torch.FloatTensor
    forwards: int
    compactions: int


def _sampling_processors(do_sample, temperature, top_k, top_p, logits_processor):
    """The user's processors, then `generate`'s sampling warpers in `generate`'s order (only when sampling)."""
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import (
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    processors = LogitsProcessorList(logits_processor or [])
    if do_sample:
        if temperature is not None and temperature != 1.0:
            processors.append(TemperatureLogitsWarper(temperature))
        if top_k is not None and top_k != 0:
            processors.append(TopKLogitsWarper(top_k))
        if top_p is not None and top_p < 1.0:
            processors.append(TopPLogitsWarper(top_p))
    for processor in processors:
        if not speculative_processor_shift_safe(processor):
            raise ValueError(
                f"StationaryBatchISD cannot apply {type(processor).__name__}: in a stationary batch the slots' "
                "prompts and lengths change under the processors, so only processors that read a row's own tokens "
                "and scores are supported (sampling warpers, repetition penalty, n-gram blocking, suppressed tokens)."
            )
    return processors


class StationaryBatchISD:
    """Decode many requests with ISD in B fixed slots of [2N-1] columns per round (see the module docstring).

    Args:
        model: a causal LM (an I-DLM, or any causal LM: greedy output equals greedy `generate` regardless); a peft
            model with an activated LoRA runs as R-ISD.
        batch_size: B, the number of slots.
        gen_block_size, mask_token_id, verify_alpha, proposal, isd_config: ISD's knobs, as for `isd_generate`.
        do_sample, temperature, top_k, top_p: sampling, as for `generate` (greedy by default).
        logits_processor: extra shift-safe processors (applied before the sampling warpers).
        max_new_tokens: per request (default of `generate`, which may also take one per request).
        eos_token_id: int or list (default: the model's generation config).
        cache_implementation: "dynamic" (`DynamicCache`) or "static" (`StaticCache` of `max_cache_len` columns).
        max_cache_len: cache columns per slot; the cache is compacted when a round would not fit. Default: twice the
            longest request (prompt + max_new_tokens) plus two rounds.

    `generate(requests, max_new_tokens=None)` takes a list of prompts (1D token tensors or lists) and optionally one
    `max_new_tokens` per request, and returns a `StationaryBatchOutput`.
    """

    def __init__(self, model, batch_size: int = 8, *, gen_block_size: int | None = None,
                 mask_token_id: int | None = None, verify_alpha: float | None = None, proposal: str | None = None,
                 isd_config: ISDConfig | None = None, do_sample: bool = False, temperature: float | None = None,
                 top_k: int | None = None, top_p: float | None = None, logits_processor=None,
                 max_new_tokens: int = 64, eos_token_id: int | list[int] | None = None,
                 cache_implementation: str = "dynamic", max_cache_len: int | None = None):
        self.model = model = unwrap_peft_model(model)
        self.config = resolve_isd_config(model, gen_block_size, mask_token_id, verify_alpha, proposal, isd_config)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int; got {batch_size!r}.")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be a positive int; got {max_new_tokens!r}.")
        if max_cache_len is not None and (not isinstance(max_cache_len, int) or max_cache_len < 1):
            raise ValueError(f"max_cache_len must be a positive int or None; got {max_cache_len!r}.")
        # An explicit 4D mask (bool for SDPA, additive for eager); refuses flash attention, which takes none.
        model_attention_mask(model, torch.ones(1, 1, 1, 1, dtype=torch.bool), torch.float32)
        from transformers import GenerationConfig

        if eos_token_id is None:
            eos_token_id = (getattr(model, "generation_config", None) or GenerationConfig()).eos_token_id
        self.eos_ids = set(token_ids(eos_token_id))
        # isd_generate's refusals (encoder-decoder, stateful, non-causal block-diffusion model, mask id == EOS,
        # merged aLoRA); the stationary batch never crops, so its own cache check replaces the croppability one.
        probe = GenerationConfig(eos_token_id=sorted(self.eos_ids) or None)
        check_isd_call(model, torch.zeros(1, 1, dtype=torch.long), self.config, probe, False, None, None,
                       make_stationary_cache(model, "dynamic", 1))
        check_stationary_cache(make_stationary_cache(model, cache_implementation, 1))
        self.batch_size, self.max_new_tokens = batch_size, max_new_tokens
        self.do_sample = bool(do_sample)
        self.processors = _sampling_processors(do_sample, temperature, top_k, top_p, logits_processor)
        self.cache_implementation, self.max_cache_len = cache_implementation, max_cache_len

    @torch.no_grad()
    def generate(self, requests, max_new_tokens: int | list[int] | None = None) -> StationaryBatchOutput:
        prompts = [torch.as_tensor(r, dtype=torch.long).reshape(-1) for r in requests]
        if not prompts:
            raise ValueError("StationaryBatchISD.generate needs at least one request.")
        limits = self.max_new_tokens if max_new_tokens is None else max_new_tokens
        limits = [limits] * len(prompts) if isinstance(limits, int) else list(limits)
        if len(limits) != len(prompts) or any(isinstance(m, bool) or not isinstance(m, int) or m < 1 for m in limits):
            raise ValueError(f"max_new_tokens must be a positive int or one per request; got {max_new_tokens!r}.")
        vocab = self.model.get_input_embeddings().num_embeddings
        for i, p in enumerate(prompts):
            if p.numel() == 0:
                raise ValueError(f"request {i} has an empty prompt.")
            if int(p.min()) < 0 or int(p.max()) >= vocab:
                raise ValueError(f"request {i} holds token ids outside the vocabulary [0, {vocab}).")
        run = _Run(self, prompts, limits)
        run.start()
        # Every round moves each busy slot forward (a prompt chunk, or >= 1 committed token): a bound on rounds.
        limit = sum(-(-p.numel() // run.width_round) + m + 1 for p, m in zip(prompts, limits))
        while run.busy():
            if run.forwards > limit:
                raise RuntimeError("StationaryBatchISD made no progress (a bug): stopping instead of looping.")
            run.round()
        return run.output()


class _Run:
    """The state of one `generate` call: B slots over a shared cache, a queue of waiting requests."""

    def __init__(self, owner: StationaryBatchISD, prompts: list[torch.Tensor], max_new_tokens: list[int]):
        self.owner, self.prompts, self.max_new_tokens = owner, prompts, max_new_tokens
        self.model = model = owner.model
        self.device = device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        n = self.n = owner.config.gen_block_size
        self.width_round = 2 * n - 1
        slots = self.slots = min(owner.batch_size, len(prompts))
        longest = max(p.numel() + m for p, m in zip(prompts, max_new_tokens))
        needed = longest + n + 2 * self.width_round  # a row's valid columns (stop inside a round) + one round
        self.capacity = owner.max_cache_len if owner.max_cache_len is not None else 2 * longest + 2 * self.width_round
        if self.capacity < needed:
            raise ValueError(f"max_cache_len={self.capacity} cannot hold the longest request (prompt + max_new_tokens "
                             f"= {longest}) and a round: give at least {needed}.")
        self.cache = make_stationary_cache(model, owner.cache_implementation, self.capacity)
        check_stationary_cache(self.cache)
        self.r_isd = uses_alora(model)
        self.round_processors = RoundProcessors(owner.processors)
        self.rows = ISDRows(
            tokens=torch.zeros(slots, longest + 2 * n + 1, dtype=torch.long, device=device),
            lengths=torch.zeros(slots, dtype=torch.long, device=device),
            num_specs=torch.zeros(slots, dtype=torch.long, device=device),
            active=torch.zeros(slots, dtype=torch.bool, device=device),
        )
        self.kv_valid = torch.zeros(slots, self.capacity, dtype=torch.bool, device=device)
        self.width = 0  # cache columns in use (every slot has the same)
        self.n_cached = torch.zeros(slots, dtype=torch.long, device=device)  # valid columns per slot
        self.phase = [_EMPTY] * slots
        self.owner_of = [-1] * slots  # request index per slot
        self.prefilled = [0] * slots  # prompt tokens already in the cache
        self.queue = deque(range(len(prompts)))
        r = len(prompts)
        self.sequences: list[torch.Tensor | None] = [None] * r
        self.req_forwards = torch.zeros(r, dtype=torch.long)
        self.req_proposed = torch.zeros(r, dtype=torch.long)
        self.req_accepted = torch.zeros(r, dtype=torch.long)
        self.forwards = self.compactions = 0

    # ---- slots ------------------------------------------------------------------------------------------------------
    def admit(self, slot: int) -> None:
        """Give `slot` the next waiting request: its prompt replaces the slot's tokens, its cache columns are masked."""
        req = self.queue.popleft()
        prompt = self.prompts[req].to(self.device)
        rows = self.rows
        self.clear(slot)
        rows.tokens[slot, : prompt.numel()] = prompt
        rows.lengths[slot] = prompt.numel()
        self.owner_of[slot], self.prefilled[slot] = req, 0
        # All but the last prompt token go to the cache; the last one is the cold-start round's pending token.
        self.phase[slot] = _PREFILL if prompt.numel() > 1 else _DECODE

    def release(self, slot: int, length: int) -> None:
        req = self.owner_of[slot]
        self.sequences[req] = self.rows.tokens[slot, :length].cpu().clone()
        self.phase[slot], self.owner_of[slot] = _EMPTY, -1
        self.clear(slot)
        if self.queue:
            self.admit(slot)

    def clear(self, slot: int) -> None:
        """The slot's cache columns are all masked (they stay in the cache until a compaction drops them)."""
        self.kv_valid[slot] = False
        self.n_cached[slot] = 0
        self.rows.tokens[slot].zero_()
        self.rows.lengths[slot] = 0
        self.rows.num_specs[slot] = 0

    def busy(self) -> bool:
        return any(p != _EMPTY for p in self.phase)

    # ---- forward ----------------------------------------------------------------------------------------------------
    def forward(self, ids, positions, new_valid, offsets):
        """One forward of [B, w] tokens appended to every slot; a query sees its slot's valid cache columns and the
        round's valid columns up to itself (and itself, so filler rows stay finite). Returns float32 logits."""
        slots, w = ids.shape
        if self.width + w > self.capacity:
            self.compact()
        if self.width + w > self.capacity:
            raise RuntimeError("StationaryBatchISD: the cache is full even after compaction (raise max_cache_len).")
        total = self.capacity if self.owner.cache_implementation == "static" else self.width + w
        cols = torch.arange(w, device=self.device)
        causal = (cols[None, :, None] >= cols[None, None, :]) & new_valid[:, None, :]
        causal |= torch.eye(w, dtype=torch.bool, device=self.device)[None]
        allowed = torch.zeros(slots, w, total, dtype=torch.bool, device=self.device)
        allowed[:, :, : self.width] = self.kv_valid[:, None, : self.width]
        allowed[:, :, self.width: self.width + w] = causal
        mask = model_attention_mask(self.model, allowed[:, None], self.dtype)
        context = alora_offsets(self.model, offsets) if self.r_isd else contextlib.nullcontext()
        with context:
            out = speculative_forward(self.model, ids, mask, positions, self.cache, w)
        self.cache = output_cache(out) or self.cache
        self.forwards += 1
        for slot in range(slots):
            if self.phase[slot] != _EMPTY:
                self.req_forwards[self.owner_of[slot]] += 1
        return out.logits.to(dtype=torch.float32)  # what isd_round reads, as in isd_generate

    def keep(self, kept: torch.Tensor) -> None:
        """The forward's w columns are in the cache; `kept` [B, w] marks the ones that stay valid."""
        w = kept.shape[1]
        self.kv_valid[:, self.width: self.width + w] = kept
        self.n_cached += kept.sum(dim=1)
        self.width += w

    def compact(self) -> None:
        """Gather every slot's valid columns to the right end of the first `max valid` columns."""
        width = self.width
        cols = torch.arange(width, device=self.device)
        new_width = int(self.n_cached.max())
        order = torch.where(self.kv_valid[:, :width], cols, -1).argsort(dim=1, stable=True)[:, width - new_width:]
        compact_cache_columns(self.cache, order, width)
        valid = self.kv_valid[:, :width].gather(1, order)
        self.kv_valid.zero_()
        self.kv_valid[:, :new_width] = valid
        self.width = new_width
        self.compactions += 1

    # ---- prefill of the first B requests ----------------------------------------------------------------------------
    def start(self) -> None:
        for slot in range(self.slots):
            self.admit(slot)
        lengths = [self.prompts[self.owner_of[s]].numel() - 1 for s in range(self.slots)]
        w = max(lengths)
        if w == 0:
            return
        ids = torch.zeros(self.slots, w, dtype=torch.long, device=self.device)
        for slot, length in enumerate(lengths):
            ids[slot, :length] = self.rows.tokens[slot, :length]
        new_valid = torch.arange(w, device=self.device)[None, :] < torch.tensor(lengths, device=self.device)[:, None]
        positions = torch.arange(w, device=self.device)[None, :].expand(self.slots, w)
        self.forward(ids, positions, new_valid, [0] * self.slots)
        self.keep(new_valid)
        for slot, length in enumerate(lengths):
            self.prefilled[slot] = length
            self.phase[slot] = _DECODE

    # ---- one round --------------------------------------------------------------------------------------------------
    def round(self) -> None:
        rows, n, w, device = self.rows, self.n, self.width_round, self.device
        decode = torch.tensor([p == _DECODE for p in self.phase], device=device)
        num_specs = torch.where(decode, rows.num_specs, torch.zeros_like(rows.num_specs))
        cols = torch.arange(w, device=device)[None, :]
        # Decoding slots: [pending, specs (K), filler (N-1-K), masks (N-1)]; logical slot of a column (H4's layout).
        pending = rows.tokens.gather(1, (rows.lengths - 1).clamp(min=0)[:, None])
        ids = torch.cat([pending, rows.specs(n - 1),
                         torch.full((self.slots, n - 1), self.owner.config.mask_token_id, device=device)], dim=1)
        logical = torch.where(cols <= n - 1, cols, cols - (n - 1 - num_specs[:, None]))
        new_valid = ((cols <= num_specs[:, None]) | (cols >= n)) & decode[:, None]
        positions = self.n_cached[:, None] + logical
        # Prefilling slots: the next chunk of their prompt (all but its last token).
        chunk = torch.zeros(self.slots, dtype=torch.long, device=device)
        for slot, phase in enumerate(self.phase):
            if phase == _PREFILL:
                start = self.prefilled[slot]
                take = min(w, int(rows.lengths[slot]) - 1 - start)
                ids[slot, :take] = rows.tokens[slot, start: start + take]
                ids[slot, take:] = 0
                chunk[slot] = take
        prefill = chunk > 0
        new_valid = torch.where(prefill[:, None], cols < chunk[:, None], new_valid)
        positions = torch.where(prefill[:, None], self.n_cached[:, None] + cols, positions)
        ids = torch.where(new_valid, ids, torch.zeros_like(ids))
        offsets = [n - 1 if p == _DECODE else 0 for p in self.phase]
        logits = self.forward(ids, positions, new_valid, offsets)

        # Decisions: isd_round on the logical layout (slot j <= K at column j, mask slot K + m at column N-1 + m).
        slot_cols = torch.arange(w, device=device)[None, :]
        slot_cols = torch.where(slot_cols <= num_specs[:, None], slot_cols,
                                slot_cols + (n - 1 - num_specs[:, None])).clamp(max=w - 1)
        logical_logits = logits.gather(1, slot_cols[:, :, None].expand(-1, -1, logits.shape[-1]))
        rows.active = decode
        start = rows.lengths.clone()
        result = isd_round(logical_logits, rows, self.owner.config, do_sample=self.owner.do_sample,
                           processors=self.round_processors)
        # Kept columns: pending + accepted drafts of decoding slots, the chunk of prefilling slots.
        kept = torch.where(decode[:, None], cols <= result.accepted[:, None], cols < chunk[:, None])
        self.keep(kept)
        for slot in range(self.slots):
            if prefill[slot]:
                self.prefilled[slot] += int(chunk[slot])
                if self.prefilled[slot] == int(rows.lengths[slot]) - 1:
                    self.phase[slot] = _DECODE
            elif decode[slot]:
                req = self.owner_of[slot]
                self.req_proposed[req] += int(result.proposed[slot])
                self.req_accepted[req] += int(result.accepted[slot])
                self.stop_if_done(slot, int(start[slot]), int(result.committed[slot]))

    def stop_if_done(self, slot: int, start: int, committed: int) -> None:
        """Release the slot when its request hit EOS or max_new_tokens among this round's committed tokens."""
        req = self.owner_of[slot]
        limit = self.prompts[req].numel() + self.max_new_tokens[req]
        new = self.rows.tokens[slot, start: start + committed].tolist()
        for i, token in enumerate(new):
            end = start + i + 1
            if token in self.owner.eos_ids or end >= limit:
                self.release(slot, end)
                return

    # ---- output -----------------------------------------------------------------------------------------------------
    def output(self) -> StationaryBatchOutput:
        lengths = torch.tensor([p.numel() for p in self.prompts])
        new_tokens = torch.tensor([s.numel() for s in self.sequences]) - lengths
        proposed = self.req_proposed.float()
        return StationaryBatchOutput(
            sequences=list(self.sequences),
            new_tokens=new_tokens,
            num_forwards=self.req_forwards.clone(),
            tokens_per_forward=new_tokens.float() / self.req_forwards.clamp(min=1).float(),
            acceptance_rate=torch.where(proposed > 0, self.req_accepted.float() / proposed.clamp(min=1),
                                        torch.full_like(proposed, float("nan"))),
            forwards=self.forwards,
            compactions=self.compactions,
        )
