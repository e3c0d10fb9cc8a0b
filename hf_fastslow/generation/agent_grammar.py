"""The speculative agents' output grammar (one parser, model-independent), the clock stamps, and the one context
renderer that both the runtime and the clock-SFT data builder use.

A model turn is optional reasoning in `<think>...</think>` followed by exactly ONE action:

    <tool_call id=N>{"name": "lookup", "arguments": {"entity": "Ada", "relation": "employer"}}</tool_call>
    <tool_call id=N>REMOVE</tool_call>      (withdraw call N; re-issuing an existing id with new arguments revises it)
    <pause>                                 (heard enough to think, not to act: wait for the next event)
    <answer>...</answer>

A string argument may name the result of an earlier call as `$K`: the call then depends on call K, starts when K's
result is in, and is cancelled with K. `TurnParser` reads a turn as it streams and reports the action the moment its
closing tag arrives; anything else (unclosed or unknown tags, a second action, stray text, a non-integer id, bad JSON)
becomes a `GrammarError` - never an exception, never an action.

The context a model sees is rebuilt from timed events (user chunks, the live version of each call, tool results,
cancellations, errors) by `render_messages`; environment lines carry a clock stamp (`ClockFormat`, default
`<t=TICK>` with TICK = floor(seconds / tick_seconds)) so a model can learn how much time passed. `parse_timeline`
inverts the rendering (the clock-SFT round trip and the scripted teacher policy read contexts with it).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Action",
    "AnswerAction",
    "ClockFormat",
    "GrammarError",
    "PauseAction",
    "RemoveAction",
    "TimedEvent",
    "ToolCallAction",
    "Turn",
    "TurnParser",
    "format_action",
    "grammar_prompt",
    "parse_timeline",
    "parse_turn",
    "references",
    "render_messages",
]

REFERENCE = re.compile(r"\$(\d+)")


def references(arguments: Any) -> frozenset[int]:
    """Ids of the calls whose results `arguments` names as `$K` (in any string, at any depth)."""
    if isinstance(arguments, str):
        return frozenset(int(k) for k in REFERENCE.findall(arguments))
    if isinstance(arguments, dict):
        arguments = list(arguments.values())
    if isinstance(arguments, (list, tuple)):
        return frozenset().union(*(references(a) for a in arguments)) if arguments else frozenset()
    return frozenset()


@dataclass(frozen=True)
class ToolCallAction:
    call_id: int
    name: str
    arguments: dict

    @property
    def deps(self) -> frozenset[int]:
        return references(self.arguments)


@dataclass(frozen=True)
class RemoveAction:
    call_id: int


@dataclass(frozen=True)
class PauseAction:
    pass


@dataclass(frozen=True)
class AnswerAction:
    text: str


Action = ToolCallAction | RemoveAction | PauseAction | AnswerAction


@dataclass(frozen=True)
class GrammarError:
    message: str
    text: str


@dataclass
class Turn:
    """One parsed model turn: reasoning, the (first) action, and every protocol error found."""

    think: str = ""
    action: Action | None = None
    errors: list[GrammarError] = field(default_factory=list)

    @property
    def valid(self) -> bool:
        """Exactly one well-formed action and nothing malformed around it."""
        return self.action is not None and not self.errors


def format_action(action: Action) -> str:
    """The canonical markup of an action (what a model should emit; what the context shows)."""
    if isinstance(action, ToolCallAction):
        body = json.dumps({"name": action.name, "arguments": action.arguments}, ensure_ascii=False)
        return f"<tool_call id={action.call_id}>{body}</tool_call>"
    if isinstance(action, RemoveAction):
        return f"<tool_call id={action.call_id}>REMOVE</tool_call>"
    if isinstance(action, PauseAction):
        return "<pause>"
    if isinstance(action, AnswerAction):
        return f"<answer>{action.text}</answer>"
    raise TypeError(f"not an action: {action!r}")


_OPENERS = ("<think>", "<tool_call", "<pause", "<answer>")
_PAUSE = re.compile(r"<pause\s*/?>")
_TOOL_OPEN = re.compile(r"<tool_call\b([^<>]*)>")
_ID_ATTR = re.compile(r"""^\s*id\s*=\s*["']?([^"'\s>]*)["']?\s*$""")


def _tool_call(attrs: str, body: str, text: str) -> Action | GrammarError:
    m = _ID_ATTR.match(attrs)
    if m is None:
        return GrammarError("<tool_call> needs an id attribute: <tool_call id=N>", text)
    try:
        call_id = int(m.group(1))
    except ValueError:
        return GrammarError(f"tool call id {m.group(1)!r} is not an integer", text)
    if call_id < 1:
        return GrammarError(f"tool call ids start at 1, got {call_id}", text)
    body = body.strip()
    if body == "REMOVE":
        return RemoveAction(call_id)
    try:
        payload = json.loads(body)
    except json.JSONDecodeError as err:
        return GrammarError(f"tool call {call_id}: body is not JSON ({err.msg})", text)
    if not isinstance(payload, dict) or not isinstance(payload.get("name"), str):
        return GrammarError(f'tool call {call_id}: body must be {{"name": ..., "arguments": {{...}}}}', text)
    arguments = payload.get("arguments", {})
    if not isinstance(arguments, dict):
        return GrammarError(f"tool call {call_id}: arguments must be a JSON object", text)
    return ToolCallAction(call_id, payload["name"], arguments)


class TurnParser:
    """Streaming parser of one model turn: `feed(delta)` returns the action as soon as its closing tag arrives (once);
    `finish()` flushes what is left (unclosed tags, stray text) and returns the `Turn`. With `stop_at_action=True`
    nothing after the first action is read (the runtime stops generating there): a turn is judged up to its action."""

    def __init__(self, stop_at_action: bool = False) -> None:
        self.stop_at_action = stop_at_action
        self.buffer = ""
        self.pos = 0
        self.turn = Turn()
        self._thinks: list[str] = []

    def feed(self, delta: str) -> Action | None:
        self.buffer += delta
        had = self.turn.action
        self._scan(final=False)
        return self.turn.action if had is None else None

    def finish(self) -> Turn:
        self._scan(final=True)
        self.turn.think = "\n".join(self._thinks)
        return self.turn

    def _element(self, start: int) -> tuple[int, Action | GrammarError | str] | None:
        """(end, item) for a complete element at `start`; None while incomplete; (start, "") if not a known tag."""
        buf = self.buffer
        rest = buf[start:]
        for closer, opener in (("</think>", "<think>"), ("</answer>", "<answer>")):
            if rest.startswith(opener):
                end = buf.find(closer, start)
                if end < 0:
                    return None
                inner = buf[start + len(opener):end]
                item = inner if opener == "<think>" else AnswerAction(inner.strip())
                return end + len(closer), item
        m = _PAUSE.match(buf, start)
        if m:
            return m.end(), PauseAction()
        if rest.startswith("<tool_call"):
            m = _TOOL_OPEN.match(buf, start)
            if m is None:
                return None if "<" not in rest[1:] and ">" not in rest else (start, "")
            end = buf.find("</tool_call>", m.end())
            if end < 0:
                return None
            stop = end + len("</tool_call>")
            return stop, _tool_call(m.group(1), buf[m.end():end], buf[start:stop])
        if any(o.startswith(rest) for o in _OPENERS) or rest.startswith("<pause"):
            return None  # a tag still arriving
        return start, ""

    def _scan(self, final: bool) -> None:
        while not (self.stop_at_action and self.turn.action is not None):
            rest = self.buffer[self.pos:]
            start = self.pos + len(rest) - len(rest.lstrip())
            if start >= len(self.buffer):
                self.pos = start
                return
            found = self._element(start) if self.buffer[start] == "<" else (start, "")
            if found is None:  # incomplete element
                if final:
                    text = self.buffer[start:]
                    self.turn.errors.append(GrammarError(f"unclosed {text.split('>')[0][:20]}...", text))
                    self.pos = len(self.buffer)
                return
            end, item = found
            if end == start:  # stray text (or an unknown tag) up to the next "<"
                nxt = self.buffer.find("<", start + 1)
                if nxt < 0 and not final:
                    return
                end = len(self.buffer) if nxt < 0 else nxt
                self.turn.errors.append(GrammarError("text outside the grammar's tags", self.buffer[start:end]))
            elif isinstance(item, str):
                self._thinks.append(item.strip())
            elif isinstance(item, GrammarError):
                self.turn.errors.append(item)
            elif self.turn.action is None:
                self.turn.action = item
            else:
                self.turn.errors.append(GrammarError("a second action in one turn (ignored)",
                                                     self.buffer[start:end]))
            self.pos = end


def parse_turn(text: str, stop_at_action: bool = False) -> Turn:
    """Parse a whole model turn (the same parser the runtime streams through)."""
    parser = TurnParser(stop_at_action)
    parser.feed(text)
    return parser.finish()


# --------------------------------------------------------------------------------------------------------------------
# Clock stamps and the context renderer
# --------------------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ClockFormat:
    """Clock stamps in the context: `marker` with `{tick}` = floor(seconds / tick_seconds) since the episode start."""

    tick_seconds: float = 0.25
    marker: str = "<t={tick}>"

    def __post_init__(self):
        if not self.tick_seconds > 0:
            raise ValueError(f"tick_seconds must be > 0, got {self.tick_seconds}")
        if self.marker.count("{tick}") != 1:
            raise ValueError(f"marker must hold '{{tick}}' once, got {self.marker!r}")

    def tick(self, seconds: float) -> int:
        # The small epsilon keeps 0.75 s at 0.25 s/tick at tick 3 despite float division.
        return math.floor(seconds / self.tick_seconds + 1e-9)

    def stamp(self, seconds: float) -> str:
        return self.marker.replace("{tick}", str(self.tick(seconds)))

    def read(self, line: str) -> tuple[float | None, str]:
        """(seconds at the start of the stamped tick, the rest of the line); (None, line) when unstamped."""
        head, tail = (re.escape(part) for part in self.marker.split("{tick}"))
        m = re.match(rf"{head}(\d+){tail}\s?", line)
        if m is None:
            return None, line
        return int(m.group(1)) * self.tick_seconds, line[m.end():]


@dataclass(frozen=True)
class TimedEvent:
    """One entry of an agent's timeline. kind: "user", "user_final", "action" (text = action markup), "result",
    "cancelled", "error"."""

    t: float
    kind: str
    text: str = ""
    call_id: int | None = None


_LINE_FORMS = {"user": "user: {text}", "user_final": "user (done): {text}", "result": "result {id}: {text}",
               "cancelled": "cancelled {id}", "error": "error: {text}"}
_LINE_PARSE = [(kind, re.compile("^" + re.escape(form).replace(r"\{text\}", "(?P<text>.*)")
                                 .replace(r"\{id\}", r"(?P<id>\d+)") + "$", re.S))
               for kind, form in _LINE_FORMS.items()]


def render_messages(system: str | None, events: list[TimedEvent], clock: ClockFormat) -> list[dict[str, str]]:
    """Chat messages for a timeline: environment events as stamped lines of user messages, actions as assistant
    messages (unstamped: a model must not have to predict the clock); consecutive lines of one role merge."""
    messages: list[dict[str, str]] = [{"role": "system", "content": system}] if system else []
    for event in events:
        if event.kind == "action":
            role, line = "assistant", event.text
        else:
            form = _LINE_FORMS[event.kind]
            line = f"{clock.stamp(event.t)} " + form.format(text=event.text, id=event.call_id)
            role = "user"
        if messages and messages[-1]["role"] == role:
            messages[-1]["content"] += "\n" + line
        else:
            messages.append({"role": role, "content": line})
    return messages


def parse_timeline(messages: list[dict[str, str]], clock: ClockFormat) -> list[TimedEvent]:
    """Inverse of `render_messages` (system messages skipped): environment lines get their stamp's time (within one
    tick of the event), actions the time of the latest stamp before them; unparsable lines come back as errors."""
    events: list[TimedEvent] = []
    now = 0.0
    for message in messages:
        if message["role"] == "system":
            continue
        if message["role"] == "assistant":
            for line in message["content"].split("\n"):
                action = parse_turn(line).action
                call_id = getattr(action, "call_id", None)
                events.append(TimedEvent(now, "action", line, call_id))
            continue
        for line in message["content"].split("\n"):
            t, rest = clock.read(line)
            now = now if t is None else t
            for kind, pattern in _LINE_PARSE:
                m = pattern.match(rest)
                if m:
                    groups = m.groupdict()
                    call_id = int(groups["id"]) if "id" in groups else None
                    events.append(TimedEvent(now, kind, groups.get("text", ""), call_id))
                    break
            else:
                events.append(TimedEvent(now, "error", f"unparsed line: {line}"))
    return events


def grammar_prompt(tool_lines: list[str], examples: str = "") -> str:
    """The system prompt teaching the grammar (every model gets the same, whatever its chat template)."""
    tools = "\n".join(tool_lines)
    prompt = (
        "You are a real-time assistant. The user is still typing while you work; lines starting with a clock "
        "<t=N> tell you what happened and when. Each reply is optional reasoning in <think>...</think> followed by "
        "exactly one action:\n"
        '<tool_call id=N>{"name": TOOL, "arguments": {...}}</tool_call> to call a tool (ids start at 1 and grow; '
        "re-using an id revises that call; write $K in an argument to use the result of call K),\n"
        "<tool_call id=N>REMOVE</tool_call> to withdraw call N,\n"
        "<pause> to wait for more input,\n"
        "<answer>...</answer> once the user is done and you know the answer.\n"
        "Safe tools run at once; unsafe tools wait until the user is done.\n"
        f"Tools:\n{tools}"
    )
    return prompt + ("\n" + examples if examples else "")
