"""`HFLocalBackend`: an in-process transformers causal LM behind the backend API.

- Prompts are rendered with the tokenizer's chat template; several conversations run as ONE left-padded batched
  `generate`, `n` samples per conversation through `num_return_sequences`.
- Log-probs come from a `LogitsProcessor` that returns the scores unchanged. transformers runs user processors after
  its built-in ones and before the sampling warpers (temperature, top-k, top-p), so it sees the model's logits before
  temperature. It keeps one step of log-probs to read the chosen token at the next step (never `output_logits`,
  which would hold steps x rows x vocab floats).
- `continue_final_message=True` renders the conversation up to the partial assistant message; with `prefix_cache`
  the longest cached token prefix of an earlier single-row call is copied, cropped to the shared prefix and passed to
  `generate`, so only the uncached suffix is prefilled.
- `stream_batch` runs one batched `generate` in a worker thread and splits it per row with `BatchChunkStreamer`.
- `score(messages, continuation)` is one forward over prompt + continuation.
"""

from __future__ import annotations

import contextlib
import copy
import os
import threading
from collections.abc import Iterator
from typing import Any

import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, StoppingCriteria, StoppingCriteriaList

from ..generation.padding import left_pad, pad_token_id, token_ids
from ..integrations.caches import cache_kwargs
from .base import Backend, CallMeter, Capabilities, Completion, GenerationOptions, Messages, StreamChunk
from .streamers import BatchChunkStreamer

__all__ = ["HFLocalBackend", "LogProbRecorder"]


