"""Logits processors over a speculative round: every row and draft position, batched, as `generate` would see them.

In `generate` every live row has the same length, so one `LogitsProcessorList` call with the whole batch serves a step,
and processors keep per-batch state (the repetition penalty's per-row padding lengths). In a speculative round the
rows have different lengths (they accepted different numbers of drafts) and each verifies several positions. Draft
position j of row i must be processed on the row's committed tokens plus its first j draft tokens.

`RoundProcessors` calls each processor once per position with the full batch:

* processors that only read scores or token content (sampling warpers, repetition penalty, n-gram blocking,
  suppressed tokens) get the rows right-aligned behind filler ids they ignore (see
  `integrations.speculative_call_shifted`);
* any other processor (length dependent such as `min_new_tokens`, or unknown) gets `generate`'s exact view: the
  batch cut at one total length, once per distinct length among the rows that need it, each row taking its result
  from the call with its own length.

Rows whose result is not used (finished, draft shorter than the position, or already rejected) are computed along but
ignored.
"""

from __future__ import annotations

import torch

from ..integrations import speculative_call_shifted, speculative_processor_shift_safe

__all__ = ["RoundProcessors"]


class RoundProcessors:
    """Applies `generate`'s logits processors to one speculative round.

    Args:
        processors: the `LogitsProcessorList` `generate` built (possibly empty).
    """

    def __init__(self, processors):
        self.processors = list(processors or ())
        self.shift_safe = [speculative_processor_shift_safe(p) for p in self.processors]
        self._tokens = self._lengths = self._aligned = self._shift = None
        self._aligned_width = 0

    def __bool__(self) -> bool:
        return bool(self.processors)

    def begin_round(self, tokens: torch.Tensor, lengths: torch.Tensor, rows: torch.Tensor, positions: int) -> None:
        """`tokens[i, :lengths[i]]` is row i as `generate` shows it (left pads + prompt + generated) and its draft
        follows at `tokens[i, lengths[i]:]`; `rows` marks the rows in the round; `positions` = 1 + longest draft."""
        self._tokens, self._lengths = tokens, lengths
        self._aligned = None
        if not any(self.shift_safe):
            return
        longest = int(lengths[rows].max()) if bool(rows.any()) else int(lengths.max())
        self._shift = (longest - lengths).clamp(min=0)
        self._aligned_width = longest
        width = longest + positions - 1
        src = torch.arange(width, device=tokens.device)[None, :] - self._shift[:, None]
        self._aligned = tokens.gather(1, src.clamp(min=0, max=tokens.shape[1] - 1))
        self._filler_mask = src < 0

    def write(self, j: int, token: torch.Tensor) -> None:
        """The draft token at position j became known after `begin_round` (a loop that drafts while it processes, as
        ISD does): the caller wrote `token[i]` at `tokens[i, lengths[i] + j]`; later positions must see it too."""
        if self._aligned is not None and self._aligned_width + j < self._aligned.shape[1]:
            self._aligned[:, self._aligned_width + j] = token

    def position(self, j: int, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Processed scores (B, V) of draft position j (its prefix: committed tokens + j drafts) for the `rows` used."""
        aligned = None
        for processor, safe in zip(self.processors, self.shift_safe):
            if safe:
                if aligned is None:
                    # The filler is the logits' vocabulary size: an id the shift-safe processors skip.
                    aligned = self._aligned[:, : self._aligned_width + j].masked_fill(
                        self._filler_mask[:, : self._aligned_width + j], scores.shape[-1]
                    )
                scores = speculative_call_shifted(processor, aligned, scores, self._shift)
            else:
                scores = self._exact(processor, j, scores, rows)
        return scores

    def _exact(self, processor, j: int, scores: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        totals = self._lengths + j
        wanted = totals[rows].unique().tolist()
        if len(wanted) == 1:
            return processor(self._tokens[:, : wanted[0]], scores)
        out = scores.clone()
        for total in wanted:
            take = rows & (totals == total)
            out[take] = processor(self._tokens[:, :total], scores)[take]
        return out
