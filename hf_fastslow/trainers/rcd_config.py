"""Configuration of RCD training (Residual Context Diffusion, arXiv 2601.22954, stage 2): the block-diffusion SFT
objective with residual inputs built from a frozen reference model's predictions."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..generation.rcd import ALPHA_MODES
from .block_diffusion_config import BlockDiffusionTrainingConfig


@dataclass
class RCDTrainingConfig(BlockDiffusionTrainingConfig):
    r"""`BlockDiffusionTrainingConfig` plus RCD's residual inputs.

    Every masked slot of the noisy half gets the input `(1 - alpha) E(m) + alpha E^T p`, p the frozen reference
    model's distribution for that slot on the same noisy input, alpha its normalized entropy (Eq. 2-3); the loss is the
    objective's own `sum_masked CE / p_mask / N`. The paper trains without a residual temperature (`rcd_t_res=1`).
    `rcd_alpha_mode="fixed", rcd_fixed_alpha=0` is plain block-diffusion SFT (SeqD), bit for bit.

    Parameters:
        rcd_alpha_mode (`str`, defaults to `"entropy"`): `"entropy"`, `"confidence"` or `"fixed"` (see
            `hf_fastslow.generation.rcd.RCDConfig`).
        rcd_t_res (`float`, defaults to `1.0`): temperature of the distribution alpha is computed on.
        rcd_fixed_alpha (`float`, defaults to `0.3`): alpha of `rcd_alpha_mode="fixed"`.
        rcd_residual_topk (`int` or `None`): build the soft token from the k most likely reference tokens only.
    """

    rcd_alpha_mode: str = field(default="entropy", metadata={"help": "'entropy', 'confidence' or 'fixed'."})
    rcd_t_res: float = field(default=1.0, metadata={"help": "Residual temperature of alpha."})
    rcd_fixed_alpha: float = field(default=0.3, metadata={"help": "alpha of rcd_alpha_mode='fixed'."})
    rcd_residual_topk: int | None = field(default=None, metadata={"help": "Top-k soft token (None: dense)."})

    def __post_init__(self):
        name = type(self).__name__
        if self.rcd_alpha_mode not in ALPHA_MODES:
            raise ValueError(f"{name}: rcd_alpha_mode must be one of {ALPHA_MODES}, got {self.rcd_alpha_mode!r}.")
        if not self.rcd_t_res >= 0:
            raise ValueError(f"{name}: rcd_t_res must be >= 0, got {self.rcd_t_res}.")
        if not 0.0 <= self.rcd_fixed_alpha <= 1.0:
            raise ValueError(f"{name}: rcd_fixed_alpha must be in [0, 1], got {self.rcd_fixed_alpha}.")
        if self.rcd_residual_topk is not None and self.rcd_residual_topk < 1:
            raise ValueError(f"{name}: rcd_residual_topk must be >= 1 or None, got {self.rcd_residual_topk}.")
        super().__post_init__()
