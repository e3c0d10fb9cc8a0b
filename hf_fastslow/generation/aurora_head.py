"""`AuroraHead`: the EAGLE-3-style draft head of Aurora and its pruned draft vocabulary.

One decoder block on a fused feature of three target hidden-state taps and the embedding of the next token, predicting
over a pruned draft vocabulary (`d2t` maps draft ids back to target ids). Drafting chains the head's own output state,
as in EAGLE-3; training unrolls the same chain ("training-time test", `AuroraHead.unroll`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .aurora_config import AuroraConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PAPER = "Aurora - When RL Meets Adaptive Speculative Training (Wang et al., arXiv 2602.06932)"


class _RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x):
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


class _Attention(nn.Module):
    def __init__(self, cfg: AuroraConfig):
        super().__init__()
        h, d = cfg.hidden_size, cfg.head_dim
        # q/k/v read [embedding ; feature] (2H), as in EAGLE-3's first draft layer.
        self.q_proj = nn.Linear(2 * h, cfg.num_attention_heads * d, bias=False)
        self.k_proj = nn.Linear(2 * h, cfg.num_key_value_heads * d, bias=False)
        self.v_proj = nn.Linear(2 * h, cfg.num_key_value_heads * d, bias=False)
        self.o_proj = nn.Linear(cfg.num_attention_heads * d, h, bias=False)


class _MLP(nn.Module):
    def __init__(self, cfg: AuroraConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class _MidLayer(nn.Module):
    def __init__(self, cfg: AuroraConfig):
        super().__init__()
        self.input_layernorm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hidden_norm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = _Attention(cfg)
        self.post_attention_layernorm = _RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = _MLP(cfg)


def _rotate_half(x):
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


class AuroraHead(nn.Module):
    """EAGLE-3-style draft head: `fc` fuses the target taps, one decoder block (`midlayer`), `norm`, `lm_head`
    over the draft vocabulary, and the buffers `d2t` (draft id -> target id) / `t2d` (target id -> draft id or -1).

    The token embedding is the target's (frozen, passed in by the caller), so it is not part of the checkpoint.
    Parameter names follow EAGLE-3 checkpoints (`fc`, `midlayer.*`, `norm`, `lm_head`, `d2t`).
    """

    def __init__(self, config: AuroraConfig, d2t: torch.Tensor | None = None):
        super().__init__()
        self.config = config
        h = config.hidden_size
        self.fc = nn.Linear(len(config.taps) * h, h, bias=False)
        self.midlayer = _MidLayer(config)
        self.norm = _RMSNorm(h, config.rms_norm_eps)
        self.lm_head = nn.Linear(h, config.draft_vocab_size, bias=False)
        if d2t is None:
            d2t = torch.arange(config.draft_vocab_size)
        d2t = torch.as_tensor(d2t, dtype=torch.long).flatten()
        if d2t.numel() != config.draft_vocab_size:
            raise ValueError(f"d2t has {d2t.numel()} entries, expected draft_vocab_size={config.draft_vocab_size}.")
        if d2t.numel() and (int(d2t.min()) < 0 or int(d2t.max()) >= config.target_vocab_size):
            raise ValueError("d2t contains ids outside the target vocabulary.")
        if torch.unique(d2t).numel() != d2t.numel():
            raise ValueError("d2t must not repeat target ids.")
        self.register_buffer("d2t", d2t)
        t2d = torch.full((config.target_vocab_size,), -1, dtype=torch.long)
        t2d[d2t] = torch.arange(d2t.numel())
        self.register_buffer("t2d", t2d, persistent=False)
        inv = 1.0 / (config.rope_theta ** (torch.arange(0, config.head_dim, 2, dtype=torch.float32) / config.head_dim))
        self.register_buffer("inv_freq", inv, persistent=False)
        self.reset_parameters()

    # ---- construction ------------------------------------------------------------------------------------------
    def reset_parameters(self, std: float = 0.02, generator: torch.Generator | None = None):
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.normal_(module.weight, std=std, generator=generator)
            elif isinstance(module, _RMSNorm):
                nn.init.ones_(module.weight)

    @classmethod
    def from_target(
        cls,
        model,
        *,
        draft_vocab_size: int | None = None,
        token_counts: torch.Tensor | Iterable[Sequence[int]] | None = None,
        taps: Sequence[int] | None = None,
        window: int | None = None,
        max_draft: int | None = None,
        seed: int | None = None,
    ) -> AuroraHead:
        """A day-0 head for `model`: random decoder block and `fc`; `lm_head` rows and `norm` copied from the target's
        output layer for the draft vocabulary, so the head starts in the target's output space.

        The draft vocabulary is the `draft_vocab_size` most frequent ids in `token_counts` (a count vector over the
        target vocabulary or an iterable of token-id sequences). Without counts it is the lowest ids: BPE assigns ids
        in merge order, which tracks corpus frequency, so this is a data-free stand-in until traffic is seen. The
        target's EOS ids are always included so the head can propose the end of a sequence.
        """
        config = AuroraConfig.from_target_config(
            model.config, draft_vocab_size=draft_vocab_size, taps=taps, window=window, max_draft=max_draft
        )
        d2t = select_draft_vocab(
            config.target_vocab_size, config.draft_vocab_size, token_counts, always=_eos_ids(model)
        )
        head = cls(config, d2t)
        if seed is not None:  # a private generator: seeding must not touch the global RNG of the caller
            head.reset_parameters(generator=torch.Generator().manual_seed(seed))
        out = model.get_output_embeddings()
        final_norm = getattr(getattr(model, "model", model), "norm", None)
        with torch.no_grad():
            if out is not None and out.weight.shape == (config.target_vocab_size, config.hidden_size):
                head.lm_head.weight.copy_(out.weight.detach()[d2t].float())
            norm_weight = getattr(final_norm, "weight", None)
            if norm_weight is not None and norm_weight.shape == head.norm.weight.shape:
                head.norm.weight.copy_(norm_weight.detach().float())
        param = next(model.parameters())
        return head.to(device=param.device, dtype=param.dtype)

    # ---- blocks ------------------------------------------------------------------------------------------------
    def _rope(self, x, positions):
        angles = positions.to(self.inv_freq.dtype)[..., None] * self.inv_freq
        angles = torch.cat((angles, angles), dim=-1)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        return x * cos + _rotate_half(x) * sin

    def _qkv(self, feat, emb, positions):
        """q (B, nh, S, d), k/v (B, nh, S, d) (kv heads repeated) for inputs at `positions` (S,)."""
        cfg, layer = self.config, self.midlayer
        b, s, _ = feat.shape
        x = torch.cat((layer.input_layernorm(emb), layer.hidden_norm(feat)), dim=-1)
        q = layer.self_attn.q_proj(x).view(b, s, cfg.num_attention_heads, cfg.head_dim).transpose(1, 2)
        k = layer.self_attn.k_proj(x).view(b, s, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        v = layer.self_attn.v_proj(x).view(b, s, cfg.num_key_value_heads, cfg.head_dim).transpose(1, 2)
        q, k = self._rope(q, positions), self._rope(k, positions)
        rep = cfg.num_attention_heads // cfg.num_key_value_heads
        if rep > 1:
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        return q, k, v

    def _finish(self, feat, attn):
        """Residual on the input feature, then the MLP: the block's output state (next chain step's feature)."""
        b, _, s, _ = attn.shape
        layer = self.midlayer
        h = feat + layer.self_attn.o_proj(attn.transpose(1, 2).reshape(b, s, -1))
        return h + layer.mlp(layer.post_attention_layernorm(h))

    def draft_logits(self, state):
        return self.lm_head(self.norm(state))

    def fuse(self, taps: torch.Tensor) -> torch.Tensor:
        """(..., len(taps) * H) concatenated target hidden states -> (..., H) feature."""
        return self.fc(taps)

    # ---- training-time test (teacher-forced chain unroll) ------------------------------------------------------
    def unroll(self, taps, next_embeds, valid, steps: int):
        """Draft logits of a `steps`-long chain from every anchor position, all anchors in parallel.

        taps: (B, S, n_taps*H) target hidden states at anchors s; next_embeds: (B, S + steps - 1, H) embeddings of the
        tokens x_{s+1+j} fed at chain step j; valid: (B, S) bool, anchors that exist (padding is False).
        Returns a list of `steps` tensors (B, S, V_d): step j predicts x_{s+2+j}.

        Step j attends to the real context (step-0 keys of anchors s' <= s within the window) and to the anchor's own
        earlier chain steps (EAGLE-3's diagonal), exactly what `propose` sees at inference.
        """
        s = taps.shape[1]
        if next_embeds.shape[1] < s + steps - 1:
            raise ValueError(
                f"next_embeds needs S + steps - 1 = {s + steps - 1} positions, got {next_embeds.shape[1]}."
            )
        scale = self.config.head_dim**-0.5
        pos = torch.arange(s, device=taps.device)
        band = (pos[None, :] <= pos[:, None]) & (pos[:, None] - pos[None, :] < self.config.window)
        ctx_mask = band[None, None] & valid[:, None, None, :]  # (B, 1, S, S)
        neg = torch.finfo(taps.dtype).min

        feat = self.fuse(taps)
        q, k0, v0 = self._qkv(feat, next_embeds[:, :s], pos)
        diag_k, diag_v, outputs = [], [], []
        for j in range(steps):
            if j > 0:
                q, kj, vj = self._qkv(feat, next_embeds[:, j : j + s], pos + j)
                diag_k.append(kj)
                diag_v.append(vj)
            scores = (q @ k0.transpose(-1, -2)) * scale
            scores = scores.masked_fill(~ctx_mask, neg)
            if diag_k:
                diag = torch.stack([(q * kk).sum(-1) for kk in diag_k], dim=-1) * scale  # (B, nh, S, j)
                probs = torch.softmax(torch.cat((scores, diag), dim=-1), dim=-1)
                attn = probs[..., :s] @ v0
                attn = attn + (probs[..., s:, None] * torch.stack(diag_v, dim=-2)).sum(-2)
            else:
                attn = torch.softmax(scores, dim=-1) @ v0
            feat = self._finish(feat, attn)
            outputs.append(self.draft_logits(feat))
        return outputs

    # ---- inference -----------------------------------------------------------------------------------------------
    @torch.no_grad()
    def propose(self, taps: torch.Tensor, next_ids: torch.Tensor, embed: nn.Module, k: int, start_pos: int = 0):
        """Greedy chain of `k` draft tokens (target ids) after the context.

        taps: (W, n_taps*H) target states of the last W anchors (oldest first); next_ids: (W,) the token that followed
        each anchor (the last one is the newest token, whose own state the target has not computed yet).
        Returns (target ids (k,), draft-vocab log-probs of each drafted token (k,)).
        """
        if k < 1:
            raise ValueError(f"k must be >= 1, got {k}.")
        w = taps.shape[0]
        scale = self.config.head_dim**-0.5
        pos = torch.arange(start_pos, start_pos + w, device=taps.device)
        feat = self.fuse(taps[None])
        q, k0, v0 = self._qkv(feat, embed(next_ids[None]).to(feat.dtype), pos)
        # Only the newest anchor drafts; older anchors contribute keys/values.
        q, feat = q[:, :, -1:], feat[:, -1:]
        keys, values = k0, v0
        drafted, logps = [], []
        last = start_pos + w - 1
        for j in range(k):
            if j > 0:
                tok = self.d2t[drafted[-1]].view(1, 1)
                q, kj, vj = self._qkv(feat, embed(tok).to(feat.dtype), torch.tensor([last + j], device=taps.device))
                keys, values = torch.cat((keys, kj), dim=2), torch.cat((values, vj), dim=2)
            probs = torch.softmax((q @ keys.transpose(-1, -2)) * scale, dim=-1)
            feat = self._finish(feat, probs @ values)
            logp = torch.log_softmax(self.draft_logits(feat)[0, -1].float(), dim=-1)
            idx = int(torch.argmax(logp))
            drafted.append(idx)
            logps.append(logp[idx])
        ids = self.d2t[torch.tensor(drafted, device=taps.device)]
        return ids, torch.stack(logps)

    # ---- checkpoints ---------------------------------------------------------------------------------------------
    def save_pretrained(self, save_directory: str | os.PathLike, figures: dict[str, Any] | None = None):
        """`config.json` + `model.safetensors` + a model card (README.md) in `save_directory`."""
        from safetensors.torch import save_file

        from ..model_card import save_model_card

        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as fh:
            json.dump(self.config.to_dict(), fh, indent=2, sort_keys=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        save_file(state, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})
        save_model_card(
            save_directory,
            base_model=self.config.base_model,
            method="aurora",
            paper=PAPER,
            tags=["speculative-decoding", "eagle", "draft-head"],
            figures=figures,
            description=(
                f"EAGLE-style draft head ({sum(p.numel() for p in self.parameters()) / 1e6:.2f} M parameters, "
                f"draft vocabulary {self.config.draft_vocab_size} of {self.config.target_vocab_size}, taps "
                f"{list(self.config.taps)}) for speculative decoding with `hf_fastslow.generation.AuroraDrafter`. "
                "It reads the target's hidden states and embedding, so it only works with its base model."
            ),
            usage=(
                "from hf_fastslow.generation import AuroraDrafter, AuroraHead, speculative_generate\n"
                "head = AuroraHead.from_pretrained(path)\n"
                "drafter = AuroraDrafter(model, head=head, online=False)\n"
                "out = model.generate(ids, custom_generate=speculative_generate, drafter=drafter, max_new_tokens=128)"
            ),
        )

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: str | torch.device | None = None,
                        dtype: torch.dtype | None = None) -> AuroraHead:
        from safetensors.torch import load_file

        with open(os.path.join(path, CONFIG_NAME)) as fh:
            config = AuroraConfig.from_dict(json.load(fh))
        state = load_file(os.path.join(path, WEIGHTS_NAME))
        head = cls(config, state["d2t"])
        head.load_state_dict(state)
        if dtype is None:
            dtype = state["fc.weight"].dtype
        return head.to(device=device or "cpu", dtype=dtype)


def _eos_ids(model) -> list[int]:
    ids = []
    for cfg in (getattr(model, "generation_config", None), getattr(model, "config", None)):
        eos = getattr(cfg, "eos_token_id", None)
        if eos is not None:
            ids.extend([eos] if isinstance(eos, int) else list(eos))
    return sorted({int(i) for i in ids})


def select_draft_vocab(vocab_size: int, draft_vocab_size: int, token_counts=None, always: Sequence[int] = ()):
    """Sorted target ids of the draft vocabulary: `always` first, then by descending count (ties: lower id)."""
    if draft_vocab_size > vocab_size:
        raise ValueError(f"draft_vocab_size={draft_vocab_size} exceeds the target vocabulary ({vocab_size}).")
    if token_counts is None:
        counts = torch.zeros(vocab_size, dtype=torch.float64)
    elif isinstance(token_counts, torch.Tensor):
        if token_counts.numel() != vocab_size:
            raise ValueError(f"token_counts has {token_counts.numel()} entries, the vocabulary has {vocab_size}.")
        counts = token_counts.detach().flatten().double().cpu().clone()
    else:
        counts = torch.zeros(vocab_size, dtype=torch.float64)
        for seq in token_counts:
            ids = torch.as_tensor(list(seq), dtype=torch.long)
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
                raise ValueError("token_counts contains ids outside the target vocabulary.")
            counts += torch.bincount(ids, minlength=vocab_size).double()
    # Lower ids win ties (BPE order), forced ids win everything.
    score = counts - torch.arange(vocab_size, dtype=torch.float64) / vocab_size
    forced = [i for i in always if 0 <= i < vocab_size][:draft_vocab_size]
    score[forced] = float("inf")
    return torch.topk(score, draft_vocab_size).indices.sort().values
