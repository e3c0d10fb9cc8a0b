"""Aurora: an EAGLE-style draft head trained online from live speculative-decoding traces and hot-swapped in.

Paper: "When RL Meets Adaptive Speculative Training: A Unified Training-Serving System" (Wang et al., arXiv 2602.06932).

Pieces, from the bottom up:

* `AuroraHead` - one decoder block on a fused feature of three target hidden-state taps and the embedding of the next
  token, predicting over a pruned draft vocabulary (`d2t` maps draft ids back to target ids). Drafting chains the
  head's own output state, as in EAGLE-3; training unrolls the same chain ("training-time test").
* `HotSwapHead` - two serving replicas of the head and a versioned pointer: the trainer writes the inactive replica
  (never one a reader holds) and flips the pointer, so every proposal is computed from one complete weight set.
* `AuroraTrainer` - a replay buffer of traces (accepted tokens = positives, the first rejected proposal of a round =
  negative) and an AdamW loop, run inline (`train(n)`) or in a background thread (`start()` / `stop()`).
* `AuroraDrafter` - the `Drafter` that reads the target's hidden states from each verification, drafts with the
  current serving weights and feeds its traces to the trainer (`online=False` gives a frozen speculator).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import json
import logging
import os
import random
import threading
import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from .drafter import DraftContext, Drafter, DraftFeedback

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
PAPER = "Aurora - When RL Meets Adaptive Speculative Training (Wang et al., arXiv 2602.06932)"


# --------------------------------------------------------------------------------------------------------------------
# Configuration
# --------------------------------------------------------------------------------------------------------------------
def default_taps(num_layers: int) -> tuple[int, int, int]:
    """EAGLE-3's feature taps (layers 1, L/2-1, L-4) as indices into HF's `hidden_states` tuple (layer + 1).

    Shallow targets (tests) would give negative layers; they are clamped to the model's layer range.
    """
    layers = (1, num_layers // 2 - 1, num_layers - 4)
    return tuple(min(max(layer, 0), num_layers - 1) + 1 for layer in layers)


@dataclasses.dataclass
class AuroraConfig:
    """Shape and drafting defaults of an `AuroraHead` (saved as `config.json`)."""

    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    intermediate_size: int
    target_vocab_size: int
    draft_vocab_size: int
    target_num_layers: int
    taps: tuple[int, ...] = ()
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    window: int = 16
    max_draft: int = 5
    base_model: str | None = None
    model_type: str = "aurora_eagle_head"

    def __post_init__(self):
        self.taps = tuple(int(t) for t in (self.taps or default_taps(self.target_num_layers)))
        if self.draft_vocab_size < 1 or self.draft_vocab_size > self.target_vocab_size:
            raise ValueError(
                f"draft_vocab_size must be in [1, {self.target_vocab_size}] (the target vocabulary), got "
                f"{self.draft_vocab_size}."
            )
        bad = [t for t in self.taps if not 0 <= t <= self.target_num_layers]
        if bad:
            raise ValueError(
                f"taps {bad} are out of range: indices into hidden_states must lie in [0, {self.target_num_layers}] "
                f"for a {self.target_num_layers}-layer target (index = layer + 1, 0 = embeddings)."
            )
        if self.max_draft < 1:
            raise ValueError(f"max_draft (k) must be >= 1, got {self.max_draft}.")
        if self.window < 1:
            raise ValueError(f"window must be >= 1, got {self.window}.")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads.")

    @classmethod
    def from_target_config(cls, config, **overrides) -> AuroraConfig:
        rope = getattr(config, "rope_parameters", None) or {}
        theta = rope.get("rope_theta") if isinstance(rope, dict) else None
        heads = config.num_attention_heads
        values = {
            "hidden_size": config.hidden_size,
            "num_attention_heads": heads,
            "num_key_value_heads": getattr(config, "num_key_value_heads", None) or heads,
            "head_dim": getattr(config, "head_dim", None) or config.hidden_size // heads,
            "intermediate_size": config.intermediate_size,
            "target_vocab_size": config.vocab_size,
            "draft_vocab_size": min(config.vocab_size, 8192),
            "target_num_layers": config.num_hidden_layers,
            "rms_norm_eps": getattr(config, "rms_norm_eps", 1e-5),
            "rope_theta": float(theta or getattr(config, "rope_theta", 10000.0)),
            "base_model": getattr(config, "_name_or_path", None) or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["taps"] = list(self.taps)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AuroraConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


# --------------------------------------------------------------------------------------------------------------------
# The head
# --------------------------------------------------------------------------------------------------------------------
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


# --------------------------------------------------------------------------------------------------------------------
# Serving weights: double buffer + versioned swap
# --------------------------------------------------------------------------------------------------------------------
class HotSwapHead:
    """Two serving replicas of a head and the index of the active one.

    Readers `acquire()` the active replica (a counter per replica, taken under a condition variable); `publish()`
    waits until nobody holds the inactive replica, copies the new weights into it, then flips the index and bumps the
    version. A proposal therefore never sees a half-written weight set, and neither side blocks for long: readers
    never wait for a copy, the publisher waits at most for the proposals already running on the stale replica.
    """

    def __init__(self, head: AuroraHead):
        # Both replicas are private copies: publishing writes into them, and a caller's head may be shared (e.g. by a
        # frozen and an online drafter built from the same day-0 head).
        self._replicas = [copy.deepcopy(head), copy.deepcopy(head)]
        for replica in self._replicas:
            replica.requires_grad_(False).eval()
        self._active = 0
        self._readers = [0, 0]
        self._version = 0
        self._cond = threading.Condition()
        self._publish_lock = threading.Lock()

    @property
    def version(self) -> int:
        return self._version

    @property
    def config(self) -> AuroraConfig:
        return self._replicas[0].config

    @contextlib.contextmanager
    def acquire(self):
        """`with hot.acquire() as (head, version):` - the head stays intact until the block exits."""
        with self._cond:
            idx, version = self._active, self._version
            self._readers[idx] += 1
        try:
            yield self._replicas[idx], version
        finally:
            with self._cond:
                self._readers[idx] -= 1
                self._cond.notify_all()

    def publish(self, source: AuroraHead | dict[str, torch.Tensor]) -> int:
        """Copy `source`'s weights into the inactive replica and make it active; returns the new version."""
        state = source.state_dict() if isinstance(source, nn.Module) else source
        with self._publish_lock:
            with self._cond:
                target = 1 - self._active
                self._cond.wait_for(lambda: self._readers[target] == 0)
            # No reader can start on `target` now: readers only pick the active replica.
            with torch.no_grad():
                for name, tensor in self._replicas[target].state_dict().items():
                    tensor.copy_(state[name])
            with self._cond:
                self._active = target
                self._version += 1
                return self._version

    def snapshot(self) -> AuroraHead:
        """A detached copy of the current serving head (for checkpoints)."""
        with self.acquire() as (head, _):
            return copy.deepcopy(head)


