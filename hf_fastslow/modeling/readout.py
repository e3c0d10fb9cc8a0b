"""Early readouts: small heads on an early decoder layer (early-readout distillation, arXiv 2310.18590, and the
Feature Sieve, arXiv 2301.13293, read the same early representation).

A sequence classifier reads the early layer's hidden state at the last real token (the token
`LlamaForSequenceClassification` pools); a causal LM's token readout is a trainable d x d map (identity at start) in
front of the model's own final norm and LM head, a "tuned logit lens", so reading layer l needs d^2 parameters rather
than a new vocabulary-sized head.
"""

from __future__ import annotations

import torch
from torch import nn

from ..integrations.modeling import decoder_layers

__all__ = [
    "EarlyReadoutHead",
    "TokenReadoutHead",
    "check_readout_layer",
    "confidence_margin",
    "lower_layer_parameters",
    "pool_last_token",
]


class EarlyReadoutHead(nn.Module):
    """An MLP classifier on a pooled hidden state: `depth - 1` hidden layers of `width` (GELU), then `num_labels`."""

    def __init__(self, hidden_size: int, num_labels: int, depth: int = 2, width: int = 256):
        super().__init__()
        if depth < 1 or width < 1 or num_labels < 2:
            raise ValueError(f"EarlyReadoutHead needs depth >= 1, width >= 1, num_labels >= 2 "
                             f"(got {depth}, {width}, {num_labels}).")
        layers: list[nn.Module] = []
        size = hidden_size
        for _ in range(depth - 1):
            layers += [nn.Linear(size, width), nn.GELU()]
            size = width
        layers.append(nn.Linear(size, num_labels))
        self.net = nn.Sequential(*layers)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.net(pooled)


class TokenReadoutHead(nn.Module):
    """Per-token readout of an early layer of a causal LM: `lm_head(norm(A h))`, A trainable (identity at start);
    the model's norm and LM head are used but never trained through this head."""

    def __init__(self, model: nn.Module):
        super().__init__()
        hidden = model.config.hidden_size
        self.adapter = nn.Linear(hidden, hidden, bias=False)
        with torch.no_grad():
            self.adapter.weight.copy_(torch.eye(hidden))
        base = getattr(model, "model", model)
        # Plain attributes, not sub-modules: the model's own norm and head stay out of this head's parameters.
        object.__setattr__(self, "_norm", base.norm)
        object.__setattr__(self, "_lm_head", model.get_output_embeddings())

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = _frozen_call(self._norm, self.adapter(hidden))
        return _frozen_call(self._lm_head, x)


def _frozen_call(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """`module(x)` with its parameters detached: gradients reach `x`, never the module (whatever its norm type)."""
    params = {name: p.detach() for name, p in module.named_parameters()}
    return torch.func.functional_call(module, params, (x,))


def check_readout_layer(model: nn.Module, layer: int, what: str = "readout_layer") -> int:
    """`layer` must be a hidden state strictly inside the network: 1 .. L-1 (0 is the embeddings, L the last layer)."""
    n = len(decoder_layers(model))
    if not isinstance(layer, int) or not 1 <= layer <= n - 1:
        raise ValueError(f"{what} must be in [1, {n - 1}] for a model with {n} decoder layers, got {layer!r}.")
    return layer


def pool_last_token(hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """[B, T, D] -> [B, D]: the hidden state of each row's last real token (left or right padding)."""
    if attention_mask is None:
        return hidden[:, -1]
    positions = torch.arange(hidden.shape[1], device=hidden.device)
    last = (attention_mask.to(torch.long) * positions).argmax(-1)
    return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]


def confidence_margin(logits: torch.Tensor) -> torch.Tensor:
    """Top-1 minus top-2 probability (softmax in fp32), in [0, 1]; |2p - 1| for two classes; 0 for uniform."""
    top = torch.softmax(logits.float(), dim=-1).topk(2, dim=-1).values
    return top[..., 0] - top[..., 1]


def lower_layer_parameters(model: nn.Module, layer: int, include_embeddings: bool = False) -> list[nn.Parameter]:
    """Parameters that compute hidden state `layer`: decoder layers 0 .. layer-1 (and the input embeddings if
    asked; they are tied to the LM head in many small models, so they are left out by default)."""
    params = [p for block in decoder_layers(model)[:layer] for p in block.parameters()]
    if include_embeddings:
        params = list(model.get_input_embeddings().parameters()) + params
    return params
