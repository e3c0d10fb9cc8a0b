"""`EndpointBackend`: an OpenAI-compatible server (vLLM, TGI, SGLang, `transformers serve`, hosted APIs) through
`huggingface_hub.InferenceClient` / `AsyncInferenceClient` with `base_url=`.

Servers differ in what they honour, and most say nothing when they ignore a field: `transformers serve` (5.24)
accepts `n`, `logprobs` and `top_logprobs` and ignores them (one choice, no log-probs), and samples only when asked
through its own `generation_config` field (a plain `temperature` leaves the model's greedy default). So the backend
probes once (one request of one token with n=2 and top_logprobs=20) unless `capabilities=` is given, fans `n` out as
n requests with seeds seed+i where the server ignores `n`, and raises `BackendFeatureError` up front for log-probs it
cannot get. Continuing a partial assistant message is not part of the chat API: with a `tokenizer` the prompt is
rendered locally and sent to `/v1/completions`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import queue
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from huggingface_hub import AsyncInferenceClient, InferenceClient
from huggingface_hub.errors import HfHubHTTPError
from huggingface_hub.utils import get_session

from ..integrations.backends_seam import endpoint_requests_allowed, hub_transport_error
from .base import (
    Backend,
    BackendError,
    BackendUnreachableError,
    CallMeter,
    Capabilities,
    Completion,
    GenerationOptions,
    Messages,
    StreamChunk,
)

__all__ = ["EndpointBackend", "TRANSFORMERS_SERVE"]

TRANSFORMERS_SERVE = "transformers serve"
_PROBE = [{"role": "user", "content": "Say OK."}]
_TRANSPORT_ERROR = hub_transport_error()


def _looks_like_transformers_serve(models: dict) -> bool:
    # Its /v1/models entries are owned by "local" and carry a load status; vLLM/TGI/llama.cpp name themselves.
    entries = models.get("data") or []
    return bool(entries) and all(e.get("owned_by") == "local" and "status" in e for e in entries)


def _get(obj: Any, key: str, default: Any = None) -> Any:
    return obj.get(key, default) if isinstance(obj, dict) else getattr(obj, key, default)


def _parse_logprobs(choice: Any) -> tuple[list[float] | None, list[list[float]] | None]:
    content = _get(_get(choice, "logprobs"), "content")
    if not content:
        return None, None
    chosen = [float(_get(t, "logprob")) for t in content]
    tops = [[float(_get(x, "logprob")) for x in (_get(t, "top_logprobs") or [])] for t in content]
    return chosen, tops if any(tops) else None


class EndpointBackend(Backend):
    """`EndpointBackend(base_url, model, *, api_key=None, timeout=120.0, system=None, tokenizer=None,
    max_concurrency=8, capabilities=None, server=None, **generation_defaults)`.

    `base_url` is the API root (`http://127.0.0.1:8000/v1`); `model` the request's model field (None: omitted).
    `server`: `"transformers serve"`, `"openai"` or None (detected from `GET /v1/models` when first needed).
    `generation_defaults` outside the backend options go into every request's body.
    """

    def __init__(self, base_url: str, model: str | None, *, api_key: str | None = None, timeout: float = 120.0,
                 system: str | None = None, tokenizer=None, max_concurrency: int = 8,
                 capabilities: Capabilities | None = None, server: str | None = None, name: str | None = None,
                 **generation_defaults: Any):
        super().__init__(system=system, **generation_defaults)
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise ValueError(f"base_url must be an http(s) URL such as 'http://127.0.0.1:8000/v1', got {base_url!r}.")
        if max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {max_concurrency}.")
        base_url = base_url.rstrip("/")
        for suffix in ("/chat/completions", "/completions"):
            base_url = base_url.removesuffix(suffix)
        self.base_url, self.model, self.api_key, self.timeout = base_url, model, api_key, timeout
        self.tokenizer = tokenizer
        self.max_concurrency = max_concurrency
        self.name = name or f"EndpointBackend({base_url})"
        self.server = server
        self._capabilities = capabilities
        self._probe_lock = threading.Lock()
        self._server_lock = threading.Lock()
        self.client = InferenceClient(base_url=base_url, api_key=api_key, timeout=timeout)

    # ----- capabilities -------------------------------------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        if self._capabilities is None:
            with self._probe_lock:
                if self._capabilities is None:
                    self._capabilities = self.probe()
        return self._capabilities

    def probe(self) -> Capabilities:
        """Ask the server once: which kind it is (`/v1/models`), and whether one request with n=2, logprobs and
        top_logprobs=20 returns two choices with log-probs. Not recorded in the ledger (setup, not work)."""
        self.detect_server()
        try:
            with self.translate_errors():
                out = self.client.chat_completion(_PROBE, model=self.model, max_tokens=1, n=2, logprobs=True,
                                                  top_logprobs=20, seed=0, temperature=1.0)
        except BackendUnreachableError:
            raise
        except BackendError:  # the server rejects n or log-probs outright: probe the plain form
            with self.translate_errors():
                out = self.client.chat_completion(_PROBE, model=self.model, max_tokens=1)
            out.choices = out.choices[:1]
            for c in out.choices:
                c.logprobs = None
        chosen, tops = _parse_logprobs(out.choices[0])
        return Capabilities(
            native_n=len(out.choices) >= 2, logprobs=chosen is not None,
            max_top_logprobs=len(tops[0]) if tops else 0, streaming=True,
            continue_final_message=self.tokenizer is not None, prompt_scoring=False, seed=True,
        )

    def detect_server(self) -> str:
        """`"transformers serve"` or `"openai"` (any other OpenAI-compatible server), from `GET /v1/models` once."""
        with self._server_lock:
            if self.server is None:
                with self.translate_errors():
                    response = get_session().get(self.base_url + "/models", headers=self._headers(),
                                                 timeout=self.timeout)
                kind = "openai"
                if response.status_code == 200:
                    with contextlib.suppress(ValueError):
                        if _looks_like_transformers_serve(response.json()):
                            kind = TRANSFORMERS_SERVE
                self.server = kind
        return self.server

    def feature_hint(self, feature: str) -> str:
        server = f" ({self.server})" if self.server == TRANSFORMERS_SERVE else ""
        if feature == "continue_final_message":
            return (f"pass tokenizer= (the server's tokenizer) so the prompt is rendered locally and sent to "
                    f"{self.base_url}/completions")
        if feature in ("logprobs", "max_top_logprobs"):
            return (f"the server{server} returns no (or too few) log-probs: use a fitness that needs none (e.g. "
                    f"answer diversity) or score locally with HFLocalBackend(model, tokenizer).score()")
        if feature == "prompt_scoring":
            return "score with an HFLocalBackend on the same (or a smaller) model"
        return f"the server{server} lacks it"

    # ----- plumbing ---------------------------------------------------------------------------------------------
    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    @contextlib.contextmanager
    def translate_errors(self):
        """Map transport and HTTP failures to the layer's errors, naming this backend and its URL. Requests sent inside
        go out even under `HF_HUB_OFFLINE=1` (that switch keeps the Hub offline, not a server the user named)."""
        try:
            with endpoint_requests_allowed():
                yield
        except HfHubHTTPError as err:
            status = getattr(getattr(err, "response", None), "status_code", "?")
            raise BackendError(f"{self.name} returned HTTP {status}: {str(err)[:500]}") from err
        except (_TRANSPORT_ERROR, ConnectionError, TimeoutError) as err:
            raise BackendUnreachableError(f"{self.name} is unreachable: {err}") from err

    def _params(self, opts: GenerationOptions, index: int, *, fan_out: bool) -> dict[str, Any]:
        """chat_completion keyword arguments of request `index`."""
        kw: dict[str, Any] = {"model": self.model} if self.model else {}
        if opts.max_new_tokens is not None:
            kw["max_tokens"] = opts.max_new_tokens
        if opts.temperature is not None:
            kw["temperature"] = float(opts.temperature)
        if opts.top_p is not None:
            kw["top_p"] = float(opts.top_p)
        seed = opts.sample_seed(index) if fan_out else opts.seed
        if seed is not None:
            kw["seed"] = seed
        if opts.stop:
            kw["stop"] = list(opts.stop)
        if opts.logprobs:
            kw["logprobs"] = True
            if opts.top_logprobs:
                kw["top_logprobs"] = opts.top_logprobs
        if not fan_out and opts.n > 1:
            kw["n"] = opts.n
        extra = dict(opts.extra)
        if opts.temperature and self.detect_server() == TRANSFORMERS_SERVE:
            # transformers serve samples only when its generation config says so; the field replaces the model's
            # config (max_tokens, stop still apply on top), so carry the sampling settings in it.
            config = {"do_sample": True, "temperature": float(opts.temperature)}
            if opts.top_p is not None:
                config["top_p"] = float(opts.top_p)
            extra["generation_config"] = json.dumps(config)
        if extra:
            kw["extra_body"] = extra
        return kw

    def _completion(self, choice: Any, usage: Any, share: int, stop: list[str] | None = None) -> Completion:
        text = _get(_get(choice, "message"), "content") if _get(choice, "message") is not None else None
        if text is None:
            text = _get(choice, "text") or ""
        # OpenAI semantics (and HFLocalBackend's): a stop string is not part of the reply, whatever the server does
        cut = min((text.index(s) for s in stop or () if s and s in text), default=None)
        text = text if cut is None else text[:cut]
        chosen, tops = _parse_logprobs(choice)
        completion_tokens = _get(usage, "completion_tokens")
        if completion_tokens is None or share > 1:
            completion_tokens = len(chosen) if chosen is not None else self._count(text, completion_tokens, share)
        return Completion(text=text, prompt_tokens=int(_get(usage, "prompt_tokens") or 0),
                          completion_tokens=int(completion_tokens), finish_reason=_get(choice, "finish_reason"),
                          token_logprobs=chosen, top_logprobs=tops)

    def _count(self, text: str, reported: int | None, share: int) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return (reported or 0) // max(share, 1)  # a server's total over n choices, split evenly

    def _requests(self, conversations: list[Messages], opts: GenerationOptions):
        """[(conversation index, sample index or None for a native-n request, messages)]."""
        if self.capabilities.native_n or opts.n == 1:
            return [(i, None, conv) for i, conv in enumerate(conversations)]
        return [(i, s, conv) for i, conv in enumerate(conversations) for s in range(opts.n)]

    # ----- chat ------------------------------------------------------------------------------------------------------
    def _one(self, conv: Messages, opts: GenerationOptions, sample: int | None) -> list[Completion]:
        if opts.continue_final_message:
            return [self._continue(conv, opts, sample or 0)]
        with self.translate_errors():
            out = self.client.chat_completion(conv, **self._params(opts, sample or 0, fan_out=sample is not None))
        return self._choices(out, opts, sample)

    def _choices(self, out: Any, opts: GenerationOptions, sample: int | None) -> list[Completion]:
        choices = list(_get(out, "choices") or [])
        if not choices:
            raise BackendError(f"{self.name} sent a reply without choices: {str(out)[:300]}")
        wanted = 1 if sample is not None else opts.n
        if len(choices) < wanted:
            raise BackendError(f"{self.name} returned {len(choices)} choices for n={wanted}; pass capabilities= "
                               f"with native_n=False to fan out.")
        return [self._completion(c, _get(out, "usage"), len(choices), opts.stop) for c in choices[:wanted]]

    def _chat_batch(self, conversations, opts, meter: CallMeter) -> list[list[Completion]]:
        requests = self._requests(conversations, opts)
        meter.requests = len(requests)
        if len(requests) == 1 or self.max_concurrency == 1:
            replies = [self._one(conv, opts, s) for _, s, conv in requests]
        else:
            with ThreadPoolExecutor(max_workers=min(self.max_concurrency, len(requests))) as pool:
                replies = list(pool.map(lambda r: self._one(r[2], opts, r[1]), requests))
        results: list[list[Completion]] = [[] for _ in conversations]
        for (i, _, _), reply in zip(requests, replies):
            results[i].extend(reply)
        return results

    async def achat_batch(self, conversations, **kwargs: Any) -> list[list[Completion]]:
        """Native async: `AsyncInferenceClient`, at most `max_concurrency` requests in flight."""
        n = kwargs.pop("n", 1)
        opts = self.resolve_options({**kwargs, "n": n})
        if opts.continue_final_message:
            return await super().achat_batch(conversations, n=n, **kwargs)
        conversations = self._prepare(conversations, opts)
        requests = self._requests(conversations, opts)
        meter = CallMeter(self, "chat")
        meter.requests = len(requests)
        limit = asyncio.Semaphore(self.max_concurrency)
        client = AsyncInferenceClient(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout)

        async def one(conv: Messages, sample: int | None) -> list[Completion]:
            async with limit:
                with self.translate_errors():
                    out = await client.chat_completion(conv, **self._params(opts, sample or 0,
                                                                            fan_out=sample is not None))
            return self._choices(out, opts, sample)

        try:
            replies = await asyncio.gather(*(one(conv, s) for _, s, conv in requests))
            results: list[list[Completion]] = [[] for _ in conversations]
            for (i, _, _), reply in zip(requests, replies):
                results[i].extend(reply)
            seconds = meter.elapsed()
            for c in (c for row in results for c in row):
                c.seconds = seconds
            meter.samples = sum(len(r) for r in results)
            meter.prompt_tokens = sum(c.prompt_tokens for r in results for c in r)
            meter.completion_tokens = sum(c.completion_tokens for r in results for c in r)
        finally:
            meter.close()
            with contextlib.suppress(Exception):
                await client.close()
        return results

    # ----- continuation through /v1/completions --------------------------------------------------------------------
    def _render(self, conv: Messages) -> str:
        return self.tokenizer.apply_chat_template(conv, tokenize=False, add_generation_prompt=False,
                                                  continue_final_message=True)

    def _completions_body(self, conv: Messages, opts: GenerationOptions, index: int, stream: bool) -> dict:
        params = self._params(opts, index, fan_out=True)
        params.pop("logprobs", None), params.pop("top_logprobs", None)
        body = {**params.pop("extra_body", {}), **params, "prompt": self._render(conv)}
        if stream:
            body["stream"] = True
        return body

    def _continue(self, conv: Messages, opts: GenerationOptions, index: int) -> Completion:
        body = self._completions_body(conv, opts, index, stream=False)
        with self.translate_errors():
            response = get_session().post(self.base_url + "/completions", json=body, headers=self._headers(),
                                          timeout=self.timeout)
        if response.status_code != 200:
            raise BackendError(f"{self.name} /completions returned HTTP {response.status_code}: {response.text[:500]}")
        payload = response.json()
        choices = payload.get("choices") or []
        if not choices:
            raise BackendError(f"{self.name} /completions sent a reply without choices: {str(payload)[:300]}")
        return self._completion(choices[0], payload.get("usage"), 1, opts.stop)

    def _continue_stream(self, conv: Messages, opts: GenerationOptions) -> Iterator[tuple[str, Any]]:
        body = self._completions_body(conv, opts, 0, stream=True)
        with self.translate_errors(), get_session().stream("POST", self.base_url + "/completions", json=body,
                                                  headers=self._headers(), timeout=self.timeout) as response:
            if response.status_code != 200:
                response.read()
                raise BackendError(f"{self.name} /completions returned HTTP {response.status_code}: "
                                   f"{response.text[:500]}")
            for line in response.iter_lines():
                if not line.startswith("data:") or line.strip() == "data: [DONE]":
                    continue
                event = json.loads(line[5:])
                choice = (event.get("choices") or [{}])[0]
                yield choice.get("text") or "", event.get("usage")

    # ----- streaming -------------------------------------------------------------------------------------------------
    def _deltas(self, conv: Messages, opts: GenerationOptions) -> Iterator[tuple[str, Any]]:
        """(text delta, usage or None) pairs of one streamed sample."""
        if opts.continue_final_message:
            yield from self._continue_stream(conv, opts)
            return
        params = self._params(opts, 0, fan_out=False)
        with self.translate_errors():
            for event in self.client.chat_completion(conv, stream=True, **params):
                choices = _get(event, "choices") or []
                delta = _get(_get(choices[0], "delta"), "content") if choices else None
                yield delta or "", _get(event, "usage")

    def _stream_batch(self, conversations, opts, chunk_tokens: int, meter: CallMeter) -> Iterator[StreamChunk]:
        meter.requests = meter.samples = len(conversations)
        events: queue.Queue = queue.Queue()
        stop = threading.Event()

        def pump(row: int, conv: Messages) -> None:
            pending: list[str] = []
            deltas = self._deltas(conv, opts)
            try:
                for delta, usage in deltas:
                    if usage is not None:
                        events.put(("usage", row, usage))
                    if stop.is_set():
                        break
                    if delta:
                        pending.append(delta)
                        events.put(("delta", row, None))
                    if len(pending) >= chunk_tokens:  # one delta per token on the servers we know
                        events.put(("chunk", row, "".join(pending)))
                        pending = []
                events.put(("done", row, "".join(pending)))
            except BaseException as err:  # noqa: BLE001 - re-raised in the consuming thread
                events.put(("error", row, err))
            finally:
                deltas.close()  # closes the HTTP stream when the consumer stopped early

        with ThreadPoolExecutor(max_workers=min(self.max_concurrency, max(len(conversations), 1))) as pool:
            for row, conv in enumerate(conversations):
                pool.submit(pump, row, conv)
            open_rows, counted, reported = len(conversations), 0, 0
            try:
                while open_rows:
                    kind, row, value = events.get()
                    if kind == "error":
                        raise value
                    if kind == "delta":
                        counted += 1
                    elif kind == "usage":
                        meter.prompt_tokens += int(_get(value, "prompt_tokens") or 0)
                        reported += int(_get(value, "completion_tokens") or 0)
                    else:
                        open_rows -= kind == "done"
                        yield StreamChunk(row, value, None, kind == "done")
            finally:
                stop.set()
                meter.completion_tokens = reported or counted  # deltas when the server reports no usage

    async def astream(self, messages: Messages, **kwargs: Any):
        """Native async stream of one sample (continuations use the base's threaded stream)."""
        if kwargs.get("continue_final_message"):
            async for delta in super().astream(messages, **kwargs):
                yield delta
            return
        kwargs.pop("n", None)
        self.require("streaming", "astream")
        opts = self.resolve_options(kwargs, purpose="stream")
        (conv,) = self._prepare([messages], opts)
        meter = CallMeter(self, "stream")
        meter.requests = meter.samples = 1
        client = AsyncInferenceClient(base_url=self.base_url, api_key=self.api_key, timeout=self.timeout)
        try:
            with self.translate_errors():
                events = await client.chat_completion(conv, stream=True, **self._params(opts, 0, fan_out=False))
                async for event in events:
                    usage = _get(event, "usage")
                    if usage is not None:
                        meter.prompt_tokens = int(_get(usage, "prompt_tokens") or 0)
                        meter.completion_tokens = int(_get(usage, "completion_tokens") or 0)
                    choices = _get(event, "choices") or []
                    delta = _get(_get(choices[0], "delta"), "content") if choices else None
                    if delta:
                        meter.first_text()
                        yield delta
        finally:
            meter.close()
            with contextlib.suppress(Exception):
                await client.close()
