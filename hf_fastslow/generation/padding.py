"""Token-id plumbing every batched `generate` caller needs: which id to pad with, left-padding a batch of prompts,
and cutting a completion at its first EOS. One helper per job, used by the judges, the trainers and the speculative
loop alike (so the fallbacks cannot drift apart)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

__all__ = ["cut_at_eos", "left_pad", "pad_token_id", "token_ids"]


def token_ids(value: Any) -> tuple[int, ...]:
    """`value` (an id, a list/tuple/set of ids, a tensor, or None) as a tuple of ints, in order."""
    if value is None:
        return ()
    if isinstance(value, torch.Tensor):
        return tuple(int(t) for t in value.reshape(-1).tolist())
    if isinstance(value, Iterable):
        return tuple(int(t) for t in value if t is not None)
    return (int(value),)


def pad_token_id(source: Any, default: int | None = None) -> int | None:
    """The id to pad with: `source.pad_token_id`, else its (first) `eos_token_id`, else `default`.

    `source` is anything with those two attributes: a tokenizer, a `GenerationConfig`, a model config. Many chat
    tokenizers have no pad token; padding with EOS is safe under an attention mask and is what `generate` falls back to.
    """
    pad = token_ids(getattr(source, "pad_token_id", None))
    if pad:
        return pad[0]
    eos = token_ids(getattr(source, "eos_token_id", None))
    return eos[0] if eos else default


def left_pad(
    rows: Sequence[Sequence[int]], pad_id: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, attention_mask), both long tensors of shape (len(rows), longest row), each row right-aligned
    behind `pad_id` fillers (mask 0). Decoder-only batching pads on the left so the new tokens follow every prompt."""
    width = max((len(r) for r in rows), default=0)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        if len(row):
            input_ids[i, width - len(row):] = torch.as_tensor(list(row), dtype=torch.long)
            attention_mask[i, width - len(row):] = 1
    return input_ids.to(device), attention_mask.to(device)


def cut_at_eos(ids: Iterable[int], eos_token_ids: Any) -> list[int]:
    """`ids` up to and including the first EOS (`eos_token_ids`: an id, several, or None); all of them without one.

    What `generate` writes after a row's EOS is padding, not part of the completion."""
    eos = set(token_ids(eos_token_ids))
    out: list[int] = []
    for t in ids:
        out.append(t)
        if t in eos:
            break
    return out
