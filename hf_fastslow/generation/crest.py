"""CREST: test-time steering of attention heads away from "non-linear" reasoning steps (Zhang et al., "Understanding
and Steering the Cognitive Behaviors of Reasoning Models at Test-Time", arXiv 2512.24574).

Calibration (offline, `CRESTCalibrator`): split reasoning traces into steps at "\\n\\n"; a step is *non-linear*
(label 1) when it contains a keyword such as "Wait", "Alternatively", "let me check", else *linear* (0). At the token
that completes each boundary, record every head's contribution to the attention output, u = W_O[:, h] a_h (the
head's slice of `o_proj`, mapped to the hidden size: the paper's "after o_proj" site). Each boundary is labelled
with the step that *follows* it by default, because the boundary token is where steering can still change that
step (`target="previous"` labels it with the step it ends). Per head: a class-balanced logistic-regression probe with
its balanced held-out accuracy, and the unit class-mean difference v (pointing towards non-linear) as the direction.

Steering (`CRESTSteerer`, a context manager around `generate`): on decode steps whose input token completes a
boundary, in each layer the o_proj output o is, for each selected head in order of probe accuracy, gated by the
head's probe (hard: probe says non-linear) and rotated away from v: o' = o - strength * g * (o.v) v, then rescaled
to ||o||. strength 4 (the reference code's coefficient -4) turns the v-component p into -3p; the norm never changes.
As in the reference code, each selected head's probe and direction act on the whole o_proj output.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from hf_fastslow.integrations.steering_seam import attention_output_sites

from .crest_trigger import BoundaryTokens, SteeringHooks

__all__ = [
    "NONLINEAR_KEYWORDS",
    "CRESTCalibrator",
    "CRESTSteerer",
    "CRESTVectors",
    "fit_probes",
    "rotate_away",
]

# Reflection and transition phrases (in the spirit of SEAL's keyword lists), matched case-insensitively.
NONLINEAR_KEYWORDS = (
    "wait", "hmm", "verify", "double-check", "double check", "make sure", "hold on", "think again", "let me check",
    "'s correct", "'s incorrect", "seems right", "alternatively", "think differently", "another way",
    "another approach", "another method", "another solution", "another strategy",
)
_FORMAT = "hf_fastslow.crest/1"
GATES = ("hard", "soft", "off")


# --------------------------------------------------------------------------------------------------------------------
# Probes
# --------------------------------------------------------------------------------------------------------------------
def _stratified_split(labels: torch.Tensor, val_frac: float, generator: torch.Generator):
    train, val = [], []
    for cls in (0, 1):
        idx = torch.nonzero(labels == cls).flatten()
        idx = idx[torch.randperm(idx.numel(), generator=generator)]
        n_val = min(idx.numel() - 1, max(1, round(val_frac * idx.numel())))
        val.append(idx[:n_val])
        train.append(idx[n_val:])
    return torch.cat(train), torch.cat(val)


def fit_probes(features: torch.Tensor, labels: torch.Tensor, val_frac: float = 0.2, seed: int = 0, l2: float = 1e-2,
               steps: int = 200, lr: float = 0.05) -> dict[str, torch.Tensor]:
    """One logistic-regression probe per head on `features` [N, L, H, D] with binary `labels` [N] (1 = non-linear).

    Returns `weight` [L, H, D] and `bias` [L, H] acting on raw features (the standardisation is folded in),
    `direction` [L, H, D] (unit class-mean difference, towards label 1) and `accuracy` [L, H]: balanced accuracy
    (mean of the two recalls) on a stratified held-out split, so that rare non-linear steps count as much as the
    common linear ones. All heads are fitted at once (full-batch Adam, class-balanced loss, L2 on the weights).
    """
    if features.dim() != 4 or labels.shape != features.shape[:1]:
        raise ValueError(f"features must be [N, L, H, D] and labels [N]; got {tuple(features.shape)} and "
                         f"{tuple(labels.shape)}")
    labels = labels.long()
    counts = [int((labels == c).sum()) for c in (0, 1)]
    if min(counts) < 2:
        raise ValueError(f"need at least 2 linear and 2 non-linear steps to fit and validate probes; got {counts[0]} "
                         f"linear and {counts[1]} non-linear.")
    if not 0.0 < val_frac < 1.0:
        raise ValueError(f"val_frac must be in (0, 1), got {val_frac}")
    n, layers, heads, dim = features.shape
    gen = torch.Generator().manual_seed(seed)
    train, val = _stratified_split(labels, val_frac, gen)
    x = features.float().reshape(n, layers * heads, dim).transpose(0, 1)  # [G, N, D]
    xt, yt = x[:, train], labels[train].float()
    mean, std = xt.mean(1, keepdim=True), xt.std(1, keepdim=True)
    std = torch.where(std > 1e-8, std, torch.ones_like(std))
    z = (xt - mean) / std
    pos_weight = (yt.numel() - yt.sum()) / yt.sum()  # class balance: both classes weigh the same in the loss
    w = torch.zeros(layers * heads, dim, requires_grad=True)
    b = torch.zeros(layers * heads, requires_grad=True)
    opt = torch.optim.Adam([w, b], lr=lr)
    sample_w = torch.where(yt > 0, pos_weight, torch.ones_like(yt))
    for _ in range(steps):
        opt.zero_grad()
        logits = torch.einsum("gnd,gd->gn", z, w) + b[:, None]
        loss = torch.nn.functional.binary_cross_entropy_with_logits(
            logits, yt.expand_as(logits), weight=sample_w.expand_as(logits), reduction="none").mean(1).sum()
        (loss + l2 * (w ** 2).sum()).backward()
        opt.step()
    with torch.no_grad():
        w_raw = w / std[:, 0]
        b_raw = b - (w_raw * mean[:, 0]).sum(-1)
        pred = (torch.einsum("gnd,gd->gn", x[:, val], w_raw) + b_raw[:, None]) > 0
        yv = labels[val].bool()
        accuracy = 0.5 * (pred[:, yv].float().mean(1) + (~pred[:, ~yv]).float().mean(1))
        diff = x[:, labels == 1].mean(1) - x[:, labels == 0].mean(1)
        direction = diff / diff.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    shape = (layers, heads)
    return {"weight": w_raw.reshape(*shape, dim), "bias": b_raw.reshape(shape),
            "direction": direction.reshape(*shape, dim), "accuracy": accuracy.reshape(shape)}


# --------------------------------------------------------------------------------------------------------------------
# Vectors
# --------------------------------------------------------------------------------------------------------------------
@dataclass
class CRESTVectors:
    """Per-head probes and steering directions of one model, with the step-boundary tables of its tokenizer.

    `probe_weight` [L, H, D] / `probe_bias` [L, H]: the probe's logit of "non-linear" on an o_proj output;
    `directions` [L, H, D]: unit vectors towards non-linear; `accuracy` [L, H]: balanced held-out probe accuracy
    (the head ranking). Saved as one small safetensors file.
    """

    probe_weight: torch.Tensor
    probe_bias: torch.Tensor
    directions: torch.Tensor
    accuracy: torch.Tensor
    boundary: BoundaryTokens
    keywords: tuple[str, ...] = NONLINEAR_KEYWORDS
    num_linear: int = 0
    num_nonlinear: int = 0
    model_type: str = ""
    target: str = "next"
    shuffled_labels: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        """(layers, heads, hidden size)."""
        return tuple(self.directions.shape)

    def top_heads(self, top_ratio: float | None = 0.38, top_k: int | None = None) -> list[tuple[int, int]]:
        """The (layer, head) pairs to steer, best probe accuracy first: `top_k` heads, else `top_ratio` of all."""
        total = self.accuracy.numel()
        if top_k is not None:
            if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= total:
                raise ValueError(f"top_k must be an int in [1, {total}] (layers x heads), got {top_k!r}")
            k = top_k
        else:
            if top_ratio is None or not 0.0 < float(top_ratio) <= 1.0:
                raise ValueError(f"top_ratio must be in (0, 1], got {top_ratio!r}")
            k = max(1, math.ceil(float(top_ratio) * total - 1e-9))
        order = torch.argsort(self.accuracy.flatten(), descending=True, stable=True)[:k]
        heads = self.accuracy.shape[1]
        return [(int(i) // heads, int(i) % heads) for i in order]

    def check_model(self, model: torch.nn.Module):
        """The model's attention output sites, after checking these vectors were fitted on its shape."""
        sites = attention_output_sites(model)
        mine = self.shape
        theirs = (sites.num_layers, sites.num_heads, sites.hidden_size)
        if mine != theirs:
            raise ValueError(
                f"these CREST vectors were fitted on a model with {mine[0]} layers x {mine[1]} heads, hidden size "
                f"{mine[2]} ({self.model_type or 'unknown type'}); {type(model).__name__} has {theirs[0]} layers x "
                f"{theirs[1]} heads, hidden size {theirs[2]}. Calibrate vectors for this model with CRESTCalibrator."
            )
        rows = model.get_input_embeddings().weight.shape[0]
        if self.boundary.vocab_size > rows:
            raise ValueError(f"these CREST vectors come with a tokenizer of {self.boundary.vocab_size} tokens; "
                             f"{type(model).__name__} embeds only {rows}.")
        return sites

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        tensors = {"probe_weight": self.probe_weight, "probe_bias": self.probe_bias, "directions": self.directions,
                   "accuracy": self.accuracy, **self.boundary.state_dict()}
        meta = {"format": _FORMAT, "delimiter": self.boundary.delimiter, "keywords": json.dumps(list(self.keywords)),
                "num_linear": str(self.num_linear), "num_nonlinear": str(self.num_nonlinear),
                "model_type": self.model_type, "target": self.target, "site": "o_proj_out",
                "shuffled_labels": str(bool(self.shuffled_labels))}
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(path), metadata=meta)
        return path

    @classmethod
    def load(cls, path: str | Path) -> CRESTVectors:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            if meta.get("format") != _FORMAT:
                raise ValueError(f"{path} is not a CREST vector file (format {meta.get('format')!r}, "
                                 f"expected {_FORMAT!r}).")
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        return cls(tensors["probe_weight"], tensors["probe_bias"], tensors["directions"], tensors["accuracy"],
                   BoundaryTokens.from_state_dict(tensors, meta["delimiter"]), tuple(json.loads(meta["keywords"])),
                   int(meta["num_linear"]), int(meta["num_nonlinear"]), meta["model_type"], meta["target"],
                   meta["shuffled_labels"] == "True")


