"""Speculative interaction agents (Hooper et al., arXiv 2605.13360): an asyncio runtime that keeps the
reason-and-act loop running while the user is still typing and while tools are in flight, beside the sequential
ReAct baseline that waits for the whole utterance and blocks on every tool. Both drive any backend of
`hf_fastslow.backends` through `astream` (local model or OpenAI-compatible server) with the same tools, the same
grammar (`agent_grammar`) and the same tool runtime (`agent_tools`).

`SpeculativeAgent`: every user chunk and every tool result wakes the model (events arriving during a turn are
coalesced into the next one; `interrupt=True` abandons a turn that has not acted yet). Safe tools run at once;
unsafe tools are held until the commit point: the final user chunk has arrived AND the model then issues a call with
an id larger than any before, or `<pause>`. Re-issuing an id with new arguments revises the call, `REMOVE` withdraws
it, both cancel the calls depending on it in cascade; an answer before the final chunk is held (recorded as
tentative, not returned). Malformed actions are recorded as protocol errors and never executed.

`max_turns` bounds the model turns after the final user chunk (the same budget for both agents; turns while the user
types are bounded by the input's events). `prefix_reuse=True` asks the backend to continue an empty assistant message
(`continue_final_message`): the prompt text is the same as with a generation prompt for ChatML-style templates, and
`HFLocalBackend` then prefills only what follows its cached longest common prefix - each context extends the last.

    agent = SpeculativeAgent(backend, tools=[Tool("lookup", lookup, safe=True, schema=...), ...])
    for chunk, final in chunks:            # e.g. words arriving every 0.3 s
        await agent.feed_user(chunk, final=final)
    result = await agent.result()          # .answer, .tool_log, .events, .metrics.latency_after_final_s
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass

import torch
from transformers import StoppingCriteria

from hf_fastslow.generation.agent_grammar import (
    AnswerAction,
    ClockFormat,
    PauseAction,
    RemoveAction,
    TimedEvent,
    ToolCallAction,
    Turn,
    TurnParser,
    format_action,
    grammar_prompt,
    render_messages,
)
from hf_fastslow.generation.agent_tools import CallStatus, Tool, ToolCallState, ToolEvent, ToolRuntime

__all__ = [
    "AgentEvent",
    "AgentMetrics",
    "AgentResult",
    "InterruptOnEvent",
    "SequentialReActAgent",
    "SpeculativeAgent",
    "feed_words",
    "unsafe_violations",
]


@dataclass(frozen=True)
class AgentEvent:
    """One thing that happened, at `t` seconds of the event loop's clock. kind: "user", "user_final", "turn" (text:
    the model's raw output), "protocol_error", "tentative_answer", "answer", "interrupted", or a tool event kind
    ("held", "started", "finished", "failed", "cancelled", "committed" (text: ids), "rejected")."""

    t: float
    kind: str
    text: str = ""
    call_id: int | None = None
    name: str = ""
    safe: bool = True


@dataclass
class AgentMetrics:
    latency_after_final_s: float | None = None  # final user chunk -> answer
    turns: int = 0
    turns_after_final: int = 0
    valid_turns: int = 0  # one well-formed action, nothing malformed
    protocol_errors: int = 0
    interrupted_turns: int = 0
    tools_started: int = 0
    wasted_calls: int = 0  # executions started, then cancelled or superseded
    model_seconds: float = 0.0


@dataclass
class AgentResult:
    answer: str | None
    tool_log: list[tuple[str, str, str]]  # (tool, resolved arguments, result) of the executions that counted
    events: list[AgentEvent]
    metrics: AgentMetrics


@dataclass
class _Entry:  # one line of the timeline the context is rebuilt from
    t: float
    kind: str
    text: str = ""
    call_id: int | None = None
    version: int = 0
    turn: int = 0


class _AgentCore:
    def __init__(self, backend, tools: list[Tool], *, system_prompt: str | None = None, max_turns: int = 16,
                 tick_seconds: float = 0.25, clock_marker: str = "<t={tick}>", max_new_tokens: int = 96,
                 interrupt: bool = False, prefix_reuse: bool = False, **generation_kwargs):
        if max_turns < 1:
            raise ValueError(f"max_turns must be >= 1, got {max_turns}")
        if prefix_reuse:
            backend.require("continue_final_message", f"{type(self).__name__}(prefix_reuse=True)")
        self.prefix_reuse = prefix_reuse
        self.backend = backend
        self.tools = list(tools)
        self.clock = ClockFormat(tick_seconds, clock_marker)
        self.system_prompt = system_prompt if system_prompt is not None else grammar_prompt(
            [t.prompt_line() for t in self.tools])
        self.max_turns, self.max_new_tokens, self.interrupt = max_turns, max_new_tokens, interrupt
        self.generation_kwargs = generation_kwargs
        self.runtime = ToolRuntime(self.tools, self._tool_event, self._settled)
        self.metrics = AgentMetrics()
        self.log: list[AgentEvent] = []
        self.answer: str | None = None
        self._timeline: list[_Entry] = []
        self._started_at: float | None = None
        self._final_t: float | None = None
        self._wake = asyncio.Event()
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task: asyncio.Task | None = None
        self._seen = 0  # timeline entries the current turn's context held
        self._execution_log: list[tuple[int, int, str, str]] = []

    # ---- clock, events, timeline ---------------------------------------------------------------------------------
    def _now(self) -> float:
        loop_t = asyncio.get_running_loop().time()
        if self._started_at is None:
            self._started_at = loop_t
        return loop_t - self._started_at

    def _record(self, kind: str, text: str = "", call: ToolCallState | None = None, t: float | None = None) -> None:
        t = self._now() if t is None else t
        event = AgentEvent(t, kind, text, call.call_id if call else None, call.name if call else "",
                           call.safe if call else True)
        self.log.append(event)
        self._queue.put_nowait(event)

    def _tool_event(self, event: ToolEvent) -> None:
        call = self.runtime.calls.get(event.call_id) if event.call_id is not None else None
        t = self._now()
        ev = AgentEvent(t, event.kind, event.detail, event.call_id, event.name, event.safe)
        self.log.append(ev)
        self._queue.put_nowait(ev)
        if event.kind == "started":
            self.metrics.tools_started += 1
            self._execution_log.append((call.call_id, call.version, call.name, event.detail))
        elif event.kind == "cancelled" and call is not None:
            self._timeline.append(_Entry(t, "cancelled", call_id=call.call_id, version=call.version))
        elif event.kind == "rejected":
            self._timeline.append(_Entry(t, "error", event.detail, turn=self.metrics.turns))

    def _settled(self, call: ToolCallState) -> None:
        self._timeline.append(_Entry(self._now(), "result", call.result, call.call_id, call.version))
        self._wake.set()

    def render(self) -> list[dict[str, str]]:
        """The context the model sees now, rebuilt from the timeline: the live version of each call, results of live
        calls only, a `cancelled N` line for dead ones, the errors of the last turn only."""
        events = []
        for e in self._timeline:
            call = self.runtime.calls.get(e.call_id) if e.call_id is not None else None
            if e.kind in ("action", "result") and (call.version != e.version or (
                    e.kind == "result" and call.status is CallStatus.CANCELLED)):
                continue
            if e.kind == "cancelled" and (call.status is not CallStatus.CANCELLED or call.version != e.version):
                continue
            if e.kind == "error" and e.turn != self.metrics.turns:
                continue
            events.append(TimedEvent(e.t, e.kind, e.text, e.call_id))
        return render_messages(self.system_prompt, events, self.clock)

    def _user(self, text: str, final: bool) -> None:
        if self._final_t is not None:
            raise RuntimeError("the user input is already final")
        t = self._now()
        kind = "user_final" if final else "user"
        self._timeline.append(_Entry(t, kind, text))
        self._record(kind, text, t=t)
        if final:
            self._final_t = t

    # ---- one model turn ------------------------------------------------------------------------------------------
    async def _model_turn(self) -> Turn | None:
        """Stream one turn, stopping at the first complete action; None if interrupted before acting."""
        parser, text = TurnParser(stop_at_action=True), ""
        t0 = self._now()
        after_final = self._final_t is not None  # the turn budget counts turns started after the final chunk
        # The action goes into the timeline where this context ended: it answers what the model saw, and chunks
        # arriving while it generates come after it (the next context ends with them, not with the action).
        self._seen = len(self._timeline)
        messages, extra = self.render(), {}
        if self.prefix_reuse:  # same prompt text, but the backend may resume from its cached longest common prefix
            messages, extra = [*messages, {"role": "assistant", "content": ""}], {"continue_final_message": True}
        stream = self.backend.astream(messages, max_new_tokens=self.max_new_tokens, **extra, **self.generation_kwargs)
        interrupted = False
        async with contextlib.aclosing(stream):
            async for delta in stream:
                text += delta
                if parser.feed(delta) is not None:
                    break
                if self.interrupt and self._wake.is_set():
                    interrupted = True
                    break
        self.metrics.model_seconds += self._now() - t0
        if interrupted:
            self.metrics.interrupted_turns += 1
            self._record("interrupted", text)
            return None
        turn = parser.finish()
        self.metrics.turns += 1
        self.metrics.turns_after_final += after_final
        self.metrics.valid_turns += turn.valid
        self._record("turn", text)
        for err in turn.errors:
            self.metrics.protocol_errors += 1
            self._record("protocol_error", f"{err.message}: {err.text!r}")
            self._timeline.append(_Entry(self._now(), "error", err.message, turn=self.metrics.turns))
        return turn

    def _issue(self, action: ToolCallAction) -> bool:
        """Submit a call; True when it was accepted as a new or changed call."""
        before = self.runtime.calls.get(action.call_id)
        version = before.version if before is not None else 0
        if self.runtime.submit(action) is not None:
            return False
        call = self.runtime.calls[action.call_id]
        if call.version == version:
            return False  # the same call again
        seen_t = self._timeline[self._seen - 1].t if self._seen else 0.0
        self._timeline.insert(self._seen, _Entry(seen_t, "action", format_action(action), call.call_id, call.version))
        self._seen += 1
        return True

    def _finish(self, answer: str | None) -> None:
        self.answer = answer
        if answer is not None:
            self._record("answer", answer)
            if self._final_t is not None:
                self.metrics.latency_after_final_s = self._now() - self._final_t
        self.runtime.cancel_all("episode over")
        self.metrics.wasted_calls = self.runtime.wasted

    # ---- public --------------------------------------------------------------------------------------------------
    def _ensure_started(self) -> None:
        if self._task is None:
            self._now()
            self._task = asyncio.get_running_loop().create_task(self._guarded())

    async def _guarded(self) -> None:
        try:
            await self._run()
        finally:
            self._queue.put_nowait(None)

    async def _run(self) -> None:
        raise NotImplementedError

    async def feed_user(self, text: str, final: bool = False) -> None:
        """A chunk of the user's input arrived (`final=True` on the last one)."""
        self._ensure_started()
        self._user(text, final)
        self._wake.set()
        await asyncio.sleep(0)

    async def events(self) -> AsyncIterator[AgentEvent]:
        """Every event as it happens, until the episode ends."""
        self._ensure_started()
        while (event := await self._queue.get()) is not None:
            yield event

    async def result(self) -> AgentResult:
        """Wait for the episode to end (an answer, or `max_turns` turns after the final user chunk)."""
        self._ensure_started()
        await self._task
        counted = [(name, args, self.runtime.calls[cid].result)
                   for cid, version, name, args in self._execution_log
                   if self.runtime.calls[cid].version == version and self.runtime.calls[cid].result is not None
                   and self.runtime.calls[cid].status in (CallStatus.DONE, CallStatus.FAILED)]
        return AgentResult(self.answer, counted, list(self.log), self.metrics)

    async def run(self, chunks: Iterable[tuple[float, str]]) -> AgentResult:
        """Feed `(delay_s, text)` chunks (the last one final) and return the result."""
        chunks = list(chunks)
        for i, (delay, text) in enumerate(chunks):
            await asyncio.sleep(delay)
            await self.feed_user(text, final=i == len(chunks) - 1)
        return await self.result()


