"""The Triton ISD verify (kernels/isd_verify_triton.py) against the contract, written here as a plain per-row loop, and
against the PyTorch reference in kernels/isd_verify.py.

On a CPU-only machine the kernel runs under TRITON_INTERPRET=1 (set by tests/conftest.py before any kernel import);
shapes stay small.
"""

import pytest
import torch

from hf_fastslow.kernels.dispatch import force_backend
from hf_fastslow.kernels.isd_verify import isd_verify
from hf_fastslow.kernels.testing import assert_matches_reference, triton_runnable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(
    not triton_runnable(DEVICE), reason="needs triton on CUDA, or TRITON_INTERPRET=1 set before the kernels import"
)


def _triton():
    from hf_fastslow.kernels.isd_verify_triton import isd_verify_triton

    return isd_verify_triton


def contract_oracle(p, tokens, q, num_drafts, uniforms, alpha=1.0):
    """The contract, row by row: accept draft k iff u < min(1, p[x] / (alpha q[x])); stop at the first reject."""
    rows, k_max, vocab = p.shape
    accepted = torch.zeros(rows, dtype=torch.long)
    residual = torch.zeros(rows, vocab, dtype=torch.float32)
    for r in range(rows):
        n = int(num_drafts[r])
        stop = n
        for k in range(n):
            x = int(tokens[r, k])
            ratio = p[r, k, x] / (alpha * q[r, k, x])
            if not bool(uniforms[r, k] < torch.clamp(ratio, max=1.0)):
                stop = k
                break
        accepted[r] = stop
        if stop < n:
            diff = (p[r, stop] - alpha * q[r, stop]).clamp(min=0)
            residual[r] = diff / diff.sum() if diff.sum() > 0 else p[r, stop]
    return accepted, residual


