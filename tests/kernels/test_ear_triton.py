"""SVG-EAR's Triton kernels (kernels/ear_triton.py) against their PyTorch references in kernels/ear.py.

On a CPU-only machine they run under TRITON_INTERPRET=1 (set by tests/conftest.py before any kernel import); the
interpreter is slow, so shapes stay tiny.
"""

import pytest
import torch

from hf_fastslow.kernels.dispatch import force_backend
from hf_fastslow.kernels.ear import (
    _offsets,
    block_sparse_attention,
    ear_attention,
    ear_probe,
)
from hf_fastslow.kernels.kmeans import kmeans_update
from hf_fastslow.kernels.testing import assert_matches_reference, triton_runnable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(
    not triton_runnable(DEVICE), reason="needs triton on CUDA, or TRITON_INTERPRET=1 set before the kernels import"
)


def _sorted_clusters(b=1, hq=4, hk=2, nq=37, nk=45, d=12, cq=5, ck=7, seed=0, empty=True):
    """Cluster-sorted q/k/v with random cluster sizes (some empty) and the tensors both kernels take."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g)
    k = torch.randn(b, hk, nk, d, generator=g)
    v = torch.randn(b, hk, nk, d, generator=g)
    q_labels = torch.randint(0, cq, (b, hk, nq), generator=g).sort(-1).values
    k_labels = torch.randint(0, ck, (b, hk, nk), generator=g).sort(-1).values
    if empty:
        k_labels[k_labels == 2] = 3  # key cluster 2 is empty
        q_labels[q_labels == 1] = 0  # query cluster 1 is empty
    q_off, k_off = _offsets(q_labels, cq), _offsets(k_labels, ck)
    k_cent, _ = kmeans_update(k, k_labels, torch.randn(b, hk, ck, d, generator=g))
    v_means, _ = kmeans_update(v, k_labels, torch.zeros(b, hk, ck, d))
    q_cent = torch.randn(b, hq, cq, d, generator=g)
    mask = torch.rand(b, hk, cq, ck, generator=g) < 0.4
    to = lambda *ts: [t.to(DEVICE) for t in ts]  # noqa: E731
    return to(q, k, v, q_off, k_off, k_cent, v_means, q_cent, mask)


@pytest.mark.parametrize("seed, d", [(0, 12), (1, 32)])
def test_probe_matches_reference(seed, d):
    q, k, v, q_off, k_off, k_cent, v_means, q_cent, mask = _sorted_clusters(seed=seed, d=d)
    assert_matches_reference(ear_probe, q_cent, k, v, k_off, k_cent, v_means, 0.3, atol=1e-6, rtol=1e-4)


@pytest.mark.parametrize("compensate", [True, False])
def test_block_sparse_attention_matches_reference(compensate):
    q, k, v, q_off, k_off, k_cent, v_means, q_cent, mask = _sorted_clusters(seed=2)
    mask[0, 0, 3] = False  # a query cluster with no exact block: compensation only (or nothing: lse = -inf)
    got, expected = assert_matches_reference(block_sparse_attention, q, k, v, q_off, k_off, mask, k_cent, v_means,
                                             12 ** -0.5, compensate, atol=1e-5, rtol=1e-5)
    if not compensate:
        rows = slice(int(q_off[0, 0, 3]), int(q_off[0, 0, 4]))
        assert torch.isinf(got[1][0, 0, rows]).all() and (got[0][0, 0, rows] == 0).all()


@pytest.mark.parametrize("router, compensate, causal", [("error", True, False), ("score", False, False),
                                                        ("error", True, True)])
def test_ear_attention_end_to_end_triton_equals_torch(router, compensate, causal):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(1, h, 40, 16, generator=g).to(DEVICE) for h in (4, 2, 2))
    kw = dict(density=0.3, num_q_clusters=4, num_k_clusters=5, router=router, compensate=compensate,
              causal=causal, causal_chunk=10, return_info=True)
    with force_backend("torch"):
        expected, info_t = ear_attention(q, k, v, **kw)
    with force_backend("triton"):
        got, info_g = ear_attention(q, k, v, **kw)
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)
    assert info_g.exact_pairs == info_t.exact_pairs