# --------------------------------------------------------------------------------------------------------------------
# Calibration
# --------------------------------------------------------------------------------------------------------------------
Trace = str | tuple[str, str]


class CRESTCalibrator:
    """Collects per-head activations at step boundaries of reasoning traces and fits `CRESTVectors`.

    A trace is the reasoning text, or a `(prompt, reasoning)` pair whose prompt (e.g. a chat-templated question) is
    read as context only: boundaries and steps are taken in the reasoning part. Both parts are tokenized without
    special tokens and concatenated, as `generate` sees a prompt and its continuation. `collect` can be called several
    times; `fit` uses everything collected. The decoder-layer outputs at the same boundaries are kept too
    (`residuals` [N, L, D]) for the SEAL-style peer (`crest_baselines.fit_seal_vector`).
    """

    def __init__(self, model, tokenizer, delimiter: str = "\n\n", keywords: Sequence[str] = NONLINEAR_KEYWORDS,
                 target: str = "next"):
        if target not in ("next", "previous"):
            raise ValueError(f"target must be 'next' or 'previous', got {target!r}")
        if isinstance(keywords, str) or not keywords or not all(isinstance(k, str) and k for k in keywords):
            raise ValueError("keywords must be a non-empty sequence of non-empty strings.")
        self.model, self.tokenizer, self.target = model, tokenizer, target
        self.sites = attention_output_sites(model)
        self.boundary = BoundaryTokens.from_tokenizer(tokenizer, delimiter)
        self.keywords = tuple(keywords)
        self._features: list[torch.Tensor] = []
        self._residuals: list[torch.Tensor] = []
        self._labels: list[int] = []

    @property
    def num_steps(self) -> int:
        return len(self._labels)

    @property
    def num_nonlinear(self) -> int:
        return sum(self._labels)

    @property
    def labels(self) -> torch.Tensor:
        return torch.tensor(self._labels, dtype=torch.long)

    @property
    def features(self) -> torch.Tensor:
        """Per-head o_proj contributions at the collected boundaries, [N, L, H, D]."""
        return torch.cat(self._features) if self._features else torch.empty(0)

    @property
    def residuals(self) -> torch.Tensor:
        """Decoder-layer outputs at the collected boundaries, [N, L, D]."""
        return torch.cat(self._residuals) if self._residuals else torch.empty(0)

    def is_nonlinear(self, step_text: str) -> bool:
        low = step_text.lower()
        return any(k.lower() in low for k in self.keywords)

    def label_trace(self, trace: Trace) -> tuple[list[int], list[int], list[int]]:
        """(token ids, boundary positions in them, label per position) of one trace; boundaries whose step is empty
        (e.g. the second newline of "\\n\\n\\n", a trailing delimiter) are left out."""
        prompt, text = (trace if isinstance(trace, (tuple, list)) else ("", trace))
        if not isinstance(prompt, str) or not isinstance(text, str):
            raise TypeError("a trace is a string or a (prompt, reasoning) pair of strings.")
        enc = self.tokenizer
        p_ids = enc(prompt, add_special_tokens=False).input_ids if prompt else []
        c_ids = enc(text, add_special_tokens=False).input_ids
        cuts = self.boundary.positions(c_ids, p_ids[-1] if p_ids else None)
        positions, labels = [], []
        for k, j in enumerate(cuts):
            if self.target == "next":
                span = c_ids[j + 1:(cuts[k + 1] + 1 if k + 1 < len(cuts) else len(c_ids))]
            else:
                span = c_ids[(cuts[k - 1] + 1 if k else 0):j + 1]
            step = enc.decode(span, skip_special_tokens=True)
            if step.strip(self.boundary.delimiter + " \t\r\n"):
                positions.append(len(p_ids) + j)
                labels.append(int(self.is_nonlinear(step)))
        return p_ids + c_ids, positions, labels

    @torch.no_grad()
    def collect(self, traces: Sequence[Trace]) -> CRESTCalibrator:
        """Label the steps of `traces`, then run the model once per trace and keep the activations at boundaries.

        Raises ValueError before any forward pass, collecting nothing, when the traces hold no step boundary or when
        no step collected so far would show the targeted (non-linear) behaviour.
        """
        if isinstance(traces, str) or not len(traces):
            raise ValueError("collect takes a non-empty sequence of traces (strings or (prompt, reasoning) pairs).")
        labelled = [self.label_trace(t) for t in traces]
        steps = sum(len(lab) for _, _, lab in labelled)
        if steps == 0:
            raise ValueError(f"none of the {len(traces)} traces contains a step boundary "
                             f"({self.boundary.delimiter!r} followed by text); nothing to calibrate on.")
        nonlinear = self.num_nonlinear + sum(sum(lab) for _, _, lab in labelled)
        if nonlinear == 0:
            raise ValueError(
                f"none of the {self.num_steps + steps} steps contains a non-linear keyword "
                f"({', '.join(self.keywords[:6])}, ...): CREST needs traces with at least one step of the targeted "
                "behaviour. Generate traces that verify or backtrack (e.g. ask the model to check each step), or "
                "pass your own `keywords`.")
        sites, dim = self.sites, self.sites.head_dim
        captured: list[torch.Tensor] = []
        where: list[int] = []

        def grab(proj):
            w = proj.weight.detach().float().view(sites.hidden_size, sites.num_heads, dim)

            def pre(module, args):
                a = args[0][0, where].float().view(len(where), sites.num_heads, dim)
                captured.append(torch.einsum("nhd,Dhd->nhD", a, w))  # each head's contribution to the output
            return pre

        handles = [p.register_forward_pre_hook(grab(p)) for p in sites.projections]
        was_training = self.model.training
        self.model.eval()
        device = self.model.get_input_embeddings().weight.device
        try:
            for ids, positions, labels in labelled:
                if not positions:
                    continue
                where[:] = positions
                captured.clear()
                out = self.model(input_ids=torch.tensor([ids], device=device), output_hidden_states=True,
                                 use_cache=False)
                self._features.append(torch.stack(captured, 1).cpu())
                hidden = out.hidden_states[1:sites.num_layers + 1]
                self._residuals.append(torch.stack([h[0, positions].float() for h in hidden], 1).cpu())
                self._labels.extend(labels)
        finally:
            for h in handles:
                h.remove()
            self.model.train(was_training)
        return self

    def fit(self, val_frac: float = 0.2, seed: int = 0, l2: float = 1e-2, steps: int = 200,
            shuffle_labels: bool = False) -> CRESTVectors:
        """Fit one probe and one direction per head on everything collected. `shuffle_labels=True` permutes the
        labels first (seeded): the control a real probe accuracy is compared with."""
        if not self._labels:
            raise ValueError("nothing collected yet: call collect(traces) first.")
        labels = self.labels
        if shuffle_labels:
            labels = labels[torch.randperm(labels.numel(), generator=torch.Generator().manual_seed(seed + 1))]
        fitted = fit_probes(self.features, labels, val_frac=val_frac, seed=seed, l2=l2, steps=steps)
        return CRESTVectors(fitted["weight"], fitted["bias"], fitted["direction"], fitted["accuracy"], self.boundary,
                            self.keywords, self.num_steps - self.num_nonlinear, self.num_nonlinear,
                            self.sites.model_type, self.target, shuffle_labels)


