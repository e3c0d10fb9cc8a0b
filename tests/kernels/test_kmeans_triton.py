"""The Triton k-means assignment against its PyTorch reference (under TRITON_INTERPRET=1 on a CPU-only machine)."""

import pytest
import torch

from hf_fastslow.kernels import force_backend
from hf_fastslow.kernels.kmeans import kmeans, kmeans_assign, kmeans_assign_reference
from hf_fastslow.kernels.testing import assert_matches_reference, triton_runnable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(
    not triton_runnable(DEVICE), reason="needs triton on CUDA, or TRITON_INTERPRET=1 set before the kernels import"
)



@pytest.mark.parametrize("shape, clusters, dtype", [
    ((2, 3, 70, 64), 20, torch.float32),   # several point tiles, two centroid tiles
    ((1, 33, 24), 5, torch.float32),       # D not a power of two, one partial tile
    ((2, 40, 16), 40, torch.bfloat16),     # C = N, low-precision input
])
def test_assignment_matches_the_reference(shape, clusters, dtype):
    g = torch.Generator().manual_seed(sum(shape) + clusters)
    x = torch.randn(*shape, generator=g).to(dtype).to(DEVICE)
    c = torch.randn(*shape[:-2], clusters, shape[-1], generator=g).to(dtype).to(DEVICE)
    got = kmeans_assign.triton()(x, c)
    expected = kmeans_assign_reference(x, c)
    assert got.dtype == torch.int64 and got.shape == expected.shape
    # The summation order differs from the reference's matmul, so only a near-tie (none in these seeded draws)
    # could go either way.
    assert torch.equal(got, expected), f"{(got != expected).sum().item()} points assigned differently"


def test_ties_go_to_the_lowest_index_within_and_across_centroid_tiles():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(1, 40, 16, generator=g)
    c[0, 35] = c[0, 3]  # duplicate in another tile of 16 centroids
    c[0, 9] = c[0, 7]  # duplicate in the same tile
    x = torch.stack([c[0, 3], c[0, 7], c[0, 35] + 1e-3 * torch.ones(16)]).unsqueeze(0).to(DEVICE)
    got, expected = assert_matches_reference(kmeans_assign, x, c.to(DEVICE))
    assert got.tolist() == [[3, 7, 3]]


def test_kmeans_with_the_triton_assignment_equals_the_torch_run():
    g = torch.Generator().manual_seed(1)
    centers = torch.randn(2, 6, 16, generator=g) * 4
    x = (centers.repeat_interleave(10, dim=1) + 0.1 * torch.randn(2, 60, 16, generator=g)).to(DEVICE)
    with force_backend("triton"):
        a = kmeans(x, 6, iters=5, seed=3)
    with force_backend("torch"):
        b = kmeans(x, 6, iters=5, seed=3)
    assert torch.equal(a.labels, b.labels)
    torch.testing.assert_close(a.centroids, b.centroids, atol=0, rtol=0)


def test_shape_errors():
    with pytest.raises(ValueError, match="same batch dims"):
        kmeans_assign.triton()(torch.randn(2, 5, 8), torch.randn(3, 2, 8))
    with pytest.raises(ValueError, match="D ="):
        kmeans_assign.triton()(torch.randn(2, 5, 8), torch.randn(2, 2, 4))
