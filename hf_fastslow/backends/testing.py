"""`ScriptedBackend`: a deterministic backend for testing pipelines built on the backend layer (public API).

Replies come from a function you write; tokens are whitespace-separated words; streams go word by word, optionally
sleeping `token_delay_s` per token on a clock you can replace by `ManualClock` (time advances instantly, so timing
logic such as TTFT can be tested without sleeping). Calls are accounted into `.ledger` like a real backend and every
responder invocation is listed in `.calls`.
"""

from __future__ import annotations

import asyncio
import math
import re
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from .base import Backend, CallMeter, Capabilities, Completion, GenerationOptions, Messages, StreamChunk

__all__ = ["ALL_CAPABILITIES", "ManualClock", "ScriptedBackend", "ScriptedCall", "SystemClock", "word_pieces"]

ALL_CAPABILITIES = Capabilities(
    native_n=True, logprobs=True, max_top_logprobs=20, streaming=True, continue_final_message=True,
    prompt_scoring=True, seed=True,
)


def word_pieces(text: str) -> list[str]:
    """Split `text` into word tokens that concatenate back to it exactly (whitespace rides with the words)."""
    pieces = re.findall(r"\s*\S+\s*", text)
    return pieces if pieces or not text else [text]


def count_words(messages: Messages) -> int:
    return sum(len(m.get("content", "").split()) for m in messages)


class SystemClock:
    """Real time: `time.perf_counter` / `time.sleep` / `asyncio.sleep`."""

    def time(self) -> float:
        return time.perf_counter()

    def sleep(self, seconds: float) -> None:
        if seconds > 0:
            time.sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


class ManualClock:
    """A clock whose `sleep` advances time instantly (thread-safe); share one between backends for a common time."""

    def __init__(self, start: float = 0.0):
        self._t = start
        self._lock = threading.Lock()

    def time(self) -> float:
        with self._lock:
            return self._t

    def sleep(self, seconds: float) -> None:
        with self._lock:
            self._t += max(0.0, seconds)

    def advance(self, seconds: float) -> None:
        self.sleep(seconds)

    async def asleep(self, seconds: float) -> None:
        self.sleep(seconds)
        await asyncio.sleep(0)


@dataclass
class ScriptedCall:
    """One responder invocation: the messages it saw (system prepended), the sample index and the resolved kwargs."""

    kind: str
    messages: Messages
    sample_index: int
    kwargs: dict[str, Any]


Responder = Callable[[Messages, int, dict[str, Any]], "str | Completion"]


