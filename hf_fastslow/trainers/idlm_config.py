"""Configuration of I-DLM introspective-consistency training (Yu et al., "Introspective Diffusion Language Models",
arXiv 2604.11035, Sec. training) and of its lossless R-ISD variant (an activated LoRA on the mask slots only)."""

from __future__ import annotations

from dataclasses import dataclass, field

from .block_diffusion_config import BlockDiffusionTrainingConfig, check_diffusion_options


@dataclass
class IDLMConfig(BlockDiffusionTrainingConfig):
    r"""`BlockDiffusionTrainingConfig` with I-DLM's objective and defaults.

    One forward on `[x_t | x_0]`: every response token of x_t is the mask (`mask_rate=1.0`, prompt kept), token-causal
    attention inside a noisy block of `block_length` slots, noisy slots see the clean earlier blocks, the clean half is
    the plain causal AR model; hidden i is scored on token i+1 on both halves. Loss
    `L = CE_noisy + alpha * CE_clean` with `alpha = ce_alpha`, or with `auto_balance` `alpha = stopgrad(CE_noisy /
    CE_clean)` (both CEs normalized by the same token count).

    A model trained with `block_length = b` serves ISD with `gen_block_size` N <= b + 1 (N - 1 mask slots per round).
    The paper trains b = 1 -> 2 -> 3 as a curriculum (alpha 0.2, then auto-balance at b = 3): run the trainer once per
    stage on the previous stage's weights.

    `lora_gated=True` trains R-ISD: the layout becomes `[x_0 | x_t]` and a peft activated LoRA (aLoRA) is applied to
    the last L positions only (`alora_offsets`), i.e. to the noisy half; the base weights are frozen, so every clean
    position — and at decode time every committed/pending/draft token — runs the base model bit for bit. The clean
    half then carries no gradient (it never sees the adapter): `CE_clean` is still logged and added, as a constant.
    Pass your own `peft_config` (a `LoraConfig`; its `alora_invocation_tokens` is set to `[mask_token_id]`) or let the
    trainer build one from `lora_r`, `lora_alpha`, `lora_target_modules`.

    Parameters:
        block_length (`int`, defaults to `3`): b, mask slots per noisy block (= ISD's N - 1; 3 serves N = 2, 3, 4).
        ce_alpha (`float`, defaults to `0.2`): weight of the clean AR cross-entropy.
        auto_balance (`bool`, defaults to `False`): alpha = stopgrad(CE_noisy / CE_clean) instead of `ce_alpha`.
        lora_gated (`bool`, defaults to `False`): R-ISD training (see above).
        lora_r (`int`, defaults to `16`), lora_alpha (`int`, defaults to `32`), lora_target_modules (`str` or list,
            defaults to `"all-linear"`): the aLoRA built when `lora_gated` and no `peft_config` is given.
    """

    objective: str = field(default="idlm", metadata={"help": "Always 'idlm'."})
    mask_rate: float | None = field(default=1.0, metadata={"help": "I-DLM masks every response token."})
    block_length: int = field(default=3, metadata={"help": "Mask slots per noisy block (ISD N - 1)."})
    ce_alpha: float = field(default=0.2, metadata={"help": "Weight of the clean AR cross-entropy."})
    auto_balance: bool = field(default=False, metadata={"help": "alpha = stopgrad(CE_noisy / CE_clean)."})
    lora_gated: bool = field(default=False, metadata={"help": "R-ISD: [x_0 | x_t] + aLoRA on the noisy half."})
    lora_r: int = field(default=16, metadata={"help": "Rank of the default aLoRA (lora_gated)."})
    lora_alpha: int = field(default=32, metadata={"help": "lora_alpha of the default aLoRA (lora_gated)."})
    lora_target_modules: str | list[str] = field(
        default="all-linear", metadata={"help": "target_modules of the default aLoRA (lora_gated)."}
    )

    def __post_init__(self):
        name = type(self).__name__
        if self.objective != "idlm":
            raise ValueError(f"{name}: objective is always 'idlm' (use BlockDiffusionTrainingConfig for others).")
        if not (isinstance(self.block_length, int) and self.block_length >= 1):
            raise ValueError(f"{name}: block_length must be an int >= 1, got {self.block_length!r}.")
        if not self.ce_alpha >= 0:
            raise ValueError(f"{name}: ce_alpha must be >= 0, got {self.ce_alpha}.")
        self.block_size = self.block_length
        self.clean_loss_weight = self.ce_alpha
        check_diffusion_options(self, name)
        super().__post_init__()
