"""Triton kernels of XQuant's group quantizer against their PyTorch references.

On a CPU-only machine they run under TRITON_INTERPRET=1 (set by tests/conftest.py before any kernel import); the
interpreter is slow, so shapes stay tiny.
"""

import pytest
import torch

from hf_fastslow.kernels import dispatch
from hf_fastslow.kernels.quantize import (
    SUPPORTED_BITS,
    dequant_matmul,
    dequant_matmul_reference,
    dequantize,
    dequantize_reference,
    quantize_pack,
    quantize_pack_reference,
)
from hf_fastslow.kernels.testing import assert_matches_reference, triton_runnable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(
    not triton_runnable(DEVICE), reason="needs triton on CUDA, or TRITON_INTERPRET=1 set before the kernels import"
)


def _randn(*shape, seed, scale=3.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    # An offset per column so that groups do not all share one range.
    x = torch.randn(*shape, generator=g) * scale + torch.linspace(-2, 2, shape[-1])
    return x.to(dtype).to(DEVICE)


def _assert_same_storage(got, expected):
    assert torch.equal(got.packed, expected.packed), f"{(got.packed != expected.packed).sum().item()} bytes differ"
    assert torch.equal(got.scale, expected.scale)
    assert torch.equal(got.minimum, expected.minimum)
    assert (got.nbits, got.group_size, got.numel_last) == (expected.nbits, expected.group_size, expected.numel_last)


def _random_shape(seed, n_choices):
    """A random leading shape (odd sizes included) and a last dim drawn from `n_choices`."""
    g = torch.Generator().manual_seed(seed)
    ndim = int(torch.randint(0, 3, (1,), generator=g))
    lead = tuple(int(v) for v in torch.randint(1, 6, (ndim,), generator=g))
    n = n_choices[int(torch.randint(0, len(n_choices), (1,), generator=g))]
    return lead, n


# -- quantize + pack ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nbits", SUPPORTED_BITS)
@pytest.mark.parametrize("shape, group_size", [((2, 3, 64), 32), ((5, 48), 24), ((1, 1, 1, 16), 8), ((7, 128), 128)])
def test_quantize_pack_bit_identical(nbits, shape, group_size):
    x = _randn(*shape, seed=nbits * 31 + group_size)
    got, expected = assert_matches_reference(quantize_pack, x, nbits, group_size)
    _assert_same_storage(got, expected)


@pytest.mark.parametrize("nbits", SUPPORTED_BITS)
@pytest.mark.parametrize("seed", [0, 1])
def test_quantize_pack_random_shapes(nbits, seed):
    lead, n = _random_shape(10 * nbits + seed, [16, 32, 48, 64])
    x = _randn(*lead, n, seed=seed)
    got, expected = assert_matches_reference(quantize_pack, x, nbits, 16)
    _assert_same_storage(got, expected)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_quantize_pack_half_inputs(dtype):
    x = _randn(3, 64, seed=5, dtype=dtype)
    for nbits in (3, 4):
        got, expected = assert_matches_reference(quantize_pack, x, nbits, 32)
        _assert_same_storage(got, expected)


def test_quantize_pack_degenerate_groups():
    # A constant group (zero range, clamped step), ties at exactly half a step, and a non-contiguous input.
    x = torch.zeros(3, 32, device=DEVICE)
    x[1] = 0.7
    x[2, :8] = torch.tensor([0.0, 3.0, 0.5, 1.5, 2.5, 1.0, 2.0, 0.0])
    _assert_same_storage(*assert_matches_reference(quantize_pack, x, 2, 8))
    xt = _randn(32, 4, seed=9).t()
    _assert_same_storage(*assert_matches_reference(quantize_pack, xt, 4, 16))


# -- dequantize --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nbits", SUPPORTED_BITS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_dequantize_matches(nbits, dtype):
    q = quantize_pack_reference(_randn(3, 5, 48, seed=nbits), nbits, 24)
    got, expected = assert_matches_reference(dequantize, q, dtype, atol=0, rtol=0)
    assert torch.equal(got, expected)  # same roundings as the reference (no FMA contraction, RTNE to bf16)


# -- fused dequantize + matmul -----------------------------------------------------------------------------------

def _matmul_tol(expected, dtype):
    mag = expected.float().abs().max().item()
    if dtype == torch.float32:
        return {"atol": 1e-4 * max(1.0, mag), "rtol": 1e-4}
    # The reference rounds the product to the half dtype before adding the bias; the kernel rounds once.
    eps = torch.finfo(dtype).eps
    return {"atol": 2 * eps * max(1.0, mag), "rtol": 2 * eps}


@pytest.mark.parametrize("nbits", SUPPORTED_BITS)
@pytest.mark.parametrize("use_bias", [False, True])
def test_dequant_matmul_per_token(nbits, use_bias):
    # q holds (..., T, n) quantized along n, the reduction axis.
    q = quantize_pack_reference(_randn(2, 3, 64, seed=nbits), nbits, 32)
    w = _randn(64, 48, seed=100, scale=0.2)
    b = _randn(48, seed=101) if use_bias else None
    expected = dequant_matmul_reference(q, w, b)
    got, _ = assert_matches_reference(dequant_matmul, q, w, b, **_matmul_tol(expected, w.dtype))
    assert got.shape == (2, 3, 48)


@pytest.mark.parametrize("nbits", SUPPORTED_BITS)
@pytest.mark.parametrize("use_bias", [False, True])
def test_dequant_matmul_per_channel(nbits, use_bias):
    # q holds (..., n, T) quantized along T (tokens); A = deq(q)^T.
    q = quantize_pack_reference(_randn(3, 40, 24, seed=nbits), nbits, 8)
    w = _randn(40, 20, seed=102, scale=0.2)
    b = _randn(20, seed=103) if use_bias else None
    expected = dequant_matmul_reference(q, w, b, transposed=True)
    got, _ = assert_matches_reference(dequant_matmul, q, w, b, transposed=True, **_matmul_tol(expected, w.dtype))
    assert got.shape == (3, 24, 20)


@pytest.mark.parametrize("nbits", [3])  # the straddling width; the others run through the tests above
@pytest.mark.parametrize(
    "transposed, group_size",
    # Tiles inside one group (scale/minimum once per tile) and tiles spanning several groups (gathered per element),
    # including group sizes that are not powers of two.
    [(False, 8), (False, 24), (False, 48), (False, 64), (True, 16), (True, 32), (True, 48), (True, 64)],
)
def test_dequant_matmul_group_sizes(nbits, transposed, group_size):
    quantized_len = 2 * group_size if group_size < 48 else group_size
    other = 24
    # The quantized axis is last in both layouts: (..., T, n) per-token, (..., n, T) per-channel.
    q = quantize_pack_reference(_randn(2, other, quantized_len, seed=group_size), nbits, group_size)
    n = other if transposed else quantized_len  # features: q.shape[-2] per-channel, q.shape[-1] per-token
    w = _randn(n, 16, seed=11, scale=0.2)
    expected = dequant_matmul_reference(q, w, transposed=transposed)
    assert_matches_reference(dequant_matmul, q, w, transposed=transposed, **_matmul_tol(expected, w.dtype))


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_dequant_matmul_random_shapes(transposed, seed):
    nbits = SUPPORTED_BITS[seed % len(SUPPORTED_BITS)] if not transposed else SUPPORTED_BITS[(seed + 1) % 4]
    lead, n = _random_shape(50 + seed + 10 * transposed, [16, 32, 48])
    g = torch.Generator().manual_seed(seed)
    other = int(torch.randint(1, 5, (1,), generator=g)) * 8
    m = int(torch.randint(1, 40, (1,), generator=g))
    if transposed:
        x = _randn(*lead, n, other, seed=seed)  # (..., n, T) with T = other
        q = quantize_pack_reference(x, nbits, 8)
    else:
        x = _randn(*lead, other, n, seed=seed)  # (..., T, n)
        q = quantize_pack_reference(x, nbits, 16)
    w = _randn(n, m, seed=seed + 7, scale=0.2)
    expected = dequant_matmul_reference(q, w, transposed=transposed)
    assert_matches_reference(dequant_matmul, q, w, transposed=transposed, **_matmul_tol(expected, w.dtype))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("transposed", [False, True])
def test_dequant_matmul_half_weights(dtype, transposed):
    x = _randn(2, 32, 16, seed=4)
    q = quantize_pack_reference(x, 3, 16 if not transposed else 8)
    w = _randn(32 if transposed else 16, 24, seed=8, scale=0.2, dtype=dtype)
    b = _randn(24, seed=9, dtype=dtype)
    expected = dequant_matmul_reference(q, w, b, transposed=transposed)
    got, _ = assert_matches_reference(dequant_matmul, q, w, b, transposed=transposed, **_matmul_tol(expected, dtype))
    assert got.dtype == dtype


def test_dequant_matmul_strided_weight_and_single_row():
    q = quantize_pack_reference(_randn(64, seed=1), 4, 32)  # one row, no leading dims
    w = _randn(48, 64, seed=2, scale=0.2).t()  # (64, 48), column-major
    expected = dequant_matmul_reference(q, w)
    got, _ = assert_matches_reference(dequant_matmul, q, w, **_matmul_tol(expected, w.dtype))
    assert got.shape == (48,)


# -- dispatch ----------------------------------------------------------------------------------------------------

@pytest.fixture
def triton_calls(monkeypatch):
    """Count calls into the Triton implementations (the dispatcher resolves them by name on every call)."""
    import hf_fastslow.kernels.quantize_triton as qt

    calls = []
    for name in ("quantize_pack_triton", "dequantize_triton", "dequant_matmul_triton"):
        original = getattr(qt, name)

        def wrapper(*args, _original=original, _name=name, **kwargs):
            calls.append(_name)
            return _original(*args, **kwargs)

        monkeypatch.setattr(qt, name, wrapper)
    monkeypatch.delenv("HF_FASTSLOW_KERNELS", raising=False)
    return calls


@pytest.mark.skipif(DEVICE != "cpu", reason="the default picks Triton on CUDA")
def test_dispatch_defaults_to_reference_on_cpu(triton_calls):
    x = _randn(2, 32, seed=3)
    q = quantize_pack(x, 4, 16)
    dequantize(q)
    dequant_matmul(q, _randn(32, 16, seed=4))
    assert triton_calls == []
    with dispatch.force_backend("torch"):
        quantize_pack(x, 4, 16)
    assert triton_calls == []


def test_dispatch_forced_triton(triton_calls):
    x = _randn(2, 32, seed=3)
    w = _randn(32, 16, seed=4)
    with dispatch.force_backend("triton"):
        q = quantize_pack(x, 4, 16)
        deq = dequantize(q)  # the only tensors are inside the QuantizedTensor
        out = dequant_matmul(q, w)
    assert triton_calls == ["quantize_pack_triton", "dequantize_triton", "dequant_matmul_triton"]
    _assert_same_storage(q, quantize_pack_reference(x, 4, 16))
    assert torch.equal(deq, dequantize_reference(q))
    torch.testing.assert_close(out, dequant_matmul_reference(q, w), atol=1e-4, rtol=1e-4)


# -- validation --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("nbits, group_size", [(5, 16), (4, 24), (4, 12), (4, 0)])
def test_bad_quantize_arguments_raise(nbits, group_size):
    x = _randn(2, 32, seed=0)  # 24 does not divide 32; 12 is not a multiple of 8
    with pytest.raises(ValueError):
        quantize_pack_reference(x, nbits, group_size)
    with pytest.raises(ValueError):
        quantize_pack.triton()(x, nbits, group_size)
    with dispatch.force_backend("triton"), pytest.raises(ValueError):
        quantize_pack(x, nbits, group_size)


def test_bad_matmul_arguments_raise():
    q = quantize_pack_reference(_randn(2, 32, seed=0), 4, 16)
    fn = dequant_matmul.triton()
    with pytest.raises(ValueError):
        fn(q, _randn(16, 8, seed=1))  # weight rows != features
    with pytest.raises(ValueError):
        fn(q, _randn(32, 8, seed=1), _randn(7, seed=2))  # bias length != output columns
    with pytest.raises(ValueError):
        fn(q, _randn(32, 8, seed=1), transposed=True)  # transposed: features are q.shape[-2] == 2, not 32
    with pytest.raises(ValueError):
        fn(q, _randn(32, 8, seed=1).to(torch.int32))