class ScriptedBackend(Backend):
    """`responder(messages, sample_index, kwargs) -> str | Completion` (or a constant string).

    A string reply is cut at `max_new_tokens` words (finish_reason "length") and at the first `stop` string; with
    `logprobs=True` it gets log-probs of 0 (the scripted reply is certain: p(chosen) = 1, the other top-k are -inf).
    Return a `Completion` to script log-probs yourself. `scorer(messages, continuation) -> list[float]` backs
    `score()`; without one `prompt_scoring` is False. `capabilities=` simulates a weaker server (e.g. no log-probs,
    no native n: then `n` counts as n requests in the ledger, seeds seed+i as for an endpoint).
    """

    def __init__(
        self,
        responder: Responder | str,
        *,
        capabilities: Capabilities | None = None,
        token_delay_s: float = 0.0,
        name: str = "ScriptedBackend",
        clock: SystemClock | ManualClock | None = None,
        scorer: Callable[[Messages, str], list[float]] | None = None,
        system: str | None = None,
        **generation_defaults: Any,
    ):
        super().__init__(system=system, **generation_defaults)
        if isinstance(responder, str):
            reply = responder
            responder = lambda messages, index, kwargs: reply  # noqa: E731
        if not callable(responder):
            raise TypeError("ScriptedBackend needs responder(messages, sample_index, kwargs) -> str | Completion.")
        if token_delay_s < 0:
            raise ValueError(f"token_delay_s must be >= 0, got {token_delay_s}.")
        self.responder = responder
        self.scorer = scorer
        self.token_delay_s = token_delay_s
        self.clock = clock or SystemClock()
        self.name = name
        self.calls: list[ScriptedCall] = []
        self._calls_lock = threading.Lock()
        caps = capabilities or ALL_CAPABILITIES
        if scorer is None and capabilities is None:
            caps = Capabilities(**{**caps.__dict__, "prompt_scoring": False})
        self._capabilities = caps

    @property
    def capabilities(self) -> Capabilities:
        return self._capabilities

    def _now(self) -> float:
        return self.clock.time()

    def _reply(self, kind: str, messages: Messages, index: int, opts: GenerationOptions) -> Completion:
        kwargs = opts.as_kwargs()
        kwargs["seed"] = opts.sample_seed(index)
        with self._calls_lock:
            self.calls.append(ScriptedCall(kind, [dict(m) for m in messages], index, dict(kwargs)))
        out = self.responder(messages, index, kwargs)
        if isinstance(out, Completion):
            return out
        if not isinstance(out, str):
            raise TypeError(f"The responder must return str or Completion, got {type(out).__name__}.")
        text, finish = out, "stop"
        for s in opts.stop or ():
            if s and s in text:
                text = text[: text.index(s)]
        pieces = word_pieces(text)
        if opts.max_new_tokens is not None and len(pieces) > opts.max_new_tokens:
            pieces, finish = pieces[: opts.max_new_tokens], "length"
            text = "".join(pieces).rstrip()
        k = len(text.split())
        completion = Completion(text=text, prompt_tokens=count_words(messages), completion_tokens=k,
                                finish_reason=finish)
        if opts.logprobs:
            completion.token_logprobs = [0.0] * k
            if opts.top_logprobs:
                completion.top_logprobs = [[0.0] + [-math.inf] * (opts.top_logprobs - 1) for _ in range(k)]
        return completion

    def _chat_batch(self, conversations, opts, meter: CallMeter) -> list[list[Completion]]:
        results = [[self._reply("chat", conv, i, opts) for i in range(opts.n)] for conv in conversations]
        meter.requests = len(conversations) * (1 if self.capabilities.native_n else opts.n)
        longest = max((c.completion_tokens for row in results for c in row), default=0)
        self.clock.sleep(self.token_delay_s * longest)  # samples are produced in parallel
        return results

    def _stream_batch(self, conversations, opts, chunk_tokens: int, meter: CallMeter) -> Iterator[StreamChunk]:
        replies = [self._reply("stream", conv, 0, opts) for conv in conversations]
        meter.requests, meter.samples = len(conversations), len(conversations)
        meter.prompt_tokens = sum(c.prompt_tokens for c in replies)
        meter.completion_tokens = sum(c.completion_tokens for c in replies)
        chunks = []
        for c in replies:
            pieces = word_pieces(c.text)
            chunks.append(["".join(pieces[i : i + chunk_tokens]) for i in range(0, len(pieces), chunk_tokens)])
        for row, row_chunks in enumerate(chunks):
            if not row_chunks:
                yield StreamChunk(row, "", None, True)
        for step in range(max((len(c) for c in chunks), default=0)):
            step_tokens = max(len(c[step].split()) for c in chunks if step < len(c))
            self.clock.sleep(self.token_delay_s * step_tokens)  # rows decode in parallel, one chunk per step
            for row, row_chunks in enumerate(chunks):
                if step < len(row_chunks):
                    yield StreamChunk(row, row_chunks[step], None, step == len(row_chunks) - 1)

    def _score(self, messages, continuation, meter: CallMeter) -> list[float]:
        with self._calls_lock:
            self.calls.append(ScriptedCall("score", [dict(m) for m in messages], 0, {"continuation": continuation}))
        scores = list(self.scorer(messages, continuation))
        meter.requests, meter.samples = 1, 1
        meter.prompt_tokens, meter.completion_tokens = count_words(messages) + len(continuation.split()), 0
        return scores
