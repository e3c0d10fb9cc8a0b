"""Configuration of early-readout distillation for causal-LM students (arXiv 2310.18590) on trl's `GKDConfig`."""

from __future__ import annotations

from dataclasses import dataclass

from trl.experimental.gkd import GKDConfig

from .early_readout_config import EarlyReadoutOptions


@dataclass
class EarlyReadoutGKDConfig(EarlyReadoutOptions, GKDConfig):
    r"""trl's `GKDConfig` plus the early-readout knobs (`EarlyReadoutOptions`): per-token weights on GKD's generalized
    JSD from a tuned-logit-lens readout of hidden state `readout_layer`; prompt and padding tokens (labels -100) never
    count toward flags, weights or loss. With `weight_fn="none"` the loss is GKD's, unchanged."""

    def __post_init__(self):
        self.check_readout_options()
        super().__post_init__()
