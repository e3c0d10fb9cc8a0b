"""Few-shot episodes from scikit-learn's bundled digits, with rotations as new classes (as Omniglot setups do).

Each (digit, rotation in {0, 90, 180, 270} degrees) is a class. The splits are by base digit, so a meta-test digit is
never seen in meta-training in any rotation: meta-train {0, 1, 2, 3, 4}, meta-val {5, 7}, meta-test {6, 8, 9}.
A 180-degree turn is dropped where it would clash with another class: 0, 1 and 8 look like themselves turned
upside down, and a turned 9 is a 6. That leaves 18 / 8 / 10 classes of about 180 images each (8x8 grey, scaled to
[0, 1] and up-sampled bilinearly to `image_size`).

An episode is `{"support_x", "support_y", "query_x", "query_y"}` with `ways * shots` support and `ways * queries`
query images, labels 0..ways-1 in a random class order. `EpisodeDataset` is a deterministic map-style dataset of
episodes (episode i is drawn from `seed + i`), what `IMAMLTrainer`'s data loader and the fixed validation / test task
lists use; `collate_episodes` stacks episodes into a meta-batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

SPLIT_DIGITS = {"train": (0, 1, 2, 3, 4), "val": (5, 7), "test": (6, 8, 9)}
ROTATIONS = (0, 1, 2, 3)  # quarter turns
# (digit, quarter turns) left out: 0/1/8 turned 180 degrees look like themselves, a turned 9 is a 6.
DROPPED_CLASSES = frozenset({(0, 2), (1, 2), (8, 2), (9, 2)})


def digit_rotation_classes(split: str, image_size: int = 16) -> dict[tuple[int, int], torch.Tensor]:
    """`{(digit, quarter_turns): images (N, 1, image_size, image_size) float32 in [0, 1]}` for one split."""
    if split not in SPLIT_DIGITS:
        raise ValueError(f"digit_rotation_classes: split must be one of {sorted(SPLIT_DIGITS)}, got {split!r}.")
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32) / 16.0
    targets = torch.tensor(digits.target)
    classes = {}
    for digit in SPLIT_DIGITS[split]:
        base = images[targets == digit][:, None]
        if image_size != base.shape[-1]:
            base = torch.nn.functional.interpolate(base, size=(image_size, image_size), mode="bilinear",
                                                   align_corners=False)
        for turns in ROTATIONS:
            if (digit, turns) not in DROPPED_CLASSES:
                classes[(digit, turns)] = torch.rot90(base, turns, dims=(2, 3)).contiguous()
    return classes


@dataclass
class EpisodeSpec:
    ways: int = 5
    shots: int = 1
    queries: int = 15

    def __post_init__(self):
        for name in ("ways", "shots", "queries"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"EpisodeSpec: {name} must be >= 1, got {getattr(self, name)}.")


def check_episode_fits(classes: dict, spec: EpisodeSpec) -> None:
    """Clear errors for episodes the classes cannot supply (too few classes, too few examples in a class)."""
    if len(classes) < spec.ways:
        raise ValueError(f"A {spec.ways}-way episode needs {spec.ways} classes; this split has {len(classes)}.")
    need = spec.shots + spec.queries
    short = {key: len(images) for key, images in classes.items() if len(images) < need}
    if short:
        raise ValueError(
            f"Episodes with {spec.shots} shots and {spec.queries} queries need {need} examples per class; "
            f"these classes have fewer: {short}."
        )


def sample_episode(classes: dict, spec: EpisodeSpec, generator: torch.Generator) -> dict[str, torch.Tensor]:
    """One episode drawn with `generator` (class choice, label order, examples)."""
    check_episode_fits(classes, spec)
    keys = list(classes)
    chosen = torch.randperm(len(keys), generator=generator)[: spec.ways].tolist()
    support_x, query_x = [], []
    for key_index in chosen:
        images = classes[keys[key_index]]
        order = torch.randperm(len(images), generator=generator)
        support_x.append(images[order[: spec.shots]])
        query_x.append(images[order[spec.shots: spec.shots + spec.queries]])
    labels = torch.arange(spec.ways)
    return {
        "support_x": torch.cat(support_x),
        "support_y": labels.repeat_interleave(spec.shots),
        "query_x": torch.cat(query_x),
        "query_y": labels.repeat_interleave(spec.queries),
    }


class EpisodeDataset(torch.utils.data.Dataset):
    """`length` episodes from `classes`; episode i is drawn from `seed + i`, so a list of validation or test tasks is
    fixed by (split, spec, seed) and the same for every model compared on it."""

    def __init__(self, classes: dict, ways: int = 5, shots: int = 1, queries: int = 15, length: int = 100_000,
                 seed: int = 0):
        self.classes = classes
        self.spec = EpisodeSpec(ways, shots, queries)
        check_episode_fits(classes, self.spec)
        if length < 1:
            raise ValueError(f"EpisodeDataset: length must be >= 1, got {length}.")
        self.length = int(length)
        self.seed = int(seed)

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < self.length:
            raise IndexError(index)
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        return sample_episode(self.classes, self.spec, generator)


def collate_episodes(episodes: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack episodes of one shape into a meta-batch: every tensor gains a leading task axis."""
    return {key: torch.stack([episode[key] for episode in episodes]) for key in episodes[0]}


def mean_and_ci95(values) -> tuple[float, float]:
    """Mean and the half-width 1.96 * std / sqrt(n) of per-task accuracies (the few-shot literature's interval)."""
    values = torch.as_tensor(list(values), dtype=torch.float64)
    if values.numel() == 0:
        raise ValueError("mean_and_ci95: no values.")
    half = 1.96 * values.std(unbiased=True).item() / values.numel() ** 0.5 if values.numel() > 1 else float("nan")
    return values.mean().item(), half
