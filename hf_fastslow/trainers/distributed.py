"""Cross-rank helpers for the trainers' method state (FST's context pool, DAS's rollout history, judge rows): the
launch check every multi-process trainer runs first, and the object collectives they share."""

from __future__ import annotations

import math
import os
from typing import Any

__all__ = [
    "MisconfiguredLaunchError",
    "all_gather_objects",
    "check_distributed_launch",
    "padded_block_shard",
    "rank_shard",
    "unshard",
]

_WORLD_SIZE_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


class MisconfiguredLaunchError(RuntimeError):
    """The processes were launched so that a method's state would silently diverge (or could not be shared)."""


def launched_world_size() -> int:
    """How many processes the launcher says it started (1 when not launched)."""
    for name in _WORLD_SIZE_VARS:
        value = os.environ.get(name)
        if value and value.isdigit():
            return int(value)
    return 1


def check_distributed_launch(accelerator: Any, what: str, needs_object_gather: bool = True) -> None:
    """Refuse launches under which `what`'s state would not be shared across ranks.

    * The launcher started several processes but the accelerator sees one: every process trains alone on the whole
      dataset and keeps its own method state. On a machine without a GPU this is what `torchrun` gives when the
      trainer is not told to run on CPU (`use_cpu=True`): accelerate then picks no distributed backend at all.
    * The method exchanges Python objects (`gather_object`) and the backend cannot (XLA / TPU).
    """
    world = launched_world_size()
    processes = int(getattr(accelerator, "num_processes", 1))
    if world > 1 and processes == 1:
        raise MisconfiguredLaunchError(
            f"{what}: the launcher started {world} processes (WORLD_SIZE={world}) but this process sees itself alone "
            "(accelerate's distributed type is NO), so every process would train alone and keep its own method "
            "state. On CPU set use_cpu=True in the training arguments (gloo); on GPU check that CUDA is visible."
        )
    distributed_type = str(getattr(accelerator, "distributed_type", ""))
    if processes > 1 and needs_object_gather and distributed_type.endswith("XLA"):
        raise MisconfiguredLaunchError(
            f"{what}: its state is shared across ranks with an all-gather of Python objects, which accelerate does "
            "not support under XLA (TPU). Run it under torchrun / accelerate launch with gloo or NCCL."
        )


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order, on every rank (one process: `[obj]`)."""
    from accelerate.utils import gather_object

    return gather_object([obj])  # accelerate concatenates the ranks' lists: one element per rank


def rank_shard(items: list, rank: int, world: int) -> list:
    """The items rank `rank` handles: every `world`-th one from `rank` (balanced to within one item)."""
    return items[rank::world]


def unshard(shards: list[list], total: int) -> list:
    """Inverse of `rank_shard` over all ranks' shards (rank order)."""
    out: list = [None] * total
    for rank, shard in enumerate(shards):
        out[rank::len(shards)] = shard
    return out


def padded_block_shard(items: list, rank: int, world: int, filler: Any, total_multiple: int = 1,
                       block_multiple: int = 1) -> tuple[list, int]:
    """Rank `rank`'s contiguous block of `items` after padding the list at its end with `filler` to the shortest
    length that is a multiple of `total_multiple` and splits into `world` equal blocks, each a multiple of
    `block_multiple`. Returns (block, how many of its leading entries are real items; the rest are `filler`).

    Every item lands in exactly one rank's block, in order, for any `len(items)`; every rank gets the same count
    (what a tensor all-gather needs). Contiguous rather than strided (`rank_shard`) so that the all-gathered rows
    keep their order: consecutive groups of `total_multiple` rows (GRPO's generation groups) stay whole.
    """
    step = math.lcm(max(total_multiple, 1), world * max(block_multiple, 1))
    padded = -(-len(items) // step) * step
    size = padded // world
    start = rank * size
    real = items[start : start + size]
    return real + [filler] * (size - len(real)), len(real)
