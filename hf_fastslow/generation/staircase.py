"""Staircase streaming (Wang et al., arXiv 2510.05059) and the Mixture-of-Agents baseline it speeds up (MoA, arXiv
2406.04692), on the backend layer (`hf_fastslow.backends`).

`MixtureOfAgents` asks every proposer for a full answer, then streams one aggregator answer written from all of them:
the user waits for the slowest proposal before the first token. `StaircaseMoA` starts the aggregator as soon as every
proposer has `chunk_tokens` tokens, streams `agg_chunk_tokens` of its answer, and each time the proposals have grown
by another chunk (a "stair") continues that same partial answer with the longer proposals in the prompt
(`continue_final_message=True`; a local backend reuses the cached KV of the prompt prefix the stairs share), until the
proposals are complete and the aggregator finishes over them.

Proposers that are one backend object, or local backends over the same model and tokenizer with the same generation
defaults, are served by ONE `stream_batch` call (one batched `generate`, split per row); other proposers stream
concurrently in their own threads. Both classes record `.last_metrics` (`AggregationMetrics`): time to the first
answer text, total time, this process's CPU seconds and the tokens of every call from the backends' ledgers.
"""

from __future__ import annotations

import concurrent.futures
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

from hf_fastslow.backends.base import Backend, Messages, Usage
from hf_fastslow.generation.staircase_runtime import ProposalFeed, ProposerGroup, group_proposers, iterate_in_thread

__all__ = [
    "AGGREGATE_INSTRUCTION",
    "UNFINISHED_NOTE",
    "AggregationMetrics",
    "MixtureOfAgents",
    "Stair",
    "StaircaseMoA",
    "aggregate_prompt",
    "interleaved_prompt",
]

PromptBuilder = Callable[[Messages, Sequence[Sequence[str]], Sequence[bool]], Messages]
Clock = Callable[[], float]

AGGREGATE_INSTRUCTION = (
    "You are given answers from several assistants to the user's latest message. Write one answer of your own that "
    "is better than each of them: check them critically, since some may be wrong, and do not just copy one. Reply "
    "with the answer only."
)
UNFINISHED_NOTE = (
    "The answers are still being written, so those marked unfinished stop mid-way. If your reply has already begun, "
    "continue it from where it stops, without repeating it."
)


# ----------------------------------------------------------------------------------------------------------------------
# Aggregator prompts: builder(messages, pieces, finished) -> the aggregator's conversation
# ----------------------------------------------------------------------------------------------------------------------
def _with_instruction(messages: Messages, text: str) -> Messages:
    # As in the MoA reference, the answers go into the system message (after the user's own system text, if any);
    # the rest of the conversation follows unchanged.
    messages = [dict(m) for m in messages]
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": messages[0]["content"] + "\n\n" + text}, *messages[1:]]
    return [{"role": "system", "content": text}, *messages]


def _partial(pieces: Sequence[Sequence[str]], finished: Sequence[bool]) -> bool:
    # More than one stair, or a proposal still running: the prompt explains partial answers. A single stair over
    # complete proposals is plain MoA, which is what makes chunk_tokens >= every proposal reproduce MoA exactly.
    return max((len(p) for p in pieces), default=0) > 1 or not all(finished)


def _check_pieces(pieces: Sequence[Sequence[str]], finished: Sequence[bool]) -> None:
    if len(pieces) != len(finished) or not pieces:
        raise ValueError(f"need one `finished` flag per proposal and at least one proposal "
                         f"({len(pieces)} proposals, {len(finished)} flags).")


def aggregate_prompt(messages: Messages, pieces: Sequence[Sequence[str]], finished: Sequence[bool]) -> Messages:
    """The MoA aggregator prompt: `AGGREGATE_INSTRUCTION` and the numbered answers (each proposal's pieces joined)
    in the system message, then the user's conversation. While any answer is partial (or after the first stair)
    `UNFINISHED_NOTE` is added and running answers are labelled "(unfinished)"."""
    _check_pieces(pieces, finished)
    partial = _partial(pieces, finished)
    lines = [AGGREGATE_INSTRUCTION + (" " + UNFINISHED_NOTE if partial else ""), ""]
    for number, (parts, done) in enumerate(zip(pieces, finished), 1):
        label = f"Answer {number}" + ("" if done else " (unfinished)")
        lines.append(f"{label}: {''.join(parts).strip()}")
    return _with_instruction(messages, "\n".join(lines))


