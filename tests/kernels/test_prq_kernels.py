"""Triton PRQ encode (minus centroids + quantize + pack) and fused decode against their PyTorch references, bit for
bit (under TRITON_INTERPRET=1 on a CPU-only machine; shapes stay tiny, the interpreter is slow)."""

import pytest
import torch

from hf_fastslow.kernels import force_backend
from hf_fastslow.kernels.prq import prq_decode, prq_encode
from hf_fastslow.kernels.testing import assert_matches_reference, triton_runnable
from hf_fastslow.quantizers.qvg_codec import prq_compress, prq_decompress

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(
    not triton_runnable(DEVICE), reason="needs triton on CUDA, or TRITON_INTERPRET=1 set before the kernels import"
)



def _stages(rows, n, d, stages, clusters, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, n, d, generator=g) * 2
    centroids = (torch.randn(stages, rows, clusters, d, generator=g)).to(torch.bfloat16)
    labels = torch.randint(0, clusters, (stages, rows, n), generator=g).to(torch.uint8)
    return x.to(DEVICE), centroids.to(DEVICE), labels.to(DEVICE)


CASES = [(2, False, 1), (2, True, 2), (3, False, 0), (4, True, 1), (8, False, 2)]


@pytest.mark.parametrize("nbits, asymmetric, stages", CASES)
def test_encode_and_decode_are_bit_identical(nbits, asymmetric, stages):
    x, c, lab = _stages(rows=2, n=21, d=32, stages=stages, clusters=5, seed=nbits * 10 + stages)
    got, expected = assert_matches_reference(prq_encode, x, c, lab, nbits, 16, asymmetric, atol=0, rtol=0)
    codes, scales, zeros = expected
    assert_matches_reference(prq_decode, codes, scales, zeros, c, lab, nbits, torch.float32, atol=0, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_decode_rounds_to_the_output_dtype_like_torch(dtype):
    x, c, lab = _stages(rows=1, n=9, d=16, stages=2, clusters=3, seed=5)
    codes, scales, zeros = prq_encode.reference(x, c, lab, 4, 8, False)
    assert_matches_reference(prq_decode, codes, scales, zeros, c, lab, 4, dtype, atol=0, rtol=0)


@pytest.mark.parametrize("asymmetric", [False, True])
def test_edge_values_zeros_tiny_and_half_step_ties(asymmetric):
    zero = torch.zeros(1, 3, 16)
    tiny = torch.randn(1, 3, 16, generator=torch.Generator().manual_seed(0)) * 1e-30
    # |max| = 7 at 4 bits symmetric gives a scale of exactly 1: the halves are rounding ties (to even)
    ties = torch.tensor([[7.0, -7.0, 2.5, -2.5, 3.5, -3.5, 0.5, -0.5, 1.5, -1.5, 6.5, -6.5, 0.0, 4.5, -4.5, 5.5]])
    x = torch.cat([zero, tiny, ties.expand(1, 3, 16)], dim=1).to(DEVICE)
    none_c = torch.zeros(0, 1, 1, 16, device=DEVICE)
    none_l = torch.zeros(0, 1, 9, dtype=torch.uint8, device=DEVICE)
    _, (codes, scales, zeros) = assert_matches_reference(prq_encode, x, none_c, none_l, 4, 16, asymmetric, atol=0,
                                                        rtol=0)
    assert (scales.float() > 0).all()
    assert_matches_reference(prq_decode, codes, scales, zeros, none_c, none_l, 4, torch.float32, atol=0, rtol=0)


def test_codec_through_the_dispatcher_is_backend_independent():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, 24, 32, generator=g).to(DEVICE)
    with force_backend("torch"):
        a = prq_compress(x, nbits=2, block_size=16, num_stages=2, num_centroids=4, kmeans_iters=3)
        out_a = prq_decompress(a)
    with force_backend("triton"):
        b = prq_compress(x, nbits=2, block_size=16, num_stages=2, num_centroids=4, kmeans_iters=3)
        out_b = prq_decompress(b)
    for ta, tb in zip(a.tensors(), b.tensors()):
        assert torch.equal(ta, tb)
    assert torch.equal(out_a, out_b)


def test_shape_errors():
    x, c, lab = _stages(rows=2, n=8, d=16, stages=1, clusters=3, seed=0)
    with pytest.raises(ValueError, match="labels"):
        prq_encode.triton()(x, c, lab[:, :1], 2, 8, False)
    with pytest.raises(ValueError, match="block_size"):
        prq_encode.triton()(x, c, lab, 2, 12, False)
    with pytest.raises(ValueError, match="nbits"):
        prq_encode.triton()(x, c, lab, 5, 8, False)


def test_cache_forward_with_triton_kernels_equals_the_torch_path():
    from hf_fastslow import QVGCache, QVGConfig
    from hf_fastslow.integrations import cache_kwargs
    from tests.conftest import tiny_llama

    model = tiny_llama(num_layers=2, hidden=64, heads=4, kv_heads=2, seed=0).to(DEVICE)
    ids = torch.randint(3, 128, (1, 21), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    config = QVGConfig(nbits=2, block_size=16, num_stages=2, num_centroids=3, chunk_tokens=8, sink_tokens=1,
                       kmeans_iters=2)
    logits = {}
    for backend in ("torch", "triton"):
        cache = QVGCache(model, config)
        with force_backend(backend), torch.no_grad():
            model(ids[:, :17], **cache_kwargs(model, cache))
            logits[backend] = model(ids[:, 17:], **cache_kwargs(model, cache)).logits
    assert len(cache.layers[0].spans) == 2
    torch.testing.assert_close(logits["triton"], logits["torch"], atol=0, rtol=0)