class LogProbRecorder(LogitsProcessor):
    """Records log p(chosen token) and the top-k log-probs per step from the scores it sees; returns them unchanged.

    Holds one step of full-vocabulary log-probs (the chosen token is known one step later, from `input_ids`);
    `finish(sequences, prompt_len)` reads the last step's chosen token from the output.
    """

    def __init__(self, top_k: int = 0):
        self.top_k = top_k
        self.chosen: list[torch.Tensor] = []
        self.top: list[torch.Tensor] = []
        self._last: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        logp = torch.log_softmax(scores.float(), dim=-1)
        if self._last is not None:
            self.chosen.append(self._last.gather(1, input_ids[:, -1:])[:, 0])
        self._last = logp
        if self.top_k:
            self.top.append(logp.topk(min(self.top_k, logp.shape[-1]), dim=-1).values)
        return scores

    def finish(self, sequences: torch.Tensor, prompt_len: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(chosen [rows, steps], top [rows, steps, k] or None)."""
        if self._last is not None and prompt_len + len(self.chosen) < sequences.shape[1]:
            last = sequences[:, prompt_len + len(self.chosen)].to(self._last.device)
            self.chosen.append(self._last.gather(1, last[:, None])[:, 0])
            self._last = None
        rows = sequences.shape[0]
        chosen = torch.stack(self.chosen, 1).cpu() if self.chosen else torch.zeros(rows, 0)
        top = torch.stack(self.top, 1).cpu() if self.top else None
        return chosen, top


class _Cancel(StoppingCriteria):
    """Stops `generate` at the next step once `event` is set (a stream closed by its consumer)."""

    def __init__(self, event: threading.Event):
        self.event = event

    def __call__(self, input_ids, scores, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


def _cut_at_stop(text: str, stop: list[str] | None) -> tuple[str, bool]:
    cut = min((text.index(s) for s in stop or () if s and s in text), default=None)
    return (text, False) if cut is None else (text[:cut], True)


class HFLocalBackend(Backend):
    """`HFLocalBackend(model, tokenizer, *, system=None, prefix_cache=True, **generation_defaults)`.

    `generation_defaults` may hold the backend options (max_new_tokens, temperature, top_p, ...) and any other
    `generate` keyword (top_k, repetition_penalty, do_sample, ...). `temperature=0` means greedy. `n > 1` needs
    sampling. A `seed` seeds torch's RNG for the call (restored afterwards); samples of one call share it.
    """

    def __init__(self, model, tokenizer, *, system: str | None = None, prefix_cache: bool = True,
                 prefix_cache_entries: int = 4, name: str | None = None, **generation_defaults: Any):
        super().__init__(system=system, **generation_defaults)
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("HFLocalBackend needs a tokenizer with a chat template (tokenizer.chat_template unset).")
        self.model = model
        self.tokenizer = tokenizer
        self.prefix_cache = prefix_cache
        self.prefix_cache_entries = prefix_cache_entries
        self._cache_entries: list[tuple[tuple[int, ...], Any]] = []  # (token ids the cache holds, cache), LRU last
        self._lock = threading.RLock()  # one generate at a time: the model and the cache store are shared
        self.reused_prompt_tokens = 0  # prompt tokens served from the prefix cache, all calls
        self.last_reused_tokens = 0
        label = os.path.basename(str(getattr(model, "name_or_path", "") or "").rstrip("/"))
        self.name = name or f"HFLocalBackend({label or model.config.model_type})"
        self.pad_id = pad_token_id(tokenizer, default=pad_token_id(model.config, 0))
        self.eos_ids = set(token_ids(tokenizer.eos_token_id)) | set(
            token_ids(getattr(model.generation_config, "eos_token_id", None)))

    @property
    def capabilities(self) -> Capabilities:
        return Capabilities(native_n=True, logprobs=True, max_top_logprobs=int(self.model.config.vocab_size),
                            streaming=True, continue_final_message=True, prompt_scoring=True, seed=True)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ----- rendering ----------------------------------------------------------------------------------------------
    def render(self, messages: Messages, *, continue_final_message: bool = False) -> list[int]:
        """Token ids of the chat-template rendering (generation prompt added unless continuing)."""
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=not continue_final_message,
            continue_final_message=continue_final_message,
        )
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def decode(self, ids: list[int]) -> str:
        # No clean-up of spaces: a decoded prefix must stay a prefix of the whole (stream deltas rely on it).
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def _generate_kwargs(self, opts: GenerationOptions, n: int) -> dict[str, Any]:
        kw = dict(opts.extra)
        if opts.max_new_tokens is not None:
            kw["max_new_tokens"] = opts.max_new_tokens
        if opts.temperature is not None:
            if opts.temperature <= 0:
                kw["do_sample"] = False
            else:
                kw.update(do_sample=True, temperature=float(opts.temperature))
        if opts.top_p is not None:
            kw["top_p"] = float(opts.top_p)
        if n > 1:
            sampling = kw.get("do_sample", getattr(self.model.generation_config, "do_sample", False))
            if not sampling:
                raise ValueError(f"{self.name}: n={n} samples need sampling; pass temperature > 0.")
            kw["num_return_sequences"] = n
        if opts.stop:
            kw.update(stop_strings=list(opts.stop), tokenizer=self.tokenizer)
        kw["pad_token_id"] = self.pad_id
        return kw

    # ----- prefix cache -------------------------------------------------------------------------------------------
    def _cached_prefix(self, ids: list[int]) -> tuple[Any, int]:
        """A copy of the longest cached prefix of `ids`, cropped to it (leaving >= 1 token to prefill); (None, 0)."""
        best, best_len = None, 0
        for entry_ids, cache in self._cache_entries:
            limit = min(len(entry_ids), len(ids) - 1)
            common = 0
            while common < limit and entry_ids[common] == ids[common]:
                common += 1
            if common > best_len:
                best, best_len = (entry_ids, cache), common
        if best is None:
            return None, 0
        cache = copy.deepcopy(best[1])
        extra = cache.get_seq_length() - best_len
        if extra > 0:
            cache.crop(-extra)
        self._cache_entries.remove(best)
        self._cache_entries.append(best)
        return cache, best_len

    def _store_prefix(self, sequence: list[int], cache: Any) -> None:
        held = tuple(sequence[: cache.get_seq_length()])
        self._cache_entries = [e for e in self._cache_entries if e[0] != held] + [(held, cache)]
        del self._cache_entries[: max(0, len(self._cache_entries) - self.prefix_cache_entries)]

    def clear_prefix_cache(self) -> None:
        with self._lock:
            self._cache_entries.clear()

    # ----- generation -------------------------------------------------------------------------------------------
    def _run_generate(self, rows: list[list[int]], opts: GenerationOptions, **extra: Any):
        """One `generate` over left-padded `rows`; returns (sequences, prompt width, mask sum per row, cache used)."""
        n = opts.n
        kw = self._generate_kwargs(opts, n)
        kw.update(extra)
        input_ids, attention_mask = left_pad(rows, self.pad_id, self.device)
        cache, reused = None, 0
        single = len(rows) == 1 and self.prefix_cache
        if single:
            if opts.continue_final_message:
                cache, reused = self._cached_prefix(rows[0])
            if cache is None:
                cache = DynamicCache()
            elif n > 1:
                cache.batch_repeat_interleave(n)
            kw.update(cache_kwargs(self.model, cache))
        self.last_reused_tokens = reused
        self.reused_prompt_tokens += reused
        # A seed must not leak into the caller's RNG streams, so a seeded call forks them. Only a seeded one: torch's
        # RNG is process-global, and restoring it when an unseeded call ends (e.g. an aggregator in one thread) would
        # rewind a seeded sampler running in another thread. Seeded calls on different backends in concurrent
        # threads still share that one RNG: runs that must be reproducible sample one seeded call at a time.
        seeded = opts.seed is not None
        on_cpu = self.device.type == "cpu"
        with (torch.random.fork_rng(devices=[] if on_cpu else [self.device], device_type=self.device.type)
              if seeded else contextlib.nullcontext()):
            if seeded:
                torch.manual_seed(opts.seed)
            with torch.no_grad():
                out = self.model.generate(input_ids=input_ids, attention_mask=attention_mask, **kw)
        sequences = out if isinstance(out, torch.Tensor) else out.sequences
        if single and n == 1:
            self._store_prefix(sequences[0].tolist(), cache)
        return sequences.cpu(), input_ids.shape[1], attention_mask.sum(1).tolist()

    def _row_tokens(self, generated: list[int]) -> tuple[list[int], bool]:
        """Generated ids up to and including the first EOS (what follows is padding); whether an EOS ended it."""
        for i, t in enumerate(generated):
            if t in self.eos_ids:
                return generated[: i + 1], True
        if self.pad_id not in self.eos_ids:
            while generated and generated[-1] == self.pad_id:  # a row stopped by a stop string, then padded
                generated = generated[:-1]
        return generated, False

    def _chat_batch(self, conversations, opts, meter: CallMeter) -> list[list[Completion]]:
        rows = [self.render(c, continue_final_message=opts.continue_final_message) for c in conversations]
        recorder = LogProbRecorder(opts.top_logprobs) if opts.logprobs else None
        extra = {"logits_processor": LogitsProcessorList([recorder])} if recorder else {}
        with self._lock:
            sequences, width, prompt_lens = self._run_generate(rows, opts, **extra)
            chosen, top = recorder.finish(sequences, width) if recorder else (None, None)
        meter.requests = 1
        results: list[list[Completion]] = []
        for r, seq in enumerate(sequences.tolist()):
            ids, ended = self._row_tokens(seq[width:])
            text, stopped = _cut_at_stop(self.decode(ids[:-1] if ended else ids), opts.stop)
            done = ended or stopped or (opts.max_new_tokens is not None and len(ids) < opts.max_new_tokens)
            c = Completion(text=text, prompt_tokens=int(prompt_lens[r // opts.n]), completion_tokens=len(ids),
                           finish_reason="stop" if done else "length", token_ids=ids)
            if chosen is not None:
                c.token_logprobs = chosen[r, : len(ids)].tolist()
                if top is not None:
                    c.top_logprobs = top[r, : len(ids)].tolist()
            if r % opts.n == 0:
                results.append([])
            results[-1].append(c)
        return results

    def _stream_batch(self, conversations, opts, chunk_tokens: int, meter: CallMeter) -> Iterator[StreamChunk]:
        rows = [self.render(c, continue_final_message=opts.continue_final_message) for c in conversations]
        stop_ids = set(self.eos_ids) | {self.pad_id}
        streamer = BatchChunkStreamer(chunk_tokens, stop_token_ids=stop_ids)
        cancel = threading.Event()
        finished: dict[str, Any] = {}

        def work() -> None:
            try:
                with self._lock:
                    seqs, width, lens = self._run_generate(
                        rows, opts, streamer=streamer, stopping_criteria=StoppingCriteriaList([_Cancel(cancel)]))
                finished.update(sequences=seqs, width=width, prompt_lens=lens)
            except BaseException as err:  # noqa: BLE001 - re-raised in the consuming thread
                streamer.fail(err)

        worker = threading.Thread(target=work, name=f"{self.name} stream", daemon=True)
        worker.start()
        ids = [[] for _ in rows]
        emitted = [""] * len(rows)
        closed = [False] * len(rows)
        hold = max((len(s) for s in opts.stop or ()), default=1) - 1
        try:
            for chunk in streamer:
                if closed[chunk.row]:
                    continue
                r = chunk.row
                ids[r].extend(chunk.token_ids)
                text, stopped = _cut_at_stop(self.decode(ids[r]), opts.stop)
                done = chunk.done or stopped
                if not done:  # hold back a partial UTF-8 character and a possible start of a stop string
                    text = text.rstrip("\ufffd")
                    text = text[: len(text) - hold] if hold else text
                delta = text[len(emitted[r]):] if text.startswith(emitted[r]) else ""
                emitted[r] += delta
                closed[r] = done
                yield StreamChunk(r, delta, list(chunk.token_ids), done)
        finally:
            cancel.set()
            worker.join()
            meter.requests, meter.samples = 1, len(rows)
            if finished:
                seqs, width = finished["sequences"], finished["width"]
                meter.prompt_tokens = int(sum(finished["prompt_lens"]))
                meter.completion_tokens = sum(len(self._row_tokens(s[width:])[0]) for s in seqs.tolist())

    # ----- scoring ---------------------------------------------------------------------------------------------------
    def _score(self, messages, continuation: str, meter: CallMeter) -> list[float]:
        prompt = self.render(messages)
        cont = list(self.tokenizer(continuation, add_special_tokens=False)["input_ids"])
        if not cont:
            return []
        ids = torch.tensor([prompt + cont], device=self.device)
        with self._lock, torch.no_grad():
            logits = self.model(input_ids=ids).logits[0, len(prompt) - 1 : -1].float()
        logp = torch.log_softmax(logits, -1).gather(1, ids[0, len(prompt):, None])[:, 0]
        meter.requests, meter.samples, meter.prompt_tokens = 1, 1, len(prompt) + len(cont)
        return logp.cpu().tolist()
