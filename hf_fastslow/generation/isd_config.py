"""`ISDConfig`: the knobs of I-DLM introspective strided decoding that `generate`'s own config does not carry.

Sampling itself (`do_sample`, `temperature`, `top_k`, `top_p`, processors) stays `generate`'s: ISD applies the same
processors to the anchor p and the drafts q, so one set of knobs governs both (the I-DLM release ships temperature
1.0, top_k 50, top_p 0.95; pass them to `generate`).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields

__all__ = ["ISDConfig", "PROPOSALS"]

PROPOSALS = ("sample", "argmax")


@dataclass
class ISDConfig:
    """Introspective strided decoding settings.

    Args:
        gen_block_size: N, the stride: one forward verifies up to N-1 drafts and drafts N-1 new tokens at N-1
            appended mask slots; a round that accepts everything commits N tokens. N >= 2.
        mask_token_id: the id fed at the mask slots (None: the model's attached block-diffusion config, if any).
        verify_alpha: acceptance test u < min(1, p(x) / (verify_alpha * q(x))). 1.0 is exact; < 1 accepts more,
            lossy (I-DLM's speed knob). Ignored by greedy decoding.
        proposal: "sample" (drafts sampled from q, the exact default) or "argmax" (drafts = argmax q, verified with q
            one-hot: accept with probability p(x), else sample p without x; also exact). Greedy decoding always
            drafts by argmax and accepts iff the draft is the anchor's argmax.
    """

    gen_block_size: int = 4
    mask_token_id: int | None = None
    verify_alpha: float = 1.0
    proposal: str = "sample"

    def __post_init__(self):
        self.validate()

    def validate(self) -> None:
        if isinstance(self.gen_block_size, bool) or not isinstance(self.gen_block_size, int):
            raise TypeError(f"gen_block_size must be an int, got {type(self.gen_block_size).__name__}.")
        if self.gen_block_size < 2:
            raise ValueError(
                f"gen_block_size (N) must be >= 2 (N = 1 is plain autoregressive decoding), got {self.gen_block_size}."
            )
        if self.mask_token_id is not None and (
            isinstance(self.mask_token_id, bool) or not isinstance(self.mask_token_id, int) or self.mask_token_id < 0
        ):
            raise ValueError(f"mask_token_id must be a non-negative int or None, got {self.mask_token_id!r}.")
        if not (0.0 < float(self.verify_alpha) <= 1.0):
            raise ValueError(f"verify_alpha must be in (0, 1] (1 = exact), got {self.verify_alpha}.")
        if self.proposal not in PROPOSALS:
            raise ValueError(f"proposal must be one of {PROPOSALS}, got {self.proposal!r}.")

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ISDConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"Unknown ISDConfig keys: {sorted(unknown)}.")
        return cls(**data)
