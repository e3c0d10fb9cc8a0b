"""`AuroraTrainer`: Aurora's online trainer of the draft head, fed with traces by `AuroraDrafter`.

It trains a private copy of the head on the replay buffer (inline with `train(n)`, or in a background thread with
`start()` / `stop()`) and publishes into the drafter's `HotSwapHead`.

One trainer (and at most one training thread) per serving head, so per serving process: a second trainer bound to
the same `HotSwapHead` is refused. A publication copies the head between optimizer steps only (it holds the step
lock), into the replica no proposal is reading, and flips one index: a reader sees one whole weight set, never a mix.
Several serving processes each keep their own head, buffer and thread; nothing is synchronised between them (see
docs/scaling_parts/multiprocess.md).
"""

from __future__ import annotations

import logging
import random
import threading
import time
from typing import Any

import torch
from torch import nn

from ..generation.aurora import AuroraTrace
from ..generation.aurora_hotswap import HotSwapHead
from .replay_buffer import ReplayBuffer

logger = logging.getLogger(__name__)


def _labelled_end(trace: AuroraTrace) -> int:
    """One past the last anchor whose step-0 label (`ids[a + 1]`) is known."""
    return min(len(trace), trace.ids.numel() - 1)


class AuroraTrainer:
    """Online trainer: AdamW on a private copy of the head, publishing into a `HotSwapHead` every `sync_every` steps.

    Loss per chunk (one trace window of at most `max_len` anchors, unrolled `ttt_length` steps):
    `sum_j 0.8^j * CE(q_j, x_{s+2+j})` over anchors whose label is in the draft vocabulary (under greedy serving the
    verified token is the target's argmax, so this is the forward KL at temperature 0), plus
    `rejection_weight * -log(1 - q_j*(x_hat))` at each round's first rejected proposal (never at later steps: their
    context contains the rejected token). Negatives older than `max_staleness` versions are dropped.
    """

    def __init__(
        self,
        hot: HotSwapHead,
        embed: nn.Module,
        *,
        lr: float = 1e-3,
        ttt_length: int = 5,
        rejection_weight: float = 0.1,
        sync_every: int = 10,
        batch_size: int = 4,
        max_len: int = 64,
        buffer_size: int = 256,
        grad_clip: float = 0.5,
        max_staleness: int = 5,
        seed: int = 0,
    ):
        if ttt_length < 1 or sync_every < 1 or batch_size < 1 or max_len < 1:
            raise ValueError("ttt_length, sync_every, batch_size and max_len must be >= 1")
        self.hot = hot
        self.embed = embed
        self.head = hot.snapshot()
        self.head.requires_grad_(True).train()
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=lr,
                                           weight_decay=0.0)
        self.ttt_length, self.rejection_weight, self.sync_every = ttt_length, rejection_weight, sync_every
        self.batch_size, self.max_len = batch_size, max_len
        self.grad_clip, self.max_staleness = grad_clip, max_staleness
        self._t2d = self.head.t2d.cpu()  # traces live on the CPU; the head may not
        self.buffer = ReplayBuffer(buffer_size)
        self.rng = random.Random(seed)
        self.steps = 0
        self.last_loss = float("nan")
        self.last_sim_acceptance = float("nan")
        self.train_seconds = 0.0
        # Re-entrant: train_step publishes while holding it; an outside publish() waits for the step to finish.
        self._step_lock = threading.RLock()
        self._thread_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None
        hot.bind_writer(self)

    # ---- data --------------------------------------------------------------------------------------------------
    def add_trace(self, trace: AuroraTrace):
        if trace.loss_from >= _labelled_end(trace):
            return  # no anchor with a known next token: no signal
        self.buffer.put(trace)

    def _collate(self, traces: list[AuroraTrace]):
        """Pad a window of each trace into (B, S) tensors; labels (steps, B, S) in draft ids, -100 = no loss."""
        T, w = self.ttt_length, self.head.config.window
        pieces = []
        for tr in traces:
            n = len(tr)
            lo = self.rng.randrange(tr.loss_from, _labelled_end(tr))
            hi = min(n, lo + self.max_len)
            ctx = max(0, lo - (w - 1))  # give the first loss anchor its full attention window
            pieces.append((tr, ctx, lo, hi))
        s = max(hi - ctx for _, ctx, _, hi in pieces)
        b = len(pieces)
        dim = traces[0].taps.shape[-1]
        dtype = self.head.fc.weight.dtype
        taps = torch.zeros(b, s, dim, dtype=dtype)
        ids = torch.zeros(b, s + T, dtype=torch.long)
        valid = torch.zeros(b, s, dtype=torch.bool)
        labels = torch.full((T, b, s), -100, dtype=torch.long)
        negatives = []
        t2d = self._t2d
        for i, (tr, ctx, lo, hi) in enumerate(pieces):
            m = hi - ctx
            taps[i, :m] = tr.taps[ctx:hi].to(dtype)
            seq = tr.ids[ctx : hi + T]
            known = seq.clamp_min(0)
            ids[i, : seq.numel()] = known
            valid[i, :m] = True
            anchors = torch.arange(lo, hi)
            for j in range(T):
                # label of anchor a at step j is x_{p0+a+2+j} = tr.ids[a + 1 + j]
                idx = anchors + 1 + j
                lab = torch.full((hi - lo,), -1, dtype=torch.long)
                ok = idx < tr.ids.numel()
                lab[ok] = tr.ids[idx[ok]]
                lab_d = torch.where(lab >= 0, t2d[lab.clamp_min(0)], torch.full_like(lab, -1))
                labels[j, i, lo - ctx : hi - ctx] = torch.where(lab_d >= 0, lab_d, torch.full_like(lab_d, -100))
            for anchor, step, tok, version in tr.negatives:
                fresh = self.hot.version - version <= self.max_staleness
                if fresh and lo <= anchor < hi and step < T and t2d[tok] >= 0:
                    negatives.append((i, anchor - ctx, step, int(t2d[tok])))
        device = self.head.fc.weight.device
        return taps.to(device), ids.to(device), valid.to(device), labels.to(device), negatives

    # ---- optimisation --------------------------------------------------------------------------------------------
    def loss(self, traces: list[AuroraTrace]):
        """(loss tensor, simulated acceptance length) of a batch of traces."""
        taps, ids, valid, labels, negatives = self._collate(traces)
        with torch.no_grad():
            next_embeds = self.embed(ids).to(taps.dtype)
        logits = self.head.unroll(taps, next_embeds, valid, self.ttt_length)
        total = taps.new_zeros(())
        alive = torch.ones_like(labels[0], dtype=torch.float32)
        sim_accept = torch.zeros_like(alive)
        for j, lj in enumerate(logits):
            lab = labels[j]
            mask = lab != -100
            if mask.any():
                logp = torch.log_softmax(lj.float(), dim=-1)
                nll = -logp.gather(-1, lab.clamp_min(0)[..., None])[..., 0]
                total = total + (0.8**j) * nll[mask].mean()
                with torch.no_grad():
                    hit = (lj.argmax(-1) == lab) & mask
                    alive = alive * hit.float()
                    sim_accept += alive
            else:
                alive = torch.zeros_like(alive)
            rows = [(b, a, tok) for b, a, step, tok in negatives if step == j]
            if rows and self.rejection_weight > 0:
                bi, ai, ti = (torch.tensor(c, device=lj.device) for c in zip(*rows))
                q = torch.softmax(lj[bi, ai].float(), dim=-1).gather(-1, ti[:, None])[:, 0]
                total = total + self.rejection_weight * (-torch.log1p(-q.clamp(max=1 - 1e-6))).mean()
        first = labels[0] != -100
        sim = float(sim_accept[first].mean()) if first.any() else float("nan")
        return total, sim

    def train_step(self, traces: list[AuroraTrace] | None = None) -> float | None:
        """One AdamW step on `traces` (default: a batch from the replay buffer); None if there is nothing to learn."""
        with self._step_lock:
            if traces is None:
                traces = self.buffer.sample(self.batch_size, self.rng)
            if not traces:
                return None
            t0 = time.perf_counter()
            loss, sim = self.loss(traces)
            if not loss.requires_grad:
                return None
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.grad_clip)
            self.optimizer.step()
            self.steps += 1
            self.last_loss, self.last_sim_acceptance = float(loss.detach()), sim
            if self.steps % self.sync_every == 0:
                self.publish()
            self.train_seconds += time.perf_counter() - t0
            return self.last_loss

    def publish(self) -> int:
        """Publish the head as it is after the last whole optimizer step (safe from any thread); the new version."""
        with self._step_lock:
            return self.hot.publish(self.head)

    def train(self, steps: int) -> list[float]:
        """Run `steps` steps inline (deterministic; for tests and between-request training)."""
        losses = []
        for _ in range(steps):
            value = self.train_step()
            if value is None:
                break
            losses.append(value)
        return losses

    # ---- background thread ---------------------------------------------------------------------------------------
    def start(self, num_threads: int | None = 1) -> AuroraTrainer:
        """Train in a daemon thread until `stop()`. Torch kernels release the GIL, so decoding keeps running."""
        with self._thread_lock:  # concurrent start() calls still start one thread
            if self._thread is not None and self._thread.is_alive():
                return self
            self._stop.clear()
            self._error = None
            self._thread = threading.Thread(target=self._loop, name="aurora-trainer", daemon=True)
            self._thread.start()
        return self

    def _loop(self):
        try:
            while not self._stop.is_set():
                if self.train_step() is None:
                    self.buffer.sample(0, self.rng, timeout=0.05)  # wait for traffic
                    self._stop.wait(0.05)
        except BaseException as err:  # surfaced by stop()/check()
            self._error = err
            logger.exception("Aurora trainer thread failed")

    def stop(self, publish: bool = True):
        """Stop the thread (after its current step), publish the latest weights, re-raise a thread failure."""
        with self._thread_lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join()
        if publish and self.steps:
            self.publish()
        self.check()

    def check(self):
        if self._error is not None:
            raise RuntimeError("the Aurora trainer thread failed") from self._error

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def stats(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "version": self.hot.version,
            "loss": self.last_loss,
            "sim_acceptance": self.last_sim_acceptance,
            "buffer": len(self.buffer),
            "traces_seen": self.buffer.total,
            "traces_dropped": self.buffer.dropped,
            "train_seconds": self.train_seconds,
        }
