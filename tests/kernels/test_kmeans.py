"""The shared k-means op (kernels/kmeans.py): assignment, update, caps, warm start, determinism, errors."""

import pytest
import torch

from hf_fastslow.kernels.kmeans import (
    gather_centroids,
    kmeans,
    kmeans_assign_reference,
    kmeans_init,
    kmeans_update,
)


def _blobs(batch=3, per=20, clusters=4, dim=8, spread=0.05, seed=0):
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(batch, clusters, dim, generator=g) * 4
    points = centers.repeat_interleave(per, dim=1) + spread * torch.randn(batch, clusters * per, dim, generator=g)
    return points, centers


def test_assignment_is_the_argmin_of_distances_with_ties_to_the_lowest_index():
    x = torch.randn(2, 5, 31, 7)
    c = torch.randn(2, 5, 6, 7)
    expected = torch.cdist(x, c).argmin(-1)
    assert torch.equal(kmeans_assign_reference(x, c), expected)
    tied = torch.tensor([[[0.0, 0.0]]])
    centroids = torch.tensor([[[1.0, 0.0], [-1.0, 0.0], [0.0, 1.0]]])  # all at distance 1
    assert kmeans_assign_reference(tied, centroids).item() == 0


def test_kmeans_recovers_well_separated_blobs_per_batch_row():
    x, centers = _blobs()
    rough = centers + 0.5 * torch.randn(centers.shape, generator=torch.Generator().manual_seed(2))
    result = kmeans(x, 4, iters=20, init=rough)
    assert result.centroids.shape == (3, 4, 8) and result.labels.shape == (3, 80)
    for b in range(3):  # each true center has a centroid within the noise
        nearest = torch.cdist(centers[b], result.centroids[b]).min(-1).values
        assert nearest.max() < 0.1, nearest
    assert torch.equal(result.counts.sum(-1), torch.full((3,), 80))
    # the labels are the assignment to the returned centroids
    assert torch.equal(result.labels, kmeans_assign_reference(x, result.centroids))


def test_lloyd_never_raises_the_objective_and_singletons_are_exact():
    x = torch.randn(2, 64, 5)
    sse = []
    for iters in (0, 1, 3, 10):
        r = kmeans(x, 8, iters=iters, seed=3)
        sse.append(((x - gather_centroids(r.centroids, r.labels)) ** 2).sum().item())
    assert all(a >= b - 1e-4 for a, b in zip(sse, sse[1:])), sse
    exact = kmeans(x, 64, iters=2)
    assert torch.allclose(gather_centroids(exact.centroids, exact.labels), x)


def test_more_clusters_than_points_is_capped():
    x = torch.randn(4, 6, 3)
    r = kmeans(x, 256, iters=3)
    assert r.centroids.shape == (4, 6, 3)
    assert torch.allclose(gather_centroids(r.centroids, r.labels), x)


def test_empty_cluster_keeps_its_previous_centroid():
    x = torch.tensor([[[0.0], [0.1], [10.0]]])
    previous = torch.tensor([[[0.0], [10.0], [-50.0]]])
    labels = kmeans_assign_reference(x, previous)
    centroids, counts = kmeans_update(x, labels, previous)
    assert counts.tolist() == [[2, 1, 0]]
    assert torch.allclose(centroids, torch.tensor([[[0.05], [10.0], [-50.0]]]))
    assert torch.isfinite(kmeans(x, 3, init=previous, iters=5).centroids).all()


def test_seeded_and_reproducible_and_warm_start_needs_no_more_iterations():
    x, _ = _blobs(batch=2, seed=4)
    a, b = kmeans(x, 4, iters=5, seed=7), kmeans(x, 4, iters=5, seed=7)
    assert torch.equal(a.centroids, b.centroids) and torch.equal(a.labels, b.labels)
    init = kmeans_init(x, 4, seed=7)
    assert torch.equal(init, kmeans_init(x, 4, seed=7))
    assert not torch.equal(init, kmeans_init(x, 4, seed=8))
    cold = kmeans(x, 4, iters=50, seed=7)
    warm = kmeans(x + 0.001, 4, init=cold.centroids, iters=50)
    assert warm.iterations <= cold.iterations


def test_low_precision_inputs_cluster_in_fp32():
    x, _ = _blobs(batch=1)
    r = kmeans(x.to(torch.bfloat16), 4, iters=10, seed=1)
    assert r.centroids.dtype == torch.float32


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: kmeans(torch.randn(5), 2), "shape"),
        (lambda: kmeans(torch.randn(2, 0, 3), 2), "empty"),
        (lambda: kmeans(torch.randint(0, 3, (4, 2)), 2), "floating"),
        (lambda: kmeans(torch.randn(4, 2), 0), "num_clusters"),
        (lambda: kmeans(torch.randn(4, 2), 2, iters=-1), "iters"),
        (lambda: kmeans(torch.randn(3, 4, 2), 2, init=torch.randn(3, 2, 5)), "init"),
    ],
)
def test_bad_input_gives_a_clear_error(call, message):
    with pytest.raises((ValueError, TypeError), match=message):
        call()
