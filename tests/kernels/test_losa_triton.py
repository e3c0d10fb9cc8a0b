"""LOSA's Triton union-sparse prefix attention (kernels/losa_triton.py) against a dense softmax over the gathered
keys written here, and against the PyTorch reference in kernels/losa.py.

On a CPU-only machine the kernel runs under TRITON_INTERPRET=1 (set by tests/conftest.py before any kernel import);
shapes stay small.
"""

import math

import pytest
import torch

from hf_fastslow.kernels.dispatch import force_backend
from hf_fastslow.kernels.losa import union_sparse_prefix_attention
from hf_fastslow.kernels.testing import assert_matches_reference, triton_runnable

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

pytestmark = pytest.mark.skipif(
    not triton_runnable(DEVICE), reason="needs triton on CUDA, or TRITON_INTERPRET=1 set before the kernels import"
)


def _triton():
    from hf_fastslow.kernels.losa_triton import union_sparse_prefix_attention_triton

    return union_sparse_prefix_attention_triton


def gathered_dense(query, key, value, page_index, page_size, scale, key_valid=None):
    """Per KV head: collect the keys of the listed pages (skip -1, clip at P, drop invalid), dense softmax in fp64."""
    hq, active, dim = query.shape
    hkv, num_keys, _ = key.shape
    group = hq // hkv
    out = torch.zeros(hq, active, dim, dtype=torch.float64)
    lse = torch.full((hq, active), float("-inf"), dtype=torch.float64)
    for g in range(hkv):
        keys = [j for page in page_index[g].tolist() if page >= 0
                for j in range(page * page_size, min((page + 1) * page_size, num_keys))
                if key_valid is None or bool(key_valid[j])]
        if not keys:
            continue
        idx = torch.tensor(keys)
        k, v = key[g, idx].double(), value[g, idx].double()
        for h in range(g * group, (g + 1) * group):
            logits = scale * query[h].double() @ k.T
            lse[h] = torch.logsumexp(logits, -1)
            out[h] = torch.softmax(logits, -1) @ v
    return out, lse


