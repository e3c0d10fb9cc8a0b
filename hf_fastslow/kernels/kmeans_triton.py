"""Triton k-means assignment (nearest centroid per point), behind `kernels.kmeans.kmeans_assign`.

One program takes a tile of points of one batch row and sweeps the row's centroids tile by tile: distances as
|c|^2 - 2 x.c (the |x|^2 term is the same for every centroid of a point), a running (min, argmin) kept in registers,
like a GEMM with an argmin epilogue. Ties go to the lowest centroid index, as in the reference: within a tile
`tl.argmin` keeps the first minimum, across tiles only a strictly smaller distance replaces the running one.
Distances are fp32 whatever the input dtype; the summation order differs from the reference's matmul, so a point
almost equidistant from two centroids (a gap near fp32 rounding) may go either way.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .quantize_triton import _device_guard, _next_pow2


@triton.jit
def _kmeans_assign_kernel(
    x_ptr, c_ptr, out_ptr, n_points, n_clusters, dim,
    BLOCK_N: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_n = tl.program_id(0)
    row = tl.program_id(1).to(tl.int64)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < n_points
    d_ok = offs_d < dim
    x = tl.load(x_ptr + row * n_points * dim + offs_n[:, None] * dim + offs_d[None, :],
                mask=n_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
    best = tl.full((BLOCK_N,), float("inf"), tl.float32)
    best_idx = tl.zeros((BLOCK_N,), dtype=tl.int32)
    for c0 in range(0, n_clusters, BLOCK_C):
        offs_c = c0 + tl.arange(0, BLOCK_C)
        c_ok = offs_c < n_clusters
        c = tl.load(c_ptr + row * n_clusters * dim + offs_c[:, None] * dim + offs_d[None, :],
                    mask=c_ok[:, None] & d_ok[None, :], other=0.0).to(tl.float32)
        c_sq = tl.sum(c * c, axis=1)
        dots = tl.dot(x, tl.trans(c), input_precision="ieee")
        dist = c_sq[None, :] - 2.0 * dots
        dist = tl.where(c_ok[None, :], dist, float("inf"))
        tile_min = tl.min(dist, axis=1)
        tile_idx = tl.argmin(dist, axis=1).to(tl.int32) + c0
        better = tile_min < best
        best = tl.where(better, tile_min, best)
        best_idx = tl.where(better, tile_idx, best_idx)
    tl.store(out_ptr + row * n_points + offs_n, best_idx.to(tl.int64), mask=n_ok)


def kmeans_assign_triton(x: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """Index of the nearest centroid for each point of x (..., N, D) among centroids (..., C, D) (Triton)."""
    if x.dim() < 2 or centroids.dim() != x.dim() or centroids.shape[:-2] != x.shape[:-2]:
        raise ValueError(f"points {tuple(x.shape)} and centroids {tuple(centroids.shape)} must be (..., N, D) and "
                         "(..., C, D) with the same batch dims.")
    if centroids.shape[-1] != x.shape[-1]:
        raise ValueError(f"points have D = {x.shape[-1]} but centroids D = {centroids.shape[-1]}.")
    lead, n, d = tuple(x.shape[:-2]), x.shape[-2], x.shape[-1]
    c = centroids.shape[-2]
    rows = math.prod(lead)
    out = torch.empty((rows, n), dtype=torch.int64, device=x.device)
    if rows == 0 or n == 0:
        return out.reshape(*lead, n)
    if c == 0:
        raise ValueError("k-means assignment needs at least one centroid.")
    block_d = max(16, _next_pow2(d))
    block_n = 32 if block_d <= 128 else 16
    block_c = 16
    grid = (triton.cdiv(n, block_n), rows)
    with _device_guard(x):
        _kmeans_assign_kernel[grid](
            x.contiguous().reshape(rows, n, d), centroids.contiguous().reshape(rows, c, d), out, n, c, d,
            BLOCK_N=block_n, BLOCK_C=block_c, BLOCK_D=block_d,
        )
    return out.reshape(*lead, n)


__all__ = ["kmeans_assign_triton"]
