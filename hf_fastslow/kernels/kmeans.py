"""Batched Euclidean k-means, the one clustering op shared by QVG (arXiv 2602.02958) and SVG-EAR (arXiv 2603.08982).

Every leading dimension is a batch: `x` of shape `(..., N, D)` gives `(..., C, D)` centroids and `(..., N)` labels,
each batch row clustered on its own (QVG clusters per (batch, head, chunk); EAR per (batch, head)). Lloyd iterations
in fp32 whatever the input dtype. Conventions both methods rely on:
- `num_clusters` larger than N is capped at N (a chunk shorter than the centroid budget is not an error);
- a cluster that loses all its points keeps its previous centroid (so a warm start never produces NaNs);
- ties in the assignment go to the lowest centroid index, identically in every backend;
- the random initialisation (distinct rows of each batch row) is drawn from a `torch.Generator` seeded by `seed`,
  so a call is reproducible.
`kmeans_assign` is the hot step (distances + argmin) and goes through the kernel dispatcher.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .dispatch import kernel


@dataclass
class KMeansResult:
    centroids: torch.Tensor  # (..., C, D) float32
    labels: torch.Tensor  # (..., N) int64
    counts: torch.Tensor  # (..., C) int64, points per cluster at the last assignment
    iterations: int  # Lloyd iterations run (may stop early at `tol`)


def _check_points(x: torch.Tensor) -> None:
    if x.dim() < 2:
        raise ValueError(f"k-means expects points of shape (..., N, D); got a tensor of shape {tuple(x.shape)}.")
    if x.shape[-2] == 0:
        raise ValueError("k-means got an empty set of points (N = 0).")
    if not x.is_floating_point():
        raise TypeError(f"k-means expects floating-point points; got {x.dtype}.")


def kmeans_assign_reference(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid (squared Euclidean distance) for each point; ties go to the lowest index."""
    xf, cf = x.float(), centroids.float()
    # |x - c|^2 = |x|^2 - 2 x.c + |c|^2; |x|^2 is the same for every centroid of a point, so it is left out.
    distances = (cf * cf).sum(-1).unsqueeze(-2) - 2.0 * xf @ cf.transpose(-1, -2)
    return distances.argmin(dim=-1)


kmeans_assign = kernel(kmeans_assign_reference, "hf_fastslow.kernels.kmeans_triton:kmeans_assign_triton",
                       name="kmeans_assign")


def kmeans_update(
    x: torch.Tensor, labels: torch.Tensor, previous: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of each cluster's points; an empty cluster keeps its `previous` centroid. Returns (centroids, counts)."""
    num_clusters = previous.shape[-2]
    xf = x.float()
    sums = torch.zeros(*x.shape[:-2], num_clusters, x.shape[-1], dtype=torch.float32, device=x.device)
    sums.scatter_add_(-2, labels.unsqueeze(-1).expand_as(xf), xf)
    counts = torch.zeros(*x.shape[:-2], num_clusters, dtype=torch.int64, device=x.device)
    counts.scatter_add_(-1, labels, torch.ones_like(labels))
    means = sums / counts.clamp(min=1).unsqueeze(-1).to(torch.float32)
    return torch.where(counts.unsqueeze(-1) > 0, means, previous.float()), counts


def kmeans_init(x: torch.Tensor, num_clusters: int, seed: int = 0) -> torch.Tensor:
    """`num_clusters` distinct points of each batch row, drawn with a generator seeded by `seed`."""
    n = x.shape[-2]
    batch = x.reshape(-1, n, x.shape[-1])
    generator = torch.Generator(device="cpu").manual_seed(int(seed))
    picks = torch.stack([torch.randperm(n, generator=generator)[:num_clusters] for _ in range(batch.shape[0])])
    picks = picks.to(x.device)
    chosen = torch.gather(batch.float(), 1, picks.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
    return chosen.reshape(*x.shape[:-2], num_clusters, x.shape[-1])


def kmeans(
    x: torch.Tensor,
    num_clusters: int,
    *,
    iters: int = 10,
    init: torch.Tensor | None = None,
    seed: int = 0,
    tol: float = 0.0,
) -> KMeansResult:
    """Cluster the N rows of each batch row of `x` (..., N, D) into min(num_clusters, N) clusters.

    `init` (..., C, D) warm-starts from earlier centroids (its C wins over `num_clusters`); `iters` Lloyd iterations
    at most; stop early when the fraction of points that changed cluster is at most `tol` (0 = only when none moved).
    The returned labels are the assignment to the returned centroids.
    """
    _check_points(x)
    if iters < 0:
        raise ValueError(f"iters must be >= 0; got {iters}.")
    n, dim = x.shape[-2], x.shape[-1]
    if init is not None:
        if init.shape[:-2] != x.shape[:-2] or init.shape[-1] != dim:
            raise ValueError(
                f"init centroids of shape {tuple(init.shape)} do not match points of shape {tuple(x.shape)} "
                "(expected (..., C, D) with the points' batch dims and D)."
            )
        centroids = init.float().clone()
    else:
        if num_clusters < 1:
            raise ValueError(f"num_clusters must be >= 1; got {num_clusters}.")
        centroids = kmeans_init(x, min(int(num_clusters), n), seed)
    labels = kmeans_assign(x, centroids)
    done = 0
    while done < iters:
        done += 1
        centroids, counts = kmeans_update(x, labels, centroids)
        new_labels = kmeans_assign(x, centroids)
        changed = (new_labels != labels).float().mean().item()
        labels = new_labels
        if changed <= tol:
            break
    # Counts that match the returned labels (the last update's counts belong to the assignment before it).
    counts = torch.zeros(*x.shape[:-2], centroids.shape[-2], dtype=torch.int64, device=x.device)
    counts.scatter_add_(-1, labels, torch.ones_like(labels))
    return KMeansResult(centroids=centroids, labels=labels, counts=counts, iterations=done)


def gather_centroids(centroids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """centroids[..., labels[..., i], :] for every point i: the (..., N, D) tensor of each point's centroid."""
    return torch.gather(centroids, -2, labels.unsqueeze(-1).expand(*labels.shape, centroids.shape[-1]))
