"""Tools and the in-flight tool runtime of the speculative agents: `Tool(name, fn, safe, schema)`, calls with
dependencies (`$K` arguments), revisions, cascading cancellation, held unsafe calls released only by `commit()`; and
`VirtualClockLoop`, an asyncio loop whose clock jumps to the next timer (tests and data synthesis run episodes of
many simulated seconds in milliseconds, deterministically).

Safe tools are read-only and may run speculatively (cancelling one just drops its result). Unsafe tools have side
effects: they are held until the agent commits, and once started they are never cancelled nor revised - a request to
do so is rejected and recorded. A tool that raises is a failed call whose error text the model sees; the run goes on.
"""

from __future__ import annotations

import asyncio
import inspect
import selectors
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from hf_fastslow.generation.agent_grammar import REFERENCE, ToolCallAction

__all__ = [
    "CallStatus",
    "InlineStream",
    "Tool",
    "ToolCallState",
    "ToolEvent",
    "ToolRuntime",
    "VirtualClockLoop",
    "run_virtual",
]


@dataclass(frozen=True)
class Tool:
    """A tool the model may call. `fn(**arguments)` (sync: run in a worker thread; async: awaited) returns the result
    (sent to the model as text). `safe=True` marks it read-only (runs speculatively); `schema` is an OpenAI-style
    function schema `{"description": ..., "parameters": {"properties": {...}, "required": [...]}}` used to check
    arguments before a call runs and to describe the tool in the prompt."""

    name: str
    fn: Callable[..., Any]
    safe: bool
    schema: dict | None = None

    def check(self, arguments: dict) -> str | None:
        """Why these arguments cannot be passed (None when they can)."""
        params = (self.schema or {}).get("parameters") or {}
        properties = params.get("properties")
        missing = [k for k in params.get("required", []) if k not in arguments]
        if missing:
            return f"{self.name}: missing argument(s) {', '.join(missing)}"
        if properties is not None:
            unknown = [k for k in arguments if k not in properties]
            if unknown:
                return f"{self.name}: unknown argument(s) {', '.join(unknown)}"
        return None

    def prompt_line(self) -> str:
        params = ((self.schema or {}).get("parameters") or {}).get("properties") or {}
        described = (self.schema or {}).get("description", "")
        kind = "safe" if self.safe else "unsafe: runs only after the user is done"
        return f"- {self.name}({', '.join(params)}) [{kind}]: {described}".rstrip(": ")


class CallStatus(str, Enum):
    WAITING = "waiting"  # its dependencies' results are not in yet
    HELD = "held"  # unsafe and not committed
    RUNNING = "running"
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"


LIVE = (CallStatus.WAITING, CallStatus.HELD, CallStatus.RUNNING, CallStatus.DONE, CallStatus.FAILED)


@dataclass
class ToolCallState:
    call_id: int
    name: str
    arguments: dict
    safe: bool
    version: int = 1
    status: CallStatus = CallStatus.WAITING
    committed: bool = False
    started: bool = False  # this version started executing
    result: str | None = None
    issued_t: float = 0.0
    task: asyncio.Task | None = field(default=None, repr=False)

    @property
    def deps(self) -> frozenset[int]:
        return ToolCallAction(self.call_id, self.name, self.arguments).deps


@dataclass(frozen=True)
class ToolEvent:
    """kind: "held", "started", "finished", "failed", "cancelled", "committed", "rejected" (a request not carried
    out: unknown tool, bad arguments, cycle, id reuse, touching a started unsafe call...)."""

    t: float
    kind: str
    call_id: int | None
    name: str = ""
    safe: bool = True
    detail: str = ""