# --------------------------------------------------------------------------------------------------------------------
# Traces, replay buffer, trainer
# --------------------------------------------------------------------------------------------------------------------
@dataclasses.dataclass
class AuroraTrace:
    """A contiguous piece of one request, as verified by the target.

    taps: (N, n_taps*H) target states at positions p0..p0+N-1; ids: tokens x_{p0+1}, x_{p0+2}, ... (the token after
    each anchor, then later tokens as labels for the unrolled steps); loss_from: anchors before it are context only
    (they were trained in the previous piece); negatives: (anchor, step, target id, serving version) of each round's
    first rejected proposal.
    """

    taps: torch.Tensor
    ids: torch.Tensor
    loss_from: int = 0
    negatives: list[tuple[int, int, int, int]] = dataclasses.field(default_factory=list)

    def __len__(self):
        return self.taps.shape[0]


def _labelled_end(trace: AuroraTrace) -> int:
    """One past the last anchor whose step-0 label (`ids[a + 1]`) is known."""
    return min(len(trace), trace.ids.numel() - 1)


class ReplayBuffer:
    """Bounded FIFO of traces; `put` never blocks and drops the oldest trace when full."""

    def __init__(self, capacity: int = 256):
        if capacity < 1:
            raise ValueError("capacity must be >= 1")
        self._items: collections.deque[AuroraTrace] = collections.deque(maxlen=capacity)
        self._lock = threading.Lock()
        self._added = threading.Condition(self._lock)
        self.dropped = 0
        self.total = 0

    def put(self, trace: AuroraTrace):
        with self._lock:
            if len(self._items) == self._items.maxlen:
                self.dropped += 1
            self._items.append(trace)
            self.total += 1
            self._added.notify_all()

    def __len__(self):
        with self._lock:
            return len(self._items)

    def sample(self, n: int, rng: random.Random, timeout: float | None = None) -> list[AuroraTrace]:
        """`n` traces drawn with replacement, weighted by length, newest-biased (recent traffic matters most)."""
        with self._lock:
            if not self._items and timeout:
                self._added.wait(timeout)
            items = list(self._items)
        if not items:
            return []
        weights = [len(t) * (1.0 + i / len(items)) for i, t in enumerate(items)]
        return rng.choices(items, weights=weights, k=n)


