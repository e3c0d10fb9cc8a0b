"""`HotSwapHead`: the serving weights of an Aurora head, a double buffer with a versioned swap."""

from __future__ import annotations

import contextlib
import copy
import threading
import weakref

import torch
from torch import nn

from .aurora_config import AuroraConfig
from .aurora_head import AuroraHead


class HotSwapHead:
    """Two serving replicas of a head and the index of the active one.

    Readers `acquire()` the active replica (a counter per replica, taken under a condition variable); `publish()`
    waits until nobody holds the inactive replica, copies the new weights into it, then flips the index and bumps the
    version. A proposal therefore never sees a half-written weight set, and neither side blocks for long: readers
    never wait for a copy, the publisher waits at most for the proposals already running on the stale replica.
    """

    def __init__(self, head: AuroraHead):
        # Both replicas are private copies: publishing writes into them, and a caller's head may be shared (e.g. by a
        # frozen and an online drafter built from the same day-0 head).
        self._replicas = [copy.deepcopy(head), copy.deepcopy(head)]
        for replica in self._replicas:
            replica.requires_grad_(False).eval()
        self._active = 0
        self._readers = [0, 0]
        self._version = 0
        self._cond = threading.Condition()
        self._publish_lock = threading.Lock()
        self._writer: weakref.ref | None = None

    @property
    def version(self) -> int:
        return self._version

    @property
    def config(self) -> AuroraConfig:
        return self._replicas[0].config

    @contextlib.contextmanager
    def acquire(self):
        """`with hot.acquire() as (head, version):` - the head stays intact until the block exits."""
        with self._cond:
            idx, version = self._active, self._version
            self._readers[idx] += 1
        try:
            yield self._replicas[idx], version
        finally:
            with self._cond:
                self._readers[idx] -= 1
                self._cond.notify_all()

    def bind_writer(self, owner) -> None:
        """Make `owner` (an online trainer) the one trainer that publishes into this head. A second live trainer is
        refused: the two would publish in turns and readers would alternate between two unrelated weight sets."""
        with self._cond:
            current = self._writer() if self._writer is not None else None
            if current is not None and current is not owner:
                raise RuntimeError("HotSwapHead: another online trainer already publishes into this head (one trainer "
                                   "per serving head); stop and drop it first, or give each drafter its own head.")
            self._writer = weakref.ref(owner)

    def publish(self, source: AuroraHead | dict[str, torch.Tensor]) -> int:
        """Copy `source`'s weights into the inactive replica and make it active; returns the new version."""
        state = source.state_dict() if isinstance(source, nn.Module) else source
        with self._publish_lock:
            with self._cond:
                target = 1 - self._active
                self._cond.wait_for(lambda: self._readers[target] == 0)
            # No reader can start on `target` now: readers only pick the active replica.
            with torch.no_grad():
                for name, tensor in self._replicas[target].state_dict().items():
                    tensor.copy_(state[name])
            with self._cond:
                self._active = target
                self._version += 1
                return self._version

    def snapshot(self) -> AuroraHead:
        """A detached copy of the current serving head (for checkpoints)."""
        with self.acquire() as (head, _):
            return copy.deepcopy(head)