def interleaved_prompt(messages: Messages, pieces: Sequence[Sequence[str]], finished: Sequence[bool]) -> Messages:
    """An append-only aggregator prompt: the answers' pieces listed stair by stair ("Answer 2, part 3: ..."), and
    "Answer i is complete." after an answer's last piece, so each stair's system message extends the previous one
    and a prefix-caching aggregator re-reads only the new pieces, the user's turn and its own partial answer.
    One stair of complete answers gives `aggregate_prompt`'s MoA form."""
    _check_pieces(pieces, finished)
    if not _partial(pieces, finished):
        return aggregate_prompt(messages, pieces, finished)
    lines = [AGGREGATE_INSTRUCTION + " " + UNFINISHED_NOTE, ""]
    last = [max((k for k, p in enumerate(parts) if p), default=-1) for parts in pieces]
    for stair in range(max(len(p) for p in pieces)):
        for number, parts in enumerate(pieces, 1):
            if stair < len(parts) and parts[stair]:
                lines.append(f"Answer {number}, part {stair + 1}: {parts[stair]}")
            if finished[number - 1] and stair == max(last[number - 1], 0):
                lines.append(f"Answer {number} is complete.")
    return _with_instruction(messages, "\n".join(lines))


# ----------------------------------------------------------------------------------------------------------------------
# Metrics
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class Stair:
    """One aggregator call. Times are seconds from the start of the run; tokens come from the aggregator's ledger
    record of the call (None when it could not be told apart from a proposer's record on the same backend)."""

    index: int
    final: bool
    visible_tokens: list[int] | None  # proposal tokens the call saw, per live proposer (None: complete proposals)
    start_s: float = 0.0
    first_text_s: float | None = None
    seconds: float = 0.0
    prompt_tokens: int | None = None
    new_tokens: int | None = None
    reused_prompt_tokens: int | None = None  # served from the aggregator's prefix cache (backends that report it)
    text: str = ""
    conversation: Messages = field(default_factory=list, repr=False)  # the prompt, before the partial answer


@dataclass
class AggregationMetrics:
    """One run of `MixtureOfAgents` / `StaircaseMoA`: `ttft_s` (first answer text), `total_s`, `proposals_s` (when
    the last proposal was complete), this process's `cpu_s`, `tokens` (every call of every backend involved, each
    backend's ledger counted once) and `aggregator_tokens`, the stairs, the proposals and the answer."""

    method: str
    proposals: list[str | None]
    ttft_s: float | None = None
    total_s: float = 0.0
    proposals_s: float | None = None
    cpu_s: float = 0.0
    tokens: Usage = field(default_factory=Usage)
    aggregator_tokens: Usage = field(default_factory=Usage)
    stairs: list[Stair] = field(default_factory=list)
    dropped: dict[int, str] = field(default_factory=dict)
    answer: str = ""
    stopped_early: bool = False  # the aggregator ended (EOS) before the proposals were complete
    start_s: float = field(default=0.0, repr=False)
    cpu_start: float = field(default=0.0, repr=False)

    @property
    def proposer_tokens(self) -> Usage:
        """`tokens` less the aggregator's calls."""
        return Usage(**{f.name: getattr(self.tokens, f.name) - getattr(self.aggregator_tokens, f.name)
                        for f in fields(Usage)})

    @property
    def answer_tokens_per_s(self) -> float:
        """Answer tokens per second of the whole run (the user's view of throughput)."""
        return self.aggregator_tokens.completion_tokens / self.total_s if self.total_s > 0 else 0.0

    def drop(self, indices: Sequence[int], backend: Backend, error: BaseException) -> None:
        """Record failed proposers and warn (the run goes on without them)."""
        reason = f"{type(error).__name__}: {error}"
        for index in indices:
            self.dropped[index] = reason
            self.proposals[index] = None
        warnings.warn(f"proposer {list(indices)} ({backend.name}) failed and is dropped: {reason}", RuntimeWarning,
                      stacklevel=3)

    def describe_drops(self) -> str:
        return "; ".join(f"proposer {i}: {why}" for i, why in sorted(self.dropped.items()))


