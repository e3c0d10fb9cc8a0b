"""Configuration of AR -> DLM conversion by supervised fine-tuning with a masked-diffusion objective
(MDLM/LLaDA, BD3-LM/SDAR block diffusion, I-DLM)."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from trl import SFTConfig

OBJECTIVES = ("mdlm", "bd3", "idlm")
# objective -> (2L mask pattern or None for the one-half MDLM input, BlockDiffusionConfig.attention stored on the model)
OBJECTIVE_LAYOUT = {"mdlm": (None, "bidirectional"), "bd3": ("bd3", "block"), "idlm": ("idlm", "causal")}


@dataclass
class BlockDiffusionTrainingConfig(SFTConfig):
    r"""`SFTConfig` plus the masked-diffusion objective. Every SFT option that shapes the data applies unchanged
    (chat templates, `assistant_only_loss`, `completion_only_loss`, `max_length`, ...): only tokens that carry a label
    are ever masked or scored, so the prompt is always clean context.

    Objectives (`L` = sequence length, `b` = `block_size`):
      - `"mdlm"`: one pass on x_t with whole-sequence bidirectional attention (LLaDA); loss
        `sum_masked CE / p_mask / N`.
      - `"bd3"`: one pass on `[x_t | x_0]` (2L tokens), bidirectional inside a noisy block, noisy blocks see the clean
        earlier blocks, clean half block-causal (BD3-LM, SDAR, Fast-dLLM v2); same loss.
      - `"idlm"`: as `"bd3"` but token-causal inside the noisy block and plain causal on the clean half (I-DLM; see
        `IDLMConfig` for its loss).
    `N` is the number of target tokens of the whole (gradient-accumulated, all-process) batch when the Trainer passes
    `num_items_in_batch`, else this micro-batch's.

    Parameters:
        objective (`str`, defaults to `"bd3"`): `"mdlm"`, `"bd3"` or `"idlm"`.
        block_size (`int`, defaults to `4`): b, tokens per block (the decode-time block size).
        mask_token_id (`int` or `None`): the mask id; `None` = the model's attached `BlockDiffusionConfig`
            (`hf_fastslow.modeling.block_diffusion.ensure_mask_token` picks one for a tokenizer without it).
        logit_shift (`bool`, defaults to `True`): hidden i predicts token i+1 (keeps a converted AR head's meaning;
            required by `"idlm"`); `False`: hidden i predicts token i (SDAR, LLaDA).
        mask_rate (`float` or `None`): `None` = MDLM schedule (t ~ U[0,1) per row, p_mask = (1-eps) t + eps); a
            number = that fixed fraction of the response is masked (I-DLM: 1.0).
        eps (`float`, defaults to `1e-3`): the schedule's floor (LLaDA's forward_process).
        block_alignment (`str`, defaults to `"response"`): where blocks start. `"response"`: each labelled run (the
            answer) is tiled from its first token and prompt tokens are plain causal context — the layout
            `block_diffusion_generate` decodes (first block at the end of the prompt); `"absolute"`: the papers'
            grid `pos // block_size` over the whole row (BD3-LM, SDAR and I-DLM training code).
        clean_loss_weight (`float`, defaults to `0.0`): weight of the AR cross-entropy on the clean half (`"bd3"`,
            `"idlm"` with `logit_shift`): a shifted block decoder takes each block's first token from the clean
            prefix, which this term keeps trained.
        bf16 (`bool` or `None`): unset = bf16 only where a bf16-capable GPU exists (SFTConfig would force it).
    """

    objective: str = field(default="bd3", metadata={"help": "'mdlm', 'bd3' or 'idlm'."})
    block_size: int = field(default=4, metadata={"help": "Tokens per diffusion block."})
    mask_token_id: int | None = field(default=None, metadata={"help": "Mask id (None: the model's attached one)."})
    logit_shift: bool = field(default=True, metadata={"help": "Hidden i predicts token i+1 (converted AR)."})
    mask_rate: float | None = field(default=None, metadata={"help": "None: MDLM schedule; a number: fixed rate."})
    eps: float = field(default=1e-3, metadata={"help": "Floor of the masking schedule."})
    block_alignment: str = field(default="response", metadata={"help": "'response' or 'absolute' block grid."})
    clean_loss_weight: float = field(default=0.0, metadata={"help": "Weight of the clean-half AR cross-entropy."})
    bf16: bool | None = field(default=None, metadata={"help": "bf16 mixed precision; unset = on with a bf16 GPU."})

    def __post_init__(self):
        check_diffusion_options(self, type(self).__name__)
        if self.bf16 is None:
            self.bf16 = (not self.fp16 and not self.use_cpu and torch.cuda.is_available()
                         and torch.cuda.is_bf16_supported())
        super().__post_init__()


def check_diffusion_options(config, name: str) -> None:
    """Validation shared by `BlockDiffusionTrainingConfig` and its subclasses (run before SFTConfig's own)."""
    if config.objective not in OBJECTIVES:
        raise ValueError(f"{name}: objective must be one of {OBJECTIVES}, got {config.objective!r}.")
    if not (isinstance(config.block_size, int) and config.block_size >= 1):
        raise ValueError(f"{name}: block_size must be an int >= 1, got {config.block_size!r}.")
    if config.block_alignment not in ("response", "absolute"):
        raise ValueError(f"{name}: block_alignment must be 'response' or 'absolute', got {config.block_alignment!r}.")
    if config.mask_token_id is not None and config.mask_token_id < 0:
        raise ValueError(f"{name}: mask_token_id must be >= 0, got {config.mask_token_id}.")
    if config.mask_rate is not None and not 0.0 < config.mask_rate <= 1.0:
        raise ValueError(f"{name}: mask_rate must be in (0, 1] or None, got {config.mask_rate}.")
    if not 0.0 <= config.eps < 1.0:
        raise ValueError(f"{name}: eps must be in [0, 1), got {config.eps}.")
    if not config.clean_loss_weight >= 0:
        raise ValueError(f"{name}: clean_loss_weight must be >= 0, got {config.clean_loss_weight}.")
    if config.objective == "idlm" and not config.logit_shift:
        raise ValueError(f"{name}: objective='idlm' needs logit_shift=True (its anchor is the AR next-token head).")
    if config.clean_loss_weight > 0 and (config.objective == "mdlm" or not config.logit_shift):
        raise ValueError(f"{name}: clean_loss_weight needs a two-half objective ('bd3'/'idlm') with logit_shift=True "
                         "(without the shift a clean hidden state would be scored on the token it already sees).")
    if config.packing or config.padding_free:
        raise ValueError(f"{name}: packing / padding_free are not supported: the two-half layout needs one 4D "
                         "attention mask per row (pad instead).")
