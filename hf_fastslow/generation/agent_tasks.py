"""A multi-hop tool task generated in code, for the speculative agents' tests, benchmark and clock-SFT data: a fact base
of invented people, employers and cities behind a safe `lookup` tool (simulated latency), an unsafe `send_message`
tool with a visible outbox, a user request meant to be streamed word by word (sometimes with a correction of the
person half-way: "no sorry, I mean ..."), the gold answer, and `teacher_policy`, a scripted policy that reads only
the rendered context (as a model would) and emits the ideal next action - the target of clock SFT and the oracle arm
of the benchmark.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field

from hf_fastslow.generation.agent_grammar import (
    AnswerAction,
    ClockFormat,
    PauseAction,
    ToolCallAction,
    format_action,
    parse_timeline,
    parse_turn,
)
from hf_fastslow.generation.agent_tools import Tool

__all__ = ["FactTask", "TASK_EXAMPLE", "make_fact_tasks", "teacher_policy"]

_FIRST = ["Ada", "Bruno", "Carla", "Dmitri", "Elena", "Farid", "Greta", "Hugo", "Ines", "Jonas", "Kira", "Liam",
          "Mara", "Nils", "Olga", "Pavel", "Rosa", "Sven", "Tara", "Umar"]
_LAST = ["Brenner", "Castell", "Dorn", "Ekberg", "Falk", "Gruber", "Holm", "Ivers", "Janko", "Kessler", "Lund",
         "Moreau", "Novak", "Ortega", "Pohl", "Quist"]
_COMPANIES = ["Kelvar Labs", "Torrin Foods", "Abaco Systems", "Miralux", "Pendra Works", "Quorra Bank", "Sable Rail",
              "Vireo Health", "Zantic Media", "Orvel Motors"]
_CITIES = ["Olmsted", "Brackley", "Carrow", "Dunmere", "Elsworth", "Fenwick", "Garrowby", "Hollin", "Ivybridge",
           "Jarrow"]
_RECIPIENTS = ["Bob", "Alice", "Chen", "Dana", "Eli", "Fay"]

LOOKUP_SCHEMA = {"description": "a fact about an entity (relation: employer of a person, city of a company)",
                 "parameters": {"properties": {"entity": {"type": "string"}, "relation": {"type": "string"}},
                                "required": ["entity", "relation"]}}
SEND_SCHEMA = {"description": "send a short message to a person",
               "parameters": {"properties": {"to": {"type": "string"}, "text": {"type": "string"}},
                              "required": ["to", "text"]}}

TASK_EXAMPLE = (
    "Example (user: Find which city the employer of Ada Holm is in and send it to Bob.):\n"
    '<tool_call id=1>{"name": "lookup", "arguments": {"entity": "Ada Holm", "relation": "employer"}}</tool_call>\n'
    '<tool_call id=2>{"name": "lookup", "arguments": {"entity": "$1", "relation": "city"}}</tool_call>\n'
    '<tool_call id=3>{"name": "send_message", "arguments": {"to": "Bob", "text": "$2"}}</tool_call>\n'
    "<pause>\n<answer>Carrow</answer>"
)


@dataclass
class FactTask:
    """One episode: `request` (what the user types), the people it names, the gold city and recipient; `tools()`
    builds fresh tools (the outbox is per call of `tools()`)."""

    request: str
    person: str
    recipient: str
    facts: dict[tuple[str, str], str]
    people: list[str]
    lookup_latency_s: float = 0.8
    send_latency_s: float = 0.5
    outbox: list[tuple[str, str]] = field(default_factory=list)

    @property
    def relations(self) -> tuple[str, ...]:
        return ("employer", "city")

    @property
    def answer(self) -> str:
        value = self.person
        for relation in self.relations:
            value = self.facts[(value, relation)]
        return value

    def tools(self) -> list[Tool]:
        self.outbox = []

        async def lookup(entity: str, relation: str) -> str:
            await asyncio.sleep(self.lookup_latency_s)
            key = (entity.strip(), relation.strip().lower())
            if key not in self.facts:
                raise KeyError(f"no fact {relation!r} for {entity!r}")
            return self.facts[key]

        async def send_message(to: str, text: str) -> str:
            await asyncio.sleep(self.send_latency_s)
            self.outbox.append((to, text))
            return f"sent to {to}"

        return [Tool("lookup", lookup, safe=True, schema=LOOKUP_SCHEMA),
                Tool("send_message", send_message, safe=False, schema=SEND_SCHEMA)]

    def correct(self, answer: str | None) -> bool:
        """The answer names the gold city and exactly the right message went out."""
        return (answer is not None and self.answer.lower() in answer.lower()
                and self.outbox == [(self.recipient, self.answer)])


def make_fact_tasks(n: int, seed: int, correction_rate: float = 0.3, lookup_latency_s: float = 0.8,
                    send_latency_s: float = 0.5) -> list[FactTask]:
    """`n` tasks over one shared random fact base (seeded); a fraction names a wrong person first, then corrects."""
    rng = random.Random(seed)
    people = rng.sample([f"{a} {b}" for a in _FIRST for b in _LAST], 40)
    facts: dict[tuple[str, str], str] = {}
    for person in people:
        facts[(person, "employer")] = rng.choice(_COMPANIES)
    cities = rng.sample(_CITIES, len(_CITIES))
    for i, company in enumerate(_COMPANIES):
        facts[(company, "city")] = cities[i % len(cities)]
    tasks = []
    for _ in range(n):
        person, decoy = rng.sample(people, 2)
        recipient = rng.choice(_RECIPIENTS)
        who = f"{decoy}, no sorry, I mean {person}" if rng.random() < correction_rate else person
        request = (f"Hey, quick one about {who}. Could you find out which city the employer of that person is "
                   f"based in and send the city to {recipient}? Thanks a lot!")
        tasks.append(FactTask(request, person, recipient, facts, people, lookup_latency_s, send_latency_s))
    return tasks


def teacher_policy(task: FactTask, clock: ClockFormat | None = None):
    """A ScriptedBackend responder playing the ideal agent for `task` from the rendered context alone: speculate the
    lookups as soon as the person is named, revise the first on a correction (its dependents are cancelled by the
    runtime; re-issue them under new ids), queue the message once the recipient is named, `<pause>` while waiting,
    answer when the user is done and every result is in."""
    clock = clock or ClockFormat()

    def respond(messages, sample_index, kwargs) -> str:
        return format_action(teacher_action(task, messages, clock))

    return respond


def teacher_action(task: FactTask, messages, clock: ClockFormat):
    events = parse_timeline(messages, clock)
    said = " ".join(e.text for e in events if e.kind in ("user", "user_final"))
    done = any(e.kind == "user_final" for e in events)
    issued: dict[int, ToolCallAction] = {}
    for e in events:
        action = parse_turn(e.text).action if e.kind == "action" else None
        if isinstance(action, ToolCallAction):
            issued[action.call_id] = action
    dead = {e.call_id for e in events if e.kind == "cancelled"}
    results = {e.call_id: e.text for e in events if e.kind == "result"}
    live = {i: a for i, a in issued.items() if i not in dead}
    next_id = max(issued, default=0) + 1

    named = [(said.rfind(p), p) for p in task.people if p in said]
    if not named:
        return PauseAction()
    person = max(named)[1]
    needed: list[int] = []
    source = person
    for hop, relation in enumerate(task.relations):
        want = {"entity": source, "relation": relation}
        match = [i for i, a in live.items() if a.name == "lookup" and a.arguments == want]
        if not match:
            if hop == 0:  # a first lookup of someone else: revise it in place
                stale = [i for i, a in live.items() if a.name == "lookup" and a.arguments.get("relation") == relation
                         and "$" not in a.arguments.get("entity", "$")]
                if stale:
                    return ToolCallAction(stale[0], "lookup", want)
            return ToolCallAction(next_id, "lookup", want)
        needed.append(match[0])
        source = f"${match[0]}"
    recipients = [(said.rfind(f" to {r}"), r) for r in {task.recipient} if f" to {r}" in said]
    if recipients:
        want = {"to": recipients[0][1], "text": source}
        match = [i for i, a in live.items() if a.name == "send_message" and a.arguments == want]
        if not match:
            return ToolCallAction(next_id, "send_message", want)
        needed.append(match[0])
    if not done or not recipients or any(i not in results for i in needed):
        return PauseAction()
    return AnswerAction(results[needed[len(task.relations) - 1]])
