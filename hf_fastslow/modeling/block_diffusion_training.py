"""Training-side pieces of block diffusion: the vectorized two-half ("2L") attention masks, the noising of the response
and the shifted targets, shared by `BlockDiffusionTrainer`, `IDLMTrainer` and RCD's trainer.

One forward on `[x_t | x_0]` (length 2L, both halves at positions 0..L-1) trains every block's denoising step at
once (BD3-LM, SDAR, Fast-dLLM v2, I-DLM). With `blk(i) = pos(i) // b`:

- noisy q_i -> noisy k_j: same block; any j in the block ("bd3": bidirectional) or j <= i ("idlm": token-causal);
- noisy q_i -> clean k_j: blk(j) < blk(i) (strictly earlier blocks: the KV-cached prefix at decode time);
- clean q_i -> clean k_j: blk(j) <= blk(i) ("bd3": block-causal) or j <= i ("idlm": plain causal, the AR model);
- clean q -> noisy k: never.

Blocks: `block_ids` gives each token the position of its block's first token. `"response"` alignment (what
`block_diffusion_generate` decodes: the first block starts at the end of the prompt) tiles every labelled run from its
own start and makes every unlabelled (prompt) token a block of its own, so the prompt is plain causal context;
`"absolute"` is the papers' grid `pos // b` over the whole row. Without `block_ids` the grid is absolute.

`clean_first=True` lays the halves out as `[x_0 | x_t]` (R-ISD: a peft activated LoRA acts on the last L positions,
i.e. on the noisy half only) with the same rules. Padding keys are never visible; a padding query sees only itself
(no all-masked softmax row, so no NaN; its output carries no loss). Pure torch: works with every supported
transformers version.
"""

from __future__ import annotations

import torch

from .block_diffusion import additive_attention_mask  # noqa: F401  (re-exported: the trainers import it from here)

__all__ = [
    "BLOCK_ALIGNMENTS",
    "MASK_PATTERNS",
    "additive_attention_mask",
    "block_ids",
    "diffusion_targets",
    "noisy_inputs",
    "sequence_positions",
    "single_sequence_mask",
    "split_block_first_targets",
    "training_mask_2l",
    "two_half_position_ids",
]

MASK_PATTERNS = ("bd3", "idlm")
BLOCK_ALIGNMENTS = ("response", "absolute")


