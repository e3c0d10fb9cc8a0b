"""Residual Context Diffusion (RCD, Hu et al., arXiv 2601.22954): block-diffusion decoding where every slot that is
still masked after a denoising step is fed, at the next step, a blend of the mask embedding and the
probability-weighted mean of the token embeddings it predicted ("soft token"), weighted by the normalized entropy of
that prediction (Eq. 1-3 of the paper):

    delta_i = E^T p_i,   alpha_i = H(softmax(z_i / T_res)) / log V,   e_i = (1 - alpha_i) E(m) + alpha_i delta_i

Committed tokens and the prompt never get a residual, so the prefix KV cache is the baseline's. The commit rule, the
cache handling and the loop are the block-diffusion baseline's (`BlockDiffusionDecoder`); RCD only overrides its
hooks: `start_block` resets the residual state, `block_inputs` injects it, `after_step` computes the next one.
With `alpha_mode="fixed", fixed_alpha=0` (or `t_res=0`) RCD is the baseline token for token.

    out = model.generate(ids, custom_generate=rcd_generate, block_size=8, threshold=0.9, mask_token_id=m,
                         t_res=1.0, init="zero", max_new_tokens=64)
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields

import torch
from torch.nn import functional as F

__all__ = [
    "ALPHA_MODES",
    "INITS",
    "RCDConfig",
    "entropy_weighted_residual",
    "input_embedding_scale",
    "inject_residual",
    "residual_weight",
    "soft_token_embedding",
]

ALPHA_MODES = ("entropy", "confidence", "fixed")
INITS = ("zero", "self", "ref", "dirichlet")


@dataclass
class RCDConfig:
    """Decoding-time settings of RCD.

    Args:
        t_res: residual temperature: alpha is computed on softmax(z / t_res) (raise it for an over-confident model);
            0 gives alpha = 0, i.e. the baseline.
        init: residual of a block's first step. "zero" (cold start, e = E(m); the paper's SDAR setting), "self" (one
            extra target pass on the all-mask block), "ref" (one pass of a reference model of the same tokenizer,
            the paper's LLaDA warm start; needs `ref_model=`), "dirichlet" (p drawn from a flat Dirichlet).
        alpha_mode: "entropy" (Eq. 3, H(p)/log V), "confidence" (1 - max p: the paper's ablated alternative, oriented
            like the entropy so that uncertain slots lean on their residual), "fixed" (`fixed_alpha` everywhere).
        fixed_alpha: the weight of `alpha_mode="fixed"`.
        temper_delta: build delta from the tempered distribution too (the paper's text) instead of the untempered one
            (its Algorithm 2, the default).
        residual_topk: build delta from the k most likely tokens only (renormalized): a gather-sum of k embedding
            rows instead of a [V, D] matmul; None = dense.
        dirichlet_concentration: concentration of the "dirichlet" init (1.0 = flat).
    """

    t_res: float = 1.0
    init: str = "zero"
    alpha_mode: str = "entropy"
    fixed_alpha: float = 0.3
    temper_delta: bool = False
    residual_topk: int | None = None
    dirichlet_concentration: float = 1.0

    def __post_init__(self):
        if self.init not in INITS:
            raise ValueError(f"RCDConfig: init must be one of {INITS}, got {self.init!r}.")
        if self.alpha_mode not in ALPHA_MODES:
            raise ValueError(f"RCDConfig: alpha_mode must be one of {ALPHA_MODES}, got {self.alpha_mode!r}.")
        if not self.t_res >= 0:
            raise ValueError(f"RCDConfig: t_res must be >= 0, got {self.t_res}.")
        if not 0.0 <= self.fixed_alpha <= 1.0:
            raise ValueError(f"RCDConfig: fixed_alpha must be in [0, 1], got {self.fixed_alpha}.")
        if self.residual_topk is not None and self.residual_topk < 1:
            raise ValueError(f"RCDConfig: residual_topk must be >= 1 or None, got {self.residual_topk}.")
        if not self.dirichlet_concentration > 0:
            raise ValueError(f"RCDConfig: dirichlet_concentration must be > 0, got {self.dirichlet_concentration}.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_kwargs(cls, kwargs: dict) -> RCDConfig:
        """Pop this config's fields out of `kwargs` (generate's model kwargs) and build it."""
        return cls(**{f.name: kwargs.pop(f.name) for f in fields(cls) if f.name in kwargs})


def input_embedding_scale(embedding: torch.nn.Module) -> float | torch.Tensor:
    """The factor an input-embedding module multiplies its lookups by (Gemma-style `embed_scale`; 1 for a plain
    `nn.Embedding`). A soft token must carry the same scale as the lookups it is blended with."""
    scale = getattr(embedding, "embed_scale", None)
    if scale is None:
        return 1.0
    if isinstance(scale, torch.Tensor):
        # The module casts its scale to the table's dtype before multiplying (transformers' ScaledWordEmbedding).
        return scale.to(embedding.weight.dtype)
    return float(scale)


def residual_weight(logits: torch.Tensor, alpha_mode: str = "entropy", t_res: float = 1.0,
                    fixed_alpha: float = 0.3) -> torch.Tensor:
    """alpha in [0, 1] for each row of `logits` [..., V], in float32. `V` is the logits width (padded vocabulary
    rows get ~0 mass, so they barely move the entropy, and log V stays the maximum)."""
    if alpha_mode not in ALPHA_MODES:
        raise ValueError(f"alpha_mode must be one of {ALPHA_MODES}, got {alpha_mode!r}.")
    shape = logits.shape[:-1]
    if alpha_mode == "fixed":
        return torch.full(shape, float(fixed_alpha), dtype=torch.float32, device=logits.device)
    if t_res == 0:  # the limit T_res -> 0: a one-hot distribution, no residual
        return torch.zeros(shape, dtype=torch.float32, device=logits.device)
    log_p = F.log_softmax(logits.float() / t_res, dim=-1)
    if alpha_mode == "confidence":
        return (1.0 - log_p.max(dim=-1).values.exp()).clamp(0.0, 1.0)
    entropy = torch.special.entr(log_p.exp()).sum(dim=-1)  # -p log p, 0 where p = 0 (e.g. -inf logits)
    return (entropy / math.log(logits.shape[-1])).clamp(0.0, 1.0)


def soft_token_embedding(probs: torch.Tensor, embed_weight: torch.Tensor, topk: int | None = None,
                         embed_scale: float | torch.Tensor = 1.0) -> torch.Tensor:
    """delta = E^T p for each row of `probs` [..., V] (Eq. 1), in the table's dtype, times the module's embedding
    scale. With `topk`, only the k most likely tokens count, renormalized (k = V is the dense residual)."""
    vocab = probs.shape[-1]
    if vocab > embed_weight.shape[0]:
        raise ValueError(f"the distribution has {vocab} entries but the input embedding table only "
                         f"{embed_weight.shape[0]} rows")
    table = embed_weight[:vocab]
    if topk is None or topk >= vocab:
        delta = torch.matmul(probs.to(table.dtype), table)
    else:
        top_p, top_idx = probs.topk(topk, dim=-1)
        top_p = top_p / top_p.sum(dim=-1, keepdim=True)
        delta = torch.einsum("...k,...kd->...d", top_p.to(table.dtype), F.embedding(top_idx, table))
    return delta * embed_scale


def entropy_weighted_residual(logits: torch.Tensor, embed_weight: torch.Tensor, t_res: float = 1.0,
                              topk: int | None = None, *, alpha_mode: str = "entropy", fixed_alpha: float = 0.3,
                              temper_delta: bool = False, embed_scale: float | torch.Tensor = 1.0):
    """The residual state of RCD from the logits of the slots [..., V]: (delta [..., D] in the table's dtype,
    alpha [...] float32). `embed_weight` must be the model's INPUT embedding table (untied models: not the LM head).
    Softmax and entropy run in float32; delta is built from the untempered distribution unless `temper_delta`."""
    alpha = residual_weight(logits, alpha_mode, t_res, fixed_alpha)
    temperature = t_res if (temper_delta and t_res > 0) else 1.0
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return soft_token_embedding(probs, embed_weight, topk, embed_scale), alpha


def inject_residual(embeds: torch.Tensor, delta: torch.Tensor, alpha: torch.Tensor,
                    masked: torch.BoolTensor) -> torch.Tensor:
    """e = (1 - alpha) * embeds + alpha * delta on the `masked` slots (where `embeds` holds E(m)), `embeds` unchanged
    (bit for bit) everywhere else. embeds/delta [B, n, D], alpha/masked [B, n]."""
    a = alpha.to(torch.float32).unsqueeze(-1)
    blended = ((1.0 - a) * embeds.float() + a * delta.float()).to(embeds.dtype)
    return torch.where(masked.unsqueeze(-1), blended, embeds)