class ToolRuntime:
    """The calls of one episode. `emit(event)` receives every ToolEvent; `on_settled(call)` is called when a call's
    result (or error) is in. Everything runs on the caller's event loop."""

    def __init__(self, tools: list[Tool], emit: Callable[[ToolEvent], None],
                 on_settled: Callable[[ToolCallState], None] | None = None):
        names = [t.name for t in tools]
        if len(set(names)) != len(names):
            raise ValueError(f"tool names must be unique, got {names}")
        self.tools = {t.name: t for t in tools}
        self.calls: dict[int, ToolCallState] = {}
        self._emit = emit
        self._on_settled = on_settled or (lambda call: None)
        self.wasted = 0  # executions started and then cancelled or superseded

    @staticmethod
    def now() -> float:
        return asyncio.get_running_loop().time()

    def _event(self, kind: str, call: ToolCallState | None, detail: str = "", call_id: int | None = None) -> None:
        if call is None:
            self._emit(ToolEvent(self.now(), kind, call_id, detail=detail))
        else:
            self._emit(ToolEvent(self.now(), kind, call.call_id, call.name, call.safe, detail))

    def reject(self, call_id: int | None, detail: str) -> str:
        self._event("rejected", None, detail, call_id)
        return detail

    @property
    def max_id(self) -> int:
        return max(self.calls, default=0)

    def live(self) -> list[ToolCallState]:
        return [c for _, c in sorted(self.calls.items()) if c.status in LIVE]

    def busy(self) -> bool:
        """A result will arrive without the model acting (a call runs; calls waiting on it start when it settles, and
        calls waiting only on held unsafe calls make no progress until the model commits)."""
        return any(c.status is CallStatus.RUNNING for c in self.calls.values())

    # ---- requests from the model ---------------------------------------------------------------------------------
    def submit(self, action: ToolCallAction) -> str | None:
        """Issue or revise a call; returns why it was rejected (None when accepted)."""
        tool = self.tools.get(action.name)
        if tool is None:
            return self.reject(action.call_id, f"unknown tool {action.name!r} (tools: {', '.join(self.tools)})")
        problem = tool.check(action.arguments)
        if problem:
            return self.reject(action.call_id, problem)
        deps = action.deps
        for dep in sorted(deps):
            if dep not in self.calls or self.calls[dep].status is CallStatus.CANCELLED:
                return self.reject(action.call_id, f"call {action.call_id} uses ${dep}, which is not a live call")
        if action.call_id in deps or any(action.call_id in self._ancestors(d) for d in deps):
            return self.reject(action.call_id, f"call {action.call_id}: cyclic dependency")
        old = self.calls.get(action.call_id)
        if old is not None:
            if old.status is CallStatus.CANCELLED:
                return self.reject(action.call_id, f"id {action.call_id} was cancelled; use a new id")
            if not old.safe and old.started:
                return self.reject(action.call_id, f"call {action.call_id} ({old.name}) is unsafe and already ran")
            if old.name == action.name and old.arguments == action.arguments:
                return None  # the same call again: nothing to do
            self._cancel_dependents(old.call_id, f"call {old.call_id} revised")
            self._stop(old, "revised")
            call = ToolCallState(action.call_id, action.name, dict(action.arguments), tool.safe, old.version + 1,
                                 committed=old.committed, issued_t=self.now())
        else:
            call = ToolCallState(action.call_id, action.name, dict(action.arguments), tool.safe, issued_t=self.now())
        self.calls[call.call_id] = call
        self._schedule(call)
        return None

    def remove(self, call_id: int) -> str | None:
        call = self.calls.get(call_id)
        if call is None:
            return self.reject(call_id, f"REMOVE {call_id}: no such call")
        if call.status is CallStatus.CANCELLED:
            return self.reject(call_id, f"REMOVE {call_id}: already cancelled")
        if not call.safe and call.started:
            return self.reject(call_id, f"REMOVE {call_id}: unsafe call already ran")
        self.cancel(call_id, "removed")
        return None

    def commit(self) -> list[int]:
        """Release every held unsafe call (in id order); returns their ids."""
        ids = [c.call_id for c in self.live() if not c.safe and not c.committed]
        for call_id in ids:
            self.calls[call_id].committed = True
        self._event("committed", None, ",".join(map(str, ids)))
        for call_id in ids:
            self._schedule(self.calls[call_id])
        return ids

    # ---- cancellation --------------------------------------------------------------------------------------------
    def _ancestors(self, call_id: int) -> set[int]:
        seen, todo = set(), [call_id]
        while todo:
            call = self.calls.get(todo.pop())
            for dep in call.deps if call else ():
                if dep not in seen:
                    seen.add(dep)
                    todo.append(dep)
        return seen

    def dependents(self, call_id: int) -> list[int]:
        """Live calls that use `call_id`'s result, directly or through others (transitively)."""
        return [c.call_id for c in self.live() if call_id in self._ancestors(c.call_id)]

    def _stop(self, call: ToolCallState, reason: str) -> None:
        if call.started:
            self.wasted += 1
        if call.task is not None and not call.task.done():
            call.task.cancel()
        call.status = CallStatus.CANCELLED
        self._event("cancelled", call, reason)

    def _cancel_dependents(self, call_id: int, reason: str) -> None:
        for dep_id in self.dependents(call_id):
            dependent = self.calls[dep_id]
            if not dependent.safe and dependent.started:
                self._event("rejected", dependent, f"{reason}, but unsafe call {dep_id} already ran: its effects stay")
            else:
                self._stop(dependent, reason)

    def cancel(self, call_id: int, reason: str) -> None:
        """Cancel a call and, in cascade, every live call depending on it."""
        self._cancel_dependents(call_id, f"{reason} (depends on {call_id})")
        self._stop(self.calls[call_id], reason)

    def cancel_all(self, reason: str) -> None:
        """Episode end: stop what still runs or waits; held unsafe calls are discarded (never committed)."""
        for call in self.live():
            if call.status in (CallStatus.WAITING, CallStatus.RUNNING, CallStatus.HELD):
                self._stop(call, reason if call.status is not CallStatus.HELD else "never committed")

    # ---- execution -----------------------------------------------------------------------------------------------
    def _schedule(self, call: ToolCallState) -> None:
        if call.status not in (CallStatus.WAITING, CallStatus.HELD):
            return
        if not call.safe and not call.committed:
            if call.status is not CallStatus.HELD:
                call.status = CallStatus.HELD
                self._event("held", call)
            return
        deps = [self.calls[d] for d in sorted(call.deps)]
        failed = [d.call_id for d in deps if d.status is CallStatus.FAILED]
        if failed:
            self._settle(call, CallStatus.FAILED, f"error: dependency {failed[0]} failed")
            return
        call.status = CallStatus.WAITING
        if all(d.status is CallStatus.DONE for d in deps):
            arguments = substitute(call.arguments, {d.call_id: d.result for d in deps})
            call.status, call.started = CallStatus.RUNNING, True
            self._event("started", call, repr(arguments))
            call.task = asyncio.get_running_loop().create_task(self._execute(call, call.version, arguments))

    async def _execute(self, call: ToolCallState, version: int, arguments: dict) -> None:
        fn = self.tools[call.name].fn
        try:
            if inspect.iscoroutinefunction(fn):
                value = await fn(**arguments)
            else:
                value = await asyncio.to_thread(fn, **arguments)
        except asyncio.CancelledError:
            raise
        except Exception as err:  # a tool that raises is reported to the model; the run goes on
            if call.version == version and call.status is CallStatus.RUNNING:
                self._settle(call, CallStatus.FAILED, f"error: {type(err).__name__}: {err}")
            return
        if call.version == version and call.status is CallStatus.RUNNING:
            self._settle(call, CallStatus.DONE, str(value))

    def _settle(self, call: ToolCallState, status: CallStatus, result: str) -> None:
        call.status, call.result = status, result
        self._event("finished" if status is CallStatus.DONE else "failed", call, result)
        self._on_settled(call)
        for other in self.live():
            if call.call_id in other.deps:
                self._schedule(other)