# --------------------------------------------------------------------------------------------------------------------
# Steering
# --------------------------------------------------------------------------------------------------------------------
def rotate_away(o: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, direction: torch.Tensor, strength: float,
                gate: str = "hard", eps: float = 1e-12) -> torch.Tensor:
    """Rotate `o` [..., D] away from each unit `direction[j]` [k, D] in turn, keeping ||o||.

    Head j: g = probe gate of the current o (`hard`: 1 when `o.weight[j] + bias[j] > 0`, `soft`: its sigmoid,
    `off`: 1); o' = o - strength * g * (o.direction[j]) direction[j]; o <- o' * ||o|| / ||o'||. Where g = 0 or
    strength = 0, o is returned unchanged (bit for bit).
    """
    if gate not in GATES:
        raise ValueError(f"probe_gate must be one of {GATES}, got {gate!r}")
    norm = o.norm(dim=-1, keepdim=True)
    x = o
    for j in range(direction.shape[0]):
        v = direction[j]
        if gate == "off":
            g = 1.0
        else:
            logit = (x @ weight[j] + bias[j]).unsqueeze(-1)
            g = (logit > 0).to(x.dtype) if gate == "hard" else torch.sigmoid(logit)
        y = x - strength * g * (x @ v).unsqueeze(-1) * v
        x = y * (norm / y.norm(dim=-1, keepdim=True).clamp_min(eps))
    return x