def _inputs(hq=4, hkv=2, active=3, num_keys=37, dim=16, page_size=8, slots=3, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(hq, active, dim, generator=g).to(dtype)
    k = torch.randn(hkv, num_keys, dim, generator=g).to(dtype)
    v = torch.randn(hkv, num_keys, dim, generator=g).to(dtype)
    n_pages = math.ceil(num_keys / page_size)
    pages = torch.stack([torch.randperm(n_pages, generator=g)[:slots] for _ in range(hkv)])
    return q, k, v, pages


def _check(q, k, v, pages, page_size, key_valid=None, atol=1e-5):
    """Triton == the PyTorch reference (kernels/losa.py) == a dense softmax over the gathered keys (fp64)."""
    scale = q.shape[-1] ** -0.5
    to = [t.to(DEVICE) for t in (q, k, v, pages)]
    valid = key_valid.to(DEVICE) if key_valid is not None else None
    out, lse = _triton()(*to, page_size, scale, valid)
    assert_matches_reference(union_sparse_prefix_attention, *to, page_size, scale, valid, atol=atol, rtol=1e-4)
    exp_out, exp_lse = gathered_dense(q.float(), k.float(), v.float(), pages, page_size, scale, key_valid)
    assert out.dtype == q.dtype and lse.dtype == torch.promote_types(q.dtype, torch.float32)
    assert out.shape == q.shape and lse.shape == q.shape[:2]
    torch.testing.assert_close(out.cpu().double(), exp_out, atol=atol, rtol=1e-4)
    torch.testing.assert_close(lse.cpu().double(), exp_lse, atol=atol, rtol=1e-5)
    return out.cpu(), lse.cpu()


@pytest.mark.parametrize("hq, hkv, active, num_keys, dim, page_size, slots, seed", [
    (4, 2, 3, 37, 16, 8, 3, 0),     # GQA, partial last page (37 = 4 * 8 + 5)
    (4, 4, 5, 40, 12, 4, 6, 1),     # MHA, head dim not a power of two
    (9, 3, 2, 50, 16, 16, 4, 2),    # SmolLM2's 9 q / 3 kv ratio; the page list covers every page
    (2, 1, 17, 70, 32, 5, 5, 3),    # more rows than one tile (2 * 17 = 34 > 32); odd page size
    (4, 2, 1, 24, 16, 40, 1, 4),    # one page larger than the prefix (page_size > P)
])
def test_matches_gathered_dense(hq, hkv, active, num_keys, dim, page_size, slots, seed):
    _check(*_inputs(hq, hkv, active, num_keys, dim, page_size, slots, seed), page_size)


def test_unused_slots_are_skipped_and_empty_heads_give_zero():
    q, k, v, pages = _inputs(hq=4, hkv=2, num_keys=40, page_size=8, slots=4, seed=5)
    pages[0, 1] = -1
    pages[0, 3] = -1
    pages[1] = -1  # KV head 1 selects nothing: out 0, lse -inf
    out, lse = _check(q, k, v, pages, 8)
    assert (out[2:] == 0).all() and torch.isinf(lse[2:]).all() and (lse[2:] < 0).all()


def test_key_valid_mask():
    q, k, v, pages = _inputs(hq=4, hkv=2, num_keys=37, page_size=8, slots=5, seed=6)
    valid = torch.rand(37, generator=torch.Generator().manual_seed(1)) > 0.4
    valid[16:24] = False  # page 2 wholly invalid
    _check(q, k, v, pages, 8, key_valid=valid)
    # Only invalid keys selected: nothing to attend to.
    only_invalid = torch.tensor([[2, -1], [-1, 2]])
    out, lse = _check(q, k, v, only_invalid, 8, key_valid=valid)
    assert (out == 0).all() and torch.isinf(lse).all()


def test_full_page_list_equals_dense_attention():
    q, k, v, _ = _inputs(hq=6, hkv=2, active=4, num_keys=45, dim=16, seed=7)
    pages = torch.arange(6).repeat(2, 1)  # every page of 8, the last partial
    out, lse = _triton()(*(t.to(DEVICE) for t in (q, k, v, pages)), 8, 0.25)
    kr, vr = k.repeat_interleave(3, 0), v.repeat_interleave(3, 0)
    logits = 0.25 * q @ kr.transpose(-1, -2)
    torch.testing.assert_close(out.cpu(), torch.softmax(logits, -1) @ vr, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.cpu(), torch.logsumexp(logits, -1), atol=1e-5, rtol=1e-5)


def test_half_precision_inputs():
    q, k, v, pages = _inputs(seed=8, dtype=torch.float16)
    _check(q, k, v, pages, 8, atol=3e-3)


def test_fp64_inputs_keep_the_reference_dtypes():
    q, k, v, pages = _inputs(seed=9, dtype=torch.float64)
    _check(q, k, v, pages, 8)


def test_dispatcher_takes_the_triton_path_when_forced(monkeypatch):
    import hf_fastslow.kernels.losa_triton as twin

    calls = []
    real = twin.union_sparse_prefix_attention_triton
    monkeypatch.setattr(twin, "union_sparse_prefix_attention_triton",
                        lambda *a, **kw: calls.append(1) or real(*a, **kw))
    q, k, v, pages = (t.to(DEVICE) for t in _inputs(seed=10))
    with force_backend("triton"):
        got = union_sparse_prefix_attention(q, k, v, pages, 8, 0.25)
    with force_backend("torch"):
        expected = union_sparse_prefix_attention(q, k, v, pages, 8, 0.25)
    assert calls == [1]
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


def test_bad_shapes_raise():
    q, k, v, pages = _inputs()
    with pytest.raises(ValueError, match="multiple"):
        _triton()(q[:3], k, v, pages, 8, 0.25)
    with pytest.raises(ValueError, match="page_index"):
        _triton()(q, k, v, pages[:1], 8, 0.25)
    with pytest.raises(ValueError, match="page_size"):
        _triton()(q, k, v, pages, 0, 0.25)
    with pytest.raises(ValueError, match="key_valid"):
        _triton()(q, k, v, pages, 8, 0.25, torch.ones(37, dtype=torch.int8))
