"""The peers a user would otherwise reach for instead of CREST, for side-by-side runs:

- SEAL-style additive residual steering (Chen et al., "SEAL: Steerable Reasoning Calibration of Large Language
  Models for Free", COLM 2025): one vector, mean(linear) - mean(non-linear) decoder-layer output at step boundaries,
  added at one layer. Here it is added on the same step-boundary decode tokens CREST steers (the shared
  `StepTrigger`), so the two differ only in what they change, not where.
- `TokenBanLogitsProcessor`: a transformers `LogitsProcessor` that forbids "Wait"-type tokens outright.

The SEAL vector is fitted from the activations a `CRESTCalibrator` already collected (same traces, same labels).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import LogitsProcessor

from hf_fastslow.integrations.modeling import decoder_layers
from hf_fastslow.integrations.steering_seam import layer_hidden_output, with_layer_hidden_output

from .crest import CRESTCalibrator
from .crest_trigger import BoundaryTokens, SteeringHooks, _vocab_texts

__all__ = ["WAIT_WORDS", "SEALSteerer", "SEALVector", "TokenBanLogitsProcessor", "fit_seal_vector"]

WAIT_WORDS = ("wait", "hmm", "alternatively")


@dataclass
class SEALVector:
    """A residual-stream steering vector for decoder layer `layer` (pointing from non-linear to linear steps)."""

    vector: torch.Tensor
    layer: int
    num_layers: int
    boundary: BoundaryTokens

    def check_model(self, model) -> list[torch.nn.Module]:
        layers = decoder_layers(model)
        hidden = model.get_input_embeddings().weight.shape[1]
        if len(layers) != self.num_layers or hidden != self.vector.numel():
            raise ValueError(f"this SEAL vector was fitted on a model with {self.num_layers} layers, hidden size "
                             f"{self.vector.numel()}; {type(model).__name__} has {len(layers)} layers, hidden size "
                             f"{hidden}.")
        return layers


def fit_seal_vector(calibrator: CRESTCalibrator, layer: int | None = None) -> SEALVector:
    """mean(linear) - mean(non-linear) decoder-layer output at the boundaries `calibrator` collected, at `layer`
    (default: 70 % of the depth, as SEAL's layer 20 of 28 in R1-Distill-Qwen-1.5B/7B)."""
    residuals, labels = calibrator.residuals, calibrator.labels
    if labels.numel() == 0:
        raise ValueError("the calibrator has collected nothing: call collect(traces) first.")
    if labels.sum() == 0 or labels.sum() == labels.numel():
        raise ValueError("a SEAL vector needs both linear and non-linear steps among the collected ones.")
    num_layers = residuals.shape[1]
    layer = int(0.7 * num_layers) if layer is None else layer
    if not 0 <= layer < num_layers:
        raise ValueError(f"layer must be in [0, {num_layers}), got {layer}")
    at = residuals[:, layer]
    vector = at[labels == 0].mean(0) - at[labels == 1].mean(0)
    return SEALVector(vector, layer, num_layers, calibrator.boundary)


class SEALSteerer(SteeringHooks):
    """Context manager: while active, `strength * vector` is added to the output of decoder layer `vector.layer` on
    step-boundary decode tokens (per row); hooks removed on exit. strength 1.0 is SEAL's default."""

    def __init__(self, model, vector: SEALVector, strength: float = 1.0):
        self.layers = vector.check_model(model)
        super().__init__(model, vector.boundary)
        self.seal, self.strength = vector, float(strength)

    def _install(self) -> None:
        layer = self.layers[self.seal.layer]
        add = None

        def hook(module, args, output):
            nonlocal add
            flag = self.trigger.flag
            if flag is None:
                return None
            hidden = layer_hidden_output(output)
            if add is None:
                add = (self.strength * self.seal.vector).to(hidden.device, hidden.dtype)
            mask = flag.view(-1, *([1] * (hidden.dim() - 1)))
            return with_layer_hidden_output(output, torch.where(mask, hidden + add, hidden))

        self._handles.append(layer.register_forward_hook(hook))


class TokenBanLogitsProcessor(LogitsProcessor):
    """Forbid every token whose text, stripped of whitespace, is one of `words` (case-insensitive): "Wait",
    " wait", "WAIT", "\\nWait" ... all go to -inf. Words no single token spells are listed in `unmatched_words`
    (banning one of their pieces would ban other words too). Stateless, so any batch size and beam search work.

        model.generate(**enc, logits_processor=LogitsProcessorList([TokenBanLogitsProcessor(tok)]))
    """

    def __init__(self, tokenizer, words: Sequence[str] = WAIT_WORDS):
        if isinstance(words, str) or not words:
            raise ValueError("words must be a non-empty sequence of strings.")
        wanted = {w.strip().lower() for w in words}
        texts = [t.strip().lower() for t in _vocab_texts(tokenizer)]
        ids = [i for i, t in enumerate(texts) if t in wanted]
        if not ids:
            raise ValueError(f"no token of this tokenizer spells any of {sorted(wanted)} on its own.")
        self.banned_ids = torch.tensor(ids, dtype=torch.long)
        self.unmatched_words = sorted(wanted - {texts[i] for i in ids})

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        ids = self.banned_ids[self.banned_ids < scores.shape[-1]].to(scores.device)
        return scores.index_fill(-1, ids, float("-inf"))