def sequence_positions(length: int, padding_mask: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """Position ids [B, L] (or [1, L] without padding): 0.. over the real tokens of each row, so a left-padded row's
    blocks start at its first real token; padding slots get 0 (they are never attended)."""
    if padding_mask is None:
        return torch.arange(length, device=device).unsqueeze(0)
    if padding_mask.dim() != 2 or padding_mask.shape[1] != length:
        raise ValueError(f"padding_mask must be [B, {length}] (1 = real token), got {tuple(padding_mask.shape)}.")
    real = padding_mask.bool()
    return (real.long().cumsum(-1) - 1).clamp(min=0).masked_fill(~real, 0)


def two_half_position_ids(length: int, padding_mask: torch.Tensor | None = None, device=None) -> torch.Tensor:
    """Position ids [B, 2L] of a two-half input: both halves repeat the positions of the L-token sequence."""
    pos = sequence_positions(length, padding_mask, device)
    return torch.cat([pos, pos], dim=-1)


def block_ids(
    labels: torch.Tensor, block_size: int, padding_mask: torch.Tensor | None = None, align: str = "response"
) -> torch.Tensor:
    """[B, L] id of each token's block: the position of the block's first token (equal inside a block, increasing
    across blocks). "response": labelled runs (labels != -100) are tiled from their first token, every other token is
    its own block; "absolute": `(pos // b) * b`."""
    if align not in BLOCK_ALIGNMENTS:
        raise ValueError(f"align must be one of {BLOCK_ALIGNMENTS}, got {align!r}.")
    if not (isinstance(block_size, int) and block_size >= 1):
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}.")
    pos = sequence_positions(labels.shape[1], padding_mask, labels.device).expand_as(labels)
    if align == "absolute":
        return (pos // block_size) * block_size
    labelled = labels != -100
    if padding_mask is not None:
        labelled = labelled & padding_mask.bool()
    previous = torch.cat([torch.zeros_like(labelled[:, :1]), labelled[:, :-1]], dim=1)
    run_start = torch.cummax(torch.where(labelled & ~previous, pos, 0), dim=1).values
    tiled = run_start + ((pos - run_start) // block_size) * block_size
    return torch.where(labelled, tiled, pos)


def training_mask_2l(
    length: int,
    block_size: int,
    pattern: str = "bd3",
    padding_mask: torch.Tensor | None = None,
    clean_first: bool = False,
    block_ids: torch.Tensor | None = None,
) -> torch.BoolTensor:
    """The 2L training mask [B, 1, 2L, 2L] (B = 1 without `padding_mask` / `block_ids`), True = may attend.

    Layout `[x_t | x_0]`, or `[x_0 | x_t]` with `clean_first=True`. `padding_mask` [B, L] (1 = real token) is the
    padding of the L-token sequence, shared by both halves; positions follow each row's real tokens. `block_ids`
    [B, L] (see `block_ids()`) overrides the absolute grid `pos // block_size`.
    """
    if pattern not in MASK_PATTERNS:
        raise ValueError(f"pattern must be one of {MASK_PATTERNS}, got {pattern!r}.")
    if not (isinstance(block_size, int) and block_size >= 1):
        raise ValueError(f"block_size must be an int >= 1, got {block_size!r}.")
    if length < 1:
        raise ValueError(f"length must be >= 1, got {length}.")
    device = padding_mask.device if padding_mask is not None else None
    pos = sequence_positions(length, padding_mask, device)  # [B, L]
    if block_ids is None:
        blk = pos // block_size
    else:
        if block_ids.dim() != 2 or block_ids.shape[1] != length:
            raise ValueError(f"block_ids must be [B, {length}], got {tuple(block_ids.shape)}.")
        blk, pos = block_ids, pos.expand_as(block_ids)
    q_blk, k_blk = blk[:, :, None], blk[:, None, :]  # [B, L, 1], [B, 1, L]
    q_pos, k_pos = pos[:, :, None], pos[:, None, :]
    same_block = q_blk == k_blk
    if pattern == "bd3":
        noisy_noisy = same_block
        clean_clean = k_blk <= q_blk
    else:
        noisy_noisy = same_block & (k_pos <= q_pos)
        clean_clean = k_pos <= q_pos
    noisy_clean = k_blk < q_blk
    clean_noisy = torch.zeros_like(noisy_noisy)
    if clean_first:
        top = torch.cat([clean_clean, clean_noisy], dim=-1)
        bottom = torch.cat([noisy_clean, noisy_noisy], dim=-1)
    else:
        top = torch.cat([noisy_noisy, noisy_clean], dim=-1)
        bottom = torch.cat([clean_noisy, clean_clean], dim=-1)
    mask = torch.cat([top, bottom], dim=-2)  # [B, 2L, 2L]
    if padding_mask is not None:
        mask = _apply_padding(mask, torch.cat([padding_mask, padding_mask], dim=-1).bool())
    return mask.unsqueeze(1)


def single_sequence_mask(
    length: int, attention: str = "bidirectional", padding_mask: torch.Tensor | None = None
) -> torch.BoolTensor:
    """[B, 1, L, L] mask of a one-half (MDLM / LLaDA) input: "bidirectional" (every real token sees every real
    token) or "causal". Same padding conventions as `training_mask_2l`."""
    if attention not in ("bidirectional", "causal"):
        raise ValueError(f"attention must be 'bidirectional' or 'causal', got {attention!r}.")
    device = padding_mask.device if padding_mask is not None else None
    mask = torch.ones(1, length, length, dtype=torch.bool, device=device)
    if attention == "causal":
        mask = torch.tril(mask)
    if padding_mask is not None:
        mask = _apply_padding(mask.expand(padding_mask.shape[0], -1, -1), padding_mask.bool())
    return mask.unsqueeze(1)


def _apply_padding(mask: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
    mask = mask & real[:, None, :] & real[:, :, None]
    eye = torch.eye(mask.shape[-1], dtype=torch.bool, device=mask.device)
    return mask | (eye & ~real[:, :, None])  # a padding query sees itself only


def noisy_inputs(
    input_ids: torch.Tensor,
    labels: torch.Tensor,
    mask_token_id: int,
    *,
    mask_rate: float | None = None,
    eps: float = 1e-3,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.BoolTensor, torch.Tensor]:
    """x_t from x_0: only tokens that carry a label (the response under completion-only / assistant-only loss) can be
    masked; prompt and padding (label -100) never are.

    `mask_rate=None`: the MDLM/LLaDA forward process, t ~ U[0, 1) per row and p_mask = (1 - eps) t + eps; a number:
    that fixed rate (I-DLM: 1.0, every response token). Returns (x_t, masked [B, L] bool, p_mask [B] float).
    """
    if input_ids.shape != labels.shape:
        raise ValueError(f"input_ids {tuple(input_ids.shape)} and labels {tuple(labels.shape)} differ in shape.")
    maskable = labels != -100
    rows = input_ids.shape[0]
    if mask_rate is None:
        if not 0.0 <= eps < 1.0:
            raise ValueError(f"eps must be in [0, 1), got {eps}.")
        t = torch.rand(rows, generator=generator, device=input_ids.device)
        p_mask = (1.0 - eps) * t + eps
    else:
        if not 0.0 < mask_rate <= 1.0:
            raise ValueError(f"mask_rate must be in (0, 1], got {mask_rate}.")
        p_mask = torch.full((rows,), float(mask_rate), device=input_ids.device)
    if mask_rate == 1.0:
        masked = maskable.clone()
    else:
        draws = torch.rand(input_ids.shape, generator=generator, device=input_ids.device)
        masked = maskable & (draws < p_mask[:, None])
    return input_ids.masked_fill(masked, mask_token_id), masked, p_mask


def diffusion_targets(
    input_ids: torch.Tensor, labels: torch.Tensor, masked: torch.Tensor, logit_shift: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-hidden-state targets [B, L] of the noisy and of the clean half (-100 = no loss).

    With `logit_shift` (converted AR models, I-DLM) hidden i is scored on token i+1: a noisy hidden on x_0[i+1] when
    that token was masked (crossing a block boundary is allowed: I-DLM's last mask slot drafts the next block's first
    token), a clean hidden on labels[i+1] (the ordinary AR SFT loss). Without it (SDAR, LLaDA) hidden i is scored on
    its own masked token and the clean half has no targets (it would see the answer).
    """
    if logit_shift:
        noisy = torch.full_like(input_ids, -100)
        noisy[:, :-1] = input_ids[:, 1:].masked_fill(~masked[:, 1:], -100)
        clean = torch.full_like(labels, -100)
        clean[:, :-1] = labels[:, 1:]
        return noisy, clean
    return input_ids.masked_fill(~masked, -100), torch.full_like(labels, -100)


def split_block_first_targets(
    noisy_targets: torch.Tensor,
    block_size: int,
    padding_mask: torch.Tensor | None = None,
    block_ids: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split shifted noisy targets [B, L] into (inside-block, block-first) ones, for a shifted block decoder.

    A shifted block decoder (`block_diffusion_generate`) reads slot j's distribution from hidden j-1 inside the
    block, but a block's FIRST slot from the last committed token, i.e. from the clean prefix. So a masked block-first
    token is scored on the clean hidden j-1 (the second tensor, to be placed on the clean half), not on the noisy
    hidden j-1 of the previous block (I-DLM keeps that one: its last mask slot drafts the next block's first token).
    """
    if block_ids is None:
        pos = sequence_positions(noisy_targets.shape[1], padding_mask, noisy_targets.device)
        block_ids = (pos // block_size).expand_as(noisy_targets)
    starts_next = torch.zeros_like(noisy_targets, dtype=torch.bool)  # hidden i's target i+1 opens a block
    starts_next[:, :-1] = block_ids[:, 1:] != block_ids[:, :-1]
    return noisy_targets.masked_fill(starts_next, -100), noisy_targets.masked_fill(~starts_next, -100)