def _check_messages(messages: Messages) -> Messages:
    if isinstance(messages, str):
        return [{"role": "user", "content": messages}]
    messages = [dict(m) for m in messages]
    if not messages or not all("role" in m and "content" in m for m in messages):
        raise ValueError("messages must be a non-empty list of {'role', 'content'} dicts (or a string).")
    if messages[-1]["role"] == "assistant":
        raise ValueError("the conversation must end with the user's turn; the aggregator writes the assistant's.")
    return messages


class _Aggregation:
    """What the two classes share: construction checks, proposer groups, ledgers and metrics bookkeeping."""

    method = "moa"

    def __init__(self, proposers: Sequence[Backend], aggregator: Backend, *, prompt_builder: PromptBuilder,
                 proposal_max_new_tokens: int | None, max_new_tokens: int | None, seed: int | None, clock: Clock):
        proposers = list(proposers)
        if not proposers:
            raise ValueError(f"{type(self).__name__} needs at least one proposer backend.")
        for p in [*proposers, aggregator]:
            if not isinstance(p, Backend):
                raise TypeError(f"proposers and aggregator must be Backend instances, got {type(p).__name__}.")
        for name, value in (("proposal_max_new_tokens", proposal_max_new_tokens), ("max_new_tokens", max_new_tokens)):
            if value is not None and value < 1:
                raise ValueError(f"{name} must be >= 1 (or None for the backend's default), got {value}.")
        aggregator.require("streaming", f"{type(self).__name__} streams the aggregator's answer")
        self.proposers = proposers
        self.aggregator = aggregator
        self.prompt_builder = prompt_builder
        self.proposal_max_new_tokens = proposal_max_new_tokens
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.clock = clock
        self.last_metrics: AggregationMetrics | None = None
        # Each backend's ledger counted once, however many roles it plays.
        self._backends = list({id(b): b for b in [*proposers, aggregator]}.values())

    def _proposal_kwargs(self) -> dict[str, Any]:
        return {"max_new_tokens": self.proposal_max_new_tokens, "seed": self.seed}

    def _groups(self, messages: Messages) -> list[ProposerGroup]:
        return group_proposers(self.proposers, messages)

    def _start_metrics(self) -> tuple[AggregationMetrics, dict[int, int]]:
        metrics = AggregationMetrics(method=self.method, proposals=[None] * len(self.proposers))
        metrics.start_s, metrics.cpu_start = self.clock(), time.process_time()
        return metrics, {id(b): b.ledger.mark() for b in self._backends}

    def _finish_metrics(self, metrics: AggregationMetrics, marks: dict[int, int], answer: list[str]) -> None:
        metrics.total_s = self.clock() - metrics.start_s
        metrics.cpu_s = time.process_time() - metrics.cpu_start
        metrics.answer = "".join(answer)
        metrics.tokens = sum((b.ledger.since(marks[id(b)]) for b in self._backends), Usage())
        self.last_metrics = metrics

    def _aggregate(self, conversation: Messages, partial_answer: str, max_new_tokens: int | None,
                   metrics: AggregationMetrics, stair: Stair) -> Iterator[str]:
        """Stream one aggregator call (continuing `partial_answer` when there is one) into `stair`."""
        kwargs: dict[str, Any] = {"max_new_tokens": max_new_tokens}
        stair.conversation = conversation
        if partial_answer:
            conversation = [*conversation, {"role": "assistant", "content": partial_answer}]
            kwargs["continue_final_message"] = True
        ledger = self.aggregator.ledger
        mark = ledger.mark()
        stair.start_s = self.clock() - metrics.start_s
        deltas = self.aggregator.stream(conversation, **kwargs)
        try:
            for delta in deltas:
                if not delta:
                    continue
                now = self.clock() - metrics.start_s
                if metrics.ttft_s is None:
                    metrics.ttft_s = now
                if stair.first_text_s is None:
                    stair.first_text_s = now
                stair.text += delta
                yield delta
        finally:  # also when the consumer closes the stream mid-call: the call is closed, accounted and recorded
            deltas.close()
            stair.seconds = self.clock() - metrics.start_s - stair.start_s
            stair.reused_prompt_tokens = getattr(self.aggregator, "last_reused_tokens", None)  # HFLocalBackend's
            # The record this call wrote: the last "stream" record of one request since the mark (a proposer group
            # sharing this backend object writes its own record once, when its whole stream ends).
            own = [r for r in ledger.records[mark:] if r.kind == "stream" and r.requests == 1]
            if own:
                stair.prompt_tokens, stair.new_tokens = own[-1].prompt_tokens, own[-1].completion_tokens
                metrics.aggregator_tokens = metrics.aggregator_tokens + Usage.of(own[-1:])
            metrics.stairs.append(stair)

    async def astream(self, messages: Messages) -> AsyncIterator[str]:
        """Async `stream`: the same run in a worker thread, its text handed over as it comes."""
        async for piece in iterate_in_thread(lambda: self.stream(messages)):
            yield piece

    def __call__(self, messages: Messages) -> str:
        """The whole answer (drains `stream`)."""
        return "".join(self.stream(messages))


