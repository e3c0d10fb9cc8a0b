"""Step-boundary triggers shared by the test-time steering methods (CREST and the SEAL-style peer).

A reasoning step ends where the text gains a delimiter ("\\n\\n" by default). The boundary is found in text, not by
one token id: SmolLM2 writes "\\n\\n" either as one token (18 vocabulary entries contain it) or as two single-newline
tokens (198, 198), so a token is a boundary when its own text contains the delimiter, or when the previous token's
text ends with the delimiter's first character and this token's text starts with its second. Both rules are
per-token tables over the vocabulary, so the decode-time check is two lookups per row, no tokenizer call.

`StepTrigger` applies the rule during `generate`: a forward pre-hook on the top-level model reads each call's
`input_ids`; a decode step (one new token per row on a non-empty cache) gets a per-row flag, a prefill gets none
(prefill is never steered) and only records each row's last token for the cross-token rule.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from hf_fastslow.integrations.steering_seam import call_cache_length, call_input_ids

__all__ = ["BoundaryTokens", "SteeringHooks", "StepTrigger"]


def _vocab_texts(tokenizer) -> list[str]:
    """The text of every token id on its own (special tokens included)."""
    return tokenizer.batch_decode([[i] for i in range(len(tokenizer))], skip_special_tokens=False,
                                  clean_up_tokenization_spaces=False)


@dataclass(frozen=True)
class BoundaryTokens:
    """Per-id tables of the boundary rule for a one- or two-character `delimiter` ("\\n\\n" by default; "\\n"
    for models that write one step per line).

    `whole[i]`: token i's text contains the delimiter; `ends_first[i]`: it ends with `delimiter[0]`;
    `starts_second[i]`: it starts with `delimiter[1]`. Token t after token p is a boundary when
    `whole[t] or (ends_first[p] and starts_second[t])`.
    """

    delimiter: str
    whole: torch.Tensor
    ends_first: torch.Tensor
    starts_second: torch.Tensor

    @classmethod
    def from_tokenizer(cls, tokenizer, delimiter: str = "\n\n") -> BoundaryTokens:
        if not isinstance(delimiter, str) or len(delimiter) not in (1, 2):
            raise ValueError(f"delimiter must be a one- or two-character string such as '\\n\\n' or '\\n', got "
                             f"{delimiter!r}")
        texts = _vocab_texts(tokenizer)
        whole = torch.tensor([delimiter in t for t in texts], dtype=torch.bool)
        if len(delimiter) == 1:  # one character never spans two tokens
            ends = starts = torch.zeros_like(whole)
        else:
            ends = torch.tensor([t.endswith(delimiter[0]) for t in texts], dtype=torch.bool)
            starts = torch.tensor([t.startswith(delimiter[1]) for t in texts], dtype=torch.bool)
        if not whole.any() and not (ends.any() and starts.any()):
            raise ValueError(f"no token of this tokenizer can write the step delimiter {delimiter!r}.")
        return cls(delimiter, whole, ends, starts)

    @property
    def vocab_size(self) -> int:
        return int(self.whole.numel())

    def to(self, device: torch.device | str) -> BoundaryTokens:
        """The same tables on `device` (lookups then run where the token ids are, without a host round trip)."""
        return replace(self, whole=self.whole.to(device), ends_first=self.ends_first.to(device),
                       starts_second=self.starts_second.to(device))

    def _lookup(self, table: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        ids = ids.to(table.device)
        inside = (ids >= 0) & (ids < self.vocab_size)  # ids past the tokenizer (padded embeddings) never match
        return table[ids.clamp(0, self.vocab_size - 1)] & inside

    def flags(self, ids: torch.Tensor, prev_ends_first: torch.Tensor) -> torch.Tensor:
        """Boundary flag of tokens `ids` (any shape) whose predecessors' `ends_first` entries are `prev_ends_first`."""
        prev = prev_ends_first.to(self.whole.device)
        return self._lookup(self.whole, ids) | (prev & self._lookup(self.starts_second, ids))

    def ends_first_of(self, ids: torch.Tensor) -> torch.Tensor:
        return self._lookup(self.ends_first, ids)

    def positions(self, ids: list[int], prev_id: int | None = None) -> list[int]:
        """Indices of the boundary tokens in the token sequence `ids` (`prev_id`: the token before it, if any)."""
        seq = torch.as_tensor(list(ids), dtype=torch.long)
        if seq.numel() == 0:
            return []
        prev = torch.cat([torch.as_tensor([-1 if prev_id is None else prev_id]), seq[:-1]])
        return torch.nonzero(self.flags(seq, self.ends_first_of(prev))).flatten().tolist()

    def state_dict(self, prefix: str = "boundary.") -> dict[str, torch.Tensor]:
        """The three tables as id lists (a few hundred ids for SmolLM2, not three vocabulary-long masks)."""
        size = torch.tensor([self.vocab_size])
        return {f"{prefix}vocab_size": size,
                **{f"{prefix}{k}": torch.nonzero(getattr(self, k)).flatten()
                   for k in ("whole", "ends_first", "starts_second")}}

    @classmethod
    def from_state_dict(cls, tensors: dict[str, torch.Tensor], delimiter: str,
                        prefix: str = "boundary.") -> BoundaryTokens:
        n = int(tensors[f"{prefix}vocab_size"][0])

        def mask(key):
            m = torch.zeros(n, dtype=torch.bool)
            m[tensors[f"{prefix}{key}"].long()] = True
            return m

        return cls(delimiter, mask("whole"), mask("ends_first"), mask("starts_second"))


