"""Settings of Interleaved Head Attention (IHA): pseudo-head count, collapse form, initial noise, converted layers."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

COLLAPSES = ("per_head", "global")
# The key IHA settings are stored under in a converted model's `config.json`.
CONFIG_KEY = "iha"


@dataclass
class IHAConfig:
    """How `apply_iha` converts a model.

    Args:
        num_pseudo_heads: P, pseudo-heads per attention head (>= 1). None means P = the number of query heads
            (the paper's usual choice). Attention costs about P^2 times the original.
        collapse: "per_head" folds the P outputs of head h back with weights R[h, p] (the paper's Algorithm 1);
            "global" lets every output head read every pseudo-head, R[h, (h', p)] (the paper's Definition 3).
        init_noise: standard deviation of the Gaussian noise added to the identity initialisation (relative to
            its unit entries; the collapse gets noise/P). 0 gives an exact conversion, but then the P copies of a
            head receive identical gradients forever (the symmetry trap), so fine-tuning needs init_noise > 0.
        layers: "all", or the indices of the decoder layers to convert (the others keep plain SDPA attention).
        seed: seed of the init noise (None: the global torch RNG).

    Positions are token-level (all P pseudo-tokens of token n sit at RoPE position n) and the mask is
    token-causal: the only reading under which the identity initialisation is exact and the KV cache is unchanged
    (it keeps the original post-RoPE keys; pseudo keys are mixed from it at every step).
    """

    num_pseudo_heads: int | None = None
    collapse: str = "per_head"
    init_noise: float = 1e-3
    layers: str | list[int] = "all"
    seed: int | None = 0

    def __post_init__(self):
        p = self.num_pseudo_heads
        if p is not None and (isinstance(p, bool) or not isinstance(p, int) or p < 1):
            raise ValueError(f"IHAConfig.num_pseudo_heads must be an integer >= 1 (or None for P = H); got {p!r}.")
        if self.collapse not in COLLAPSES:
            raise ValueError(f"IHAConfig.collapse must be one of {COLLAPSES}; got {self.collapse!r}.")
        if not isinstance(self.init_noise, (int, float)) or not self.init_noise >= 0:
            raise ValueError(f"IHAConfig.init_noise must be a number >= 0; got {self.init_noise!r}.")
        if self.layers != "all":
            if isinstance(self.layers, str) or not all(
                isinstance(i, int) and not isinstance(i, bool) for i in self.layers
            ):
                raise ValueError(f"IHAConfig.layers must be 'all' or a list of layer indices; got {self.layers!r}.")
            self.layers = sorted(set(self.layers))
            if not self.layers:
                raise ValueError("IHAConfig.layers is empty: name at least one decoder layer to convert.")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> IHAConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown IHA settings {unknown}: this checkpoint needs a newer hf_fastslow.")
        return cls(**data)