class SpeculativeAgent(_AgentCore):
    """Acts while the user types: safe tools speculatively, unsafe tools at the commit point (see the module doc)."""

    async def _run(self) -> None:
        while self.metrics.turns_after_final < self.max_turns:
            await self._wake.wait()
            self._wake.clear()
            turn = await self._model_turn()
            if turn is None or turn.action is None:
                pass
            elif self._act(turn.action):
                return self._finish(self.answer)
            if self._final_t is not None and not self.runtime.busy():
                self._wake.set()  # nothing else can arrive: think again
        self._finish(None)

    def _act(self, action) -> bool:
        final = self._final_t is not None
        if isinstance(action, ToolCallAction):
            new_max = action.call_id > self.runtime.max_id
            if self._issue(action) and final and new_max:
                self.runtime.commit()
        elif isinstance(action, RemoveAction):
            self.runtime.remove(action.call_id)
        elif isinstance(action, PauseAction):
            if final:
                self.runtime.commit()
        elif isinstance(action, AnswerAction):
            if not final:
                self._record("tentative_answer", action.text)
                return False
            self.answer = action.text
            return True
        return False


class SequentialReActAgent(_AgentCore):
    """The peer: waits for the whole utterance, then think -> act -> wait for the tool's result -> ...; same tools,
    grammar and tool runtime (an unsafe call runs when issued: the user is done by then)."""

    async def _run(self) -> None:
        while self._final_t is None:
            await self._wake.wait()
            self._wake.clear()
        while self.metrics.turns_after_final < self.max_turns:
            turn = await self._model_turn()
            action = turn.action if turn is not None else None
            if isinstance(action, AnswerAction):
                return self._finish(action.text)
            if isinstance(action, ToolCallAction):
                if self._issue(action):
                    self.runtime.commit()
            elif isinstance(action, RemoveAction):
                self.runtime.remove(action.call_id)
            while self.runtime.busy():
                self._wake.clear()
                await self._wake.wait()
        self._finish(None)


