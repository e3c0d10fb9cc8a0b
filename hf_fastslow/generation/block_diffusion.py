"""Block-diffusion decoding (LLaDA / Fast-dLLM / SDAR style) as a `generate(custom_generate=...)` callable.

    out = model.generate(ids, custom_generate=block_diffusion_generate, block_size=4, mask_token_id=m, steps=4,
                         threshold=0.9, max_new_tokens=64, return_dict_in_generate=True)
    out.sequences, out.tokens_per_forward

The prompt is prefilled once into a `BlockDiffusionCache`; then, block after block, `block_size` `[MASK]` slots are
denoised in at most `steps` forwards that see the cached prefix plus the whole block (its KV is not stored); each step
commits the masked slots whose confidence passes `threshold` (Fast-dLLM) and at least k_s of them (the at-least-k
schedule: the block's slots spread evenly over the steps); a KV-commit pass feeds the block's final tokens and stores
their keys/values (skipped after the last block), by default in the same forward as the next block's first denoising
step (`fuse_commit`). With `logit_shift` (a converted AR model, I-DLM) slot j reads the
output at slot j-1 and slot 0 reads the last prefix output, so with block_size=1, steps=1, causal attention and greedy
picks the loop is plain greedy decoding, forward for forward.

`BlockDiffusionDecoder` holds one call's state; RCD and others subclass its hooks (`start_block`, `block_inputs`,
`after_step`, `select`) and pass `decoder_cls=`.

Tokens per forward (`.tokens_per_forward`, per row) = the row's generated tokens (up to and including its EOS) divided
by the forwards run while the row was still generating: the prefill, every denoising forward and every commit pass
(a row that stopped in a block does not count that block's commit pass). Plain greedy `generate` scores 1.0 on this
count (one forward per token, the prefill giving the first), and so does this loop at block_size=1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..integrations.block_diffusion_seam import generate_call_arguments
from ..integrations.caches import cache_from_kwargs, cache_kwargs
from ..integrations.generation import decoder_only_generate_output, generate_special_tokens, split_stopping_criteria
from ..modeling.block_diffusion import (
    BlockDiffusionCache,
    block_attention_mask,
    block_diffusion_config,
    model_attention_mask,
)
from .padding import pad_token_id

__all__ = ["REMASKING_MODES", "BlockDiffusionDecoder", "block_diffusion_generate", "commit_schedule"]

REMASKING_MODES = ("low_confidence", "random", "entropy", "margin")
# model_kwargs that generate() prepares and this loop rebuilds itself.
_HANDLED_KWARGS = {
    "attention_mask", "position_ids", "cache", "past_key_values", "use_cache", "logits_to_keep", "cache_position",
}


def commit_schedule(block_len: int, steps: int) -> list[int]:
    """k_s: the at-least-k commits of each step, `block_len` slots spread evenly over `min(steps, block_len)` steps
    (earlier steps take the remainder, as LLaDA's `get_num_transfer_tokens`)."""
    steps = max(1, min(steps, block_len))
    base, extra = divmod(block_len, steps)
    return [base + (1 if s < extra else 0) for s in range(steps)]


class BlockDiffusionDecoder:
    """The state of one block-diffusion `generate` call; subclasses override the hooks.

    Settings (all validated by `block_diffusion_generate` before anything runs): `block_size`, `mask_token_id`,
    `steps` (denoising forwards per block at most), `threshold` (commit every masked slot whose confidence exceeds it;
    None: the schedule alone), `remasking` (the confidence: "low_confidence" = probability of the picked token,
    "margin" = top-1 minus top-2 probability, "entropy" = minus the entropy (threshold then is a negative number),
    "random" = uniform noise, LLaDA's random remasking), `logit_shift`, `attention` (the in-block pattern).
    """

    def __init__(self, model, *, block_size: int, mask_token_id: int, steps: int, threshold: float | None,
                 remasking: str, logit_shift: bool, attention: str, fuse_commit: bool = True):
        self.model = model
        self.block_size, self.mask_token_id, self.steps = block_size, mask_token_id, steps
        self.threshold, self.remasking = threshold, remasking
        self.logit_shift, self.attention, self.fuse_commit = logit_shift, attention, fuse_commit
        self.schedule: list[int] = commit_schedule(block_size, steps)
        self.block_index = 0
        self.losa_state = None
        # Denoising passes ask for the logits of the positions masked slots read only (a 1D index tensor as
        # `logits_to_keep`); a subclass that overrides `forward` gets the int 0 instead (every position), unless it
        # sets `slices_logits = True` to say its forward passes an index tensor through.
        self.slices_logits = type(self).forward is BlockDiffusionDecoder.forward

    # ---- hooks ------------------------------------------------------------------------------------------------------
    def start_block(self, block_index: int) -> None:
        """Called before a block's first denoising step (`self.schedule` already holds the block's k_s)."""

    def block_inputs(self, block_ids: torch.Tensor, masked: torch.Tensor) -> dict:
        """Forward kwargs feeding the block (denoising passes and the commit pass, where `masked` is all False)."""
        return {"input_ids": block_ids}

    def after_step(self, logits: torch.Tensor, block_ids: torch.Tensor, masked: torch.Tensor) -> None:
        """After each denoising step: `logits` [B, b, V] aligned (logits[:, j] is slot j's raw distribution, shift
        applied; zeros for slots no row had masked before the step, which are not computed unless a subclass overrides
        `forward`); `block_ids` / `masked`
        as they are after this step's commits."""

    def select(self, confidence: torch.Tensor, masked: torch.Tensor, step: int) -> torch.BoolTensor:
        """The commit rule: every masked slot whose confidence exceeds `threshold`, and at least
        min(k_s, masked slots) per row, the most confident first (ties: the leftmost)."""
        chosen = torch.zeros_like(masked)
        if self.threshold is not None:
            chosen = masked & (confidence > self.threshold)
        k = self.schedule[min(step, len(self.schedule) - 1)]
        if step >= len(self.schedule) - 1:
            k = masked.shape[-1]  # the last scheduled step commits whatever is left
        need = masked.sum(dim=-1).clamp(max=k)
        ranked = confidence.masked_fill(~masked, -math.inf)
        order = torch.sort(ranked, dim=-1, descending=True, stable=True).indices
        rank = torch.empty_like(order)
        rank.scatter_(-1, order, torch.arange(order.shape[-1], device=order.device).expand_as(order))
        return chosen | (masked & (rank < need[:, None]))

    # ---- helpers ----------------------------------------------------------------------------------------------------
    def confidence(self, scores: torch.Tensor, picked: torch.Tensor) -> torch.Tensor:
        """Per-slot confidence [B, b] of the picked tokens under the processed `scores` [B, b, V]."""
        if self.remasking == "random":
            return torch.rand(picked.shape, device=picked.device, dtype=torch.float32).to(scores.dtype)
        probs = torch.softmax(scores, dim=-1)
        if self.remasking == "low_confidence":
            return probs.gather(-1, picked[..., None]).squeeze(-1)
        if self.remasking == "margin":
            top = probs.topk(2, dim=-1).values
            return top[..., 0] - top[..., 1]
        logp = torch.log_softmax(scores, dim=-1)
        return (probs * logp.masked_fill(probs == 0, 0.0)).sum(-1)  # minus the entropy

    def forward(self, inputs: dict, position_ids, attention_mask, cache, logits_to_keep: int, extra: dict):
        kwargs = dict(extra)
        kwargs.update(cache_kwargs(self.model, cache))
        if self.losa_state is not None:
            kwargs["losa_state"] = self.losa_state
        return self.model(
            **inputs, attention_mask=attention_mask, position_ids=position_ids, use_cache=True,
            logits_to_keep=logits_to_keep, return_dict=True, **kwargs,
        )

    # ---- the loop ---------------------------------------------------------------------------------------------------
    def generate(self, input_ids, attention_mask, cache: BlockDiffusionCache, logits_processor, stopping_criteria,
                 generation_config, streamer=None, losa_state=None, extra_kwargs: dict | None = None):
        model, device = self.model, input_ids.device
        self.losa_state, self.extra = losa_state, dict(extra_kwargs or {})
        self.cache, self.device, self.dtype = cache, device, next(model.parameters()).dtype
        self._mask_index = torch.tensor([self.mask_token_id], device=device)
        batch, width = input_ids.shape
        special = generate_special_tokens(generation_config)
        eos_ids = torch.tensor(special.eos_token_id or (-1,), device=device)
        self.pad_id = pad_token_id(special, default=0)
        max_length, other_criteria = split_stopping_criteria(stopping_criteria)
        max_length = max_length if max_length is not None else generation_config.max_length
        max_new = max(0, max_length - width)
        do_sample = bool(generation_config.do_sample)
        return_dict = bool(generation_config.return_dict_in_generate)
        keep_scores = return_dict and bool(generation_config.output_scores)
        keep_logits = return_dict and bool(generation_config.output_logits)
        # One forward can commit a block and run the next block's first denoising step (same tokens, same masks,
        # one forward fewer per block); LOSA's protocol wants the commit pass dense and alone.
        fuse = self.fuse_commit and losa_state is None

        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        padding = attention_mask.to(device=device, dtype=torch.long)
        self.has_padding = not bool(padding.all())

        # Prefill: the uncached prompt tail, one pass, stored.
        past = cache.get_seq_length()
        if past >= width:
            raise ValueError(
                f"The cache already holds {past} tokens but the prompt has {width}: pass the whole conversation "
                "(cached tokens + at least one new token) as `input_ids`."
            )
        prompt_pos = (padding.cumsum(-1) - 1).clamp(min=0)
        allowed = block_attention_mask(
            width - past, width, self.block_size, q_offset=past, pattern=self.attention,
            padding_mask=padding if self.has_padding else None, block_start=width, device=device,
        )
        with cache.committing():
            out = self.forward({"input_ids": input_ids[:, past:]}, prompt_pos[:, past:],
                               model_attention_mask(model, allowed, self.dtype), cache, 1, self.extra)
        last_logits = _float(out.logits[:, -1])
        forwards = torch.ones(batch, dtype=torch.long, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        kept = torch.zeros(batch, dtype=torch.long, device=device)
        sequences = input_ids
        step_scores: list[torch.Tensor] = []
        step_logits: list[torch.Tensor] = []
        generated = 0
        block = None
        if max_new > 0:
            block = self._open_block(0, width, min(self.block_size, max_new), padding, padding.sum(-1), finished)
            self._enter_block(block)

        while block is not None:
            b, active, masked, block_ids = block.length, block.active, block.masked, block.ids
            block_scores = torch.zeros(batch, b, last_logits.shape[-1], dtype=last_logits.dtype, device=device) \
                if (keep_scores or keep_logits) else None
            block_raw = torch.zeros_like(block_scores) if keep_logits else None
            aligned = None
            for step in range(len(self.schedule)):
                if not bool(masked.any()):
                    break
                if step == 0 and block.first_raw is not None:  # computed by the previous block's fused commit pass
                    raw = block.first_raw
                    aligned = torch.cat([last_logits[:, None], raw[:, :-1]], dim=1) if self.logit_shift else raw
                elif self.logit_shift and not bool(masked[:, 1:].any()):
                    # With the shift, slot 0 reads the last prefix output: no forward needed when only it is masked.
                    aligned = last_logits[:, None] if aligned is None else torch.cat(
                        [last_logits[:, None], aligned[:, 1:]], dim=1)
                else:
                    # Logits only where a masked slot reads them (the LM head is a fifth of a small model's work).
                    wanted = masked.any(0)
                    wanted = torch.cat([wanted[1:], wanted.new_zeros(1)]) if self.logit_shift else wanted
                    # A subclass overriding `forward` keeps the int convention (0: every position, 1: the last).
                    keep = wanted.nonzero().reshape(-1) if self.slices_logits else 0
                    with cache.peeking():
                        out = self.forward(self.block_inputs(block_ids, masked), block.position_ids, block.mask,
                                           cache, keep, self.extra)
                    forwards += active.long()
                    computed = _float(out.logits)
                    if self.slices_logits:
                        raw = computed.new_zeros(batch, b, computed.shape[-1])
                        raw[:, keep] = computed
                    else:
                        raw = computed[:, -b:]
                    aligned = torch.cat([last_logits[:, None], raw[:, :-1]], dim=1) if self.logit_shift else raw
                scores = self._process(logits_processor, sequences, block_ids, aligned, masked)
                # The mask id is never an answer: a committed [MASK] would read as still masked to later passes.
                scores = scores.index_fill(-1, self._mask_index, -math.inf)
                picked = _pick(scores, do_sample)
                confidence = self.confidence(scores, picked).masked_fill(~masked, -math.inf)
                chosen = self.select(confidence, masked, step)
                block_ids = torch.where(chosen, picked, block_ids)
                if block_scores is not None:
                    block_scores = torch.where(chosen[..., None], scores, block_scores)
                if block_raw is not None:
                    block_raw = torch.where(chosen[..., None], aligned, block_raw)
                masked = masked & ~chosen
                self.after_step(aligned, block_ids, masked)
            if losa_state is not None:
                losa_state.end_block()

            # Stops inside the block: EOS, other criteria; what follows a row's stop becomes padding.
            stop_at = self._stop_positions(block_ids, sequences, eos_ids, other_criteria, active)
            slots = torch.arange(b, device=device)[None, :]
            block_ids = block_ids.masked_fill((slots > stop_at[:, None]) | finished[:, None], self.pad_id)
            new_kept = torch.where(active, torch.clamp(stop_at + 1, max=b), 0)
            kept += new_kept
            if keep_scores or keep_logits:
                for j in range(b):
                    live = (active & (j <= stop_at))[:, None]
                    if keep_scores:
                        step_scores.append(torch.where(live, block_scores[:, j], -math.inf))
                    if keep_logits:
                        step_logits.append(torch.where(live, block_raw[:, j], -math.inf))
            finished = finished | (active & (stop_at < b))
            sequences = torch.cat([sequences, block_ids], dim=1)
            generated += b
            if streamer is not None:
                streamer.put(block_ids[0, : int(new_kept[0])].cpu())
            if generated >= max_new or bool(finished.all()):
                break  # no commit pass after the last block: nothing reads its KV

            # KV commit: the block's final tokens, stored; fused with the next block's first step when possible.
            following = self._open_block(block.index + 1, width + generated, min(self.block_size, max_new - generated),
                                         block.kv_padding, block.position_ids[:, -1] + 1, finished)
            fused = fuse and not (self.logit_shift and following.length == 1)
            commit_inputs = self.block_inputs(block_ids, torch.zeros_like(masked))
            if fused:
                self._enter_block(following)
                inputs = _cat_inputs(commit_inputs, self.block_inputs(following.ids, following.masked))
                position_ids = torch.cat([block.position_ids, following.position_ids], dim=1)
                allowed = block_attention_mask(
                    b + following.length, following.start + following.length, self.block_size, q_offset=block.start,
                    pattern=self.attention, padding_mask=following.kv_padding if self.has_padding else None,
                    block_start=block.start, device=device,
                )
                with cache.committing(keep=b):
                    out = self.forward(inputs, position_ids, model_attention_mask(model, allowed, self.dtype), cache,
                                       following.length + 1, self.extra)
                raw = _float(out.logits[:, -(following.length + 1):])
                last_logits, following.first_raw = raw[:, 0], raw[:, 1:]
            else:
                with cache.committing():
                    out = self.forward(commit_inputs, block.position_ids, block.mask, cache, 1, self.extra)
                last_logits = _float(out.logits[:, -1])
                self._enter_block(following)
            forwards += (~finished).long()
            block = following

        if streamer is not None:
            streamer.end()
        longest = int(kept.max()) if batch else 0
        sequences = sequences[:, : width + longest]
        if not return_dict:
            return sequences
        output = decoder_only_generate_output(
            sequences,
            scores=tuple(step_scores[:longest]) if keep_scores else None,
            logits=tuple(step_logits[:longest]) if keep_logits else None,
            cache=cache,
        )
        output.tokens_per_forward = kept.to(torch.float32) / forwards.to(torch.float32)
        output.num_forwards = forwards
        return output

    def _open_block(self, index, start, length, padding, first_position, finished) -> _Block:
        """A fresh block of `length` masked slots at kv slot `start` (finished rows hold padding, nothing masked)."""
        batch, device = finished.shape[0], finished.device
        ids = torch.full((batch, length), self.mask_token_id, dtype=torch.long, device=device)
        ids[finished] = self.pad_id
        kv_padding = torch.cat([padding, torch.ones(batch, length, dtype=torch.long, device=device)], dim=1)
        allowed = block_attention_mask(
            length, start + length, self.block_size, q_offset=start, pattern=self.attention,
            padding_mask=kv_padding if self.has_padding else None, block_start=start, device=device,
        )
        return _Block(
            index=index, start=start, length=length, ids=ids, active=~finished,
            masked=(~finished)[:, None].expand(batch, length).clone(),
            position_ids=first_position[:, None] + torch.arange(length, device=device), kv_padding=kv_padding,
            mask=model_attention_mask(self.model, allowed, self.dtype),
        )

    def _enter_block(self, block: _Block) -> None:
        """The block's schedule, then the hooks that run before its first denoising forward."""
        self.block_index = block.index
        self.schedule = commit_schedule(block.length, self.steps)
        self.start_block(block.index)
        if self.losa_state is not None:
            self.losa_state.start_block()

    def _process(self, logits_processor, sequences, block_ids, aligned, masked):
        """Logits processors, slot by slot: slot j is scored after the row so far plus the block's slots < j (mask
        ids where still masked), so length- and content-dependent processors see each slot at its own position.
        Slots no row still has masked are not scored (nothing reads them)."""
        if not logits_processor:
            return aligned
        columns = []
        for j in range(aligned.shape[1]):
            if not bool(masked[:, j].any()):
                columns.append(aligned[:, j])
                continue
            context = torch.cat([sequences, block_ids[:, :j]], dim=1)
            columns.append(logits_processor(context, aligned[:, j].clone()))
        return torch.stack(columns, dim=1)

    def _stop_positions(self, block_ids, sequences, eos_ids, other_criteria, active):
        """Per row, the slot of its first stop in this block (b when none)."""
        b = block_ids.shape[1]
        is_stop = torch.isin(block_ids, eos_ids)
        if other_criteria:
            for j in range(b):
                context = torch.cat([sequences, block_ids[:, : j + 1]], dim=1)
                for criterion in other_criteria:
                    is_stop[:, j] |= torch.as_tensor(criterion(context, None), device=block_ids.device).reshape(-1)
        slots = torch.arange(b, device=block_ids.device).expand_as(block_ids)
        first = torch.where(is_stop, slots, b).min(dim=-1).values
        return torch.where(active, first, b)


@dataclass
class _Block:
    """One block being decoded: its slots, who is still generating, its positions and its attention mask."""

    index: int
    start: int  # kv slot of the block's first token
    length: int
    ids: torch.Tensor  # [B, length]
    active: torch.Tensor  # [B] rows still generating when the block opened
    masked: torch.Tensor  # [B, length]
    position_ids: torch.Tensor  # [B, length]
    kv_padding: torch.Tensor  # [B, start + length], 1 = real token
    mask: torch.Tensor  # the model's 4D mask for a pass over the block
    first_raw: torch.Tensor | None = None  # raw logits of the first denoising step, from a fused commit pass


def _cat_inputs(first: dict, second: dict) -> dict:
    if set(first) != set(second):
        raise ValueError(f"block_inputs returned different keys for two blocks: {sorted(first)} vs {sorted(second)}.")
    return {key: torch.cat([first[key], second[key]], dim=1) for key in first}


def _float(logits: torch.Tensor) -> torch.Tensor:
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _pick(scores: torch.Tensor, do_sample: bool) -> torch.Tensor:
    if not do_sample:
        return scores.argmax(dim=-1)
    probs = torch.softmax(scores.reshape(-1, scores.shape[-1]).float(), dim=-1)
    return torch.multinomial(probs, num_samples=1).reshape(scores.shape[:-1])


def _resolve_settings(model, input_ids, generation_config, *, block_size, mask_token_id, steps, threshold, remasking,
                      assistant_model, streamer) -> dict:
    """Every setting of the call, checked before anything runs (bad input changes nothing)."""
    attached = block_diffusion_config(model)
    if mask_token_id is None:
        mask_token_id = attached.mask_token_id if attached is not None else None
    if mask_token_id is None:
        raise ValueError(
            "block_diffusion_generate needs a mask token: pass `mask_token_id=` or attach a BlockDiffusionConfig "
            "(hf_fastslow.modeling.block_diffusion.attach_block_diffusion; ensure_mask_token finds or adds one)."
        )
    vocab = model.get_input_embeddings().num_embeddings
    if isinstance(mask_token_id, bool) or not isinstance(mask_token_id, int) or not 0 <= mask_token_id < vocab:
        raise ValueError(f"mask_token_id {mask_token_id!r} is not an id of the model's vocabulary (0..{vocab - 1}).")
    special = generate_special_tokens(generation_config)
    if mask_token_id in special.eos_token_id:
        raise ValueError(
            f"mask_token_id {mask_token_id} is also an EOS id: every masked slot would read as a stop. Use another "
            "token as the mask (ensure_mask_token)."
        )
    if block_size is None:
        block_size = attached.block_size if attached is not None else None
    if block_size is None:
        raise ValueError("block_diffusion_generate needs `block_size=` (or an attached BlockDiffusionConfig).")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}.")
    attention = attached.attention if attached is not None else "block"
    logit_shift = attached.logit_shift if attached is not None else True
    if attached is not None and attention == "block" and attached.block_size % block_size:
        raise ValueError(
            f"block_size={block_size} does not divide the model's trained block size {attached.block_size}: with "
            "in-block bidirectional attention, blocks larger than or straddling the trained blocks show the model "
            "attention patterns it never saw. Use a divisor of the trained block size."
        )
    if steps is None:
        steps = block_size
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}.")
    if steps > block_size and threshold is None:
        raise ValueError(
            f"steps={steps} > block_size={block_size} with threshold=None: the schedule commits at least one slot "
            "per step, so a block never takes more than block_size steps. Use steps <= block_size, or set a "
            "threshold (steps is then capped at the block size)."
        )
    if remasking not in REMASKING_MODES:
        raise ValueError(f"remasking must be one of {REMASKING_MODES}, got {remasking!r}.")
    if threshold is not None:
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or math.isnan(threshold):
            raise ValueError(f"threshold must be a number or None, got {threshold!r}.")
        if remasking == "random":
            raise ValueError("remasking='random' ranks slots by noise: a confidence threshold has no meaning there.")
    if generation_config.num_beams not in (None, 1):
        raise ValueError("block_diffusion_generate does not support beam search (`num_beams > 1`).")
    if assistant_model is not None:
        raise ValueError("block_diffusion_generate does not take an `assistant_model` (the model drafts itself).")
    if getattr(generation_config, "output_attentions", False) or getattr(
            generation_config, "output_hidden_states", False):
        raise ValueError("block_diffusion_generate does not return attentions or hidden states.")
    if model.config.is_encoder_decoder:
        raise ValueError("block_diffusion_generate supports decoder-only models only.")
    if streamer is not None and input_ids.shape[0] > 1:
        raise ValueError("Streaming is only supported for batch size 1.")
    model_attention_mask(model, torch.ones(1, 1, 1, 1, dtype=torch.bool), torch.float32)  # refuses flash attention
    return dict(block_size=block_size, mask_token_id=mask_token_id, steps=steps, threshold=threshold,
                remasking=remasking, logit_shift=logit_shift, attention=attention)


