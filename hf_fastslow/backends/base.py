"""The backend layer's shared types: completions, capabilities, errors, per-call accounting and the `Backend` base.

A backend answers OpenAI-style chat messages. Every public call goes through this base class, which merges the
generation defaults, checks the backend's capabilities before doing any work (a missing feature fails at once, with
what to do instead) and writes one `CallRecord` per call into the backend's `Ledger` (wall seconds, this process's
CPU seconds, tokens, and for streams the time to the first text). Subclasses implement the `_chat_batch`,
`_stream_batch` and (optionally) `_score` hooks; async and single-row variants come from the base unless a backend
has a native async path (the endpoint backend does).
"""

from __future__ import annotations

import asyncio
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

__all__ = [
    "iterate_in_thread",
    "Backend",
    "BackendError",
    "BackendFeatureError",
    "BackendUnreachableError",
    "CallMeter",
    "CallRecord",
    "Capabilities",
    "Completion",
    "GenerationOptions",
    "Ledger",
    "Messages",
    "StreamChunk",
    "Usage",
    "with_system",
]

Messages = list[dict[str, str]]


@dataclass
class Completion:
    """One sampled reply. `top_logprobs` come from the model's raw logits (before temperature / top-p)."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None
    token_ids: list[int] | None = None
    token_logprobs: list[float] | None = None
    top_logprobs: list[list[float]] | None = None
    seconds: float = 0.0


@dataclass(frozen=True)
class Capabilities:
    """What a backend can do; `Backend.require` turns a missing one into a `BackendFeatureError` up front."""

    native_n: bool
    logprobs: bool
    max_top_logprobs: int
    streaming: bool
    continue_final_message: bool
    prompt_scoring: bool
    seed: bool


@dataclass
class StreamChunk:
    """A piece of one row of `stream_batch`; the texts of a row's chunks concatenate to that row's reply."""

    row: int
    text: str
    token_ids: list[int] | None = None
    done: bool = False


class BackendError(RuntimeError):
    """Base of the layer's errors; messages name the backend (and for endpoints the URL)."""


class BackendUnreachableError(BackendError):
    """The server did not answer (connection refused, DNS, timeout)."""


class BackendFeatureError(BackendError):
    """The backend lacks a feature the caller asked for; the message says what to do instead."""


@dataclass
class CallRecord:
    """One backend call (a fan-out of n requests is ONE record). `requests` counts requests sent to a server (or
    `generate` calls for a local model), `samples` the completions returned."""

    backend: str
    kind: str
    requests: int
    samples: int
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    ttft_s: float | None
    cpu_seconds: float


@dataclass
class Usage:
    """A sum of call records."""

    calls: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    seconds: float = 0.0
    cpu_seconds: float = 0.0
    requests: int = 0
    samples: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: Usage) -> Usage:
        if not isinstance(other, Usage):
            return NotImplemented
        return Usage(**{f.name: getattr(self, f.name) + getattr(other, f.name) for f in fields(Usage)})

    @classmethod
    def of(cls, records: Sequence[CallRecord]) -> Usage:
        return cls(
            calls=len(records),
            prompt_tokens=sum(r.prompt_tokens for r in records),
            completion_tokens=sum(r.completion_tokens for r in records),
            seconds=sum(r.seconds for r in records),
            cpu_seconds=sum(r.cpu_seconds for r in records),
            requests=sum(r.requests for r in records),
            samples=sum(r.samples for r in records),
        )


class Ledger:
    """Thread-safe list of `CallRecord`s. `mark()` then `since(mark)` gives the usage of a stretch of work."""

    def __init__(self) -> None:
        self.records: list[CallRecord] = []
        self._lock = threading.Lock()

    def add(self, record: CallRecord) -> None:
        with self._lock:
            self.records.append(record)

    def mark(self) -> int:
        with self._lock:
            return len(self.records)

    def since(self, mark: int) -> Usage:
        with self._lock:
            return Usage.of(self.records[mark:])

    def total(self) -> Usage:
        return self.since(0)

    def __len__(self) -> int:
        return len(self.records)


