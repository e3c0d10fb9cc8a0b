"""One I-DLM introspective strided decoding (ISD) round on tensors: verify last round's drafts, commit, draft anew.

The model call and the cache stay with the caller (`isd_generate` crops rejected slots; a stationary-batch scheduler
masks them instead): `isd_round` only reads the round's logits and advances the rows' token state.

A row feeds `[pending, spec_1..spec_K, M x (N-1)]` (pending = its last committed token, not yet in the cache; M = the
mask id) under strict causal attention; `logits[:, j]` is the distribution of the token after slot j (logit shift).
In this logical layout:

* `logits[:, k-1]` for k = 1..K is the anchor p of spec_k (its context: committed tokens + spec_1..spec_{k-1});
  specs are accepted left to right by the speculative-sampling rule (`kernels.isd_verify`), greedy: iff the draft is
  the anchor's argmax; the first rejected spec is replaced by a correction (residual sample / argmax) and the row
  starts cold next round (K = 0).
* if all K specs are accepted (always when K = 0), `logits[:, K]` gives the next token exactly (its context is all
  committed tokens) and the N-1 mask slots `logits[:, K+1 .. K+N-1]` give the next round's N-1 drafts and their
  distributions q.

Every committed or drafted token goes through `generate`'s logits processors at its own prefix, batched over rows the
way `speculative_generate` does it (`RoundProcessors`), so p and q are processed alike. A row commits accepted + 1
tokens per round and its cache keeps the same count (pending + accepted specs): cache length = prompt + committed - 1.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..kernels.isd_verify import isd_verify
from .isd_config import ISDConfig
from .speculative_processors import RoundProcessors

__all__ = ["ISDRows", "ISDRoundResult", "isd_round"]


@dataclass
class ISDRows:
    """The per-row decoding state between rounds.

    `tokens[i, :lengths[i]]` is row i as `generate` shows it (left pads + prompt + committed tokens); its last
    committed token is the pending one, not yet in the cache. The row's `num_specs[i]` drafts wait right behind it at
    `tokens[i, lengths[i]:]` (the buffer needs `2 * N` spare columns past the longest row). `spec_probs[i, k]` is the
    distribution draft k was sampled from (only for sampled proposals; None otherwise).
    """

    tokens: torch.Tensor  # [B, capacity] long
    lengths: torch.Tensor  # [B] long
    num_specs: torch.Tensor  # [B] long, <= N-1
    active: torch.Tensor  # [B] bool: rows still generating
    spec_probs: torch.Tensor | None = None  # [B, N-1, V] float32

    def specs(self, width: int) -> torch.Tensor:
        """[B, width] tokens behind each row (its drafts first; what follows them is filler)."""
        cols = self.lengths[:, None] + torch.arange(width, device=self.tokens.device)[None, :]
        return self.tokens.gather(1, cols.clamp(max=self.tokens.shape[1] - 1))


@dataclass
class ISDRoundResult:
    """What a round did per row: drafts verified, drafts accepted, tokens committed (= kept cache slots)."""

    proposed: torch.Tensor  # [B] long
    accepted: torch.Tensor  # [B] long
    committed: torch.Tensor  # [B] long: accepted + 1 for active rows, 0 for the others


def _pick(scores: torch.Tensor, rows: torch.Tensor, sample: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(token, probs) for the `rows` used: argmax, or a sample of softmax(scores) (other rows: token 0; their scores
    may be garbage such as all -inf)."""
    if not sample:
        return scores.argmax(dim=-1), None
    probs = torch.zeros_like(scores)
    token = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    if bool(rows.any()):
        probs[rows] = torch.softmax(scores[rows], dim=-1)
        token[rows] = torch.multinomial(probs[rows], num_samples=1).squeeze(-1)
    return token, probs


