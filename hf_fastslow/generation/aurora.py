"""Aurora: an EAGLE-style draft head trained online from live speculative-decoding traces and hot-swapped in.

Paper: "When RL Meets Adaptive Speculative Training: A Unified Training-Serving System" (Wang et al., arXiv 2602.06932).

Pieces, from the bottom up (this module is the drafter and re-exports the others, so `hf_fastslow.generation.aurora`
still names them all):

* `AuroraHead` (`aurora_head.py`, shapes in `aurora_config.py`) - one decoder block on a fused feature of three target
  hidden-state taps and the embedding of the next token, predicting over a pruned draft vocabulary (`d2t` maps draft
  ids back to target ids). Drafting chains the head's own output state, as in EAGLE-3; training unrolls the same chain
  ("training-time test").
* `HotSwapHead` (`aurora_hotswap.py`) - two serving replicas of the head and a versioned pointer: the trainer writes
  the inactive replica (never one a reader holds) and flips the pointer, so every proposal is computed from one
  complete weight set.
* `AuroraTrainer` (`hf_fastslow/trainers/aurora_online_trainer.py`, buffer in `trainers/replay_buffer.py`) - a replay
  buffer of traces (accepted tokens = positives, the first rejected proposal of a round = negative) and an AdamW loop,
  run inline (`train(n)`) or in a background thread (`start()` / `stop()`).
* `AuroraDrafter` (here) - the `Drafter` that reads the target's hidden states from each verification, drafts with the
  current serving weights and feeds its traces (`AuroraTrace`) to the trainer (`online=False` gives a frozen
  speculator).
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import os
from typing import Any

import torch

from .aurora_config import AuroraConfig, default_taps
from .aurora_head import CONFIG_NAME, PAPER, WEIGHTS_NAME, AuroraHead, select_draft_vocab
from .aurora_hotswap import HotSwapHead
from .drafter import DraftContext, Drafter, DraftFeedback

# The online trainer lives in hf_fastslow.trainers, a floor above generation/: these names resolve on first use, so
# importing this module never imports trainers/.
_TRAINER_MODULES = {
    "AuroraTrainer": "hf_fastslow.trainers.aurora_online_trainer",
    "ReplayBuffer": "hf_fastslow.trainers.replay_buffer",
}

__all__ = [
    "CONFIG_NAME",
    "PAPER",
    "WEIGHTS_NAME",
    "AuroraConfig",
    "AuroraDrafter",
    "AuroraHead",
    "AuroraTrace",
    "HotSwapHead",
    "default_taps",
    "select_draft_vocab",
] + list(_TRAINER_MODULES)


def __getattr__(name: str):
    if name in _TRAINER_MODULES:
        return getattr(importlib.import_module(_TRAINER_MODULES[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_TRAINER_MODULES))


@dataclasses.dataclass
class AuroraTrace:
    """A contiguous piece of one request, as verified by the target.

    taps: (N, n_taps*H) target states at positions p0..p0+N-1; ids: tokens x_{p0+1}, x_{p0+2}, ... (the token after
    each anchor, then later tokens as labels for the unrolled steps); loss_from: anchors before it are context only
    (they were trained in the previous piece); negatives: (anchor, step, target id, serving version) of each round's
    first rejected proposal.
    """

    taps: torch.Tensor
    ids: torch.Tensor
    loss_from: int = 0
    negatives: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)

    def __len__(self):
        return self.taps.shape[0]



class _Row:
    """Per-request state: target taps of every verified position, the committed tokens, negatives not yet pushed."""

    __slots__ = ("flushed", "negatives", "pending", "taps", "tokens")

    def __init__(self):
        self.taps: list[torch.Tensor] = []  # chunks of (n, n_taps*H), positions 0.. contiguous
        self.tokens: list[int] = []
        self.flushed = 0  # anchors < flushed were pushed as loss anchors already
        self.negatives: list[tuple[int, int, int, int]] = []
        self.pending: tuple[int, list[int], int] | None = None  # (anchor, drafted ids, version) of the open round

    @property
    def covered(self) -> int:
        return sum(t.shape[0] for t in self.taps)

    def all_taps(self) -> torch.Tensor:
        if len(self.taps) > 1:
            self.taps = [torch.cat(self.taps)]
        return self.taps[0]


class AuroraDrafter(Drafter):
    """Draft tokens with an Aurora head on the target's hidden states; learn from the verification outcomes.

    Args:
        model (`PreTrainedModel`): the target (its embedding is shared with the head; nothing of it is modified).
        head (`AuroraHead`, *optional*): a trained or day-0 head; default `AuroraHead.from_target(model, ...)`.
        online (`bool`): collect traces and train (`start()` for the background thread, or `trainer.train(n)`
            inline). `False` gives a frozen speculator: same drafting, no learning.
        max_draft_tokens (`int`, *optional*): k per round (default: `head.config.max_draft`, 5).
        draft_vocab_size, token_counts: forwarded to `AuroraHead.from_target` when `head` is None.
        seed (`int`, *optional*): initialisation of a new head and the trainer's sampling of the replay buffer.
        flush_every (`int`): push a request's trace to the replay buffer every this many new positions (and at the
            end of the request), so a long generation feeds the trainer while it runs.
        **trainer_kwargs: forwarded to `AuroraTrainer` (lr, ttt_length, rejection_weight, sync_every, batch_size,
            max_len, buffer_size, grad_clip, max_staleness, seed).
    """

    needs_hidden_states = True

    def __init__(
        self,
        model,
        head: AuroraHead | None = None,
        *,
        online: bool = True,
        max_draft_tokens: int | None = None,
        draft_vocab_size: int | None = None,
        token_counts=None,
        seed: int | None = None,
        flush_every: int = 32,
        **trainer_kwargs,
    ):
        if head is None:
            head = AuroraHead.from_target(model, draft_vocab_size=draft_vocab_size, token_counts=token_counts,
                                          seed=seed)
        super().__init__(max_draft_tokens if max_draft_tokens is not None else head.config.max_draft)
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}.")
        self.check_compatible(model, head)
        self.embed = model.get_input_embeddings()
        self.hidden_state_layers = tuple(head.config.taps)
        self.hot = HotSwapHead(head)
        self.online = online
        self.flush_every = flush_every
        if online and seed is not None:
            trainer_kwargs.setdefault("seed", seed)
        self.trainer = self._make_trainer(trainer_kwargs) if online else None
        self._rows: dict[Any, _Row] = {}
        # Serving version used by each recent proposal (bounded): lets callers check swaps are monotonic.
        self.version_trace: collections.deque[int] = collections.deque(maxlen=4096)

    def _make_trainer(self, trainer_kwargs: dict[str, Any]):
        # Imported here, not at the top: generation/ sits below trainers/ and must not import it when it loads; only an
        # online drafter needs the trainer, so a frozen one never imports it.
        from ..trainers.aurora_online_trainer import AuroraTrainer

        return AuroraTrainer(self.hot, self.embed, **trainer_kwargs)

    # ---- Drafter hooks -------------------------------------------------------------------------------------------
    def check_compatible(self, model, head: AuroraHead | None = None) -> None:
        cfg = (head if head is not None else self.hot).config
        mcfg = model.config
        vocab = model.get_input_embeddings().weight.shape[0]
        if cfg.hidden_size != mcfg.hidden_size:
            raise ValueError(
                f"The Aurora head was built for hidden size {cfg.hidden_size}, the target has {mcfg.hidden_size}: "
                "build the head for this model with `AuroraHead.from_target(model)`."
            )
        if cfg.target_vocab_size != vocab:
            raise ValueError(
                f"The Aurora head maps to a {cfg.target_vocab_size}-token vocabulary, the target has {vocab}: the "
                "head only works with the target (and tokenizer) it was built for."
            )
        if max(cfg.taps) > mcfg.num_hidden_layers:
            raise ValueError(
                f"The head reads hidden-state taps {list(cfg.taps)}, the target has only {mcfg.num_hidden_layers} "
                "layers."
            )

    def reset(self) -> None:
        for row in self._rows.values():
            self._flush(row, final=True)
        self._rows.clear()

    @torch.no_grad()
    def propose(self, context: DraftContext) -> list[torch.LongTensor]:
        if context.hidden_states is None:
            raise ValueError(
                "AuroraDrafter needs the target's hidden states: run it through `speculative_generate`, which "
                "provides them when `drafter.needs_hidden_states` is True."
            )
        drafts = []
        window = self.hot.config.window
        with self.hot.acquire() as (head, version):  # one weight set for the whole batch of this round
            for i, (ids, budget, rid) in enumerate(zip(context.input_ids, context.budgets, context.request_ids)):
                if rid not in self._rows and budget <= 0:
                    drafts.append(ids.new_empty(0))  # a finished row: nothing to draft, nothing to record
                    continue
                row = self._rows.setdefault(rid, _Row())
                self._add_states(row, context.hidden_states[i], context.hidden_offsets[i])
                row.tokens = ids.tolist()
                row.pending = None
                k = min(int(budget), self.max_draft_tokens)
                anchor = len(row.tokens) - 2  # the newest token's own state is not computed yet
                if k <= 0 or anchor < 0 or row.covered != anchor + 1:
                    drafts.append(ids.new_empty(0))
                    continue
                w = min(window, anchor + 1)
                taps = row.all_taps()[anchor + 1 - w : anchor + 1].to(head.fc.weight.dtype)
                next_ids = ids[anchor + 2 - w : anchor + 2]
                drafted, _ = head.propose(taps, next_ids, self.embed, k, start_pos=anchor + 1 - w)
                out = drafted.tolist()
                for j, tok in enumerate(out):
                    if tok in context.eos_token_ids:
                        out = out[: j + 1]  # nothing after EOS can be accepted
                        break
                row.pending = (anchor, out, version)
                self.version_trace.append(version)
                drafts.append(torch.tensor(out, dtype=torch.long, device=ids.device))
        return drafts

    def observe(self, feedback: DraftFeedback) -> None:
        for rid, proposed, n, appended, done in zip(
            feedback.request_ids, feedback.proposed, feedback.num_accepted, feedback.appended, feedback.finished
        ):
            row = self._rows.get(rid)
            if row is None:
                continue
            row.tokens.extend(appended.tolist())
            if row.pending is not None and self.trainer is not None:
                anchor, _, version = row.pending
                if n < len(proposed):
                    row.negatives.append((anchor, int(n), int(proposed[n]), version))
            row.pending = None
            if done:
                self._flush(row, final=True)
                del self._rows[rid]
            elif row.covered - row.flushed >= self.flush_every + self._label_lag:
                self._flush(row, final=False)

    # ---- online learning -------------------------------------------------------------------------------------------
    @property
    def _label_lag(self) -> int:
        return (self.trainer.ttt_length if self.trainer else 0) + 1

    def _add_states(self, row: _Row, states: torch.Tensor | None, offset: int | None):
        if states is None or states.shape[0] == 0:
            return
        if offset is None or offset != row.covered:
            # A gap (or overlap) breaks the one-state-per-token invariant: restart the row from these states.
            self._flush(row, final=True)
            row.taps, row.negatives, row.flushed = [], [], 0
            if offset:
                row.taps = [states.new_zeros(offset, states.shape[1] * states.shape[2])]
                row.flushed = offset
        row.taps.append(states.detach().reshape(states.shape[0], -1).clone())

    def _flush(self, row: _Row, final: bool):
        """Push anchors [flushed, end) as a trace; `end` leaves the last anchors until their labels are known."""
        if self.trainer is None or not row.taps:
            return
        covered = row.covered
        end = covered if final else covered - self._label_lag
        if end <= row.flushed:
            return
        ctx = max(0, row.flushed - (self.hot.config.window - 1))
        taps = row.all_taps()[ctx:end].cpu()
        ids = torch.tensor(row.tokens[ctx + 1 : end + 1 + self.trainer.ttt_length + 1], dtype=torch.long)
        negatives = [(a - ctx, s, t, v) for a, s, t, v in row.negatives if row.flushed <= a < end]
        self.trainer.add_trace(AuroraTrace(taps=taps, ids=ids, loss_from=row.flushed - ctx, negatives=negatives))
        row.negatives = [neg for neg in row.negatives if neg[0] >= end]
        row.flushed = end

    def start(self) -> AuroraDrafter:
        """Start the background trainer (online mode only)."""
        if self.trainer is None:
            raise ValueError("This AuroraDrafter is frozen (online=False): there is no trainer to start.")
        self.trainer.start()
        return self

    def stop(self):
        if self.trainer is not None:
            self.trainer.stop()

    @property
    def version(self) -> int:
        return self.hot.version

    @property
    def head(self) -> AuroraHead:
        """A copy of the current serving head."""
        return self.hot.snapshot()

    def save_pretrained(self, save_directory: str | os.PathLike, figures: dict[str, Any] | None = None):
        """Checkpoint the current serving head (see `AuroraHead.save_pretrained`)."""
        self.head.save_pretrained(save_directory, figures=figures)
