"""The machinery under `hf_fastslow.generation.staircase`: grouping proposers into batched calls, the proposal feed
that streams them in background threads and hands their text out stair by stair, and a sync-to-async iterator
bridge."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hf_fastslow.backends.base import Backend, Messages, StreamChunk, iterate_in_thread, with_system

__all__ = ["FeedView", "ProposalFeed", "ProposerGroup", "batch_key", "group_proposers", "iterate_in_thread"]


@dataclass
class ProposerGroup:
    """Proposers served by one call of `backend`: proposer `indices[r]` is row r, asking `conversations[r]`."""

    backend: Backend
    indices: list[int] = field(default_factory=list)
    conversations: list[Messages] = field(default_factory=list)


def batch_key(backend: Backend) -> tuple:
    """Proposers with equal keys share one batched call. A local backend (one holding a torch `model`) batches
    with every local backend of the same class over the same model and tokenizer with the same generation defaults:
    their rows sample alike in one `generate`, and each row keeps its own system prompt (persona). Anything else
    batches only with itself (one object listed several times)."""
    model = getattr(backend, "model", None)
    if not isinstance(model, torch.nn.Module):  # an endpoint's `model` is the served model's name
        return ("object", id(backend))
    defaults = tuple(sorted((k, repr(v)) for k, v in backend.generation_defaults.items()))
    return ("local", type(backend), id(model), id(getattr(backend, "tokenizer", None)), defaults,
            backend.system is None)


def group_proposers(proposers: Sequence[Backend], messages: Messages) -> list[ProposerGroup]:
    """One group per batch key, in order of first appearance; each row's conversation carries its own proposer's
    system prompt (so batching under the group's first backend keeps every persona)."""
    groups: dict[tuple, ProposerGroup] = {}
    for index, backend in enumerate(proposers):
        group = groups.setdefault(batch_key(backend), ProposerGroup(backend))
        group.indices.append(index)
        group.conversations.append(with_system(messages, backend.system))
    return list(groups.values())


@dataclass
class _Chunk:
    start: int  # tokens of this proposal before the chunk
    size: int
    text: str


@dataclass
class FeedView:
    """What the aggregator may see at one stair: per proposer its text as one piece per stair so far, whether it
    has finished within what is shown, how many tokens are shown; proposers that failed since the last view."""

    pieces: list[list[str]]
    finished: list[bool]
    tokens: list[int]
    new_failures: list[tuple[int, BaseException]]
    all_done_s: float | None


class ProposalFeed:
    """Streams every proposer group in its own thread (`stream_batch(..., chunk_tokens=granularity)`) and answers
    `wait(target)`: block until every live proposer has `target` tokens or has finished (or failed), then show the
    proposals cut at the stair targets asked so far. A proposer that failed is reported (`new_failures`) at the
    first stair it cannot fill.

    Chunks are counted in tokens: `len(token_ids)` when the backend gives ids, else `granularity` for a chunk that
    is not a proposal's last and the number of words of a last one (exact for `ScriptedBackend`, whose tokens are
    words). A chunk belongs to the first stair whose target exceeds its start, so the cut never depends on timing.
    """

    def __init__(self, groups: Sequence[ProposerGroup], proposers: int, granularity: int,
                 kwargs: dict[str, Any], clock: Callable[[], float]):
        self.groups = list(groups)
        self.granularity = granularity
        self.kwargs = {k: v for k, v in kwargs.items() if v is not None}
        # A proposal at its token limit is complete even before its stream says so (a streamer learns that a row
        # ended only at the next step, so a proposal of exactly k chunks would otherwise cost one more stair).
        self.limit = self.kwargs.get("max_new_tokens")
        self.clock = clock
        self._chunks: list[list[_Chunk]] = [[] for _ in range(proposers)]
        self._count = [0] * proposers
        self._done_start: list[int | None] = [None] * proposers
        self._failed: dict[int, BaseException] = {}
        self._reported: set[int] = set()
        self._targets: list[int] = []
        self._all_done_s: float | None = None
        self._cond = threading.Condition()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        for group in self.groups:
            thread = threading.Thread(target=self._pump, args=(group,), daemon=True,
                                      name=f"staircase-proposer-{group.indices}")
            self._threads.append(thread)
            thread.start()

    def _chunk_size(self, chunk: StreamChunk) -> int:
        if chunk.token_ids is not None:
            return len(chunk.token_ids)
        return len(chunk.text.split()) if chunk.done else self.granularity

    def _pump(self, group: ProposerGroup) -> None:
        stream: Iterator[StreamChunk] | None = None
        try:
            stream = group.backend.stream_batch(group.conversations, chunk_tokens=self.granularity, **self.kwargs)
            for chunk in stream:
                index = group.indices[chunk.row]
                size = self._chunk_size(chunk)
                with self._cond:
                    start = self._count[index]
                    if chunk.text or size:
                        self._chunks[index].append(_Chunk(start, size, chunk.text))
                    self._count[index] += size
                    if chunk.done and self._done_start[index] is None:
                        self._done_start[index] = start
                    self._note_all_done()
                    self._cond.notify_all()
                if self._stop.is_set():
                    break
        except BaseException as err:  # noqa: BLE001 - the proposer is dropped; the stair reports it
            with self._cond:
                for index in group.indices:
                    if self._done_start[index] is None:
                        self._failed[index] = err
                self._note_all_done()
                self._cond.notify_all()
        finally:
            if stream is not None and hasattr(stream, "close"):
                stream.close()  # writes the call's ledger record; lets a local backend stop generating
            with self._cond:  # a stream that ended without marking a row done has nothing more for it
                for index in group.indices:
                    if self._done_start[index] is None and index not in self._failed:
                        self._done_start[index] = self._count[index]
                self._note_all_done()
                self._cond.notify_all()

    def _note_all_done(self) -> None:
        if self._all_done_s is None and all(
                d is not None or i in self._failed for i, d in enumerate(self._done_start)):
            self._all_done_s = self.clock()

    def _ready(self, index: int, target: int) -> bool:
        return index in self._failed or self._done_start[index] is not None or self._count[index] >= target

    def wait(self, target: int) -> FeedView:
        """Block until stair `target` (tokens per proposal, increasing from call to call) can be shown."""
        if self._targets and target <= self._targets[-1]:
            raise ValueError(f"stair targets must increase ({self._targets[-1]} then {target}).")
        with self._cond:
            self._cond.wait_for(lambda: all(self._ready(i, target) for i in range(len(self._count))))
            self._targets.append(target)
            bounds = [0, *self._targets]
            pieces, finished, tokens = [], [], []
            for index, chunks in enumerate(self._chunks):
                per_stair = ["".join(c.text for c in chunks if lo <= c.start < hi)
                             for lo, hi in zip(bounds, bounds[1:])]
                pieces.append(per_stair)
                done_start = self._done_start[index]
                complete = done_start is not None and done_start < target
                at_limit = self.limit is not None and self._count[index] >= self.limit and self.limit <= target
                finished.append(index not in self._failed and (complete or at_limit))
                tokens.append(sum(c.size for c in chunks if c.start < target))
            # A failed proposal stays in view while it still has the stair's tokens, so when it drops out does not
            # depend on how far its thread had run.
            new = [(i, e) for i, e in self._failed.items() if i not in self._reported and self._count[i] < target]
            self._reported.update(i for i, _ in new)
            return FeedView(pieces, finished, tokens, new, self._all_done_s)

    def texts(self) -> list[str]:
        """Every proposal's text received so far (complete once the proposer finished)."""
        with self._cond:
            return ["".join(c.text for c in chunks) for chunks in self._chunks]

    def all_done_s(self) -> float | None:
        """When the last proposal was complete (or had failed), on the feed's clock; None while one is running."""
        with self._cond:
            return self._all_done_s

    def failed(self) -> dict[int, BaseException]:
        with self._cond:
            return dict(self._failed)

    def close(self, timeout: float = 60.0) -> None:
        """Stop reading the streams and wait for their threads (each closes its stream, which writes its ledger
        record), so that the run's token counts are complete when it reports them."""
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout)