def substitute(arguments: Any, results: dict[int, str]) -> Any:
    """`$K` in string arguments replaced by call K's result (a whole-string `$K` becomes the result itself)."""
    if isinstance(arguments, str):
        return REFERENCE.sub(lambda m: str(results[int(m.group(1))]), arguments)
    if isinstance(arguments, dict):
        return {k: substitute(v, results) for k, v in arguments.items()}
    if isinstance(arguments, list):
        return [substitute(v, results) for v in arguments]
    return arguments


# --------------------------------------------------------------------------------------------------------------------
# A virtual clock for tests and data synthesis
# --------------------------------------------------------------------------------------------------------------------
class _JumpingSelector(selectors.BaseSelector):
    """Real I/O readiness first; when the loop would sleep until a timer, jump the loop's clock there instead."""

    def __init__(self) -> None:
        self._inner = selectors.DefaultSelector()
        self.loop: VirtualClockLoop | None = None

    def register(self, fileobj, events, data=None):
        return self._inner.register(fileobj, events, data)

    def unregister(self, fileobj):
        return self._inner.unregister(fileobj)

    def modify(self, fileobj, events, data=None):
        return self._inner.modify(fileobj, events, data)

    def get_map(self):
        return self._inner.get_map()

    def close(self):
        self._inner.close()

    def select(self, timeout=None):
        ready = self._inner.select(0)
        if ready or timeout == 0:
            return ready
        if timeout is None or self.loop.threads_in_flight:
            # Only real I/O can wake the loop, or a worker thread is busy: its work takes no virtual time, so the
            # clock waits for it (deterministic order of thread results and timers).
            return self._inner.select(None)
        self.loop.advance(timeout)
        return []


class VirtualClockLoop(asyncio.SelectorEventLoop):
    """`loop.time()` is virtual: `asyncio.sleep(5)` returns at once with the clock 5 s later, in timer order. Work in
    worker threads (`run_in_executor`, `asyncio.to_thread`) takes zero virtual time: the clock stands still until it
    is done."""

    def __init__(self) -> None:
        selector = _JumpingSelector()
        super().__init__(selector)
        selector.loop = self
        self._virtual_now = 0.0
        self.threads_in_flight = 0

    def run_in_executor(self, executor, func, *args):
        future = super().run_in_executor(executor, func, *args)
        self.threads_in_flight += 1

        def done(_):
            self.threads_in_flight -= 1

        future.add_done_callback(done)
        return future

    def time(self) -> float:
        return self._virtual_now

    def advance(self, seconds: float) -> None:
        self._virtual_now += max(0.0, seconds)


def run_virtual(coro):
    """Run a coroutine to completion on a fresh `VirtualClockLoop` (no real sleeping)."""
    loop = VirtualClockLoop()
    try:
        return loop.run_until_complete(coro)
    finally:
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


class InlineStream:
    """An async view of a backend whose sync `stream` never blocks (e.g. `ScriptedBackend` without delays): deltas
    are produced on the event loop itself, `seconds_per_delta` of loop time apart - under `VirtualClockLoop` a
    deterministic simulated generation speed. Every other attribute is the wrapped backend's."""

    def __init__(self, backend, seconds_per_delta: float = 0.0):
        self.backend = backend
        self.seconds_per_delta = seconds_per_delta

    def __getattr__(self, name):
        return getattr(self.backend, name)

    async def astream(self, messages, **kwargs):
        deltas = self.backend.stream(messages, **kwargs)
        try:
            for delta in deltas:
                await asyncio.sleep(self.seconds_per_delta)
                yield delta
        finally:
            deltas.close()
