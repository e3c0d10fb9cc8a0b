"""scikit-learn's 8x8 handwritten digits with stroke concepts derived in code, for concept bottleneck models.

Concepts (k = 11), grouped by where they sit (one query reveals a group):
- seven-segment strokes, class-level as Koh et al.'s majority-voted CUB attributes are: a top, b upper right,
  c lower right, d bottom, e lower left, f upper left, g middle; each digit has a unique code, so a label head on the
  true strokes is exact. Groups come from the segments' rows on the seven-segment grid: {a}, {b, f}, {g}, {c, e}, {d}.
- pen-style attributes measured on each clean image: `heavy_ink` (ink mass), `wide` (horizontal spread), `slanted`
  (ink-weighted x/y covariance) and `tall` (vertical spread), each thresholded at its own class's median, so every
  class holds them half the time: they say nothing about the label, and those near the median are hard to predict,
  like the many uncertain but label-irrelevant attributes of CUB. Groups {heavy_ink, wide}, {slanted, tall}.

The model sees a corrupted image (`occlusion`: in 90% of the images a random 4-pixel band, half the digit, at the
top, bottom, left or right is blanked; plus Gaussian noise), so the concept predictor is imperfect in an
image-specific way and revealing concepts has headroom. Everything is seeded; the split is stratified 60/20/20.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

SEGMENTS = ("a", "b", "c", "d", "e", "f", "g")
SEGMENT_NAMES = ("top", "upper_right", "lower_right", "bottom", "lower_left", "upper_left", "middle")
SEGMENT_CODES = {0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg", 5: "acdfg", 6: "acdefg", 7: "abc",
                 8: "abcdefg", 9: "abcdfg"}
# Row of each segment on the seven-segment grid (0 top .. 4 bottom): the groups are the rows.
SEGMENT_ROWS = {"a": 0, "b": 1, "f": 1, "g": 2, "c": 3, "e": 3, "d": 4}
STYLE_NAMES = ("heavy_ink", "wide", "slanted", "tall")
STYLE_GROUPS = (("heavy_ink", "wide"), ("slanted", "tall"))


def segment_groups() -> list[list[int]]:
    """Segment indices grouped by their row on the seven-segment grid, top to bottom."""
    rows = sorted(set(SEGMENT_ROWS.values()))
    return [[SEGMENTS.index(s) for s in SEGMENTS if SEGMENT_ROWS[s] == r] for r in rows]


def segment_matrix() -> np.ndarray:
    """[10, 7] 0/1: which segments each digit lights."""
    return np.array([[float(s in SEGMENT_CODES[d]) for s in SEGMENTS] for d in range(10)], dtype=np.float32)


def style_measures(images: np.ndarray) -> np.ndarray:
    """[N, 4] ink mass, horizontal spread, x/y covariance (slant) and vertical spread of [N, 8, 8] images."""
    n, h, w = images.shape
    ink = images.reshape(n, -1).sum(1) + 1e-6
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float64)
    p = images / ink[:, None, None]
    mx, my = (p * xs).sum((1, 2)), (p * ys).sum((1, 2))
    dx, dy = xs[None] - mx[:, None, None], ys[None] - my[:, None, None]
    sx = np.sqrt((p * dx**2).sum((1, 2)))
    sy = np.sqrt((p * dy**2).sum((1, 2)))
    # Image y grows downwards: a right-leaning stroke has x growing as y shrinks, so covariance < 0 means slanted.
    cov = -(p * dx * dy).sum((1, 2))
    return np.stack([ink, sx, cov, sy], axis=1)


def style_concepts(images: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """[N, 4] 0/1 style attributes: each measure above the median of the image's own class."""
    measures = style_measures(images)
    out = np.zeros_like(measures, dtype=np.float32)
    for c in np.unique(labels):
        rows = labels == c
        out[rows] = measures[rows] > np.median(measures[rows], axis=0, keepdims=True)
    return out


def corrupt(images: np.ndarray, seed: int, occlusion: float = 0.8, band: int = 3, noise_std: float = 0.15):
    """Images in [0, 1] with a blanked band (probability `occlusion`, side chosen at random) and Gaussian noise."""
    rng = np.random.default_rng(seed)
    out = images.astype(np.float32) / 16.0
    for i in range(len(out)):
        if rng.random() < occlusion:
            side = rng.integers(4)
            if side == 0:
                out[i, :band] = 0.0
            elif side == 1:
                out[i, -band:] = 0.0
            elif side == 2:
                out[i, :, :band] = 0.0
            else:
                out[i, :, -band:] = 0.0
    out += rng.normal(0.0, noise_std, size=out.shape).astype(np.float32)
    return out


@dataclass
class ConceptSplit:
    """One split as tensors: `pixel_values` [N, 1, S, S], `concept_labels` [N, k] (0/1 floats), `labels` [N]."""

    pixel_values: torch.Tensor
    concept_labels: torch.Tensor
    labels: torch.Tensor

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.pixel_values[i], "concept_labels": self.concept_labels[i],
                "labels": self.labels[i]}


@dataclass
class ConceptDigits:
    train: ConceptSplit
    validation: ConceptSplit
    test: ConceptSplit
    concept_names: list[str]
    concept_groups: list[list[int]]

    @property
    def n_concepts(self) -> int:
        return len(self.concept_names)


def load_concept_digits(seed: int = 0, style: bool = True, occlusion: float = 0.9, band: int = 4,
                        noise_std: float = 0.15, image_size: int = 16, groups: str = "rows") -> ConceptDigits:
    """The digits concept data set (module docstring), split 60/20/20 stratified by class with `seed`.

    `style=False` keeps only the seven segments (7 concepts in 5 groups); `image_size` != 8 resamples bilinearly
    (the default 16 gives a small ResNet's stride-4 stem a 4x4 map instead of 2x2); `groups="segments"` makes every
    segment its own group (the pen-style groups stay pairs).
    """
    if groups not in ("rows", "segments"):
        raise ValueError(f"groups must be 'rows' or 'segments', got {groups!r}.")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images, digits.target.astype(np.int64)
    concepts = segment_matrix()[labels]
    names = [f"segment_{s}_{n}" for s, n in zip(SEGMENTS, SEGMENT_NAMES)]
    concept_groups = segment_groups() if groups == "rows" else [[j] for j in range(len(SEGMENTS))]
    if style:
        concepts = np.concatenate([concepts, style_concepts(images, labels)], axis=1)
        names += list(STYLE_NAMES)
        concept_groups += [[len(SEGMENTS) + STYLE_NAMES.index(n) for n in g] for g in STYLE_GROUPS]
    pixels = torch.from_numpy(corrupt(images, seed, occlusion=occlusion, band=band, noise_std=noise_std)).unsqueeze(1)
    if image_size != 8:
        pixels = torch.nn.functional.interpolate(pixels, size=(image_size, image_size), mode="bilinear",
                                                 align_corners=False)

    rng = np.random.default_rng(seed + 1)
    parts = ([], [], [])
    for c in range(10):
        rows = rng.permutation(np.flatnonzero(labels == c))
        a, b = int(round(0.6 * len(rows))), int(round(0.8 * len(rows)))
        for part, chunk in zip(parts, (rows[:a], rows[a:b], rows[b:])):
            part.extend(chunk.tolist())

    def split(rows) -> ConceptSplit:
        rows = torch.tensor(sorted(rows))
        return ConceptSplit(pixels[rows].contiguous(), torch.from_numpy(concepts)[rows].contiguous(),
                            torch.from_numpy(labels)[rows].contiguous())

    return ConceptDigits(*(split(p) for p in parts), concept_names=names, concept_groups=concept_groups)