@dataclass
class GenerationOptions:
    """The resolved arguments of one call: explicit kwargs, then the backend's generation defaults; what stays None
    falls back to the model's own generation config (local) or the server's defaults (endpoint)."""

    n: int = 1
    max_new_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    seed: int | None = None
    logprobs: bool = False
    top_logprobs: int = 0
    stop: list[str] | None = None
    continue_final_message: bool = False
    extra: dict[str, Any] = field(default_factory=dict)  # backend-specific defaults (e.g. top_k, do_sample)

    def sample_seed(self, index: int) -> int | None:
        """The seed of sample `index` of a fan-out: seed + index."""
        return None if self.seed is None else self.seed + index

    def as_kwargs(self) -> dict[str, Any]:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        out.update(self.extra)
        return out


_OPTION_NAMES = {f.name for f in fields(GenerationOptions)} - {"extra", "n"}


def with_system(messages: Messages, system: str | None) -> Messages:
    """Prepend `{"role": "system", "content": system}` when given and the conversation has no system message."""
    messages = [dict(m) for m in messages]
    if system is not None and not any(m.get("role") == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


class CallMeter:
    """Measures one call (wall seconds on the backend's clock, process CPU seconds, time to the first text) and
    writes its `CallRecord` when closed. Hooks fill in the token counts."""

    def __init__(self, backend: Backend, kind: str):
        self.backend = backend
        self.kind = kind
        self.requests = 0
        self.samples = 0
        self.prompt_tokens = 0
        self.completion_tokens = 0
        self.ttft_s: float | None = None
        self._start = backend._now()
        self._cpu_start = time.process_time()
        self._closed = False

    def elapsed(self) -> float:
        return self.backend._now() - self._start

    def first_text(self) -> None:
        """Call when the first non-empty text of a stream is about to be handed to the caller."""
        if self.ttft_s is None:
            self.ttft_s = self.elapsed()

    def close(self) -> CallRecord | None:
        if self._closed:
            return None
        self._closed = True
        record = CallRecord(
            backend=self.backend.name, kind=self.kind, requests=self.requests, samples=self.samples,
            prompt_tokens=self.prompt_tokens, completion_tokens=self.completion_tokens, seconds=self.elapsed(),
            ttft_s=self.ttft_s, cpu_seconds=time.process_time() - self._cpu_start,
        )
        self.backend.ledger.add(record)
        return record


_FEATURE_WORDS = {
    "native_n": "several samples from one request",
    "logprobs": "log-probs",
    "max_top_logprobs": "top log-probs",
    "streaming": "streaming",
    "continue_final_message": "continuing a partial assistant message",
    "prompt_scoring": "scoring a given continuation",
    "seed": "per-request seeds",
}


class Backend(ABC):
    """A chat model behind one API: `chat`/`chat_batch`/`achat`/`achat_batch`, `stream`/`astream`/`stream_batch`,
    and `score` where the backend supports it. See the module docstring for accounting."""

    name: str = "Backend"

    def __init__(self, *, system: str | None = None, **generation_defaults: Any):
        self.system = system
        self.generation_defaults = dict(generation_defaults)
        self.ledger = Ledger()

    # ----- capabilities -----------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def capabilities(self) -> Capabilities: ...

    def feature_hint(self, feature: str) -> str:
        """What to do instead when `feature` is missing (backends override with specifics)."""
        return "use a backend that supports it (HFLocalBackend supports everything)"

    def require(self, feature: str, purpose: str) -> None:
        """Raise `BackendFeatureError` naming this backend, the feature and the purpose unless it is supported.
        `feature` is a `Capabilities` field name; `"max_top_logprobs>=k"` checks a top-k size."""
        name, _, minimum = feature.partition(">=")
        caps = self.capabilities
        if name not in _FEATURE_WORDS:
            raise ValueError(f"Unknown backend feature {feature!r}; one of {sorted(_FEATURE_WORDS)}.")
        have = getattr(caps, name)
        ok = have >= int(minimum) if minimum else bool(have)
        if not ok:
            what = _FEATURE_WORDS[name] + (f" with k={minimum} (max {have})" if minimum else "")
            raise BackendFeatureError(
                f"{self.name} does not support {what} ({name}), needed for {purpose}; {self.feature_hint(name)}."
            )

    # ----- options ------------------------------------------------------------------------------------------------
    def resolve_options(self, kwargs: dict[str, Any], *, purpose: str = "chat") -> GenerationOptions:
        """Merge call kwargs over the generation defaults, validate them and check the capabilities they need."""
        merged = dict(self.generation_defaults)
        merged.update({k: v for k, v in kwargs.items() if v is not None and k != "n"})
        known = {k: merged.pop(k) for k in list(merged) if k in _OPTION_NAMES}
        n = 1 if kwargs.get("n") is None else int(kwargs["n"])
        opts = GenerationOptions(n=n, extra=merged, **known)
        if opts.n < 1:
            raise ValueError(f"n must be >= 1, got {opts.n}.")
        if opts.max_new_tokens is not None and opts.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {opts.max_new_tokens}.")
        if opts.top_logprobs < 0:
            raise ValueError(f"top_logprobs must be >= 0, got {opts.top_logprobs}.")
        if isinstance(opts.stop, str):
            opts.stop = [opts.stop]
        if opts.top_logprobs:
            opts.logprobs = True  # OpenAI semantics: top_logprobs implies logprobs
        if opts.logprobs:
            self.require("logprobs", purpose + " with logprobs=True")
        if opts.top_logprobs:
            self.require(f"max_top_logprobs>={opts.top_logprobs}", purpose + f" with top_logprobs={opts.top_logprobs}")
        if opts.continue_final_message:
            self.require("continue_final_message", purpose + " with continue_final_message=True")
        return opts

    def _prepare(self, conversations: Sequence[Messages], opts: GenerationOptions) -> list[Messages]:
        if isinstance(conversations, dict) or (conversations and isinstance(conversations[0], dict)):
            raise TypeError("chat_batch/stream_batch take a list of conversations (each a list of messages).")
        prepared = [with_system(list(c), self.system) for c in conversations]
        for conv in prepared:
            if not conv or not all(isinstance(m, dict) and "role" in m and "content" in m for m in conv):
                raise ValueError("Each conversation must be a non-empty list of {'role', 'content'} dicts.")
            if opts.continue_final_message and conv[-1]["role"] != "assistant":
                raise ValueError("continue_final_message=True needs the last message to be an assistant message.")
        return prepared

    # ----- hooks for subclasses ------------------------------------------------------------------------------------
    def _now(self) -> float:
        return time.perf_counter()

    @abstractmethod
    def _chat_batch(
        self, conversations: list[Messages], opts: GenerationOptions, meter: CallMeter
    ) -> list[list[Completion]]:
        """Return `opts.n` completions per conversation; set `meter.requests` (token counts are summed here)."""

    @abstractmethod
    def _stream_batch(
        self, conversations: list[Messages], opts: GenerationOptions, chunk_tokens: int, meter: CallMeter
    ) -> Iterator[StreamChunk]:
        """Yield chunks of one sample per conversation; set `meter` requests and token counts."""

    def _score(self, messages: Messages, continuation: str, meter: CallMeter) -> list[float]:
        raise BackendFeatureError(f"{self.name} cannot score a continuation; {self.feature_hint('prompt_scoring')}.")

    # ----- public API -----------------------------------------------------------------------------------------------
    def chat(self, messages: Messages, **kwargs: Any) -> list[Completion]:
        """`n` completions of one conversation (see `chat_batch` for the keyword arguments)."""
        return self.chat_batch([messages], **kwargs)[0]

    def chat_batch(
        self,
        conversations: Sequence[Messages],
        *,
        n: int = 1,
        max_new_tokens: int | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        seed: int | None = None,
        logprobs: bool = False,
        top_logprobs: int = 0,
        stop: str | list[str] | None = None,
        continue_final_message: bool = False,
    ) -> list[list[Completion]]:
        """One list of `n` completions per conversation, as ONE ledger record."""
        opts = self.resolve_options(dict(
            n=n, max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed,
            logprobs=logprobs or None, top_logprobs=top_logprobs or None, stop=stop,
            continue_final_message=continue_final_message or None,
        ))
        conversations = self._prepare(conversations, opts)
        meter = CallMeter(self, "chat")
        try:
            results = self._chat_batch(conversations, opts, meter) if conversations else []
            seconds = meter.elapsed()
            for row in results:
                for c in row:
                    c.seconds = c.seconds or seconds
            meter.samples = sum(len(r) for r in results)
            meter.prompt_tokens = sum(c.prompt_tokens for r in results for c in r)
            meter.completion_tokens = sum(c.completion_tokens for r in results for c in r)
        finally:
            meter.close()
        return results

    async def achat(self, messages: Messages, **kwargs: Any) -> list[Completion]:
        return (await self.achat_batch([messages], **kwargs))[0]

    async def achat_batch(self, conversations: Sequence[Messages], **kwargs: Any) -> list[list[Completion]]:
        """Async `chat_batch`; the base runs the sync call in a worker thread (the event loop stays free)."""
        return await asyncio.to_thread(self.chat_batch, conversations, **kwargs)

    def stream(self, messages: Messages, **kwargs: Any) -> Iterator[str]:
        """Text deltas of one sample; the ledger record is written when the stream ends (or is closed)."""
        if kwargs.get("n", 1) != 1:
            raise ValueError("stream() yields one sample; use chat(n=...) or stream_batch for several.")
        kwargs.pop("n", None)
        for chunk in self.stream_batch([messages], **kwargs):
            if chunk.text:
                yield chunk.text

    def stream_batch(
        self, conversations: Sequence[Messages], *, chunk_tokens: int = 1, **kwargs: Any
    ) -> Iterator[StreamChunk]:
        """Chunks of one sample per conversation, interleaved as they are produced; each row ends with `done=True`."""
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}.")
        if kwargs.get("n", 1) != 1:
            raise ValueError("stream_batch streams one sample per conversation; repeat a conversation for more.")
        kwargs.pop("n", None)
        unknown = set(kwargs) - _OPTION_NAMES
        if unknown:
            raise TypeError(f"stream_batch got unexpected keyword arguments {sorted(unknown)}.")
        self.require("streaming", "stream/stream_batch")
        opts = self.resolve_options(kwargs, purpose="stream")
        conversations = self._prepare(conversations, opts)
        return self._metered_stream(conversations, opts, chunk_tokens)

    def _metered_stream(self, conversations, opts, chunk_tokens) -> Iterator[StreamChunk]:
        meter = CallMeter(self, "stream")
        try:
            for chunk in self._stream_batch(conversations, opts, chunk_tokens, meter):
                if chunk.text:
                    meter.first_text()
                yield chunk
        finally:
            meter.close()

    async def astream(self, messages: Messages, **kwargs: Any) -> AsyncIterator[str]:
        """Async `stream`: the sync stream runs in a worker thread (`iterate_in_thread`)."""
        sync_iter = self.stream(messages, **kwargs)
        async for delta in iterate_in_thread(lambda: sync_iter):
            yield delta

    def score(self, messages: Messages, continuation: str) -> list[float]:
        """log p of each token of `continuation` after the rendered prompt (generation prompt added)."""
        self.require("prompt_scoring", "score()")
        messages = with_system(list(messages), self.system)
        meter = CallMeter(self, "score")
        try:
            return self._score(messages, continuation, meter)
        finally:
            meter.close()

    def __repr__(self) -> str:
        return self.name


async def iterate_in_thread(make_iterator: Callable[[], Iterator[Any]]) -> AsyncIterator[Any]:
    """Drive a blocking iterator in a worker thread and yield its items in the event loop; closing the async
    iterator stops the worker at its next item and closes the sync one."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    end = object()
    stop = threading.Event()

    def put(item: Any) -> None:
        try:
            loop.call_soon_threadsafe(queue.put_nowait, item)
        except RuntimeError:  # the loop closed under us: nobody is listening any more
            stop.set()

    def pump() -> None:
        iterator = make_iterator()
        try:
            for item in iterator:
                put(item)
                if stop.is_set():
                    break
            put(end)
        except BaseException as err:  # noqa: BLE001 - re-raised in the event loop
            put(err)
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()

    worker = loop.run_in_executor(None, pump)
    try:
        while True:
            item = await queue.get()
            if item is end:
                break
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        await asyncio.shield(worker)
