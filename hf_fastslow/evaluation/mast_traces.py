"""Traces for MAST annotation: the `Trace` type, MAD loading, and adapters from the package's own agent runs.

A `Trace` is a task plus a list of `Turn`s (who spoke, what they said). Its `key` is composite — `(source,
trace_id)` — because MAD reuses trace ids across framework x model (card, section 2). Gold labels, where known, are
`labels` (code -> bool) and `task_completed`.

Adapters turn what the package's agent methods return into traces, so the annotator can be pointed at them:
`trace_from_evolve` (Squeeze Evolve / RSA `EvolveResult`), `trace_from_catts` (a CATTS `EpisodeResult`, with the
`StepDecision`s when kept), `trace_from_staircase` (`AggregationMetrics` of `MixtureOfAgents` / `StaircaseMoA`),
`trace_from_agent` (`SpeculativeAgent` / `SequentialReActAgent` `AgentResult`). They read only public result fields.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .mast_taxonomy import MAST_CODES

__all__ = ["Trace", "Turn", "load_mad", "trace_from_agent", "trace_from_catts", "trace_from_evolve",
           "trace_from_staircase"]


@dataclass(frozen=True)
class Turn:
    speaker: str
    content: str

    def render(self) -> str:
        return f"[{self.speaker}] {self.content.strip()}"


@dataclass
class Trace:
    """One multi-agent run. `labels` (code -> bool, all 14 or a subset) and `task_completed` are gold when known."""

    trace_id: str
    task: str
    turns: list[Turn]
    source: str = "custom"
    labels: dict[str, bool] | None = None
    task_completed: bool | None = None
    max_turns: int | None = None  # the run's turn limit, when it had one (the heuristics read it)
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        self.turns = [t if isinstance(t, Turn) else Turn(*t) for t in self.turns]
        if self.labels is not None:
            unknown = set(self.labels) - set(MAST_CODES)
            if unknown:
                raise ValueError(f"Trace {self.key}: unknown MAST codes in labels: {sorted(unknown)}.")

    @property
    def key(self) -> tuple[str, str]:
        return (self.source, self.trace_id)

    def render(self, turns: Sequence[Turn] | None = None) -> str:
        """The text a judge reads: the task, then one line block per turn."""
        body = "\n".join(t.render() for t in (self.turns if turns is None else turns))
        return f"TASK: {self.task.strip()}\n{body}"

    def to_dict(self) -> dict[str, Any]:
        return {"trace_id": self.trace_id, "source": self.source, "task": self.task,
                "turns": [[t.speaker, t.content] for t in self.turns], "labels": self.labels,
                "task_completed": self.task_completed, "max_turns": self.max_turns, "meta": self.meta}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Trace:
        return cls(trace_id=str(d["trace_id"]), task=d.get("task", ""), turns=[Turn(*t) for t in d["turns"]],
                   source=d.get("source", "custom"), labels=d.get("labels"), task_completed=d.get("task_completed"),
                   max_turns=d.get("max_turns"), meta=d.get("meta") or {})


# ----------------------------------------------------------------------------------------------------------------------
# MAD (mcemri/MAD) from a local JSON file
# ----------------------------------------------------------------------------------------------------------------------
def _mad_labels(annotation: Any) -> dict[str, bool] | None:
    """MAD annotation dicts map "1.1" (or "FM-1.1", or a label containing the code) to 0/1 / bool / "yes"/"no"."""
    if not isinstance(annotation, dict):
        return None
    out: dict[str, bool] = {}
    for key, value in annotation.items():
        code = next((c for c in MAST_CODES if str(key).strip().upper().removeprefix("FM-").startswith(c)), None)
        if code is None:
            continue
        if isinstance(value, str):
            value = value.strip().lower() in ("1", "yes", "true")
        out[code] = bool(value)
    return out or None


def load_mad(path: str | os.PathLike, *, human_only: bool = False) -> list[Trace]:
    """Traces from a local MAD JSON file (a list of records). Keys are composite (framework x model x id); a record
    whose composite key repeats gets `#2`, `#3`... appended rather than silently overwriting the first."""
    with open(path, encoding="utf-8") as f:
        records = json.load(f)
    if isinstance(records, dict):
        records = records.get("data") or list(records.values())
    traces: list[Trace] = []
    seen: dict[tuple[str, str], int] = {}
    for i, rec in enumerate(records):
        if human_only and not rec.get("human_labelled", rec.get("is_human_labelled", False)):
            continue
        framework = str(rec.get("mas_name") or rec.get("framework") or "unknown")
        model = str(rec.get("llm_name") or rec.get("model") or "unknown")
        source = f"{framework}/{model}"
        trace_id = str(rec.get("trace_id", i))
        n = seen.get((source, trace_id), 0) + 1
        seen[(source, trace_id)] = n
        raw = rec.get("trace", "")
        text = raw.get("trajectory", json.dumps(raw)) if isinstance(raw, dict) else str(raw)
        labels = _mad_labels(rec.get("mast_annotation") or rec.get("annotation"))
        traces.append(Trace(trace_id if n == 1 else f"{trace_id}#{n}", rec.get("task", ""), [Turn("trace", text)],
                            source=source, labels=labels))
    return traces


# ----------------------------------------------------------------------------------------------------------------------
# Adapters from the package's agent runs
# ----------------------------------------------------------------------------------------------------------------------
def _last_user(messages: Sequence[dict[str, str]]) -> str:
    return next((m["content"] for m in reversed(messages) if m.get("role") == "user"), "")


def _completed(answer: Any, gold: Any) -> bool | None:
    if gold is None:
        return None
    from .answers import answers_match

    return answer is not None and answers_match(str(answer), str(gold))


def trace_from_evolve(result, problem: str, *, gold_answer: Any = None, trace_id: str = "0",
                      source: str | None = None) -> Trace:
    """A Squeeze Evolve / RSA run: the orchestrator's routing per loop, the final population's members (the agents
    that wrote them: tier and loop), then the vote."""
    turns = [Turn("user", problem)]
    for rec in result.per_loop:
        if rec.loop == 0:
            turns.append(Turn("orchestrator", f"loop 0: seeded a population of {len(rec.answers)}; "
                                              f"{rec.unique_answers} distinct answers"))
        else:
            routed = ", ".join(result.tier_names[r] if 0 <= r < len(result.tier_names) else "vote"
                               for r in rec.routes)
            turns.append(Turn("orchestrator", f"loop {rec.loop}: {len(rec.groups)} groups routed to [{routed}]; "
                                              f"{rec.unique_answers} distinct answers after the loop"))
    for cand in result.population:
        turns.append(Turn(f"{cand.tier} (loop {cand.loop})", cand.text))
    turns.append(Turn("orchestrator", f"majority vote of the final population: {result.answer}"))
    return Trace(trace_id, problem, turns, source=source or f"squeeze_evolve/{result.method}",
                 task_completed=_completed(result.answer, gold_answer))


def trace_from_catts(result, task: str | Sequence[dict[str, str]], *, decisions: Sequence[Any] | None = None,
                     trace_id: str | None = None, source: str = "catts", max_steps: int | None = None) -> Trace:
    """A CATTS episode: per step the sampled votes (from the `StepDecision`s when given), the arbiter's intervention
    and the environment's verdict; `task` is the environment's first observation (text or messages)."""
    task_text = task if isinstance(task, str) else _last_user(task)
    turns = [Turn("environment", task_text)]
    for i, step in enumerate(result.steps):
        d = decisions[i] if decisions is not None and i < len(decisions) else None
        if d is not None:
            turns.append(Turn("sampler", f"step {i}: {len(d.samples)} samples, clusters "
                                         f"{list(d.stats.keys)} with votes {list(d.stats.counts)}"))
        if step.arbitrated:
            verb = "overrode the majority" if step.overrode_majority else "kept the majority"
            turns.append(Turn("arbiter", f"step {i}: uncertainty {step.uncertainty:.2f}; {verb}"))
        turns.append(Turn("policy", f"step {i} action: {json.dumps(step.action, default=str)}"))
        verdict = {True: "correct", False: "wrong", None: "not checked"}[step.correct]
        turns.append(Turn("environment", f"step {i}: action {verdict}"))
    end = result.failed or ("episode succeeded" if result.success else "episode ended unsuccessfully")
    turns.append(Turn("environment", end))
    hit_limit = (result.failed or "").startswith("no end within")  # run_episode's words for running out of steps
    return Trace(trace_id or f"{result.episode}-{result.seed}", task_text, turns, source=source,
                 task_completed=bool(result.success), max_turns=max_steps,
                 meta={"steps": len(result.steps), "hit_limit": hit_limit})


def trace_from_staircase(metrics, question: str | Sequence[dict[str, str]], *, gold_answer: Any = None,
                         trace_id: str = "0") -> Trace:
    """A `MixtureOfAgents` / `StaircaseMoA` run: each proposer's proposal, each aggregator call (stair) and the
    answer; proposers dropped for errors appear with the reason."""
    q = question if isinstance(question, str) else _last_user(question)
    turns = [Turn("user", q)]
    for i, prop in enumerate(metrics.proposals):
        turns.append(Turn(f"proposer {i}", prop if prop is not None else f"(dropped: {metrics.dropped.get(i, '?')})"))
    for stair in metrics.stairs:
        seen = "complete proposals" if stair.visible_tokens is None else f"{sum(stair.visible_tokens)} proposal tokens"
        turns.append(Turn(f"aggregator (stair {stair.index}{', final' if stair.final else ''})",
                          f"saw {seen}; wrote: {stair.text}"))
    turns.append(Turn("aggregator", f"answer: {metrics.answer}"))
    from .answers import extract_answer

    return Trace(trace_id, q, turns, source=f"staircase/{metrics.method}",
                 task_completed=_completed(extract_answer(metrics.answer), gold_answer))


_AGENT_SPEAKERS = {"user": "user", "user_final": "user", "turn": "agent", "protocol_error": "runtime",
                   "tentative_answer": "agent", "answer": "agent", "interrupted": "runtime"}


def trace_from_agent(result, *, task: str | None = None, gold_answer: Any = None, trace_id: str = "0",
                     source: str = "speculative_agent", max_turns: int | None = None) -> Trace:
    """A `SpeculativeAgent` / `SequentialReActAgent` run: user chunks, the model's turns, tool events and the
    answer, in event order. `<pause>` turns are dropped (counted in `meta["pauses"]`) and consecutive user chunks
    merged, so a judge reads the conversation rather than the typing."""
    turns: list[Turn] = []
    pauses = 0
    for ev in result.events:
        speaker = _AGENT_SPEAKERS.get(ev.kind, f"tool {ev.name}".strip())
        text = ev.text if ev.kind in _AGENT_SPEAKERS else f"{ev.kind} call {ev.call_id} {ev.text}".strip()
        if ev.kind == "answer":
            text = f"FINAL ANSWER: {ev.text}"
        if ev.kind == "turn" and text.strip() == "<pause>":  # the protocol's no-op while the user types
            pauses += 1
            continue
        if speaker == "user" and turns and turns[-1].speaker == "user":  # user chunks typed in a row: one message
            turns[-1] = Turn("user", f"{turns[-1].content} {text}")
            continue
        turns.append(Turn(speaker, text))
    if result.answer is None:
        turns.append(Turn("runtime", "the agent stopped without an answer"))
    users = [e.text for e in result.events if e.kind in ("user", "user_final")]
    return Trace(trace_id, task if task is not None else "".join(users), turns, source=source,
                 task_completed=_completed(result.answer, gold_answer), max_turns=max_turns,
                 meta={"turns": result.metrics.turns, "protocol_errors": result.metrics.protocol_errors,
                       "pauses": pauses, "steps": result.metrics.turns_after_final,
                       "hit_limit": result.answer is None and max_turns is not None
                       and result.metrics.turns_after_final >= max_turns})


def traces_from_dicts(rows: Iterable[dict[str, Any]]) -> list[Trace]:
    return [Trace.from_dict(r) for r in rows]
