"""`ReplicaRouter`: one `Backend` over several replicas of the same model (OpenAI-compatible servers such as
`transformers serve`, vLLM, SGLang, TGI, or any other `Backend`), so a pipeline written against one backend keeps
working when a server dies.

Routing: each conversation of a `chat_batch` is one unit of work, sent to a replica picked by the policy
(`"round_robin"`, or `"least_loaded"`: fewest requests in flight, ties in round-robin order) and run concurrently
with the others (at most `max_concurrency` in flight). A stream (`stream_batch`) and a `score` call go to one replica
as a whole.

Failures: a transport failure (`BackendUnreachableError`, a connection error or timeout, an HTTP 5xx) is retried on
another replica at once; when every replica still in rotation has failed this request, the router sleeps an
exponential backoff (`backoff_s * backoff_factor**k`, at most `max_backoff_s`) and tries again, up to `max_attempts`
attempts. Any other error (an HTTP 4xx, a missing feature, a bad argument) is the caller's and is raised unchanged. A
replica with `remove_after` consecutive failures is taken out of rotation with the reason recorded (logged as a
warning and kept in `report()`); with `cooldown_s` it gets one trial request after that many seconds and comes back
if it answers. A stream fails over only before its first chunk: chunks already handed to the caller cannot be
replayed on another replica.

Nothing is lost: every conversation is answered, or the call raises `ReplicasUnavailableError` carrying the rows that
were answered (`.results`, None for the others), what each failed row's attempts met (`.failures`) and every
replica's state (`.replicas`). The router's `ledger` holds one record per router call (`requests` counts the
attempts sent to replicas, retries included); each replica keeps its own ledger.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

from .base import (
    _OPTION_NAMES,
    Backend,
    BackendError,
    BackendFeatureError,
    BackendUnreachableError,
    CallMeter,
    Capabilities,
    Completion,
    GenerationOptions,
    Messages,
    StreamChunk,
)
from .testing import SystemClock

__all__ = ["POLICIES", "ReplicaRouter", "ReplicaStatus", "ReplicasUnavailableError", "RouterStats",
           "is_transport_failure"]

logger = logging.getLogger(__name__)

POLICIES = ("round_robin", "least_loaded")
_HTTP_STATUS = re.compile(r"\bHTTP (\d{3})\b")


def _http_status(err: BaseException) -> int | None:
    status = getattr(getattr(err.__cause__, "response", None), "status_code", None)
    if isinstance(status, int):
        return status
    match = _HTTP_STATUS.search(str(err))
    return int(match.group(1)) if match else None


def is_transport_failure(err: BaseException) -> bool:
    """Whether `err` says the replica (not the request) failed: unreachable, connection error, timeout, HTTP 5xx."""
    if isinstance(err, BackendFeatureError):
        return False
    if isinstance(err, (BackendUnreachableError, ConnectionError, TimeoutError)):
        return True
    if isinstance(err, BackendError):
        status = _http_status(err)
        return status is not None and status >= 500
    return False


def replica_model_name(backend: Backend) -> str | None:
    """The model a replica serves: an endpoint's `model` field, a local model's `name_or_path`, else None."""
    model = getattr(backend, "model", None)
    if isinstance(model, str):
        return model
    name = getattr(model, "name_or_path", None)
    return name if isinstance(name, str) and name else None


@dataclass
class ReplicaStatus:
    """One replica's state. `requests` counts attempts routed to it (retries included), `failures` all failed ones,
    `consecutive_failures` those since its last answer; `reason` is why it was last taken out of rotation."""

    name: str
    model: str | None
    requests: int = 0
    answered: int = 0
    failures: int = 0
    consecutive_failures: int = 0
    in_flight: int = 0
    removed: bool = False
    reason: str | None = None
    removed_at: float | None = None
    readmitted: int = 0
    last_error: str | None = None


@dataclass
class RouterStats:
    """Counts over the router's life: units of work (`requests`: one per conversation, stream or score call),
    `answered`, `failed` (raised or reported), `attempts` sent to replicas, `retries` (attempts after a unit's first),
    `failovers` (units answered by another replica than the one first picked) and `backoffs` (sleeps)."""

    requests: int = 0
    answered: int = 0
    failed: int = 0
    attempts: int = 0
    retries: int = 0
    failovers: int = 0
    backoffs: int = 0
    backoff_seconds: float = 0.0


class ReplicasUnavailableError(BackendUnreachableError):
    """Some requests could not be answered by any replica. `.results`: one entry per conversation (its completions,
    or None when it failed); `.failures`: {row: [(replica, reason), ...]} of the failed rows' attempts; `.replicas`:
    the routers' `report()` at that moment."""

    def __init__(self, message: str, *, results: list | None = None,
                 failures: dict[int, list[tuple[str, str]]] | None = None, replicas: list[ReplicaStatus] = ()):
        super().__init__(message)
        self.results = results
        self.failures = failures or {}
        self.replicas = list(replicas)


class _Replica:
    def __init__(self, backend: Backend, status: ReplicaStatus):
        self.backend = backend
        self.status = status
        self.on_trial = False


@dataclass
class _Attempts:
    """What one unit of work met: [(replica name, reason)] and the replica first picked."""

    tried: list[tuple[str, str]] = field(default_factory=list)
    first: str | None = None


class ReplicaRouter(Backend):
    """`ReplicaRouter(replicas, *, model=None, policy="round_robin", max_attempts=None, remove_after=2,
    cooldown_s=None, backoff_s=0.5, backoff_factor=2.0, max_backoff_s=8.0, max_concurrency=8,
    allow_mixed_models=False, replica_kwargs=None, clock=None, retry_on=is_transport_failure, system=None,
    name=None, **generation_defaults)`.

    `replicas`: `Backend` instances, base URLs (each becomes `EndpointBackend(url, model, **replica_kwargs)`) or
    `LocalServer`s (`server.backend(**replica_kwargs)`). `max_attempts` per unit of work defaults to three times the
    number of replicas. `clock` (anything with `time()` and `sleep(s)`, e.g. `ManualClock`) times the backoff, the
    cool-down and the ledger. `generation_defaults` take the backend options only (max_new_tokens, temperature,
    ...); set backend-specific ones on the replicas.
    """

    def __init__(self, replicas: Sequence[Backend | str | Any], *, model: str | None = None,
                 policy: str = "round_robin", max_attempts: int | None = None, remove_after: int = 2,
                 cooldown_s: float | None = None, backoff_s: float = 0.5, backoff_factor: float = 2.0,
                 max_backoff_s: float = 8.0, max_concurrency: int = 8, allow_mixed_models: bool = False,
                 replica_kwargs: dict[str, Any] | None = None, clock: Any = None,
                 retry_on: Callable[[BaseException], bool] = is_transport_failure, system: str | None = None,
                 name: str | None = None, **generation_defaults: Any):
        unknown = set(generation_defaults) - _OPTION_NAMES
        if unknown:
            raise TypeError(f"ReplicaRouter takes only the backend options as generation defaults, got "
                            f"{sorted(unknown)}; set backend-specific defaults on the replicas (replica_kwargs=).")
        super().__init__(system=system, **generation_defaults)
        if isinstance(replicas, (str, Backend)) or not replicas:
            raise ValueError("ReplicaRouter needs a non-empty list of replicas (Backend instances, base URLs such as "
                             "'http://127.0.0.1:8000/v1' with model=, or LocalServers).")
        if policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}.")
        for label, value, low in (("remove_after", remove_after, 1), ("max_concurrency", max_concurrency, 1),
                                  ("backoff_factor", backoff_factor, 1), ("backoff_s", backoff_s, 0),
                                  ("max_backoff_s", max_backoff_s, 0)):
            if value < low:
                raise ValueError(f"{label} must be >= {low}, got {value}.")
        if cooldown_s is not None and cooldown_s < 0:
            raise ValueError(f"cooldown_s must be >= 0 or None, got {cooldown_s}.")
        if replica_kwargs and all(isinstance(r, Backend) for r in replicas):
            raise ValueError("replica_kwargs= configure the backends built from URLs or LocalServers; every replica "
                             "here is already a Backend: configure those directly.")
        backends = [self._as_backend(r, model, dict(replica_kwargs or {})) for r in replicas]
        models = {m for m in map(replica_model_name, backends) if m is not None}
        if model is not None and not allow_mixed_models and models - {model}:
            raise ValueError(f"model={model!r} but the replicas serve {sorted(models)}; pass allow_mixed_models=True "
                             f"to route across different models.")
        if len(models) > 1 and not allow_mixed_models:
            raise ValueError(f"The replicas serve different models {sorted(models)}: a router spreads requests as if "
                             f"any replica gives the same answer. Pass allow_mixed_models=True if that is intended.")
        self.model = model if model is not None else (next(iter(models)) if len(models) == 1 else None)
        names = [b.name for b in backends]
        self._replicas = [
            _Replica(b, ReplicaStatus(name=b.name if names.count(b.name) == 1 else f"{b.name}#{i}",
                                      model=replica_model_name(b)))
            for i, b in enumerate(backends)
        ]
        self.policy = policy
        self.max_attempts = max_attempts if max_attempts is not None else 3 * len(backends)
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}.")
        self.remove_after, self.cooldown_s = remove_after, cooldown_s
        self.backoff_s, self.backoff_factor, self.max_backoff_s = backoff_s, backoff_factor, max_backoff_s
        self.max_concurrency = max_concurrency
        self.retry_on = retry_on
        self.clock = clock or SystemClock()
        self.stats = RouterStats()
        self.events: list[tuple[float, str, str, str]] = []  # (time, replica, "removed" | "readmitted", reason)
        self.name = name or f"ReplicaRouter({len(backends)} replicas, {policy})"
        self._lock = threading.Lock()
        self._next = 0

    @staticmethod
    def _as_backend(replica: Any, model: str | None, kwargs: dict[str, Any]) -> Backend:
        if isinstance(replica, Backend):
            return replica
        if isinstance(replica, str):
            if model is None:
                raise ValueError(f"Replica {replica!r} is a URL: pass model= (the model name to send).")
            from .endpoint import EndpointBackend

            return EndpointBackend(replica, model, **kwargs)
        if callable(getattr(replica, "backend", None)) and hasattr(replica, "base_url"):  # a LocalServer
            if getattr(replica, "pid", 0) is None:
                raise ValueError(f"{replica!r} is not running: start() it (or use it as a context manager) first.")
            return replica.backend(**kwargs)
        raise TypeError(f"A replica is a Backend, a base URL or a LocalServer, got {type(replica).__name__}.")

    # ----- state ---------------------------------------------------------------------------------------------------
    @property
    def replicas(self) -> list[Backend]:
        return [r.backend for r in self._replicas]

    def report(self) -> list[ReplicaStatus]:
        """A snapshot of every replica's state (requests, answers, failures, in flight, removed and why)."""
        with self._lock:
            return [replace(r.status) for r in self._replicas]

    def healthy(self) -> list[str]:
        """Names of the replicas in rotation."""
        with self._lock:
            return [r.status.name for r in self._replicas if not r.status.removed]

    def summary(self) -> str:
        """The report as a text table, then the router's counts."""
        rows = [f"{'replica':<44} {'requests':>8} {'answered':>8} {'failures':>8}  state"]
        for s in self.report():
            state = f"removed: {s.reason}" if s.removed else "in rotation"
            if s.readmitted:
                state += f" (readmitted {s.readmitted}x)"
            rows.append(f"{s.name[:44]:<44} {s.requests:>8} {s.answered:>8} {s.failures:>8}  {state[:200]}")
        st = self.stats
        rows.append(f"router: {st.requests} requests, {st.answered} answered, {st.failed} failed, {st.attempts} "
                    f"attempts ({st.retries} retries, {st.failovers} failovers, {st.backoffs} backoffs)")
        return "\n".join(rows)

    def _describe_all(self) -> str:
        parts = []
        for s in self.report():
            if s.removed:
                parts.append(f"{s.name}: out of rotation ({s.reason})")
            else:
                parts.append(f"{s.name}: in rotation, last error {s.last_error or 'none'}")
        return "; ".join(parts)

    # ----- picking and bookkeeping ---------------------------------------------------------------------------------
    def _pick(self, exclude: set[str]) -> _Replica | None:
        """The next replica for an attempt (None: every replica in rotation is excluded or out of rotation)."""
        with self._lock:
            now = self.clock.time()
            if self.cooldown_s is not None:
                for r in self._replicas:  # a removed replica whose cool-down is over gets one trial request
                    s = r.status
                    if (s.removed and not r.on_trial and s.name not in exclude
                            and now - s.removed_at >= self.cooldown_s):
                        r.on_trial = True
                        return self._start(r)
            k = len(self._replicas)
            order = [self._replicas[(self._next + j) % k] for j in range(k)]
            candidates = [r for r in order if not r.status.removed and r.status.name not in exclude]
            if not candidates:
                return None
            if self.policy == "round_robin":
                chosen = candidates[0]
            else:  # least_loaded; min keeps the first of equals, so ties go in round-robin order
                chosen = min(candidates, key=lambda r: r.status.in_flight)
            self._next = (self._replicas.index(chosen) + 1) % k
            return self._start(chosen)

    def _start(self, r: _Replica) -> _Replica:
        r.status.requests += 1
        r.status.in_flight += 1
        self.stats.attempts += 1
        return r

    def _succeeded(self, r: _Replica, *, answered: bool = True) -> None:
        """The replica answered (or, `answered=False`, refused the request itself: alive all the same)."""
        with self._lock:
            s = r.status
            s.in_flight -= 1
            s.answered += answered
            s.consecutive_failures = 0
            if r.on_trial:
                r.on_trial = False
                if s.removed:
                    s.removed, s.readmitted = False, s.readmitted + 1
                    self.events.append((self.clock.time(), s.name, "readmitted", "answered a trial request"))
                    logger.warning("%s: replica %s answered after its cool-down; back in rotation", self.name, s.name)

    def _failed(self, r: _Replica, err: BaseException, *, in_flight: bool = True) -> str:
        """Count a transport failure of `r`; take it out of rotation after `remove_after` in a row (or a failed
        trial). Returns the reason as recorded."""
        reason = f"{type(err).__name__}: {err}"[:500]
        with self._lock:
            s = r.status
            s.in_flight -= in_flight
            s.failures += 1
            s.consecutive_failures += 1
            s.last_error = reason
            trial, r.on_trial = r.on_trial, False
            if trial or (not s.removed and s.consecutive_failures >= self.remove_after):
                why = "failed its trial request after the cool-down" if trial else \
                    f"{s.consecutive_failures} consecutive failure" + "s" * (s.consecutive_failures != 1)
                s.removed, s.removed_at = True, self.clock.time()
                s.reason = f"{why}; last: {reason}"
                self.events.append((s.removed_at, s.name, "removed", s.reason))
                logger.warning("%s: replica %s taken out of rotation (%s)", self.name, s.name, s.reason)
        return reason

    def _attempt_failed(self, r: _Replica, err: BaseException, attempts: _Attempts) -> bool:
        """Book a failed attempt; True when it may be retried elsewhere (a transport failure)."""
        if self.retry_on(err):
            attempts.tried.append((r.status.name, self._failed(r, err)))
            return True
        self._succeeded(r, answered=False)
        attempts.tried.append((r.status.name, f"{type(err).__name__}: {err}"[:500]))
        return False

    def _backoff(self, round_index: int) -> None:
        delay = min(self.max_backoff_s, self.backoff_s * self.backoff_factor ** round_index)
        with self._lock:
            self.stats.backoffs += 1
            self.stats.backoff_seconds += delay
        self.clock.sleep(delay)

    def _next_replica(self, attempts: _Attempts, rounds: list[int]) -> _Replica:
        """The replica for the next attempt of a unit of work: one not yet tried in this round; when every replica
        in rotation has failed this round, back off and start a new one. Counts retries."""
        if len(attempts.tried) >= self.max_attempts:
            raise ReplicasUnavailableError(
                f"{self.name}: gave up after {len(attempts.tried)} attempts (max_attempts={self.max_attempts}): "
                f"{self._attempt_list(attempts)}", replicas=self.report())
        tried = {name for name, _ in attempts.tried[rounds[-1]:]}
        r = self._pick(tried)
        if r is None and tried and self.healthy():
            self._backoff(len(rounds) - 1)
            rounds.append(len(attempts.tried))
            r = self._pick(set())
        if r is None:
            raise ReplicasUnavailableError(
                f"{self.name}: no replica left to try ({self._attempt_list(attempts) or 'no attempt made'}); "
                f"replicas: {self._describe_all()}", replicas=self.report())
        with self._lock:
            if attempts.first is None:
                attempts.first = r.status.name
            else:
                self.stats.retries += 1
        return r

    def _done(self, r: _Replica, attempts: _Attempts) -> None:
        with self._lock:
            self.stats.answered += 1
            self.stats.failovers += r.status.name != attempts.first

    def _count_failed(self) -> None:
        with self._lock:
            self.stats.failed += 1

    def _run(self, call: Callable[[Backend], Any], attempts: _Attempts) -> Any:
        """Run one unit of work with retries, failover and backoff; raise what the caller must see."""
        with self._lock:
            self.stats.requests += 1
        rounds = [0]  # where in attempts.tried each round began
        try:
            while True:
                r = self._next_replica(attempts, rounds)
                try:
                    out = call(r.backend)
                except Exception as err:
                    if self._attempt_failed(r, err, attempts):
                        continue
                    raise
                self._succeeded(r)
                self._done(r, attempts)
                return out
        except BaseException:
            self._count_failed()
            raise

    @staticmethod
    def _attempt_list(attempts: _Attempts) -> str:
        return "; ".join(f"{name}: {reason}" for name, reason in attempts.tried)

    # ----- the Backend hooks ---------------------------------------------------------------------------------------
    @property
    def capabilities(self) -> Capabilities:
        """What every replica in rotation can do (a replica whose capability probe fails counts a failure)."""
        shared: list[Capabilities] = []
        for r in list(self._replicas):
            if r.status.removed:
                continue
            try:
                shared.append(r.backend.capabilities)
            except Exception as err:
                if not self.retry_on(err):
                    raise
                self._failed(r, err, in_flight=False)
        if not shared:
            raise ReplicasUnavailableError(f"{self.name}: no replica in rotation can report its capabilities: "
                                           f"{self._describe_all()}", replicas=self.report())
        return Capabilities(
            native_n=all(c.native_n for c in shared), logprobs=all(c.logprobs for c in shared),
            max_top_logprobs=min(c.max_top_logprobs for c in shared), streaming=all(c.streaming for c in shared),
            continue_final_message=all(c.continue_final_message for c in shared),
            prompt_scoring=all(c.prompt_scoring for c in shared), seed=all(c.seed for c in shared),
        )

    def feature_hint(self, feature: str) -> str:
        return "the router offers what every replica in rotation supports: route only replicas that support it"

    def _now(self) -> float:
        return self.clock.time()

    @staticmethod
    def _options(opts: GenerationOptions) -> dict[str, Any]:
        return dict(max_new_tokens=opts.max_new_tokens, temperature=opts.temperature, top_p=opts.top_p,
                    seed=opts.seed, logprobs=opts.logprobs, top_logprobs=opts.top_logprobs, stop=opts.stop,
                    continue_final_message=opts.continue_final_message)

    def _chat_batch(self, conversations: list[Messages], opts: GenerationOptions,
                    meter: CallMeter) -> list[list[Completion]]:
        kwargs = {**self._options(opts), "n": opts.n}
        attempts = [_Attempts() for _ in conversations]
        outcomes: list[Any] = [None] * len(conversations)

        def one(row: int) -> None:
            try:
                outcomes[row] = self._run(lambda b: b.chat_batch([conversations[row]], **kwargs)[0], attempts[row])
            except Exception as err:  # noqa: BLE001 - collected, raised below once every row has finished
                outcomes[row] = err

        workers = min(self.max_concurrency, len(conversations))
        if workers <= 1:
            for row in range(len(conversations)):
                one(row)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(one, range(len(conversations))))
        meter.requests = sum(len(a.tried) + (not isinstance(o, Exception)) for a, o in zip(attempts, outcomes))
        errors = {row: o for row, o in enumerate(outcomes) if isinstance(o, Exception)}
        for err in errors.values():
            if not isinstance(err, ReplicasUnavailableError):
                raise err  # the caller's error (bad request, missing feature): unchanged
        if errors:
            results = [None if row in errors else o for row, o in enumerate(outcomes)]
            failures = {row: attempts[row].tried for row in errors}
            rows = "; ".join(f"row {row}: {str(err)[:1000]}" for row, err in list(errors.items())[:3])
            raise ReplicasUnavailableError(
                f"{self.name}: {len(errors)} of {len(conversations)} conversations could not be answered (rows "
                f"{sorted(errors)[:20]}), the others are in .results. {rows}",
                results=results, failures=failures, replicas=self.report())
        return outcomes

    def _stream_batch(self, conversations: list[Messages], opts: GenerationOptions, chunk_tokens: int,
                      meter: CallMeter) -> Iterator[StreamChunk]:
        kwargs = self._options(opts)
        attempts = _Attempts()
        rounds = [0]
        with self._lock:
            self.stats.requests += 1
        while True:
            try:
                r = self._next_replica(attempts, rounds)
            except ReplicasUnavailableError:
                self._count_failed()
                raise
            meter.requests += 1
            mark = r.backend.ledger.mark()
            started = False
            chunks = None
            try:
                chunks = r.backend.stream_batch(conversations, chunk_tokens=chunk_tokens, **kwargs)
                for chunk in chunks:
                    started = True
                    yield chunk
            except Exception as err:
                if self._attempt_failed(r, err, attempts) and not started:
                    continue  # nothing reached the caller yet: fail over
                self._count_failed()
                if self.retry_on(err):
                    raise BackendUnreachableError(
                        f"{self.name}: replica {r.status.name} failed after the stream had started; chunks already "
                        f"handed out cannot be replayed on another replica, call again ({err})") from err
                raise
            except BaseException:  # the consumer closed the stream early (GeneratorExit): not the replica's fault
                self._succeeded(r)
                self._done(r, attempts)
                raise
            finally:
                if chunks is not None:
                    chunks.close()
                    self._copy_tokens(r.backend, mark, meter)
            meter.samples = len(conversations)
            self._succeeded(r)
            self._done(r, attempts)
            return

    @staticmethod
    def _copy_tokens(backend: Backend, mark: int, meter: CallMeter) -> None:
        # the replica's record of this stream was written when it closed, in this thread; when several streams
        # share one replica at once the records cannot be told apart, and the router leaves the counts unset
        records = [rec for rec in backend.ledger.records[mark:] if rec.kind == "stream"]
        if len(records) == 1:
            meter.prompt_tokens += records[0].prompt_tokens
            meter.completion_tokens += records[0].completion_tokens

    def _score(self, messages: Messages, continuation: str, meter: CallMeter) -> list[float]:
        attempts = _Attempts()
        try:
            scores = self._run(lambda b: b.score(messages, continuation), attempts)
        finally:
            meter.requests = len(attempts.tried)
        meter.requests += 1
        meter.samples = 1
        return scores
