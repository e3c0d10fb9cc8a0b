"""Small single-object trackers built from transformers configs, synthetic tracking sequences generated in code, and
the OTB-style metrics (success AUC, precision) — the miniature of Aggarwal et al.'s CNN-vs-transformer pruning study.

- `OneStreamViTTracker(ViTConfig)`: template and search patches in one token sequence through `ViTLayer`s (OSTrack's
  one-stream design), a centre head on the search tokens.
- `SiameseCNNTracker(ResNetConfig)`: a shared `ResNetModel` on template and search, depth-wise cross-correlation,
  the same centre head as convolutions.
- `make_sequence` / `TrackingPairs`: a digit glyph (sklearn digits) or a crop of `china.jpg` moving by a random walk
  with scale change over a crop of `flower.jpg`, with distractor digits and occlusions; exact ground-truth boxes.
- `track_sequence`, `success_auc`, `precision_at`: online tracking (template from frame 0, search region around the
  previous box) and the metrics (IoU thresholds 0:0.05:1; centre error <= k pixels).

Boxes are (x, y, w, h) in pixels. The head predicts, per search cell, a centre logit, a sub-cell offset and
log(size / search side); training: cross-entropy over cells at the cell holding the true centre, L1 on its offset
and size.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import ResNetConfig, ResNetModel, ViTConfig
from transformers.models.vit.modeling_vit import ViTLayer

__all__ = ["OneStreamViTTracker", "SiameseCNNTracker", "make_sequence", "TrackingPairs", "crop_regions",
           "track_sequence", "evaluate_tracker", "box_iou", "success_auc", "precision_at", "TEMPLATE_CONTEXT",
           "SEARCH_CONTEXT"]

TEMPLATE_CONTEXT, SEARCH_CONTEXT = 2.0, 4.0  # crop side = context * sqrt(w * h)


# ------------------------------------------------------------------------------------------------------- the head
def head_loss(pred: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """pred (B, 5, g, g): centre logit, offset x/y (in cells, sigmoid), log size w/h (fraction of the search side).
    labels (B, 4): the true box (cx, cy, w, h) as fractions of the search crop."""
    b, _, g, _ = pred.shape
    cx, cy = labels[:, 0].clamp(0, 1 - 1e-6) * g, labels[:, 1].clamp(0, 1 - 1e-6) * g
    ix, iy = cx.floor().long(), cy.floor().long()
    cell = iy * g + ix
    ce = F.cross_entropy(pred[:, 0].reshape(b, -1), cell)
    at = pred.reshape(b, 5, -1)[torch.arange(b), :, cell]  # (B, 5)
    offset = F.l1_loss(torch.sigmoid(at[:, 1:3]), torch.stack([cx - ix, cy - iy], 1))
    size = F.l1_loss(at[:, 3:5], labels[:, 2:4].clamp_min(1e-3).log())
    return ce + 2.0 * offset + size


def decode(pred: torch.Tensor) -> torch.Tensor:
    """Best cell + its offset and size -> (B, 4) box (cx, cy, w, h) as fractions of the search crop."""
    b, _, g, _ = pred.shape
    flat = pred.reshape(b, 5, -1)
    cell = flat[:, 0].argmax(-1)
    at = flat[torch.arange(b), :, cell]
    off = torch.sigmoid(at[:, 1:3])
    cx = ((cell % g).float() + off[:, 0]) / g
    cy = ((cell // g).float() + off[:, 1]) / g
    return torch.stack([cx, cy, at[:, 3].exp(), at[:, 4].exp()], 1)


class _Tracker(nn.Module):
    template_size: int
    search_size: int

    def forward(self, template: torch.Tensor, search: torch.Tensor, labels: torch.Tensor | None = None):
        pred = self.predict_map(template, search)
        out = {"logits": pred}
        if labels is not None:
            out["loss"] = head_loss(pred, labels)
        return out


class OneStreamViTTracker(_Tracker):
    """OSTrack-style one-stream ViT: patches of the template (`template_size`) and of the search region
    (`config.image_size`) are embedded by one patch projection, get their own position embeddings, and run through
    `config.num_hidden_layers` transformers `ViTLayer`s together; the head reads the search tokens."""

    def __init__(self, config: ViTConfig, template_size: int = 32):
        super().__init__()
        if getattr(config, "_attn_implementation", None) is None:
            config._attn_implementation = "sdpa"
        self.config = config
        self.template_size, self.search_size = template_size, config.image_size
        p, d = config.patch_size, config.hidden_size
        self.grid = config.image_size // p
        self.patch = nn.Conv2d(config.num_channels, d, kernel_size=p, stride=p)
        self.pos_template = nn.Parameter(torch.randn(1, (template_size // p) ** 2, d) * 0.02)
        self.pos_search = nn.Parameter(torch.randn(1, self.grid ** 2, d) * 0.02)
        self.layers = nn.ModuleList([ViTLayer(config) for _ in range(config.num_hidden_layers)])
        self.norm = nn.LayerNorm(d, eps=config.layer_norm_eps)
        self.head = nn.Linear(d, 5)

    def predict_map(self, template, search):
        z = self.patch(template).flatten(2).transpose(1, 2) + self.pos_template
        x = self.patch(search).flatten(2).transpose(1, 2) + self.pos_search
        h = torch.cat([z, x], 1)
        for layer in self.layers:
            h = layer(h)
        h = self.norm(h[:, z.shape[1]:])
        return self.head(h).transpose(1, 2).reshape(h.shape[0], 5, self.grid, self.grid)


class SiameseCNNTracker(_Tracker):
    """SiamRPN++-style: a shared transformers `ResNetModel` (from `config`) embeds template and search; depth-wise
    cross-correlation of the two feature maps; a small conv head gives the centre map."""

    def __init__(self, config: ResNetConfig, template_size: int = 32, search_size: int = 64):
        super().__init__()
        self.config = config
        self.template_size, self.search_size = template_size, search_size
        self.backbone = ResNetModel(config)
        c = config.hidden_sizes[-1]
        self.head = nn.Sequential(nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, 5, 1))

    def predict_map(self, template, search):
        z = self.backbone(template).last_hidden_state
        x = self.backbone(search).last_hidden_state
        b, c, k, _ = z.shape
        pad = (k // 2, (k - 1) // 2, k // 2, (k - 1) // 2)
        xc = F.conv2d(F.pad(x, pad).reshape(1, b * c, *[s + k - 1 for s in x.shape[2:]]),
                      z.reshape(b * c, 1, k, k), groups=b * c)
        return self.head(xc.reshape(b, c, *x.shape[2:]) / (k * k))


# --------------------------------------------------------------------------------------------- synthetic sequences
@lru_cache(maxsize=1)
def _assets():
    from sklearn.datasets import load_digits, load_sample_image

    flower = torch.tensor(load_sample_image("flower.jpg")).permute(2, 0, 1).float() / 255
    china = torch.tensor(load_sample_image("china.jpg")).permute(2, 0, 1).float() / 255
    digits = load_digits()
    glyphs = torch.tensor(digits.images).float() / 16
    return flower, china, glyphs, torch.tensor(digits.target)


def _resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    return F.interpolate(img[None], size=(max(1, h), max(1, w)), mode="bilinear", align_corners=False)[0]


def _paste(frame, patch, alpha, x, y):
    """Alpha-blend `patch` (3, h, w) at integer (x, y), clipped to the frame."""
    _, H, W = frame.shape
    _, h, w = patch.shape
    x0, y0, x1, y1 = max(0, x), max(0, y), min(W, x + w), min(H, y + h)
    if x1 <= x0 or y1 <= y0:
        return
    p, a = patch[:, y0 - y:y1 - y, x0 - x:x1 - x], alpha[:, y0 - y:y1 - y, x0 - x:x1 - x]
    frame[:, y0:y1, x0:x1] = a * p + (1 - a) * frame[:, y0:y1, x0:x1]


def make_sequence(seed: int, length: int = 20, frame_size: int = 128, target: str | None = None,
                  distractors: int = 2, occlusion: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """One synthetic sequence: frames (T, 3, S, S) in [0, 1] and ground-truth boxes (T, 4) as (x, y, w, h).

    The target is a digit glyph in a random colour or (`target="photo"`) a crop of china.jpg, 14-26 px, moving
    with a random-walk velocity and a random-walk scale (bouncing off the borders); `distractors` other digits
    move the same way; with `occlusion`, a background-textured block covers most of the target for 2-4 frames."""
    rng = np.random.default_rng(seed)
    flower, china, glyphs, labels = _assets()
    S = frame_size
    side = int(rng.integers(S, 2 * S))
    oy, ox = int(rng.integers(0, flower.shape[1] - side)), int(rng.integers(0, flower.shape[2] - side))
    background = _resize(flower[:, oy:oy + side, ox:ox + side], S, S) * 0.8
    kind = target or ("photo" if rng.random() < 0.5 else "digit")

    def sprite(k):
        if k == "photo":
            py, px = int(rng.integers(0, china.shape[1] - 64)), int(rng.integers(0, china.shape[2] - 64))
            ph, pw = int(rng.integers(24, 64)), int(rng.integers(24, 64))
            img = china[:, py:py + ph, px:px + pw]
            return img, torch.ones(1, *img.shape[1:]), pw / ph
        g = glyphs[int(rng.integers(0, len(glyphs)))][None]
        colour = torch.tensor(rng.uniform(0.3, 1.0, 3)).float()[:, None, None]
        return colour.expand(3, 8, 8), g, 1.0

    def walker(size):
        return {"c": rng.uniform(0.25 * S, 0.75 * S, 2), "v": rng.normal(0, 2.0, 2), "s": size}

    objects = [(sprite(kind), walker(float(rng.uniform(14, 26))))]
    objects += [(sprite("digit"), walker(float(rng.uniform(14, 26)))) for _ in range(distractors)]
    occ_start = int(rng.integers(3, max(4, length - 4)))  # drawn either way: `occlusion` changes nothing else
    occ_len = int(rng.integers(2, 5)) if occlusion and length > 6 else 0
    frames, boxes = [], []
    for t in range(length):
        frame = background.clone()
        for i, ((img, alpha, aspect), st) in enumerate(objects):
            if t > 0:
                st["v"] = np.clip(st["v"] + rng.normal(0, 0.8, 2), -5, 5)
                st["c"] = st["c"] + st["v"]
                st["s"] = float(np.clip(st["s"] * math.exp(rng.normal(0, 0.03)), 10, 34))
                for d in range(2):
                    if not 0.1 * S < st["c"][d] < 0.9 * S:
                        st["v"][d] = -st["v"][d]
                        st["c"][d] = np.clip(st["c"][d], 0.1 * S, 0.9 * S)
            h = int(round(st["s"] / math.sqrt(aspect)))
            w = int(round(st["s"] * math.sqrt(aspect)))
            x, y = int(round(st["c"][0] - w / 2)), int(round(st["c"][1] - h / 2))
            _paste(frame, _resize(img, h, w), _resize(alpha, h, w), x, y)
            if i == 0:
                box = (x, y, w, h)
        if occ_start <= t < occ_start + occ_len:
            x, y, w, h = box
            occ_rng = np.random.default_rng((seed, t))  # its own stream: the walk is the same with or without it
            ow, oh = int(w * occ_rng.uniform(0.5, 0.8)), int(h * occ_rng.uniform(0.5, 0.8))
            ox_, oy_ = x + int(occ_rng.integers(0, w - ow + 1)), y + int(occ_rng.integers(0, h - oh + 1))
            block = background[:, :oh, :ow] if oh <= S and ow <= S else background
            _paste(frame, block, torch.ones(1, *block.shape[1:]), ox_, oy_)
        frames.append(frame.clamp(0, 1))
        boxes.append(torch.tensor(box, dtype=torch.float32))
    return torch.stack(frames), torch.stack(boxes)


def crop_regions(frames: torch.Tensor, centers: torch.Tensor, sides: torch.Tensor, out: int) -> torch.Tensor:
    """Square crops (B, 3, out, out) of `frames` (B, 3, H, W) centred at `centers` (B, 2) with sides `sides` (B,),
    bilinear, zero outside the frame."""
    b, _, H, W = frames.shape
    theta = torch.zeros(b, 2, 3, dtype=frames.dtype)
    theta[:, 0, 0] = sides / W
    theta[:, 1, 1] = sides / H
    theta[:, 0, 2] = 2 * centers[:, 0] / W - 1
    theta[:, 1, 2] = 2 * centers[:, 1] / H - 1
    grid = F.affine_grid(theta, (b, 3, out, out), align_corners=False)
    return F.grid_sample(frames, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _center_side(boxes: torch.Tensor, context: float) -> tuple[torch.Tensor, torch.Tensor]:
    centers = boxes[:, :2] + boxes[:, 2:] / 2
    return centers, context * (boxes[:, 2] * boxes[:, 3]).clamp_min(1).sqrt()


class TrackingPairs(torch.utils.data.Dataset):
    """`size` training pairs from `num_sequences` synthetic sequences, cropped once (batched) at construction: a
    template crop from frame i and a search crop from frame j (|i - j| <= max_gap) around a jittered true centre
    (shift up to 0.3 of the side, log-normal side); `labels` is the true box in the search crop (cx, cy, w, h as
    fractions). Deterministic given `seed`."""

    def __init__(self, num_sequences: int = 64, length: int = 16, seed: int = 0, size: int = 2048,
                 template_size: int = 32, search_size: int = 64, max_gap: int = 6, frame_size: int = 128):
        sequences = [make_sequence(seed * 100_003 + i, length, frame_size) for i in range(num_sequences)]
        frames = torch.stack([f for f, _ in sequences])  # (S, T, 3, H, W)
        boxes = torch.stack([b for _, b in sequences])  # (S, T, 4)
        g = torch.Generator().manual_seed(seed)
        seq = torch.randint(num_sequences, (size,), generator=g)
        i = torch.randint(length, (size,), generator=g)
        j = (i + torch.randint(-max_gap, max_gap + 1, (size,), generator=g)).clamp(0, length - 1)
        templates, searches, labels = [], [], []
        for chunk in torch.arange(size).split(256):
            s, a, b = seq[chunk], i[chunk], j[chunk]
            zc, zs = _center_side(boxes[s, a], TEMPLATE_CONTEXT)
            xc, xs = _center_side(boxes[s, b], SEARCH_CONTEXT)
            xs = xs * torch.exp(torch.randn(len(chunk), generator=g) * 0.15)
            xc = xc + (torch.rand(len(chunk), 2, generator=g) * 0.6 - 0.3) * xs[:, None]
            templates.append(crop_regions(frames[s, a], zc, zs, template_size))
            searches.append(crop_regions(frames[s, b], xc, xs, search_size))
            true_c = boxes[s, b, :2] + boxes[s, b, 2:] / 2
            labels.append(torch.cat([(true_c - xc) / xs[:, None] + 0.5, boxes[s, b, 2:] / xs[:, None]], 1))
        self.templates, self.searches, self.labels = torch.cat(templates), torch.cat(searches), torch.cat(labels)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, k):
        return {"template": self.templates[k], "search": self.searches[k], "labels": self.labels[k]}


# ------------------------------------------------------------------------------------------------- tracking, metrics
@torch.no_grad()
def track_sequence(model: _Tracker, frames: torch.Tensor, first_box: torch.Tensor) -> torch.Tensor:
    """Online tracking: the template comes from frame 0's box; every later frame is searched around the previous
    prediction (side = SEARCH_CONTEXT * sqrt(w h)); the size is smoothed (0.5 old + 0.5 new). Returns (T, 4) boxes."""
    model.eval()
    zc, zs = _center_side(first_box[None], TEMPLATE_CONTEXT)
    template = crop_regions(frames[:1], zc, zs, model.template_size)
    box = first_box.clone()
    out = [box.clone()]
    for t in range(1, len(frames)):
        xc, xs = _center_side(box[None], SEARCH_CONTEXT)
        pred = decode(model(template, crop_regions(frames[t:t + 1], xc, xs, model.search_size))["logits"])[0]
        c = xc[0] + (pred[:2] - 0.5) * xs[0]
        wh = 0.5 * box[2:] + 0.5 * (pred[2:] * xs[0]).clamp(4, frames.shape[-1])
        box = torch.cat([c - wh / 2, wh])
        out.append(box.clone())
    return torch.stack(out)


def box_iou(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """IoU of (N, 4) boxes (x, y, w, h), row by row."""
    x0, y0 = torch.maximum(a[:, 0], b[:, 0]), torch.maximum(a[:, 1], b[:, 1])
    x1 = torch.minimum(a[:, 0] + a[:, 2], b[:, 0] + b[:, 2])
    y1 = torch.minimum(a[:, 1] + a[:, 3], b[:, 1] + b[:, 3])
    inter = (x1 - x0).clamp_min(0) * (y1 - y0).clamp_min(0)
    return inter / (a[:, 2] * a[:, 3] + b[:, 2] * b[:, 3] - inter).clamp_min(1e-9)


def success_auc(ious: torch.Tensor) -> float:
    """OTB success AUC: mean over IoU thresholds 0, 0.05, ..., 1 of the fraction of frames with IoU > threshold."""
    thresholds = torch.linspace(0, 1, 21)
    return float((ious[None, :] > thresholds[:, None]).float().mean(1).mean())


def precision_at(pred: torch.Tensor, gt: torch.Tensor, pixels: float = 20.0) -> float:
    """Fraction of frames whose predicted centre is within `pixels` of the true centre."""
    err = ((pred[:, :2] + pred[:, 2:] / 2) - (gt[:, :2] + gt[:, 2:] / 2)).norm(dim=1)
    return float((err <= pixels).float().mean())


def evaluate_tracker(model: _Tracker, sequences, pixels: float = 10.0) -> dict[str, float]:
    """Success AUC and precision@`pixels` over `sequences` [(frames, boxes)], frames after the first pooled."""
    preds, gts = [], []
    for frames, boxes in sequences:
        preds.append(track_sequence(model, frames, boxes[0])[1:])
        gts.append(boxes[1:])
    pred, gt = torch.cat(preds), torch.cat(gts)
    return {"success_auc": success_auc(box_iou(pred, gt)), f"precision@{pixels:g}px": precision_at(pred, gt, pixels)}