class MixtureOfAgents(_Aggregation):
    """MoA (one layer): full proposals from every proposer (concurrently; same-model proposers in one batch), then
    the aggregator's answer over all of them, streamed.

    `prompt_builder(messages, pieces, finished)` writes the aggregator's conversation from the user's messages and
    each proposal (`pieces[i]` is a one-element list holding proposal i, `finished` all True); `aggregate_prompt`
    puts the numbered answers into the system message, as the MoA reference does. A proposer that raises is dropped
    with a warning; `seed` goes to every proposer call (the same seed gives `StaircaseMoA` the same proposals).
    """

    method = "moa"

    def __init__(self, proposers: Sequence[Backend], aggregator: Backend, *,
                 prompt_builder: PromptBuilder = aggregate_prompt, proposal_max_new_tokens: int | None = None,
                 max_new_tokens: int | None = None, seed: int | None = None, clock: Clock = time.perf_counter):
        super().__init__(proposers, aggregator, prompt_builder=prompt_builder,
                         proposal_max_new_tokens=proposal_max_new_tokens, max_new_tokens=max_new_tokens, seed=seed,
                         clock=clock)

    def _propose(self, messages: Messages, metrics: AggregationMetrics) -> None:
        def run(group: ProposerGroup) -> list[str]:
            return [row[0].text for row in group.backend.chat_batch(group.conversations, **self._proposal_kwargs())]

        groups = self._groups(messages)
        with concurrent.futures.ThreadPoolExecutor(max_workers=len(groups)) as pool:
            futures = [(group, pool.submit(run, group)) for group in groups]
        for group, future in futures:
            try:
                for index, text in zip(group.indices, future.result()):
                    metrics.proposals[index] = text
            except Exception as err:  # noqa: BLE001 - a failed proposer is dropped, as the method prescribes
                metrics.drop(group.indices, group.backend, err)
        metrics.proposals_s = self.clock() - metrics.start_s

    def stream(self, messages: Messages) -> Iterator[str]:
        """The aggregator's answer as text deltas; `.last_metrics` is set when the stream ends (or is closed)."""
        messages = _check_messages(messages)
        metrics, marks = self._start_metrics()
        answer: list[str] = []
        try:
            self._propose(messages, metrics)
            kept = [p for p in metrics.proposals if p is not None]
            if not kept:
                raise RuntimeError(f"every proposer failed ({metrics.describe_drops()}); nothing to aggregate.")
            conversation = self.prompt_builder(messages, [[p] for p in kept], [True] * len(kept))
            stair = Stair(index=1, final=True, visible_tokens=None)
            for delta in self._aggregate(conversation, "", self.max_new_tokens, metrics, stair):
                answer.append(delta)
                yield delta
        finally:
            self._finish_metrics(metrics, marks, answer)


