"""`ReplayBuffer`: the bounded FIFO of Aurora traces that the online trainer samples from."""

from __future__ import annotations

import collections
import random
import threading

from ..generation.aurora import AuroraTrace


class ReplayBuffer:
    """Bounded FIFO of traces; `put` never blocks and drops the oldest trace when full."""

    def __init__(self, capacity: int = 256):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self._items: collections.deque[AuroraTrace] = collections.deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._added = threading.Condition(self._lock)
        self.dropped = 0
        self.total = 0

    def put(self, trace: AuroraTrace):
        with self._lock:
            if len(self._items) == self._items.maxlen:
                self.dropped += 1
            self._items.append(trace)
            self.total += 1
            self._added.notify_all()

    def __len__(self):
        with self._lock:
            return len(self._items)

    def sample(self, n: int, rng: random.Random, timeout: float | None = None) -> list[AuroraTrace]:
        """`n` traces drawn with replacement, weighted by length, newest-biased (recent traffic matters most)."""
        with self._lock:
            if not self._items and timeout:
                self._added.wait(timeout)
            items = list(self._items)
        if not items:
            return []
        weights = [len(t) * (1.0 + i / len(items)) for i, t in enumerate(items)]
        return rng.choices(items, weights=weights, k=n)
