"""Drafter interface for lossless speculative decoding (Leviathan et al., "Fast Inference from Transformers via
Speculative Decoding", ICML 2023), driven by `hf_fastslow.generation.speculative_generate`.

Contract for implementers (e.g. `AuroraDrafter`, `DASDrafter`)
-------------------------------------------------------------
The verify loop owns the target model, its cache and all correctness; a drafter only guesses. Per generate call:

1. Round 0 is the target prefill; no draft is asked for.
2. Every round the loop calls ``drafter.propose(context)`` once for the whole batch, with a `DraftContext`:
   ``context.input_ids[i]`` is row i's committed sequence (prompt + generated tokens, no padding, 1-D LongTensor on the
   model device), ``context.budgets[i]`` the most draft tokens the loop will verify for that row this round
   (``min(max_draft_tokens, tokens the row may still generate - 1)``; 0 for finished rows).
   ``propose`` returns one 1-D LongTensor per row (any length, possibly empty); the loop truncates it to the budget.
   Drafts are verified as given. Under sampling they are treated as a point-mass proposal, which is exact for any
   way of choosing them (deterministic or random), so a drafter never returns probabilities.
3. After the target pass the loop calls ``drafter.observe(feedback)`` with a `DraftFeedback`: per row the proposed
   tokens, how many were accepted, the tokens appended to the row (accepted drafts + the target's own next token),
   and whether the row finished (EOS, length or a stopping criterion). A row that stops on one of its drafts (an
   accepted EOS, a stopping criterion) keeps the drafts up to it and no target token; ``proposed`` is then cut after
   that draft (later drafts were never used) and ``num_accepted`` counts the drafts kept. ``feedback.finished[i]`` is
   True exactly once per row (the round it finishes; a row that finished at prefill gets one feedback with nothing
   proposed); then ``feedback.sequences[i]`` is the row's whole sequence (prompt + response, no padding) and
   ``feedback.prompt_lengths[i]`` its prompt length (both None/absent for rows still running).
4. Rows are identified across rounds by ``context.request_ids[i]`` (unique per row and generate call) and grouped by
   ``context.problem_ids[i]`` (caller-supplied via ``generate(..., problem_ids=[...])``, otherwise a hash of the prompt
   token ids, so GRPO siblings and later epochs of the same prompt share it).

Optional target signals (they cost memory, so a drafter asks for them):

* ``needs_hidden_states = True``: ``context.hidden_states[i]`` holds the target's hidden states for the tokens of row
  i that were verified since the previous ``propose`` (the prompt after prefill, then the accepted drafts plus the
  token before them), shape ``(n_new, len(hidden_state_layers), hidden_size)``; ``context.hidden_offsets[i]`` is the
  position in ``context.input_ids[i]`` of the first of them. Together, successive calls cover every token except the
  last one of the row (the target has not run on it yet). ``hidden_state_layers`` uses HF's tuple indices (0 =
  embeddings, -1 = last layer after the final norm). Accumulate them in the drafter if you need history.
* ``needs_target_logits = True``: ``feedback.target_logits[i]`` holds the processed target logits at the verified
  positions that saw the correct prefix (``num_accepted + 1`` rows of vocab size; the last one produced the bonus
  token). Positions after the first rejected draft are never given out: their prefix contained a rejected token.

Thread-safety: one generate call uses its drafter from one thread. A drafter that swaps weights from another thread
(Aurora) must make ``propose`` read one consistent version per call.
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

__all__ = ["DraftContext", "DraftFeedback", "DraftModelDrafter", "Drafter", "SpeculativeStats", "problem_id_for"]


def problem_id_for(prompt_ids: Sequence[int] | torch.Tensor) -> str:
    """Stable id of a prompt: a hash of its token ids (after chat templating), identical across epochs and siblings."""
    if isinstance(prompt_ids, torch.Tensor):
        prompt_ids = prompt_ids.reshape(-1).tolist()
    data = ",".join(str(int(t)) for t in prompt_ids).encode()
    return hashlib.blake2b(data, digest_size=12).hexdigest()


@dataclass
class DraftContext:
    """What a drafter sees before a verification round (see the module docstring for the contract)."""

    input_ids: list[torch.LongTensor]
    budgets: list[int]
    request_ids: list[Hashable]
    problem_ids: list[Hashable]
    prompt_lengths: list[int]
    round: int
    do_sample: bool = False
    eos_token_ids: tuple[int, ...] = ()
    hidden_states: list[torch.Tensor | None] | None = None
    hidden_offsets: list[int] | None = None

    @property
    def batch_size(self) -> int:
        return len(self.input_ids)


@dataclass
class DraftFeedback:
    """Outcome of one verification round, per row (see the module docstring)."""

    request_ids: list[Hashable]
    problem_ids: list[Hashable]
    proposed: list[torch.LongTensor]
    num_accepted: list[int]
    appended: list[torch.LongTensor]
    finished: list[bool]
    round: int
    target_logits: list[torch.Tensor | None] | None = None
    prompt_lengths: list[int] | None = None
    sequences: list[torch.LongTensor | None] | None = None

    @property
    def accepted(self) -> list[torch.LongTensor]:
        return [p[:n] for p, n in zip(self.proposed, self.num_accepted)]

    @property
    def rejected(self) -> list[torch.LongTensor]:
        """The first rejected proposal of each row (empty when every draft was accepted)."""
        return [p[n : n + 1] for p, n in zip(self.proposed, self.num_accepted)]


@dataclass
class SpeculativeStats:
    """Counters of one or more speculative generate calls; the derived figures are per row.

    `target_forwards` counts the target's (batched) forwards, prefill included; `new_tokens` every generated token of
    every row. `rounds` counts per-row verification rounds (a batch round over 3 active rows counts 3) and `emitted`
    the tokens they produced, so `mean_acceptance_length` = tokens per row-round (accepted drafts + the target's own
    token), the usual "acceptance length" (1.0 = no speedup). `proposed` counts draft tokens sent to verification,
    `accepted` the drafts a row kept (drafts the target agreed with after the row stopped, e.g. past its EOS, are not
    kept). `tokens_per_forward` = new_tokens / row_forwards, where `row_forwards` = `sequences` + `rounds` counts every
    forward each row took part in (its prefill and its rounds): the tokens a row gains per target forward, 1.0 for
    plain decoding at any batch size. (`new_tokens / target_forwards` is the batch's throughput per forward instead.)
    """

    target_forwards: int = 0
    new_tokens: int = 0
    rounds: int = 0
    proposed: int = 0
    accepted: int = 0
    emitted: int = 0
    sequences: int = 0

    @property
    def mean_acceptance_length(self) -> float:
        return self.emitted / self.rounds if self.rounds else 0.0

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.proposed if self.proposed else 0.0

    @property
    def row_forwards(self) -> int:
        return self.sequences + self.rounds

    @property
    def tokens_per_forward(self) -> float:
        return self.new_tokens / self.row_forwards if self.row_forwards else 0.0

    def __iadd__(self, other: SpeculativeStats) -> SpeculativeStats:  # noqa: PYI034
        for name in ("target_forwards", "new_tokens", "rounds", "proposed", "accepted", "emitted", "sequences"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        return self

    def as_dict(self) -> dict[str, float]:
        return {
            "target_forwards": self.target_forwards,
            "new_tokens": self.new_tokens,
            "rounds": self.rounds,
            "proposed": self.proposed,
            "accepted": self.accepted,
            "emitted": self.emitted,
            "sequences": self.sequences,
            "mean_acceptance_length": self.mean_acceptance_length,
            "acceptance_rate": self.acceptance_rate,
            "row_forwards": self.row_forwards,
            "tokens_per_forward": self.tokens_per_forward,
        }


class Drafter:
    """Base class of draft-token sources for `speculative_generate`.

    Subclasses implement `propose`; `observe`, `reset` and `check_compatible` are optional hooks.

    Args:
        max_draft_tokens (`int`): upper bound on draft tokens per row and round (k). Must be >= 1.
    """

    needs_hidden_states: bool = False
    hidden_state_layers: tuple[int, ...] = (-1,)
    needs_target_logits: bool = False

    def __init__(self, max_draft_tokens: int = 8):
        self.max_draft_tokens = max_draft_tokens
        self.stats = SpeculativeStats()
        self.last_stats = SpeculativeStats()

    @property
    def max_draft_tokens(self) -> int:
        return self._max_draft_tokens

    @max_draft_tokens.setter
    def max_draft_tokens(self, value: int) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`max_draft_tokens` must be an integer >= 1, got {value!r}.")
        self._max_draft_tokens = value

    def propose(self, context: DraftContext) -> list[torch.LongTensor]:
        """Return up to `context.budgets[i]` draft tokens for every row i (1-D LongTensors, possibly empty)."""
        raise NotImplementedError(f"{type(self).__name__} must implement `propose(context)`.")

    def observe(self, feedback: DraftFeedback) -> None:
        """Called after every verification round with what was accepted/rejected. Default: nothing."""

    def reset(self) -> None:
        """Forget per-request state (not learned history). Called by the loop before each generate call."""

    def check_compatible(self, model: torch.nn.Module) -> None:
        """Raise a ValueError if this drafter cannot serve `model` (e.g. a different vocabulary). Default: accept."""


def _empty(device: torch.device | str) -> torch.LongTensor:
    return torch.empty(0, dtype=torch.long, device=device)


class DraftModelDrafter(Drafter):
    """Greedy drafts from a smaller causal LM that shares the target's tokenizer (classic draft-model speculation).

    Each row keeps its own draft-model cache; at every round the cache is cropped back to the longest prefix it shares
    with the row's committed tokens, the missing tokens are fed, and `k` tokens are decoded greedily.

    Args:
        draft_model (`PreTrainedModel`): the small model (same vocabulary as the target).
        max_draft_tokens (`int`): k, the draft length per round.
        tokenizer / draft_tokenizer (*optional*): the target's and the draft's tokenizers; when both are given their
            vocabularies must be identical (checked once).
    """

    def __init__(self, draft_model: torch.nn.Module, max_draft_tokens: int = 5, tokenizer=None, draft_tokenizer=None):
        super().__init__(max_draft_tokens)
        self.draft_model = draft_model.eval()
        both = tokenizer is not None and draft_tokenizer is not None
        if both and tokenizer.get_vocab() != draft_tokenizer.get_vocab():
            raise ValueError(
                "The draft model's tokenizer differs from the target's: DraftModelDrafter needs a draft model that "
                "shares the target tokenizer (use `assistant_model=` with `assistant_tokenizer=` for HF's "
                "universal assisted decoding instead)."
            )
        self._rows: dict[Hashable, tuple[Any, list[int]]] = {}

    def check_compatible(self, model: torch.nn.Module) -> None:
        t_vocab = model.get_output_embeddings().weight.shape[0]
        d_vocab = self.draft_model.get_output_embeddings().weight.shape[0]
        t_cfg, d_cfg = model.config, self.draft_model.config
        specials = ("eos_token_id", "bos_token_id")
        mismatched = [s for s in specials if getattr(t_cfg, s, None) != getattr(d_cfg, s, None)]
        if t_vocab != d_vocab or mismatched:
            detail = f"vocab sizes {t_vocab} (target) vs {d_vocab} (draft)"
            if mismatched:
                detail += ", different " + ", ".join(mismatched)
            raise ValueError(
                f"The draft model does not share the target's tokenizer ({detail}). DraftModelDrafter needs a draft "
                "model with the same tokenizer and vocabulary as the target."
            )

    def reset(self) -> None:
        self._rows.clear()

    @torch.no_grad()
    def propose(self, context: DraftContext) -> list[torch.LongTensor]:
        from transformers import DynamicCache

        from ..integrations import cache_kwargs, output_cache

        model = self.draft_model
        device = next(model.parameters()).device
        drafts = []
        for ids, budget, rid in zip(context.input_ids, context.budgets, context.request_ids):
            k = min(budget, self.max_draft_tokens)
            if k <= 0:
                drafts.append(_empty(ids.device))
                continue
            tokens = ids.tolist()
            cache, cached = self._rows.get(rid, (None, []))
            if cache is None:
                cache = DynamicCache(config=model.config)
            # The draft cache holds `cached` (minus nothing); keep the shared prefix, re-feed the rest (at least the
            # last token, whose logits start the draft).
            common = 0
            for a, b in zip(cached, tokens):
                if a != b:
                    break
                common += 1
            common = min(common, len(tokens) - 1)
            if len(cached) > common:
                cache.crop(-(len(cached) - common))
            feed = tokens[common:]
            out_tokens = []
            position = common
            for _ in range(k):
                inp = torch.tensor([feed], device=device)
                pos = torch.arange(position, position + len(feed), device=device).unsqueeze(0)
                out = model(
                    input_ids=inp, position_ids=pos, use_cache=True, logits_to_keep=1, **cache_kwargs(model, cache)
                )
                cache = output_cache(out) or cache
                position += len(feed)
                nxt = int(out.logits[0, -1].argmax())
                out_tokens.append(nxt)
                feed = [nxt]
                if nxt in context.eos_token_ids:
                    break
            # The last drafted token was never fed: the cache covers tokens + out_tokens[:-1].
            self._rows[rid] = (cache, tokens + out_tokens[:-1])
            drafts.append(torch.tensor(out_tokens, dtype=torch.long, device=ids.device))
        return drafts

    def observe(self, feedback: DraftFeedback) -> None:
        for rid, done in zip(feedback.request_ids, feedback.finished):
            if done:
                self._rows.pop(rid, None)