def _inputs(rows=6, k=4, vocab=50, seed=0, one_hot=False, closeness=0.5):
    """p = softmax of random logits; q drafted from a perturbation of them (or its argmax, one-hot), x ~ q."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, k, vocab, generator=g) * 2
    p = torch.softmax(logits, -1)
    q_logits = logits + torch.randn(rows, k, vocab, generator=g) / closeness
    q = torch.softmax(q_logits, -1)
    if one_hot:
        tokens = q_logits.argmax(-1)
        q = torch.nn.functional.one_hot(tokens, vocab).float()
    else:
        tokens = torch.multinomial(q.reshape(-1, vocab), 1, generator=g).reshape(rows, k)
    num_drafts = torch.randint(0, k + 1, (rows,), generator=g)
    uniforms = torch.rand(rows, k, generator=g)
    return p, tokens, q, num_drafts, uniforms


def _check(p, tokens, q, num_drafts, uniforms, alpha=1.0):
    """Triton == the PyTorch reference (kernels/isd_verify.py) == the contract oracle above."""
    args = [t.to(DEVICE) for t in (p, tokens, q, num_drafts, uniforms)]
    got_acc, got_res = _triton()(*args, verify_alpha=alpha)
    assert_matches_reference(isd_verify, *args, verify_alpha=alpha, atol=1e-6, rtol=1e-5)
    exp_acc, exp_res = contract_oracle(p, tokens, q, num_drafts, uniforms, alpha)
    assert got_acc.dtype == torch.long and got_res.dtype == torch.float32
    assert torch.equal(got_acc.cpu(), exp_acc)
    torch.testing.assert_close(got_res.cpu(), exp_res, atol=1e-6, rtol=1e-5)
    return got_acc.cpu(), got_res.cpu()


@pytest.mark.parametrize("rows, k, vocab, seed", [(6, 4, 50, 0), (3, 1, 7, 1), (9, 7, 300, 2), (4, 3, 2500, 3),
                                                   (3, 3, 49152, 11)])  # SmolLM2's vocabulary: 24 tiles
def test_random_shapes_match_contract(rows, k, vocab, seed):
    acc, _ = _check(*_inputs(rows, k, vocab, seed))
    # The draws must exercise both outcomes, or the comparison proves little.
    args = _inputs(rows, k, vocab, seed)
    assert (acc < args[3]).any() or rows < 4


def test_one_hot_argmax_proposals():
    p, tokens, q, nd, u = _inputs(rows=8, k=5, vocab=40, seed=4, one_hot=True)
    acc, res = _check(p, tokens, q, nd, u)
    # One-hot q: accept with probability p[x]; the residual is p with x removed, renormalized.
    for r in range(8):
        if acc[r] < nd[r]:
            j, x = int(acc[r]), int(tokens[r, acc[r]])
            expected = p[r, j].clone()
            expected[x] = 0
            torch.testing.assert_close(res[r], expected / expected.sum(), atol=1e-6, rtol=1e-5)


def test_fewer_drafts_than_positions_ignores_the_tail():
    p, tokens, q, _, u = _inputs(rows=5, k=6, vocab=30, seed=5)
    nd = torch.tensor([0, 1, 2, 6, 3])
    u[:, 3:] = 0.999999  # would reject everywhere past the live drafts
    tokens[0] = 0  # what a caller pads with past num_drafts does not matter
    u[4] = 1.0  # outside [0, 1): min(1, ratio) <= 1 never accepts it, as in the reference, even where p[x] > q[x]
    tokens[4, 0] = (p[4, 0] / q[4, 0]).argmax()
    acc, res = _check(p, tokens, q, nd, u)
    assert acc[0] == 0 and (res[0] == 0).all() and acc[4] == 0
    assert (acc <= nd).all()


def test_all_accepted_rows_give_zero_residual():
    p, tokens, q, nd, u = _inputs(rows=5, k=4, vocab=30, seed=6)
    u.zero_()  # u = 0 < ratio whenever p[x] > 0: every live draft is accepted
    nd = torch.tensor([4, 2, 0, 4, 1])
    acc, res = _check(p, tokens, q, nd, u)
    assert torch.equal(acc, nd) and (res == 0).all()


@pytest.mark.parametrize("alpha", [0.5, 0.8])
def test_verify_alpha_below_one(alpha):
    p, tokens, q, _, u = _inputs(rows=10, k=4, vocab=60, seed=7, closeness=2.0)
    nd = torch.full((10,), 4)
    acc_a, _ = _check(p, tokens, q, nd, u, alpha)
    acc_1, _ = _check(p, tokens, q, nd, u, 1.0)
    assert (acc_a >= acc_1).all() and (acc_a > acc_1).any()


def test_zero_residual_falls_back_to_p():
    p, tokens, q, nd, u = _inputs(rows=3, k=3, vocab=20, seed=8)
    q = p.clone()
    nd = torch.tensor([3, 3, 2])
    # Row 0: a draft the model gives zero mass (p[x] = q[x] = 0) is rejected; p - q = 0 everywhere -> p.
    p[0, 1, 5] = 0.0
    p[0, 1] /= p[0, 1].sum()
    q = p.clone()
    tokens[0, 1] = 5
    u[0] = torch.tensor([0.0, 0.5, 0.5])
    acc, res = _check(p, tokens, q, nd, u)
    assert acc[0] == 1
    torch.testing.assert_close(res[0], p[0, 1])


def test_zero_residual_with_alpha_above_one():
    p, tokens, q, nd, u = _inputs(rows=4, k=3, vocab=20, seed=9)
    q = p.clone()  # ratio = 1 / alpha; p - alpha q <= 0 everywhere
    u.fill_(0.9)
    nd = torch.full((4,), 3)
    acc, res = _check(p, tokens, q, nd, u, alpha=1.5)
    assert (acc == 0).all()
    torch.testing.assert_close(res, p[:, 0])


def test_empty_rows():
    p, tokens, q, nd, u = _inputs(rows=0, k=3, vocab=10)
    acc, res = _triton()(*(t.to(DEVICE) for t in (p, tokens, q, nd, u)))
    assert acc.shape == (0,) and res.shape == (0, 10)


def test_dispatcher_takes_the_triton_path_when_forced(monkeypatch):
    import hf_fastslow.kernels.isd_verify_triton as twin

    calls = []
    real = twin.isd_verify_triton
    monkeypatch.setattr(twin, "isd_verify_triton", lambda *a, **k: calls.append(1) or real(*a, **k))
    args = [t.to(DEVICE) for t in _inputs(rows=2, k=2, vocab=9)]
    with force_backend("triton"):
        got = isd_verify(*args)
    with force_backend("torch"):
        expected = isd_verify(*args)
    assert calls == [1]
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], atol=1e-6, rtol=1e-5)


def test_bad_arguments_raise_like_the_reference():
    p, tokens, q, nd, u = _inputs(rows=2, k=3, vocab=9)
    with pytest.raises(ValueError, match="verify_alpha"):
        _triton()(p, tokens, q, nd, u, verify_alpha=0.0)
    with pytest.raises(ValueError, match="num_drafts"):
        _triton()(p, tokens, q, nd[:1], u)
    with pytest.raises(TypeError, match="long"):
        _triton()(p, tokens.int(), q, nd, u)
