"""Configuration of KV healing: fine-tuning a KV-compressed model (e.g. a CARE conversion) back towards the model it
was converted from, with cross-entropy on the data plus a distillation term (CARE, arXiv 2603.17946, Sec. healing)."""

from __future__ import annotations

from dataclasses import dataclass, field

from trl import SFTConfig


@dataclass
class KVHealingConfig(SFTConfig):
    r"""`SFTConfig` plus the distillation term of KV healing.

    The loss per token is `CE + kl_weight * kl_temperature**2 * KL(softmax(z_T / tau) || softmax(z_S / tau))`, with
    z_T the logits of the frozen original model (the teacher) and z_S those of the converted model being trained,
    averaged over the tokens that carry a label (the same tokens the CE counts).

    Parameters:
        kl_weight (`float`, defaults to `1.0`): beta, the weight of the KL term (0 = plain SFT).
        kl_temperature (`float`, defaults to `1.0`): tau, the softmax temperature of both distributions.
    """

    kl_weight: float = field(default=1.0, metadata={"help": "Weight of KL(teacher || student) (beta)."})
    kl_temperature: float = field(default=1.0, metadata={"help": "Softmax temperature of the KL term (tau)."})

    def __post_init__(self):
        if not self.kl_weight >= 0:
            raise ValueError(f"KVHealingConfig: kl_weight must be >= 0, got {self.kl_weight}.")
        if not self.kl_temperature > 0:
            raise ValueError(f"KVHealingConfig: kl_temperature must be > 0, got {self.kl_temperature}.")
        super().__post_init__()