class CRESTSteerer(SteeringHooks):
    """Context manager: while active, `model` rotates the o_proj outputs of the chosen heads' layers on step-boundary
    decode tokens (per row), norm-preserving; every hook is removed on exit, exceptions included.

    `strength`: how far to rotate (0: no change; 1: remove the direction's component; 4, the default, the reference
    code's coefficient -4: flip it to -3x). `top_ratio` / `top_k`: share / number of heads steered, best probe
    accuracy first (default 38 %, the paper's). `probe_gate`: "hard" (steer where the head's probe says non-linear),
    "soft" (weight by its probability) or "off" (always). `boundary_steps` counts the (row, step) pairs at
    boundaries (the hard gate may still leave some of them unchanged).

        with CRESTSteerer(model, vectors):
            out = model.generate(**enc, max_new_tokens=256)
    """

    def __init__(self, model, vectors: CRESTVectors, strength: float = 4.0, top_ratio: float | None = 0.38,
                 top_k: int | None = None, probe_gate: str = "hard"):
        if probe_gate not in GATES:
            raise ValueError(f"probe_gate must be one of {GATES}, got {probe_gate!r}")
        if not math.isfinite(float(strength)):
            raise ValueError(f"strength must be finite, got {strength!r}")
        self.sites = vectors.check_model(model)
        super().__init__(model, vectors.boundary)
        self.vectors, self.strength, self.probe_gate = vectors, float(strength), probe_gate
        self.heads = vectors.top_heads(top_ratio, top_k)
        self._layers: dict[int, list[int]] = {}
        for layer, head in self.heads:
            self._layers.setdefault(layer, []).append(head)

    def _install(self) -> None:
        for layer, heads in self._layers.items():
            proj = self.sites.projections[layer]
            idx = torch.tensor(heads)
            params = [t[layer, idx].to(proj.weight.device, torch.float32)
                      for t in (self.vectors.probe_weight, self.vectors.probe_bias, self.vectors.directions)]
            self._handles.append(proj.register_forward_hook(self._hook(*params)))

    def _hook(self, weight, bias, direction):
        def hook(module, args, output):
            flag = self.trigger.flag
            if flag is None:
                return None
            steered = rotate_away(output.float(), weight, bias, direction, self.strength, self.probe_gate)
            mask = flag.view(-1, *([1] * (output.dim() - 1)))
            return torch.where(mask, steered.to(output.dtype), output)  # masked, not branched: graph-friendly
        return hook