@torch.no_grad()
def isd_round(
    logits: torch.Tensor,
    rows: ISDRows,
    config: ISDConfig,
    *,
    do_sample: bool,
    processors: RoundProcessors | None = None,
) -> ISDRoundResult:
    """Run one ISD round's decisions on `logits` [B, K_max + N, V] (float32, logical layout: row i's slots 0..K_i
    are pending + its specs, slots K_i+1..K_i+N-1 its mask slots; the rest is ignored) and advance `rows` in place.

    Randomness comes from torch's global generator (as in `generate`).
    """
    batch, width, vocab = logits.shape
    n = config.gen_block_size
    k_max = width - n
    device = logits.device
    active = rows.active
    if k_max < 0:
        raise ValueError(f"isd_round: logits hold {width} slots per row, fewer than N = {n}.")
    num_specs = torch.where(active, rows.num_specs, torch.zeros_like(rows.num_specs))
    if bool((num_specs > k_max).any()):
        raise ValueError(f"isd_round: a row has more drafts than the {k_max} verify slots of these logits.")
    lengths = rows.lengths
    sample_drafts = do_sample and config.proposal == "sample"
    if processors is not None and not processors:
        processors = None

    accepted = torch.zeros(batch, dtype=torch.long, device=device)
    correction = torch.zeros(batch, dtype=torch.long, device=device)
    verifying = active & (num_specs > 0)
    if k_max > 0 and bool(verifying.any()):
        specs = rows.specs(k_max)
        cols = torch.arange(k_max, device=device)
        scores = logits[:, :k_max]
        if processors is not None:
            processed = torch.empty_like(scores)
            processors.begin_round(rows.tokens, lengths, verifying, k_max)
            live = verifying
            for j in range(k_max):
                live = live & (num_specs > j)
                processed[:, j] = processors.position(j, scores[:, j].clone(), live)
                if not do_sample:  # greedy: rows past their first mismatch need no more anchors
                    live = live & (processed[:, j].argmax(dim=-1) == specs[:, j])
            scores = processed
        if not do_sample:
            choice = scores.argmax(dim=-1)
            match = (choice == specs) & (cols[None, :] < num_specs[:, None])
            accepted = match.long().cumprod(dim=1).sum(dim=1)
            correction = choice.gather(1, accepted.clamp(max=k_max - 1)[:, None]).squeeze(1)
        else:
            idx = verifying.nonzero().squeeze(1)
            p = torch.softmax(scores[idx], dim=-1)
            if sample_drafts:
                q = rows.spec_probs[idx, :k_max]
            else:
                q = torch.nn.functional.one_hot(specs[idx], vocab).to(p.dtype)
            uniforms = torch.rand(idx.shape[0], k_max, device=device)
            acc, residual = isd_verify(p, specs[idx], q, num_specs[idx], uniforms, config.verify_alpha)
            accepted[idx] = acc
            rejected_idx = acc < num_specs[idx]
            if bool(rejected_idx.any()):
                correction[idx[rejected_idx]] = torch.multinomial(residual[rejected_idx], 1).squeeze(1)

    rejected = active & (accepted < num_specs)
    full = active & ~rejected
    # Rejected rows: spec_1..spec_a are already in place; the correction goes right behind them.
    if bool(rejected.any()):
        where = (lengths + accepted)[rejected]
        rows.tokens[rejected.nonzero().squeeze(1), where] = correction[rejected]
    # Rows that accepted every spec: the next token (exact) at slot K, then N-1 drafts from the mask slots.
    if bool(full.any()):
        base = lengths + num_specs
        if processors is not None:
            processors.begin_round(rows.tokens, base, full, n)
        full_idx = full.nonzero().squeeze(1)
        if sample_drafts and rows.spec_probs is None:
            rows.spec_probs = torch.zeros(batch, n - 1, vocab, dtype=torch.float32, device=device)
        for m in range(n):
            slot = (num_specs + m)[:, None, None].expand(batch, 1, vocab)
            scores = logits.gather(1, slot).squeeze(1)
            if processors is not None:
                scores = processors.position(m, scores.clone(), full)
            token, probs = _pick(scores, full, do_sample and (m == 0 or sample_drafts))
            rows.tokens[full_idx, (base + m)[full_idx]] = token[full_idx]
            if m > 0 and sample_drafts:
                rows.spec_probs[full_idx, m - 1] = probs[full_idx]
            if processors is not None and m + 1 < n:
                processors.write(m, token)

    # Full rows accepted all K specs: accepted + 1 = K + 1 either way.
    committed = torch.where(active, accepted + 1, torch.zeros_like(accepted))
    rows.lengths = lengths + committed
    rows.num_specs = torch.where(full, torch.full_like(num_specs, n - 1), torch.zeros_like(num_specs))
    return ISDRoundResult(proposed=num_specs, accepted=accepted, committed=committed)