class AuroraTrainer:
    """Online trainer: AdamW on a private copy of the head, publishing into a `HotSwapHead` every `sync_every` steps.

    Loss per chunk (one trace window of at most `max_len` anchors, unrolled `ttt_length` steps):
    `sum_j 0.8^j * CE(q_j, x_{s+2+j})` over anchors whose label is in the draft vocabulary (under greedy serving the
    verified token is the target's argmax, so this is the forward KL at temperature 0), plus
    `rejection_weight * -log(1 - q_j*(x_hat))` at each round's first rejected proposal (never at later steps: their
    context contains the rejected token). Negatives older than `max_staleness` versions are dropped.
    """

    def __init__(
        self,
        hot: HotSwapHead,
        embed: nn.Module,
        *,
        lr: float = 1e-3,
        ttt_length: int = 5,
        rejection_weight: float = 0.1,
        sync_every: int = 10,
        batch_size: int = 4,
        max_len: int = 64,
        buffer_size: int = 256,
        grad_clip: float = 0.5,
        max_staleness: int = 5,
        seed: int = 0,
    ):
        if ttt_length < 1 or sync_every < 1 or batch_size < 1 or max_len < 1:
            raise ValueError("ttt_length, sync_every, batch_size and max_len must be >= 1")
        self.hot = hot
        self.embed = embed
        self.head = hot.snapshot()
        self.head.requires_grad_(True).train()
        self.optimizer = torch.optim.AdamW(self.head.parameters(), lr=lr,
                                           weight_decay=0.0)
        self.ttt_length, self.rejection_weight, self.sync_every = ttt_length, rejection_weight, sync_every
        self.batch_size, self.max_len = batch_size, max_len
        self.grad_clip, self.max_staleness = grad_clip, max_staleness
        self._t2d = self.head.t2d.cpu()  # traces live on the CPU; the head may not
        self.buffer = ReplayBuffer(buffer_size)
        self.rng = random.Random(seed)
        self.steps = 0
        self.last_loss = float("nan")
        self.last_sim_acceptance = float("nan")
        self.train_seconds = 0.0
        self._step_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._error: BaseException | None = None

    # ---- data --------------------------------------------------------------------------------------------------
    def add_trace(self, trace: AuroraTrace):
        if trace.loss_from >= _labelled_end(trace):
            return  # no anchor with a known next token: no signal
        self.buffer.put(trace)

    def _collate(self, traces: list[AuroraTrace]):
        """Pad a window of each trace into (B, S) tensors; labels (steps, B, S) in draft ids, -100 = no loss."""
        T, w = self.ttt_length, self.head.config.window
        pieces = []
        for tr in traces:
            n = len(tr)
            lo = self.rng.randrange(tr.loss_from, _labelled_end(tr))
            hi = min(n, lo + self.max_len)
            ctx = max(0, lo - (w - 1))  # give the first loss anchor its full attention window
            pieces.append((tr, ctx, lo, hi))
        s = max(hi - ctx for _, ctx, _, hi in pieces)
        b = len(pieces)
        dim = traces[0].taps.shape[-1]
        dtype = self.head.fc.weight.dtype
        taps = torch.zeros(b, s, dim, dtype=dtype)
        ids = torch.zeros(b, s + T, dtype=torch.long)
        valid = torch.zeros(b, s, dtype=torch.bool)
        labels = torch.full((T, b, s), -100, dtype=torch.long)
        negatives = []
        t2d = self._t2d
        for i, (tr, ctx, lo, hi) in enumerate(pieces):
            m = hi - ctx
            taps[i, :m] = tr.taps[ctx:hi].to(dtype)
            seq = tr.ids[ctx : hi + T]
            known = seq.clamp_min(0)
            ids[i, : seq.numel()] = known
            valid[i, :m] = True
            anchors = torch.arange(lo, hi)
            for j in range(T):
                # label of anchor a at step j is x_{p0+a+2+j} = tr.ids[a + 1 + j]
                idx = anchors + 1 + j
                lab = torch.full((hi - lo,), -1, dtype=torch.long)
                ok = idx < tr.ids.numel()
                lab[ok] = tr.ids[idx[ok]]
                lab_d = torch.where(lab >= 0, t2d[lab.clamp_min(0)], torch.full_like(lab, -1))
                labels[j, i, lo - ctx : hi - ctx] = torch.where(lab_d >= 0, lab_d, torch.full_like(lab_d, -100))
            for anchor, step, tok, version in tr.negatives:
                fresh = self.hot.version - version <= self.max_staleness
                if fresh and lo <= anchor < hi and step < T and t2d[tok] >= 0:
                    negatives.append((i, anchor - ctx, step, int(t2d[tok])))
        device = self.head.fc.weight.device
        return taps.to(device), ids.to(device), valid.to(device), labels.to(device), negatives

    # ---- optimisation --------------------------------------------------------------------------------------------
    def loss(self, traces: list[AuroraTrace]):
        """(loss tensor, simulated acceptance length) of a batch of traces."""
        taps, ids, valid, labels, negatives = self._collate(traces)
        with torch.no_grad():
            next_embeds = self.embed(ids).to(taps.dtype)
        logits = self.head.unroll(taps, next_embeds, valid, self.ttt_length)
        total = taps.new_zeros(())
        alive = torch.ones_like(labels[0], dtype=torch.float32)
        sim_accept = torch.zeros_like(alive)
        for j, lj in enumerate(logits):
            lab = labels[j]
            mask = lab != -100
            if mask.any():
                logp = torch.log_softmax(lj.float(), dim=-1)
                nll = -logp.gather(-1, lab.clamp_min(0)[..., None])[..., 0]
                total = total + (0.8**j) * nll[mask].mean()
                with torch.no_grad():
                    hit = (lj.argmax(-1) == lab) & mask
                    alive = alive * hit.float()
                    sim_accept += alive
            else:
                alive = torch.zeros_like(alive)
            rows = [(b, a, tok) for b, a, step, tok in negatives if step == j]
            if rows and self.rejection_weight > 0:
                bi, ai, ti = (torch.tensor(c, device=lj.device) for c in zip(*rows))
                q = torch.softmax(lj[bi, ai].float(), dim=-1).gather(-1, ti[:, None])[:, 0]
                total = total + self.rejection_weight * (-torch.log1p(-q.clamp(max=1 - 1e-6))).mean()
        first = labels[0] != -100
        sim = float(sim_accept[first].mean()) if first.any() else float("nan")
        return total, sim

    def train_step(self, traces: list[AuroraTrace] | None = None) -> float | None:
        """One AdamW step on `traces` (default: a batch from the replay buffer); None if there is nothing to learn."""
        with self._step_lock:
            if traces is None:
                traces = self.buffer.sample(self.batch_size, self.rng)
            if not traces:
                return None
            t0 = time.perf_counter()
            loss, sim = self.loss(traces)
            if not loss.requires_grad:
                return None
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if self.grad_clip:
                torch.nn.utils.clip_grad_norm_(self.head.parameters(), self.grad_clip)
            self.optimizer.step()
            self.steps += 1
            self.last_loss, self.last_sim_acceptance = float(loss.detach()), sim
            if self.steps % self.sync_every == 0:
                self.publish()
            self.train_seconds += time.perf_counter() - t0
            return self.last_loss

    def publish(self) -> int:
        return self.hot.publish(self.head)

    def train(self, steps: int) -> list[float]:
        """Run `steps` steps inline (deterministic; for tests and between-request training)."""
        losses = []
        for _ in range(steps):
            value = self.train_step()
            if value is None:
                break
            losses.append(value)
        return losses

    # ---- background thread ---------------------------------------------------------------------------------------
    def start(self, num_threads: int | None = 1) -> AuroraTrainer:
        """Train in a daemon thread until `stop()`. Torch kernels release the GIL, so decoding keeps running."""
        if self._thread is not None and self._thread.is_alive():
            return self
        self._stop.clear()
        self._error = None

        def loop():
            try:
                while not self._stop.is_set():
                    if self.train_step() is None:
                        self.buffer.sample(0, self.rng, timeout=0.05)  # wait for traffic
                        self._stop.wait(0.05)
            except BaseException as err:  # surfaced by stop()/check()
                self._error = err
                logger.exception("Aurora trainer thread failed")

        self._thread = threading.Thread(target=loop, name="aurora-trainer", daemon=True)
        self._thread.start()
        return self

    def stop(self, publish: bool = True):
        """Stop the thread (after its current step), publish the latest weights, re-raise a thread failure."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None
        if publish and self.steps:
            self.publish()
        self.check()

    def check(self):
        if self._error is not None:
            raise RuntimeError("the Aurora trainer thread failed") from self._error

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    @property
    def stats(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "version": self.hot.version,
            "loss": self.last_loss,
            "sim_acceptance": self.last_sim_acceptance,
            "buffer": len(self.buffer),
            "traces_seen": self.buffer.total,
            "traces_dropped": self.buffer.dropped,
            "train_seconds": self.train_seconds,
        }


# --------------------------------------------------------------------------------------------------------------------
# The drafter
# --------------------------------------------------------------------------------------------------------------------
class _Row:
    """Per-request state: target taps of every verified position, the committed tokens, negatives not yet pushed."""

    __slots__ = ("flushed", "negatives", "pending", "taps", "tokens")

    def __init__(self):
        self.taps: list[torch.Tensor] = []  # chunks of (n, n_taps*H), positions 0.. contiguous
        self.tokens: list[int] = []
        self.flushed = 0  # anchors < flushed were pushed as loss anchors already
        self.negatives: list[tuple[int, int, int, int]] = []
        self.pending: tuple[int, list[int], int] | None = None  # (anchor, drafted ids, version) of the open round

    @property
    def covered(self) -> int:
        return sum(t.shape[0] for t in self.taps)

    def all_taps(self) -> torch.Tensor:
        if len(self.taps) > 1:
            self.taps = [torch.cat(self.taps)]
        return self.taps[0]


class AuroraDrafter(Drafter):
    """Draft tokens with an Aurora head on the target's hidden states; learn from the verification outcomes.

    Args:
        model (`PreTrainedModel`): the target (its embedding is shared with the head; nothing of it is modified).
        head (`AuroraHead`, *optional*): a trained or day-0 head; default `AuroraHead.from_target(model, ...)`.
        online (`bool`): collect traces and train (`start()` for the background thread, or `trainer.train(n)`
            inline). `False` gives a frozen speculator: same drafting, no learning.
        max_draft_tokens (`int`, *optional*): k per round (default: `head.config.max_draft`, 5).
        draft_vocab_size, token_counts: forwarded to `AuroraHead.from_target` when `head` is None.
        seed (`int`, *optional*): initialisation of a new head and the trainer's sampling of the replay buffer.
        flush_every (`int`): push a request's trace to the replay buffer every this many new positions (and at the
            end of the request), so a long generation feeds the trainer while it runs.
        **trainer_kwargs: forwarded to `AuroraTrainer` (lr, ttt_length, rejection_weight, sync_every, batch_size,
            max_len, buffer_size, grad_clip, max_staleness, seed).
    """

    needs_hidden_states = True

    def __init__(
        self,
        model,
        head: AuroraHead | None = None,
        *,
        online: bool = True,
        max_draft_tokens: int | None = None,
        draft_vocab_size: int | None = None,
        token_counts=None,
        seed: int | None = None,
        flush_every: int = 32,
        **trainer_kwargs,
    ):
        if head is None:
            head = AuroraHead.from_target(model, draft_vocab_size=draft_vocab_size, token_counts=token_counts,
                                          seed=seed)
        super().__init__(max_draft_tokens if max_draft_tokens is not None else head.config.max_draft)
        if flush_every < 1:
            raise ValueError(f"flush_every must be >= 1, got {flush_every}.")
        self.check_compatible(model, head)
        self.embed = model.get_input_embeddings()
        self.hidden_state_layers = tuple(head.config.taps)
        self.hot = HotSwapHead(head)
        self.online = online
        self.flush_every = flush_every
        if online and seed is not None:
            trainer_kwargs.setdefault("seed", seed)
        self.trainer = AuroraTrainer(self.hot, self.embed, **trainer_kwargs) if online else None
        self._rows: dict[Any, _Row] = {}
        # Serving version used by each recent proposal (bounded): lets callers check swaps are monotonic.
        self.version_trace: collections.deque[int] = collections.deque(maxlen=4096)

    # ---- Drafter hooks -------------------------------------------------------------------------------------------
    def check_compatible(self, model, head: AuroraHead | None = None) -> None:
        cfg = (head if head is not None else self.hot).config
        mcfg = model.config
        vocab = model.get_input_embeddings().weight.shape[0]
        if cfg.hidden_size != mcfg.hidden_size:
            raise ValueError(
                f"The Aurora head was built for hidden size {cfg.hidden_size}, the target has {mcfg.hidden_size}: "
                "build the head for this model with `AuroraHead.from_target(model)`."
            )
        if cfg.target_vocab_size != vocab:
            raise ValueError(
                f"The Aurora head maps to a {cfg.target_vocab_size}-token vocabulary, the target has {vocab}: the "
                "head only works with the target (and tokenizer) it was built for."
            )
        if max(cfg.taps) > mcfg.num_hidden_layers:
            raise ValueError(
                f"The head reads hidden-state taps {list(cfg.taps)}, the target has only {mcfg.num_hidden_layers} "
                "layers."
            )

    def reset(self) -> None:
        for row in self._rows.values():
            self._flush(row, final=True)
        self._rows.clear()

    @torch.no_grad()
    def propose(self, context: DraftContext) -> list[torch.LongTensor]:
        if context.hidden_states is None:
            raise ValueError(
                "AuroraDrafter needs the target's hidden states: run it through `speculative_generate`, which "
                "provides them when `drafter.needs_hidden_states` is True."
            )
        drafts = []
        window = self.hot.config.window
        with self.hot.acquire() as (head, version):  # one weight set for the whole batch of this round
            for i, (ids, budget, rid) in enumerate(zip(context.input_ids, context.budgets, context.request_ids)):
                if rid not in self._rows and budget <= 0:
                    drafts.append(ids.new_empty(0))  # a finished row: nothing to draft, nothing to record
                    continue
                row = self._rows.setdefault(rid, _Row())
                self._add_states(row, context.hidden_states[i], context.hidden_offsets[i])
                row.tokens = ids.tolist()
                row.pending = None
                k = min(int(budget), self.max_draft_tokens)
                anchor = len(row.tokens) - 2  # the newest token's own state is not computed yet
                if k <= 0 or anchor < 0 or row.covered != anchor + 1:
                    drafts.append(ids.new_empty(0))
                    continue
                w = min(window, anchor + 1)
                taps = row.all_taps()[anchor + 1 - w : anchor + 1].to(head.fc.weight.dtype)
                next_ids = ids[anchor + 2 - w : anchor + 2]
                drafted, _ = head.propose(taps, next_ids, self.embed, k, start_pos=anchor + 1 - w)
                out = drafted.tolist()
                for j, tok in enumerate(out):
                    if tok in context.eos_token_ids:
                        out = out[: j + 1]  # nothing after EOS can be accepted
                        break
                row.pending = (anchor, out, version)
                self.version_trace.append(version)
                drafts.append(torch.tensor(out, dtype=torch.long, device=ids.device))
        return drafts

    def observe(self, feedback: DraftFeedback) -> None:
        for rid, proposed, n, appended, done in zip(
            feedback.request_ids, feedback.proposed, feedback.num_accepted, feedback.appended, feedback.finished
        ):
            row = self._rows.get(rid)
            if row is None:
                continue
            row.tokens.extend(appended.tolist())
            if row.pending is not None and self.trainer is not None:
                anchor, _, version = row.pending
                if n < len(proposed):
                    row.negatives.append((anchor, int(n), int(proposed[n]), version))
            row.pending = None
            if done:
                self._flush(row, final=True)
                del self._rows[rid]
            elif row.covered - row.flushed >= self.flush_every + self._label_lag:
                self._flush(row, final=False)

    # ---- online learning -------------------------------------------------------------------------------------------
    @property
    def _label_lag(self) -> int:
        return (self.trainer.ttt_length if self.trainer else 0) + 1

    def _add_states(self, row: _Row, states: torch.Tensor | None, offset: int | None):
        if states is None or states.shape[0] == 0:
            return
        if offset is None or offset != row.covered:
            # A gap (or overlap) breaks the one-state-per-token invariant: restart the row from these states.
            self._flush(row, final=True)
            row.taps, row.negatives, row.flushed = [], [], 0
            if offset:
                row.taps = [states.new_zeros(offset, states.shape[1] * states.shape[2])]
                row.flushed = offset
        row.taps.append(states.detach().reshape(states.shape[0], -1).clone())

    def _flush(self, row: _Row, final: bool):
        """Push anchors [flushed, end) as a trace; `end` leaves the last anchors until their labels are known."""
        if self.trainer is None or not row.taps:
            return
        covered = row.covered
        end = covered if final else covered - self._label_lag
        if end <= row.flushed:
            return
        ctx = max(0, row.flushed - (self.hot.config.window - 1))
        taps = row.all_taps()[ctx:end].cpu()
        ids = torch.tensor(row.tokens[ctx + 1 : end + 1 + self.trainer.ttt_length + 1], dtype=torch.long)
        negatives = [(a - ctx, s, t, v) for a, s, t, v in row.negatives if row.flushed <= a < end]
        self.trainer.add_trace(AuroraTrace(taps=taps, ids=ids, loss_from=row.flushed - ctx, negatives=negatives))
        row.negatives = [neg for neg in row.negatives if neg[0] >= end]
        row.flushed = end

    def start(self) -> AuroraDrafter:
        """Start the background trainer (online mode only)."""
        if self.trainer is None:
            raise ValueError("This AuroraDrafter is frozen (online=False): there is no trainer to start.")
        self.trainer.start()
        return self

    def stop(self):
        if self.trainer is not None:
            self.trainer.stop()

    @property
    def version(self) -> int:
        return self.hot.version

    @property
    def head(self) -> AuroraHead:
        """A copy of the current serving head."""
        return self.hot.snapshot()

    def save_pretrained(self, save_directory: str | os.PathLike, figures: dict[str, Any] | None = None):
        """Checkpoint the current serving head (see `AuroraHead.save_pretrained`)."""
        self.head.save_pretrained(save_directory, figures=figures)