def unsafe_violations(events: list[AgentEvent]) -> list[str]:
    """Independent check of the commit rule over an event log: every unsafe start must come after the final user
    chunk and after a commit that named it; every commit after the final chunk."""
    final_seen, committed, problems = False, set(), []
    for e in events:
        if e.kind == "user_final":
            final_seen = True
        elif e.kind == "committed":
            if not final_seen:
                problems.append(f"t={e.t:.3f}: commit before the final user chunk")
            committed |= {int(i) for i in e.text.split(",") if i}
        elif e.kind == "started" and not e.safe and (not final_seen or e.call_id not in committed):
            problems.append(f"t={e.t:.3f}: unsafe call {e.call_id} ({e.name}) started before commit")
    return problems


def feed_words(text: str, words_per_second: float, words_per_chunk: int = 1) -> list[tuple[float, str]]:
    """`(delay_s, chunk)` pairs streaming `text` at a fixed rate (the first chunk at once), for `agent.run`."""
    words = text.split()
    if not words:
        raise ValueError("nothing to stream")
    delay = words_per_chunk / words_per_second
    chunks = [" ".join(words[i:i + words_per_chunk]) for i in range(0, len(words), words_per_chunk)]
    return [(0.0 if i == 0 else delay, c) for i, c in enumerate(chunks)]


class InterruptOnEvent(StoppingCriteria):
    """Stops `generate` at the next step once `event` is set (from any thread): the interrupt half of
    interrupt-and-extend; the cache `generate` returns then holds the prefix, and a later call that appends the new
    input prefills only the new tokens."""

    def __init__(self, event: threading.Event | None = None):
        self.event = event or threading.Event()

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor, **kwargs) -> torch.BoolTensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)
