"""The PyTorch ISD verify (kernels/isd_verify.py) against the contract written as a plain per-row loop, plus the
statistical property it exists for: accept-or-correct draws follow p."""

import pytest
import torch

from hf_fastslow.kernels import force_backend
from hf_fastslow.kernels.isd_verify import isd_verify, isd_verify_reference


def per_row_oracle(p, tokens, q, num_drafts, uniforms, alpha=1.0):
    rows, _, vocab = p.shape
    accepted = torch.zeros(rows, dtype=torch.long)
    residual = torch.zeros(rows, vocab, dtype=torch.float32)
    for r in range(rows):
        n = int(num_drafts[r])
        stop = n
        for k in range(n):
            x = int(tokens[r, k])
            ratio = min(1.0, float(p[r, k, x]) / (alpha * float(q[r, k, x]))) if float(q[r, k, x]) > 0 else (
                1.0 if float(p[r, k, x]) > 0 else float("nan"))
            if not float(uniforms[r, k]) < ratio:
                stop = k
                break
        accepted[r] = stop
        if stop < n:
            diff = (p[r, stop] - alpha * q[r, stop]).clamp(min=0)
            residual[r] = diff / diff.sum() if float(diff.sum()) > 0 else p[r, stop]
    return accepted, residual


def make_inputs(rows=7, k=4, vocab=23, seed=0, one_hot=False, spread=1.0):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(rows, k, vocab, generator=g) * 2
    p = torch.softmax(logits, -1)
    q_logits = logits + torch.randn(rows, k, vocab, generator=g) * spread
    q = torch.softmax(q_logits, -1)
    if one_hot:
        tokens = q_logits.argmax(-1)
        q = torch.nn.functional.one_hot(tokens, vocab).float()
    else:
        tokens = torch.multinomial(q.reshape(-1, vocab), 1, generator=g).reshape(rows, k)
    num_drafts = torch.randint(0, k + 1, (rows,), generator=g)
    uniforms = torch.rand(rows, k, generator=g)
    return p, tokens, q, num_drafts, uniforms


@pytest.mark.parametrize("one_hot", [False, True])
@pytest.mark.parametrize("alpha", [1.0, 0.5])
@pytest.mark.parametrize("seed", range(4))
def test_reference_matches_per_row_loop(one_hot, alpha, seed):
    args = make_inputs(seed=seed, one_hot=one_hot)
    accepted, residual = isd_verify_reference(*args, verify_alpha=alpha)
    want_accepted, want_residual = per_row_oracle(*args, alpha=alpha)
    assert torch.equal(accepted, want_accepted)
    torch.testing.assert_close(residual, want_residual, atol=1e-6, rtol=1e-5)
    assert accepted.dtype == torch.long and residual.dtype == torch.float32


def test_edge_cases_identical_p_q_zero_residual_and_zero_drafts():
    p, tokens, q, num_drafts, uniforms = make_inputs(rows=4, k=3)
    # q == p: every draft is accepted (ratio 1 > u); all-accepted rows get a zero residual.
    accepted, residual = isd_verify_reference(p, tokens, p.clone(), num_drafts, uniforms)
    assert torch.equal(accepted, num_drafts)
    assert torch.count_nonzero(residual) == 0
    # alpha*q >= p everywhere at the rejected position: the residual falls back to p.
    q_big = torch.full_like(p, 1.0)
    zero_p = p.clone()
    zero_p[:, :, :] = 0
    zero_p[..., 0] = 1.0  # p is a point mass on token 0
    tokens = torch.full_like(tokens, 1)  # drafted token 1: p[x] = 0 -> rejected at k = 0
    acc, res = isd_verify_reference(zero_p, tokens, q_big, torch.full((4,), 3), uniforms)
    assert torch.equal(acc, torch.zeros(4, dtype=torch.long))
    assert torch.equal(res, zero_p[:, 0])
    # K = 0
    acc, res = isd_verify_reference(p[:, :0], tokens[:, :0], q[:, :0], torch.zeros(4, dtype=torch.long),
                                    uniforms[:, :0])
    assert acc.tolist() == [0] * 4 and res.shape == (4, p.shape[-1]) and torch.count_nonzero(res) == 0


def test_dispatcher_uses_reference_on_cpu_torch_backend():
    args = make_inputs(seed=5)
    with force_backend("torch"):
        got = isd_verify(*args)
    want = isd_verify_reference(*args)
    assert all(torch.equal(a, b) for a, b in zip(got, want))
    assert isd_verify.reference is isd_verify_reference


@pytest.mark.parametrize("one_hot", [False, True])
def test_accept_or_correct_follows_p(one_hot):
    """One position, many rows: the token kept (draft if accepted, else a residual sample) is distributed as p."""
    vocab, rows = 5, 40000
    g = torch.Generator().manual_seed(1)
    p1 = torch.softmax(torch.randn(vocab, generator=g) * 1.5, -1)
    q1 = torch.softmax(torch.randn(vocab, generator=g) * 1.5, -1)
    p = p1.expand(rows, 1, vocab).contiguous()
    if one_hot:
        tokens = torch.full((rows, 1), int(q1.argmax()))
        q = torch.nn.functional.one_hot(tokens, vocab).float()
    else:
        tokens = torch.multinomial(q1, rows, replacement=True, generator=g)[:, None]
        q = q1.expand(rows, 1, vocab).contiguous()
    accepted, residual = isd_verify_reference(p, tokens, q, torch.ones(rows, dtype=torch.long),
                                              torch.rand(rows, 1, generator=g))
    rejected = accepted == 0
    kept = tokens[:, 0].clone()
    kept[rejected] = torch.multinomial(residual[rejected], 1, generator=g)[:, 0]
    freq = torch.bincount(kept, minlength=vocab).float() / rows
    assert torch.allclose(freq, p1, atol=0.012), (freq, p1)


def test_bad_shapes_raise():
    p, tokens, q, n, u = make_inputs()
    with pytest.raises(ValueError, match="draft_probs"):
        isd_verify_reference(p, tokens, q[:, :2], n, u)
    with pytest.raises(ValueError, match="num_drafts"):
        isd_verify_reference(p, tokens, q, n[:2], u)
    with pytest.raises(TypeError, match="long"):
        isd_verify_reference(p, tokens.int(), q, n, u)
    with pytest.raises(ValueError, match="verify_alpha"):
        isd_verify_reference(p, tokens, q, n, u, verify_alpha=0.0)
