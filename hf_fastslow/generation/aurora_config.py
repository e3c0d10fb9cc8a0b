"""`AuroraConfig`: the shape and drafting defaults of an Aurora draft head (saved as the head's `config.json`)."""

from __future__ import annotations

import dataclasses
from typing import Any


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
            "base_model": getattr(config, "name_or_path", None) or None,
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