class StaircaseMoA(_Aggregation):
    """Staircase streaming over MoA: aggregate as soon as every proposer has a chunk, stream, continue with the
    growing proposals.

    Stair j waits until every live proposer has `T_j` tokens or has finished, where `T_j = j * chunk_tokens` (or the
    running sum of `schedule(1..j)` when a schedule callable is given), and asks the aggregator for at most
    `agg_chunk_tokens` more tokens (or `agg_schedule(j)`) of its answer, continuing what it has written, over the
    proposals' first `T_j` tokens. The stair at which every proposal is complete runs the aggregator to the end (at
    most `max_new_tokens` answer tokens in all). The proposals seen at a stair do not depend on timing (always their
    first `T_j` tokens), so greedy runs are reproducible and with `chunk_tokens` above every proposal's length the
    output equals `MixtureOfAgents`' exactly. If the aggregator stops (EOS) before the proposals are complete, the
    answer ends there (the user already has one; the proposers are closed).

    `prompt_builder(messages, pieces, finished)` gets each proposer's text as one piece per stair; `aggregate_prompt`
    (default) writes the MoA form with unfinished answers marked, `interleaved_prompt` lists the pieces stair by
    stair so that each stair's prompt extends the previous one (more prefix-cache reuse on a local aggregator).
    The aggregator must support `continue_final_message` (checked here).
    """

    method = "staircase"

    def __init__(self, proposers: Sequence[Backend], aggregator: Backend, *, chunk_tokens: int = 32,
                 agg_chunk_tokens: int = 32, schedule: Callable[[int], int] | None = None,
                 agg_schedule: Callable[[int], int] | None = None, prompt_builder: PromptBuilder = aggregate_prompt,
                 proposal_max_new_tokens: int | None = None, max_new_tokens: int | None = None,
                 seed: int | None = None, clock: Clock = time.perf_counter):
        for name, value in (("chunk_tokens", chunk_tokens), ("agg_chunk_tokens", agg_chunk_tokens)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive number of tokens, got {value!r}.")
        super().__init__(proposers, aggregator, prompt_builder=prompt_builder,
                         proposal_max_new_tokens=proposal_max_new_tokens, max_new_tokens=max_new_tokens, seed=seed,
                         clock=clock)
        aggregator.require("continue_final_message", "StaircaseMoA continues the aggregator's answer at every stair")
        for p in self.proposers:
            p.require("streaming", "StaircaseMoA streams the proposals")
        self.chunk_tokens = chunk_tokens
        self.agg_chunk_tokens = agg_chunk_tokens
        self.schedule = schedule
        self.agg_schedule = agg_schedule

    def _size(self, schedule: Callable[[int], int] | None, default: int, stair: int, what: str) -> int:
        size = default if schedule is None else schedule(stair)
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"{what} for stair {stair} must be a positive number of tokens, got {size!r}.")
        return size

    def stream(self, messages: Messages) -> Iterator[str]:
        """The aggregator's answer as text deltas; `.last_metrics` is set when the stream ends (or is closed)."""
        messages = _check_messages(messages)
        metrics, marks = self._start_metrics()
        answer: list[str] = []
        # With a schedule, stairs need not fall on multiples of one chunk size: stream token by token and cut here.
        granularity = self.chunk_tokens if self.schedule is None else 1
        feed = ProposalFeed(self._groups(messages), len(self.proposers), granularity, self._proposal_kwargs(),
                            clock=lambda: self.clock() - metrics.start_s)
        try:
            feed.start()
            target, written, j = 0, 0, 0
            while True:
                j += 1
                target += self._size(self.schedule, self.chunk_tokens, j, "the proposal chunk")
                view = feed.wait(target)
                for index, error in view.new_failures:
                    metrics.drop([index], self.proposers[index], error)
                live = [i for i in range(len(self.proposers)) if i not in metrics.dropped]
                if not live:
                    raise RuntimeError(f"every proposer failed ({metrics.describe_drops()}); nothing to aggregate.")
                final = all(view.finished[i] for i in live)
                conversation = self.prompt_builder(messages, [view.pieces[i] for i in live],
                                                   [view.finished[i] for i in live])
                remaining = None if self.max_new_tokens is None else self.max_new_tokens - written
                budget = remaining if final else self._size(self.agg_schedule, self.agg_chunk_tokens, j,
                                                             "the aggregator chunk")
                if remaining is not None:
                    budget = min(budget, remaining)
                stair = Stair(index=j, final=final, visible_tokens=[view.tokens[i] for i in live])
                for delta in self._aggregate(conversation, "".join(answer), budget, metrics, stair):
                    answer.append(delta)
                    yield delta
                written += stair.new_tokens or 0
                if final or (remaining is not None and written >= self.max_new_tokens):
                    break
                if stair.new_tokens is not None and budget is not None and stair.new_tokens < budget:
                    metrics.stopped_early = True  # the aggregator ended its answer before the proposals did
                    break
        finally:
            feed.close()
            for index, text in enumerate(feed.texts()):
                if index not in metrics.dropped and index not in feed.failed():
                    metrics.proposals[index] = text
            metrics.proposals_s = feed.all_done_s()
            self._finish_metrics(metrics, marks, answer)

