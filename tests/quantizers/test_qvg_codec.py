"""The QVG codec (quantizers/qvg_codec.py): PRQ identity, monotone error in stages and centroids, the quantizer's
error bound, packing, scales that cannot underflow, bookkeeping (nbytes, slicing) and clear errors."""

import pytest
import torch

from hf_fastslow.evaluation.memory import storage_bytes
from hf_fastslow.kernels.kmeans import gather_centroids
from hf_fastslow.kernels.prq import prq_residual_reference, quantize_residual
from hf_fastslow.kernels.quantize import unpack_bits
from hf_fastslow.quantizers.qvg_codec import PackedPRQ, prq_compress, prq_decompress, prq_decompress_many


def _mixture(b=1, h=2, n=256, d=64, clusters=8, spread=0.15, seed=0):
    """Clustered vectors (a mixture of Gaussians per head), the structure QVG's smoothing exploits."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(b, h, clusters, d, generator=g) * 2.0
    ids = torch.randint(0, clusters, (b, h, n), generator=g)
    x = torch.gather(centers, -2, ids.unsqueeze(-1).expand(b, h, n, d))
    return x + spread * torch.randn(b, h, n, d, generator=g)


def _mse(a, b):
    return (a.float() - b.float()).pow(2).mean().item()


def _compress(x, **kw):
    args = dict(nbits=2, block_size=32, num_stages=1, num_centroids=16, kmeans_iters=5, seed=0)
    args.update(kw)
    return prq_compress(x, **args)


def test_stage_centroids_plus_residual_is_exactly_the_input():
    x = _mixture(n=96, d=32)
    packed = _compress(x, num_stages=3, num_centroids=8)
    rows = x.reshape(-1, 96, 32)
    centroids = packed.centroids.reshape(3, rows.shape[0], 8, 32)
    labels = packed.labels.reshape(3, rows.shape[0], 96)
    residual = prq_residual_reference(rows, centroids, labels)
    rebuilt = residual + sum(gather_centroids(centroids[t].float(), labels[t].long()) for t in range(3))
    torch.testing.assert_close(rebuilt, rows, atol=1e-6, rtol=0)
    # ... and the residual is what the k-means stages left: smaller than the input.
    assert residual.pow(2).mean() < 0.05 * rows.pow(2).mean()


def test_one_centroid_per_token_reconstructs_exactly_through_the_whole_codec():
    # C = N: every vector is its own centroid, the residual is 0, the stored scale is the tiny floor, and the
    # decoder's centroid sum must give x back bit for bit (fp32 centroids).
    x = torch.randn(2, 3, 12, 16)
    for asymmetric in (False, True):
        packed = _compress(x, num_centroids=12, block_size=8, centroid_dtype=torch.float32, asymmetric=asymmetric)
        assert torch.equal(prq_decompress(packed), x)


def test_reconstruction_error_decreases_with_each_stage():
    x = _mixture(n=256, d=64)
    errors = [_mse(prq_decompress(_compress(x, num_stages=s, block_size=64)), x) for s in range(4)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    # Smoothing on clustered data beats plain quantization by far (the card expects >= 5x at INT2).
    assert errors[0] / errors[1] >= 5.0, errors


def test_reconstruction_error_is_non_increasing_in_centroids():
    x = _mixture(n=256, d=64, clusters=32, spread=0.3)
    errors = [_mse(prq_decompress(_compress(x, num_centroids=c, kmeans_iters=10)), x) for c in (1, 4, 16, 64)]
    assert all(a >= b for a, b in zip(errors, errors[1:])), errors


@pytest.mark.parametrize("nbits", [2, 3, 4, 8])
@pytest.mark.parametrize("asymmetric", [False, True])
def test_residual_error_is_at_most_half_a_step(nbits, asymmetric):
    x = _mixture(n=64, d=32) * 3
    packed = _compress(x, nbits=nbits, block_size=16, asymmetric=asymmetric)
    rows = x.reshape(-1, 64, 32)
    residual = prq_residual_reference(rows, packed.centroids.reshape(1, -1, 16, 32), packed.labels.reshape(1, -1, 64))
    err = (prq_decompress(packed).reshape(rows.shape) - rows).abs().reshape(-1, 64, 2, 16)
    step = packed.scales.float().reshape(-1, 64, 2, 1)
    assert (err <= step / 2 * (1 + 1e-5) + 1e-6).all()
    # the scale is the tight one for each block (rounded up to bf16 only): no block uses a scale far too coarse
    blocks = residual.reshape(-1, 64, 2, 16)
    if asymmetric:  # the zero point is rounded down to bf16, which widens the span by up to 2^-7 |min| (one ulp)
        low = blocks.amin(-1)
        tight = (blocks.amax(-1) - low) / ((1 << nbits) - 1)
        slack = low.abs() * 2 ** -7 / ((1 << nbits) - 1)
    else:
        tight = blocks.abs().amax(-1) / ((1 << (nbits - 1)) - 1)
        slack = torch.zeros_like(tight)
    step = step.squeeze(-1)
    assert (step >= tight * (1 - 1e-6)).all()
    assert (step <= (tight + slack) * (1 + 2 ** -7) + 1e-7).all()


@pytest.mark.parametrize("nbits", [2, 3, 4, 8])
def test_codes_pack_and_unpack_round_trip(nbits):
    x = torch.randn(3, 40, 32)
    packed = _compress(x, nbits=nbits, block_size=8, num_stages=2, num_centroids=5)
    assert packed.codes.dtype == torch.uint8 and packed.codes.shape == (3, 40, 32 * nbits // 8)
    residual = prq_residual_reference(x, packed.centroids, packed.labels)
    codes, _, _ = quantize_residual(residual, nbits, 8, False)
    assert torch.equal(unpack_bits(packed.codes, nbits, 32), codes)
    assert codes.min() >= 0 and codes.max() <= 2 * ((1 << (nbits - 1)) - 1)


@pytest.mark.parametrize("asymmetric", [False, True])
def test_scales_never_underflow_or_vanish(asymmetric):
    zeros = torch.zeros(1, 2, 16, 32)
    packed = _compress(zeros, num_stages=0, asymmetric=asymmetric)
    assert (packed.scales.float() > 0).all()
    assert torch.equal(prq_decompress(packed), zeros)
    # Residuals around 1e-30 (an FP8 E4M3 scale would be 0 there): still quantized to the usual relative error.
    tiny = torch.randn(1, 2, 16, 32, generator=torch.Generator().manual_seed(3)) * 1e-30
    packed = _compress(tiny, num_stages=0, nbits=8, asymmetric=asymmetric)
    assert (packed.scales.float() > 0).all() and torch.isfinite(packed.scales.float()).all()
    rel = ((prq_decompress(packed) - tiny) * 1e30).norm() / (tiny * 1e30).norm()  # norms of 1e-30s underflow
    assert rel < 0.02, rel


def test_nbytes_is_the_storage_held_also_after_slicing_and_reordering():
    x = _mixture(b=3, h=2, n=40, d=32)
    for kw in (dict(num_stages=2), dict(num_stages=0), dict(asymmetric=True, nbits=4)):
        packed = _compress(x, **kw)
        assert packed.nbytes() == storage_bytes(packed)
        head = packed.first_tokens(17)
        assert head.nbytes() == storage_bytes(head) < packed.nbytes()
        torch.testing.assert_close(prq_decompress(head), prq_decompress(packed)[..., :17, :], atol=0, rtol=0)
        order = torch.tensor([2, 0, 0])
        beams = packed.index_select(0, order)
        assert beams.nbytes() == storage_bytes(beams)
        assert torch.equal(prq_decompress(beams), prq_decompress(packed)[order])


def test_storage_layout_and_size_formula():
    x = torch.randn(2, 3, 64, 32)
    packed = _compress(x, nbits=2, block_size=16, num_stages=2, num_centroids=8)
    assert packed.labels.dtype == torch.uint8 and packed.labels.shape == (2, 2, 3, 64)
    assert packed.centroids.shape == (2, 2, 3, 8, 32) and packed.centroids.dtype == torch.bfloat16
    assert packed.scales.dtype == torch.bfloat16 and packed.zeros is None
    # bits per value: b + 16/B + 8 S / D + 16 S C / N
    bits = 2 + 16 / 16 + 8 * 2 / 32 + 16 * 2 * 8 / 64
    assert packed.nbytes() * 8 == bits * x.numel()


def test_centroid_budget_larger_than_the_chunk_is_capped():
    x = torch.randn(1, 2, 5, 16)
    packed = _compress(x, num_centroids=200, block_size=8)
    assert packed.num_centroids == 5


def test_same_seed_same_bytes_and_input_untouched():
    x = _mixture(n=64, d=32)
    before = x.clone()
    a, b = _compress(x, num_stages=2, seed=7), _compress(x, num_stages=2, seed=7)
    assert torch.equal(x, before)
    for ta, tb in zip(a.tensors(), b.tensors()):
        assert torch.equal(ta, tb)


def test_decompress_dtype_is_the_fp32_result_rounded():
    x = _mixture(n=32, d=32)
    packed = _compress(x)
    assert torch.equal(prq_decompress(packed, torch.bfloat16), prq_decompress(packed).to(torch.bfloat16))


@pytest.mark.parametrize(
    "kwargs, shape, match",
    [
        (dict(nbits=1), (1, 8, 32), "nbits"),
        (dict(nbits=5), (1, 8, 32), "nbits"),
        (dict(nbits=16), (1, 8, 32), "nbits"),
        (dict(block_size=24), (1, 8, 32), "block_size"),
        (dict(block_size=12), (1, 8, 24), "block_size"),
        (dict(), (1, 0, 32), "empty"),
        (dict(num_centroids=257), (1, 8, 32), "256"),
        (dict(num_centroids=0), (1, 8, 32), "num_centroids"),
        (dict(num_stages=-1), (1, 8, 32), "num_stages"),
        (dict(), (32,), "shape"),
    ],
)
def test_bad_input_raises_a_clear_error_and_leaves_the_input_alone(kwargs, shape, match):
    x = torch.randn(*shape)
    before = x.clone()
    with pytest.raises(ValueError, match=match):
        _compress(x, **kwargs)
    assert torch.equal(x, before)


def test_slicing_errors():
    packed = _compress(torch.randn(2, 8, 32))
    with pytest.raises(ValueError):
        packed.first_tokens(0)
    with pytest.raises(ValueError):
        packed.index_select(1, torch.tensor([0]))  # the token axis is not a leading dim
    assert isinstance(packed.first_tokens(8), PackedPRQ)


@pytest.mark.parametrize("asymmetric, stages", [(False, 2), (True, 1), (False, 0)])
def test_decompress_many_equals_one_by_one(asymmetric, stages):
    chunks = [_compress(_mixture(b=2, h=3, n=16, d=32, seed=s), num_stages=stages, asymmetric=asymmetric, seed=s)
              for s in range(3)]
    one_by_one = torch.cat([prq_decompress(c) for c in chunks], dim=-2)
    assert torch.equal(prq_decompress_many(chunks), one_by_one)  # one call: equal layouts
    mixed = chunks[:2] + [chunks[2].first_tokens(5)]  # a cropped chunk: decoded on its own
    assert torch.equal(prq_decompress_many(mixed), torch.cat([prq_decompress(c) for c in mixed], dim=-2))
    with pytest.raises(ValueError):
        prq_decompress_many([])
