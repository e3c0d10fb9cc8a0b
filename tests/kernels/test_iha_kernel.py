"""IHA's fused Triton forward against its PyTorch reference (TRITON_INTERPRET=1 on the CPU: tiny shapes), and the
reference against the textbook definition (materialised pseudo-heads, explicit softmax)."""

import pytest
import torch

from hf_fastslow.kernels import force_backend
from hf_fastslow.kernels.iha import iha_attend, iha_attend_reference, token_causal_mask
from hf_fastslow.kernels.testing import assert_matches_reference, triton_runnable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not triton_runnable(DEVICE), reason="needs triton on CUDA, or TRITON_INTERPRET=1 set before the kernels import"
)



def _inputs(b, h, g, n, s, d, p, collapse="per_head", mask="causal", seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

    q, k, v = rnd(b, h, n, d), rnd(b, g, s, d), rnd(b, g, s, d)
    aq, ak, av = rnd(h, h, p), rnd(g, h, p), rnd(g, h, p)
    r = rnd(h, p) if collapse == "per_head" else rnd(h, h, p)
    if mask == "none":
        m = None
    elif mask == "causal":
        m = token_causal_mask(b, n, s, DEVICE)
    else:  # random pattern, with one query row that sees nothing (a padding position)
        m = (torch.rand(b, 1, n, s, generator=gen) > 0.3).to(DEVICE)
        m[0, 0, 0] = False
    return q, k, v, m, aq, ak, av, r, d**-0.5


def _textbook(q, k, v, m, aq, ak, av, r, scaling):
    """Materialised pseudo-heads, interleaved n*P + p, explicit softmax; rows with no visible key give 0."""
    b, h, n, d = q.shape
    s, p = k.shape[2], aq.shape[-1]
    out = torch.zeros(b, n, h, d, dtype=torch.float64)
    q, k, v = q.double(), k.double(), v.double()
    if m is None:  # bottom-right aligned causal, written out independently of the code under test
        m = torch.tensor([[k <= i + s - n for k in range(s)] for i in range(n)]).expand(b, 1, n, s)
    g = k.shape[1]
    for bi in range(b):
        for hi in range(h):
            qq = torch.stack([sum(aq[mi, hi, pi].double() * q[bi, mi] for mi in range(h)) for pi in range(p)], 1)
            kk = torch.stack([sum(ak[gi, hi, pi].double() * k[bi, gi] for gi in range(g)) for pi in range(p)], 1)
            vv = torch.stack([sum(av[gi, hi, pi].double() * v[bi, gi] for gi in range(g)) for pi in range(p)], 1)
            qq, kk, vv = qq.reshape(n * p, d), kk.reshape(s * p, d), vv.reshape(s * p, d)  # n-major interleave
            vis = m[bi, 0].repeat_interleave(p, 0).repeat_interleave(p, 1)
            logit = (qq @ kk.T * scaling).masked_fill(~vis, float("-inf"))
            w = torch.softmax(logit, -1).nan_to_num(0.0)
            o = (w @ vv).reshape(n, p, d)
            for ho in range(h):
                if r.dim() == 2:
                    if ho == hi:
                        out[bi, :, ho] += (r[hi].double()[None, :, None] * o).sum(1)
                else:
                    out[bi, :, ho] += (r[ho, hi].double()[None, :, None] * o).sum(1)
    return out


@pytest.mark.parametrize("collapse", ["per_head", "global"])
@pytest.mark.parametrize("mask", ["none", "causal", "random"])
def test_reference_matches_textbook(collapse, mask):
    args = _inputs(2, 4, 2, 5, 7, 8, 3, collapse=collapse, mask=mask)
    got = iha_attend_reference(*args)
    torch.testing.assert_close(got.double(), _textbook(*args), atol=1e-5, rtol=1e-5)


def test_reference_rejects_bad_shapes():
    q, k, v, m, aq, ak, av, r, sc = _inputs(1, 4, 2, 3, 3, 8, 2)
    with pytest.raises(ValueError, match="mixing shapes"):
        iha_attend_reference(q, k, v, m, aq[:2], ak, av, r, sc)
    with pytest.raises(ValueError, match="collapse"):
        iha_attend_reference(q, k, v, m, aq, ak, av, r[:, :1], sc)
    with pytest.raises(ValueError, match="mask must be boolean"):
        iha_attend_reference(q, k, v, m.float(), aq, ak, av, r, sc)


@needs_triton
@pytest.mark.parametrize("shape, collapse, mask", [
    # (b, h, g, n, s, d, p)
    ((2, 4, 2, 5, 7, 16, 3), "per_head", "none"),    # GQA, prefill over a cache prefix, token-causal built in-kernel
    ((2, 4, 2, 5, 7, 16, 3), "global", "random"),    # same with a given mask and a padding row
    ((1, 4, 1, 1, 9, 16, 2), "per_head", "random"),  # MQA decode step
    ((2, 2, 2, 6, 6, 8, 1), "global", "none"),       # MHA, P = 1, head dim below the tile
    ((1, 3, 3, 4, 4, 16, 3), "per_head", "random"),  # P = H (3, padded to 4 in the tile)
    ((1, 2, 1, 3, 5, 16, 5), "global", "random"),    # P not a power of two, above H
])
def test_triton_matches_reference(shape, collapse, mask):
    args = _inputs(*shape, collapse=collapse, mask=mask, seed=sum(shape))
    assert_matches_reference(iha_attend, *args, atol=2e-5, rtol=2e-5)


@needs_triton
def test_triton_non_contiguous_and_half_inputs():
    q, k, v, m, aq, ak, av, r, sc = _inputs(2, 4, 2, 6, 6, 16, 2, mask="random")
    # a transposed layout, as HF builds it ([B, N, H, d] viewed as [B, H, N, d])
    q_t = q.transpose(1, 2).contiguous().transpose(1, 2)
    assert not q_t.is_contiguous()
    assert_matches_reference(iha_attend, q_t, k, v, m, aq, ak, av, r, sc, atol=2e-5, rtol=2e-5)
    half = [t.to(torch.bfloat16) for t in (q, k, v)]
    got = iha_attend.triton()(*half, m, aq, ak, av, r, sc)
    want = iha_attend_reference(*[t.float() for t in half], m, aq, ak, av, r, sc)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), want, atol=3e-2, rtol=3e-2)


@needs_triton
def test_model_forward_through_the_kernel():
    """A converted tiny model: the same logits (padding included) with the kernel forced on as with the reference."""
    from hf_fastslow.modeling.iha import IHAConfig, apply_iha
    from tests.modeling.iha_helpers import logits, max_diff_on_tokens, padded_batch, tiny

    model = apply_iha(tiny(layers=1), IHAConfig(num_pseudo_heads=2, init_noise=0.2))
    ids, mask = padded_batch(length=6, pad=2)
    with force_backend("torch"):
        ref = logits(model, ids, mask)
    with force_backend("triton"):
        got = logits(model, ids, mask)
    assert max_diff_on_tokens(got, ref, mask) < 1e-4


@needs_triton
def test_triton_refuses_dropout():
    args = _inputs(1, 2, 1, 2, 2, 16, 2)
    with pytest.raises(ValueError, match="no dropout"):
        iha_attend.triton()(*args, dropout=0.1)
