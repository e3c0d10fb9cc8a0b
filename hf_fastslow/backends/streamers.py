"""`BatchChunkStreamer`: a transformers streamer for batched `generate` that hands out per-row token-id chunks.

transformers' `TextStreamer`/`TextIteratorStreamer` refuse batch size > 1. This streamer splits every `put(tokens)`
of a batched `generate` (shape `[B]` per decoding step, `[B, k]` when several tokens arrive at once) by row and emits
`(row, token_ids, done)` chunks of `chunk_tokens` ids (ids, not decoded characters). The first `put` is the
(expanded, left-padded) prompt, `[B, S]`: it is skipped. A row ends at its first stop id (EOS; what `generate` writes
after it is padding) or when generation ends; its last chunk has `done=True` and holds the remaining ids (the stop id
itself is not emitted). Consume it by iterating (a thread-safe queue, like `TextIteratorStreamer`) or give
`on_chunk`.
"""

from __future__ import annotations

import queue
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
from transformers.generation.streamers import BaseStreamer

__all__ = ["BatchChunkStreamer", "TokenChunk"]


@dataclass
class TokenChunk:
    row: int
    token_ids: list[int]
    done: bool


class BatchChunkStreamer(BaseStreamer):
    """Per-row token-id chunks of a batched `generate`.

    `stop_token_ids`: ids that end a row (EOS ids, and the pad id when `generate` pads finished rows with a
    non-EOS id). `timeout`: seconds the iterator waits for the next chunk before `queue.Empty`.
    """

    def __init__(
        self,
        chunk_tokens: int = 1,
        *,
        stop_token_ids: Iterable[int] = (),
        skip_prompt: bool = True,
        on_chunk: Callable[[TokenChunk], None] | None = None,
        timeout: float | None = None,
    ):
        if chunk_tokens < 1:
            raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}.")
        self.chunk_tokens = chunk_tokens
        self.stop_token_ids = {int(t) for t in stop_token_ids}
        self.on_chunk = on_chunk
        self.timeout = timeout
        self._skip_next = skip_prompt
        self._buffers: list[list[int]] | None = None
        self._done: list[bool] = []
        self._queue: queue.Queue = queue.Queue()
        self._end = object()

    @property
    def batch_size(self) -> int | None:
        return None if self._buffers is None else len(self._buffers)

    def _emit(self, chunk: TokenChunk) -> None:
        if self.on_chunk is not None:
            self.on_chunk(chunk)
        else:
            self._queue.put(chunk)

    def put(self, value: torch.Tensor) -> None:
        value = torch.as_tensor(value)
        if self._skip_next:  # the prompt: [B, S]
            self._skip_next = False
            if self._buffers is None:
                rows = value.shape[0] if value.dim() == 2 else 1
                self._buffers, self._done = [[] for _ in range(rows)], [False] * rows
            return
        if value.dim() == 1:
            value = value[:, None]
        if self._buffers is None:
            self._buffers, self._done = [[] for _ in range(value.shape[0])], [False] * value.shape[0]
        if value.shape[0] != len(self._buffers):
            raise ValueError(f"BatchChunkStreamer got {value.shape[0]} rows after {len(self._buffers)}.")
        for row, ids in enumerate(value.tolist()):
            if self._done[row]:
                continue
            buffer = self._buffers[row]
            for token in ids:
                if token in self.stop_token_ids:
                    self._finish(row)
                    break
                buffer.append(token)
                if len(buffer) == self.chunk_tokens:
                    self._emit(TokenChunk(row, buffer.copy(), False))
                    buffer.clear()

    def _finish(self, row: int) -> None:
        self._done[row] = True
        self._emit(TokenChunk(row, self._buffers[row].copy(), True))
        self._buffers[row].clear()

    def end(self) -> None:
        for row in range(len(self._buffers or [])):
            if not self._done[row]:
                self._finish(row)
        self._queue.put(self._end)

    def fail(self, error: BaseException) -> None:
        """Hand an exception raised by the generating thread to the consumer (re-raised by the iterator)."""
        self._queue.put(error)

    def __iter__(self) -> Iterator[TokenChunk]:
        while True:
            item = self._queue.get(timeout=self.timeout)
            if item is self._end:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