def _direct_generation_config(model, model_kwargs: dict):
    """A call made without `generate`: the model's generation config updated with generation keys of `model_kwargs`."""
    import copy

    config = copy.deepcopy(model.generation_config)
    unused = config.update(**model_kwargs)
    for key in set(model_kwargs) - set(unused):
        model_kwargs.pop(key)
    if config.max_new_tokens is not None:
        config.max_length = None
    return config


@torch.no_grad()
def block_diffusion_generate(model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None,
                             streamer=None, *, block_size=None, mask_token_id=None, steps=None, threshold=None,
                             remasking="low_confidence", losa=None, decoder_cls=None, fuse_commit=True,
                             **model_kwargs):
    r"""Block-diffusion decoding as a `generate(custom_generate=...)` callable (see the module docstring).

    Args:
        block_size, mask_token_id: default to the model's attached `BlockDiffusionConfig` (which also gives the logit
            shift and the attention pattern; without one: shift on, "block" attention).
        steps: denoising forwards per block at most (default: block_size, i.e. at least one slot per step).
        threshold: commit every masked slot whose confidence exceeds it (Fast-dLLM uses 0.9); None: the schedule only.
        remasking: "low_confidence" (default), "margin", "entropy" or "random".
        losa: a `hf_fastslow.modeling.losa.LosaConfig`: LOSA sparse prefix attention inside blocks (batch 1).
        decoder_cls: a `BlockDiffusionDecoder` subclass (or a factory taking the same arguments).
        fuse_commit: run a block's KV-commit pass and the next block's first denoising step as one forward (the
            finished block's rows cannot see the next block, so tokens are unchanged; one forward fewer per block).
            False: a separate commit pass, as SDAR; LOSA always uses a separate one.

    Returns:
        `generate`'s result: the sequences, or with `return_dict_in_generate=True` a `GenerateDecoderOnlyOutput` with
        `.tokens_per_forward` (per row, float) and `.num_forwards` (per row) attached.
    """
    call = generate_call_arguments(model)
    streamer = call.get("streamer") if streamer is None else streamer
    if generation_config is None:
        generation_config = _direct_generation_config(model, model_kwargs)
        if generation_config.max_length is None or generation_config.max_new_tokens is not None:
            generation_config.max_length = input_ids.shape[1] + (generation_config.max_new_tokens or 20)
        if logits_processor is None and generation_config.do_sample:
            from transformers import LogitsProcessorList, TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

            logits_processor = LogitsProcessorList()
            if generation_config.temperature not in (None, 1.0):
                logits_processor.append(TemperatureLogitsWarper(generation_config.temperature))
            if generation_config.top_k:
                logits_processor.append(TopKLogitsWarper(generation_config.top_k))
            if generation_config.top_p not in (None, 1.0):
                logits_processor.append(TopPLogitsWarper(generation_config.top_p))
    settings = _resolve_settings(
        model, input_ids, generation_config, block_size=block_size, mask_token_id=mask_token_id, steps=steps,
        threshold=threshold, remasking=remasking, assistant_model=call.get("assistant_model"), streamer=streamer,
    )
    cache = cache_from_kwargs(model_kwargs)
    if cache is not None and not isinstance(cache, BlockDiffusionCache):
        from transformers.cache_utils import DynamicCache

        if not isinstance(cache, DynamicCache):
            raise ValueError(f"block_diffusion_generate needs a DynamicCache, got a {type(cache).__name__}.")
    attention_mask = model_kwargs.get("attention_mask")
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(
            f"block_diffusion_generate needs `input_ids` to hold the whole sequence its attention mask covers (got "
            f"ids {tuple(input_ids.shape)}, mask {tuple(attention_mask.shape)})."
        )
    losa_state = None
    if losa is not None:
        from hf_fastslow.modeling.losa import LosaState

        losa_state = LosaState(losa, model)
    cache = BlockDiffusionCache.from_cache(cache)
    cache.check_supported()
    decoder = (decoder_cls or BlockDiffusionDecoder)(model, fuse_commit=bool(fuse_commit), **settings)
    extra = {k: v for k, v in model_kwargs.items() if k not in _HANDLED_KWARGS and v is not None}
    return decoder.generate(
        input_ids, attention_mask, cache, logits_processor, stopping_criteria, generation_config, streamer,
        losa_state=losa_state, extra_kwargs=extra,
    )
