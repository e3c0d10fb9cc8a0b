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

import functools
import math
from dataclasses import asdict, dataclass, fields

import torch
from torch.nn import functional as F

from ..modeling.block_diffusion import block_attention_mask, block_diffusion_config, model_attention_mask
from .block_diffusion import BlockDiffusionDecoder, block_diffusion_generate

__all__ = [
    "ALPHA_MODES",
    "INITS",
    "RCDConfig",
    "RCDDecoder",
    "entropy_weighted_residual",
    "input_embedding_scale",
    "inject_residual",
    "rcd_generate",
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


# --------------------------------------------------------------------------------------------------------------------
# Decoding: the baseline loop with RCD's hooks
# --------------------------------------------------------------------------------------------------------------------
class RCDDecoder(BlockDiffusionDecoder):
    """`BlockDiffusionDecoder` feeding each still-masked slot its residual from the previous step.

    Per block and row the residual state (delta [B, b, D], alpha [B, b]) starts from `config.init` and is replaced
    after every denoising step by the residual of that step's distributions (`after_step`); only the masked slots of
    the next denoising pass receive it (`block_inputs`), so committed tokens, the prompt, finished rows and the
    KV-commit pass are fed exactly as the baseline feeds them. The commit rule is the baseline's `select`.
    """

    def __init__(self, model, *, rcd: RCDConfig, ref_model=None, **settings):
        super().__init__(model, **settings)
        # The `forward` below passes the loop's logits_to_keep through unchanged, so RCD keeps the baseline's LM-head
        # slicing (logits only where masked slots read them; the residuals only ever read those).
        self.slices_logits = True
        self.rcd = rcd
        self.ref_model = ref_model
        self.embedding = model.get_input_embeddings()
        self.embed_scale = input_embedding_scale(self.embedding)
        self.delta: torch.Tensor | None = None
        self.alpha: torch.Tensor | None = None
        self.init_forwards: torch.Tensor | None = None  # per row: the extra passes of "self"/"ref" initialization
        self._fresh = False
        self._init_pending = False
        self._last_logits: torch.Tensor | None = None  # the last prefix output (slot 0's distribution with the shift)

    # ---- residual state ---------------------------------------------------------------------------------------------
    def _set_state(self, logits: torch.Tensor, masked: torch.Tensor) -> None:
        """Residuals of the `masked` slots from their distributions `logits` [B, b, V]; zero elsewhere."""
        rows, width = masked.shape
        cfg = self.rcd
        delta, alpha = entropy_weighted_residual(
            logits[masked], self.embedding.weight, cfg.t_res, cfg.residual_topk, alpha_mode=cfg.alpha_mode,
            fixed_alpha=cfg.fixed_alpha, temper_delta=cfg.temper_delta, embed_scale=self.embed_scale)
        self.delta = self.embedding.weight.new_zeros(rows, width, self.embedding.weight.shape[-1])
        self.delta[masked] = delta.to(self.delta.dtype)
        self.alpha = torch.zeros(rows, width, dtype=torch.float32, device=masked.device)
        self.alpha[masked] = alpha

    def _dirichlet_logits(self, masked: torch.Tensor) -> torch.Tensor:
        vocab = self.model.get_output_embeddings().weight.shape[0]
        concentration = torch.full((*masked.shape, vocab), float(self.rcd.dirichlet_concentration),
                                   device=masked.device)
        return torch.distributions.Dirichlet(concentration).sample().clamp_min(1e-30).log()

    # ---- hooks ------------------------------------------------------------------------------------------------------
    def start_block(self, block_index: int) -> None:
        super().start_block(block_index)
        self.delta = self.alpha = None  # every block (and every row in it) starts from the init, never from the last
        self._fresh = True

    def block_inputs(self, block_ids: torch.Tensor, masked: torch.Tensor) -> dict:
        if not bool(masked.any()):
            if self.rcd.init == "ref":
                self._sequence = torch.cat([self._sequence, block_ids], dim=1)  # the KV-commit pass: final tokens
                self._padding = torch.cat([self._padding, torch.ones_like(block_ids)], dim=1)
            return super().block_inputs(block_ids, masked)
        if self._fresh:  # the block's first denoising pass
            self._fresh = False
            if self.rcd.init == "dirichlet":
                self._set_state(self._dirichlet_logits(masked), masked)
            elif self.rcd.init in ("self", "ref"):
                self._init_pending, self._init_ids, self._init_masked = True, block_ids, masked
        if self.alpha is None:  # zero residual: e = E(m), the baseline's input
            return super().block_inputs(block_ids, masked)
        return {"inputs_embeds": inject_residual(self.embedding(block_ids), self.delta, self.alpha, masked)}

    def after_step(self, logits: torch.Tensor, block_ids: torch.Tensor, masked: torch.Tensor) -> None:
        super().after_step(logits, block_ids, masked)
        self._set_state(logits, masked)

    # ---- forwards ---------------------------------------------------------------------------------------------------
    def forward(self, inputs: dict, position_ids, attention_mask, cache, logits_to_keep: int, extra: dict):
        if self._init_pending:
            self._init_pending = False
            logits = self._initial_logits(inputs, position_ids, attention_mask, cache, extra)
            self._set_state(logits, self._init_masked)
            active = self._init_masked.any(-1).long()
            self.init_forwards = active if self.init_forwards is None else self.init_forwards + active
            inputs = self.block_inputs(self._init_ids, self._init_masked)
        out = super().forward(inputs, position_ids, attention_mask, cache, logits_to_keep, extra)
        if isinstance(logits_to_keep, int) and logits_to_keep == 1:  # prefill / KV commit
            self._last_logits = out.logits[:, -1].float()
        return out

    def _initial_logits(self, inputs, position_ids, attention_mask, cache, extra) -> torch.Tensor:
        """Aligned distributions [B, b, V] of the all-mask block: one target pass ("self") or one reference pass
        ("ref")."""
        width = self._init_ids.shape[1]
        if self.rcd.init == "self":
            raw = super().forward(inputs, position_ids, attention_mask, cache, 0, extra).logits[:, -width:].float()
            return torch.cat([self._last_logits[:, None], raw[:, :-1]], dim=1) if self.logit_shift else raw
        # The reference has no cache of its own: it reads the whole sequence so far plus the masked block.
        ref = self.ref_model
        ref_config = block_diffusion_config(ref)
        ids = torch.cat([self._sequence, self._init_ids], dim=1)
        padding = torch.cat([self._padding, torch.ones_like(self._init_ids)], dim=1)
        total = ids.shape[1]
        allowed = block_attention_mask(
            total, total, self.block_size, q_offset=0,
            pattern=ref_config.attention if ref_config is not None else self.attention,
            padding_mask=None if bool(padding.all()) else padding, block_start=self._prompt_width,
            device=ids.device)
        positions = (padding.cumsum(-1) - 1).clamp(min=0)
        mask = model_attention_mask(ref, allowed, next(ref.parameters()).dtype)
        logits = ref(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False).logits.float()
        shift = ref_config.logit_shift if ref_config is not None else self.logit_shift
        return logits[:, total - width - 1: total - 1] if shift else logits[:, total - width:]

    def generate(self, input_ids, attention_mask, cache, *args, **kwargs):
        if self.rcd.init == "ref":
            self._sequence = input_ids
            self._padding = torch.ones_like(input_ids) if attention_mask is None else attention_mask.long()
            self._prompt_width = input_ids.shape[1]
        output = super().generate(input_ids, attention_mask, cache, *args, **kwargs)
        if self.init_forwards is not None and hasattr(output, "num_forwards"):
            # The initialization passes are forwards too: tokens per forward counts them.
            kept = torch.round(output.tokens_per_forward.double() * output.num_forwards.double())
            output.num_forwards = output.num_forwards + self.init_forwards
            output.tokens_per_forward = (kept / output.num_forwards.double()).float()
        return output


def _check_reference(model, ref_model, mask_token_id) -> None:
    if ref_model is None:
        raise ValueError("rcd_generate: init='ref' needs `ref_model=` (a block-diffusion model of the same tokenizer).")
    vocab = model.get_output_embeddings().weight.shape[0]
    ref_vocab = ref_model.get_output_embeddings().weight.shape[0]
    if vocab != ref_vocab:
        raise ValueError(f"rcd_generate: the reference model's vocabulary ({ref_vocab}) differs from the target's "
                         f"({vocab}); its distributions index the target's embedding table.")
    ref_config = block_diffusion_config(ref_model)
    if ref_config is not None and mask_token_id is not None and ref_config.mask_token_id != mask_token_id:
        raise ValueError(f"rcd_generate: the reference model's mask token ({ref_config.mask_token_id}) differs from "
                         f"the target's ({mask_token_id}).")


@torch.no_grad()
def rcd_generate(model, input_ids, logits_processor=None, stopping_criteria=None, generation_config=None,
                 streamer=None, *, block_size=None, mask_token_id=None, steps=None, threshold=None,
                 remasking="low_confidence", rcd_config: RCDConfig | None = None, ref_model=None, t_res=None,
                 init=None, alpha_mode=None, fixed_alpha=None, temper_delta=None, residual_topk=None,
                 dirichlet_concentration=None, fuse_commit=True, **model_kwargs):
    r"""RCD decoding as a `generate(custom_generate=...)` callable: `block_diffusion_generate` (same arguments, same
    commit rule, same outputs: `.tokens_per_forward` counts the initialization passes of init="self"/"ref") with
    residual inputs on the masked slots.

    Args:
        rcd_config: an `RCDConfig`; or its fields as keywords (`t_res`, `init`, `alpha_mode`, `fixed_alpha`,
            `temper_delta`, `residual_topk`, `dirichlet_concentration`), which override it.
        ref_model: the reference model of init="ref" (same vocabulary and mask token); it re-reads the whole
            sequence once per block (no cache of its own), so keep it small.
    """
    overrides = {k: v for k, v in dict(t_res=t_res, init=init, alpha_mode=alpha_mode, fixed_alpha=fixed_alpha,
                                       temper_delta=temper_delta, residual_topk=residual_topk,
                                       dirichlet_concentration=dirichlet_concentration).items() if v is not None}
    config = RCDConfig(**{**(rcd_config.to_dict() if rcd_config is not None else {}), **overrides})
    if config.init == "ref":
        attached = block_diffusion_config(model)
        _check_reference(model, ref_model, mask_token_id if mask_token_id is not None else
                         (attached.mask_token_id if attached is not None else None))
    # A zero-init block's first pass is the baseline's, so it may ride on the previous block's KV-commit pass (the
    # baseline's fused commit); the other inits need that first pass alone, after their initialization.
    fuse_commit = bool(fuse_commit) and config.init == "zero"
    decoder = functools.partial(RCDDecoder, rcd=config, ref_model=ref_model)
    return block_diffusion_generate(
        model, input_ids, logits_processor, stopping_criteria, generation_config, streamer, block_size=block_size,
        mask_token_id=mask_token_id, steps=steps, threshold=threshold, remasking=remasking, decoder_cls=decoder,
        fuse_commit=fuse_commit, **model_kwargs)
