"""The PyTorch reference of XQuant's group quantizer: storage layout, round trips and error bounds."""

import pytest
import torch

from hf_fastslow.kernels.quantize import (
    SUPPORTED_BITS,
    QuantizedTensor,
    dequant_matmul_reference,
    dequantize_reference,
    pack_bits,
    quantize_pack_reference,
    unpack_bits,
)


@pytest.mark.parametrize("nbits", SUPPORTED_BITS)
def test_pack_unpack_round_trip(nbits):
    g = torch.Generator().manual_seed(nbits)
    codes = torch.randint(0, 1 << nbits, (3, 5, 64), generator=g, dtype=torch.int32)
    packed = pack_bits(codes, nbits)
    assert packed.dtype == torch.uint8
    assert packed.shape == (3, 5, 64 * nbits // 8)
    assert torch.equal(unpack_bits(packed, nbits, 64), codes)


@pytest.mark.parametrize("nbits", SUPPORTED_BITS)
def test_pack_extreme_codes_round_trip(nbits):
    # All-ones codes fill the top bit of each word (bit 31 for 4-bit), the case most likely to hit sign handling.
    top = torch.full((2, 16), (1 << nbits) - 1, dtype=torch.int32)
    assert torch.equal(pack_bits(top, nbits), torch.full((2, 2 * nbits), 0xFF, dtype=torch.uint8))
    assert torch.equal(unpack_bits(pack_bits(top, nbits), nbits, 16), top)


def test_pack_layout_is_little_endian_words():
    # 2-bit: codes 1, 2, 3 in bits [0,2), [2,4), [4,6) -> byte 0b00111001.
    codes2 = torch.tensor([[1, 2, 3, 0, 0, 0, 0, 0]], dtype=torch.int32)
    assert pack_bits(codes2, 2).tolist() == [[0b00111001, 0]]
    # 3-bit: code 7 in bits [0,3), code 5 in bits [21,24) -> the third byte holds 5 << 5.
    codes3 = torch.tensor([[7, 0, 0, 0, 0, 0, 0, 5]], dtype=torch.int32)
    assert pack_bits(codes3, 3).tolist() == [[7, 0, 5 << 5]]
    # 3-bit code 2 straddles bytes 0 and 1 (bits [6,9)): value 6 = 0b110 puts 0b10 in byte 0's top, 1 in byte 1.
    codes3b = torch.tensor([[0, 0, 6, 0, 0, 0, 0, 0]], dtype=torch.int32)
    assert pack_bits(codes3b, 3).tolist() == [[0b10000000, 0b1, 0]]
    # 4-bit: nibbles, low first.
    codes4 = torch.tensor([[1, 2, 3, 4, 5, 6, 7, 15]], dtype=torch.int32)
    assert pack_bits(codes4, 4).tolist() == [[0x21, 0x43, 0x65, 0xF7]]


def _error_bound(x: torch.Tensor, q: QuantizedTensor) -> torch.Tensor:
    """Per-element bound: half a step, plus the fp16 rounding of the stored minimum and scale (the top code can
    fall short of the group maximum by qmax * rounding(scale))."""
    g = q.group_size
    xg = x.float().reshape(*x.shape[:-1], -1, g)
    absmax = xg.abs().amax(dim=-1, keepdim=True)
    bound = q.scale.float().unsqueeze(-1) / 2 + absmax * 2.0 ** -10 + 1e-6
    return bound.expand_as(xg).reshape(x.shape)


@pytest.mark.parametrize("nbits", SUPPORTED_BITS)
@pytest.mark.parametrize("group_size", [8, 32, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_error_within_half_step(nbits, group_size, dtype):
    g = torch.Generator().manual_seed(100 * nbits + group_size)
    x = (torch.randn(4, 3, 128, generator=g) * 4 + torch.linspace(-3, 5, 128)).to(dtype)
    q = quantize_pack_reference(x, nbits, group_size)
    assert q.shape == x.shape
    assert q.scale.dtype == torch.float16 and q.minimum.dtype == torch.float16
    assert q.scale.shape == (4, 3, 128 // group_size)
    err = (dequantize_reference(q) - x.float()).abs()
    bound = _error_bound(x, q)
    assert (err <= bound).all(), f"max excess {(err - bound).max().item():.3g}"
    # The bound must be meaningful: the fp16 slack is small next to half a step for low bit widths.
    if nbits <= 4:
        assert err.max() > 0.1 * q.scale.float().max()


@pytest.mark.parametrize("nbits", SUPPORTED_BITS)
def test_values_on_the_grid_are_exact(nbits):
    # x = code * scale + min with fp16-exact scale/min and the extreme codes present: quantization is lossless.
    g = torch.Generator().manual_seed(nbits)
    qmax = (1 << nbits) - 1
    codes = torch.randint(0, qmax + 1, (6, 32), generator=g)
    codes[:, 0], codes[:, 1] = 0, qmax
    scale = torch.tensor(0.125)
    minimum = torch.tensor(-1.5)
    x = codes.float() * scale + minimum
    q = quantize_pack_reference(x, nbits, 32)
    assert torch.equal(unpack_bits(q.packed, nbits, 32), codes.to(torch.int32))
    assert torch.equal(dequantize_reference(q), x)


def test_constant_group_keeps_its_value():
    x = torch.full((2, 16), 0.3)
    q = quantize_pack_reference(x, 2, 8)
    assert (q.scale.float() > 0).all()  # clamped, never a zero step
    assert torch.allclose(dequantize_reference(q), x, atol=1e-3)


def test_dequantize_dtype_and_matmul_layouts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 5, 32, generator=g)
    w = torch.randn(32, 7, generator=g)
    b = torch.randn(7, generator=g)
    q = quantize_pack_reference(x, 4, 16)
    assert dequantize_reference(q, torch.float16).dtype == torch.float16
    out = dequant_matmul_reference(q, w, b)
    torch.testing.assert_close(out, dequantize_reference(q) @ w + b)
    # Per-channel layout: (..., n, T) quantized along tokens; the product runs over n.
    xt = torch.randn(2, 32, 8, generator=g)
    qt = quantize_pack_reference(xt, 4, 8)
    out_t = dequant_matmul_reference(qt, w, transposed=True)
    assert out_t.shape == (2, 8, 7)
    torch.testing.assert_close(out_t, dequantize_reference(qt).transpose(-1, -2) @ w)


def test_index_select_and_nbytes():
    x = torch.randn(4, 3, 64)
    q = quantize_pack_reference(x, 3, 32)
    sel = q.index_select(1, torch.tensor([2, 0]))
    assert sel.shape == (4, 2, 64)
    assert torch.equal(dequantize_reference(sel), dequantize_reference(q)[:, [2, 0]])
    assert q.nbytes() == 4 * 3 * (64 * 3 // 8 + 2 * 2 * 2)
    with pytest.raises(ValueError):
        q.index_select(-1, torch.tensor([0]))


@pytest.mark.parametrize(
    "nbits, group_size, n",
    [(5, 32, 64), (1, 32, 64), (4, 48, 64), (4, 12, 48), (4, 0, 64), (2, -8, 64)],
)
def test_reference_rejects_bad_arguments(nbits, group_size, n):
    with pytest.raises(ValueError):
        quantize_pack_reference(torch.randn(2, n), nbits, group_size)


def test_pack_bits_rejects_bad_arguments():
    with pytest.raises(ValueError):
        pack_bits(torch.zeros(2, 12, dtype=torch.int32), 4)
    with pytest.raises(ValueError):
        pack_bits(torch.zeros(2, 16, dtype=torch.int32), 6)