class StepTrigger:
    """Per-row boundary flag of the current decode step, kept by a forward pre-hook on the top-level model.

    `flag` is a bool tensor [batch] on the ids' device during a decode step (one token per row on a non-empty cache)
    and None otherwise (prefill, calls with `inputs_embeds` only): hooks that read it steer only flagged rows of
    decode steps. Beam search reorders rows between steps; the cross-token half of the rule follows the row index,
    so under beam search a delimiter split over two tokens can be missed or seen on the wrong beam.
    """

    def __init__(self, boundary: BoundaryTokens):
        self.boundary = boundary
        self.flag: torch.Tensor | None = None
        self._prev_ends: torch.Tensor | None = None
        self._on_device: dict[torch.device, BoundaryTokens] = {}
        self._flagged: torch.Tensor | int = 0

    @property
    def flagged(self) -> int:
        """(row, decode step) pairs flagged since `reset_count` (reading it is the only device sync)."""
        return int(self._flagged)

    def reset_count(self) -> None:
        self._flagged = 0

    def reset(self) -> None:
        self.flag, self._prev_ends = None, None

    def _tables(self, device: torch.device) -> BoundaryTokens:
        if device not in self._on_device:
            self._on_device[device] = self.boundary.to(device)
        return self._on_device[device]

    def pre_hook(self, module, args, kwargs):
        ids = call_input_ids(args, kwargs)
        if ids is None or ids.dim() != 2:
            self.reset()
            return None
        tables = self._tables(ids.device)
        if ids.shape[1] > 1 or call_cache_length(kwargs) == 0:  # prefill: never steered, remembers the last token
            self.flag = None
            self._prev_ends = tables.ends_first_of(ids[:, -1])
            return None
        prev = self._prev_ends
        if prev is None or prev.shape[0] != ids.shape[0]:
            prev = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
        token = ids[:, 0]
        self.flag = tables.flags(token, prev)
        self._flagged = self._flagged + self.flag.sum()  # a tensor sum: no host sync per step
        self._prev_ends = tables.ends_first_of(token)
        return None


class SteeringHooks:
    """Context-manager base of the steerers: `_install()` registers hooks into `self._handles`; they are all removed
    on exit, on an exception inside the block, and if installing fails half way. Not re-entrant."""

    def __init__(self, model: torch.nn.Module, boundary: BoundaryTokens):
        self.model = model
        self.trigger = StepTrigger(boundary)
        self._handles: list = []

    @property
    def active(self) -> bool:
        return bool(self._handles)

    @property
    def boundary_steps(self) -> int:
        """(row, decode step) pairs steered since the last `__enter__` (kept after exit, for reporting)."""
        return self.trigger.flagged

    def _install(self) -> None:  # pragma: no cover - implemented by subclasses
        raise NotImplementedError

    def __enter__(self):
        if self.active:
            raise RuntimeError(f"{type(self).__name__} is already active on this model.")
        self.trigger.reset()
        self.trigger.reset_count()
        try:
            self._handles.append(self.model.register_forward_pre_hook(self.trigger.pre_hook, with_kwargs=True))
            self._install()
        except BaseException:
            self.remove()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.remove()

    def remove(self) -> None:
        """Remove every hook this steerer registered (safe to call twice)."""
        while self._handles:
            self._handles.pop().remove()
        self.trigger.reset()
