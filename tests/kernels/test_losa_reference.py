"""LOSA's PyTorch references (kernels/losa.py): page summaries and scores, union page selection, union-sparse prefix
attention, and its merge with the in-block part through `lse_merge`."""

import pytest
import torch

from hf_fastslow.kernels.ear import dense_attention_lse
from hf_fastslow.kernels.losa import (
    prefix_attention_lse,
    quest_page_scores,
    quest_page_summaries,
    select_union_pages,
    union_sparse_prefix_attention,
    union_sparse_prefix_attention_reference,
)
from hf_fastslow.kernels.lse_merge import lse_merge


def _qkv(hq=6, hkv=2, a=5, p=45, d=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(hq, a, d, generator=g, dtype=dtype), torch.randn(hkv, p, d, generator=g, dtype=dtype),
            torch.randn(hkv, p, d, generator=g, dtype=dtype))


def _all_pages(hkv, p, page_size):
    n = -(-p // page_size)
    return torch.arange(n).expand(hkv, n).clone()


def _softmax_attention(q, k, v, mask, scale):
    """Plain softmax attention in the inputs' dtype: q (Hq, A, d), k/v (Hkv, N, d), mask (A, N) -> (out, lse)."""
    group = q.shape[0] // k.shape[0]
    k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
    logits = (q @ k.transpose(-1, -2) * scale).masked_fill(~mask, float("-inf"))
    return torch.softmax(logits, -1) @ v, torch.logsumexp(logits, -1)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-6), (torch.float64, 1e-12)])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2), (9, 3)])
def test_prefix_and_block_merged_by_lse_equal_softmax_over_the_concatenation(dtype, atol, hq, hkv):
    q, k, v = _qkv(hq, hkv, a=7, p=45, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    kb, vb = torch.randn(hkv, 7, 8, generator=g, dtype=dtype), torch.randn(hkv, 7, 8, generator=g, dtype=dtype)
    key_valid = torch.ones(45, dtype=torch.bool)
    key_valid[:5] = False  # left padding of the prefix
    block_mask = torch.rand(7, 7, generator=g) > 0.3
    block_mask |= torch.eye(7, dtype=torch.bool)
    scale = 8 ** -0.5
    o_p, l_p = union_sparse_prefix_attention(q, k, v, _all_pages(hkv, 45, 16), 16, scale, key_valid)
    ref_p, ref_lp = _softmax_attention(q, k, v, key_valid.expand(7, 45), scale)
    # the prefix part keeps the input precision (fp64 stays fp64)
    assert o_p.dtype == dtype and l_p.dtype == dtype
    torch.testing.assert_close(o_p, ref_p, atol=atol, rtol=atol)
    torch.testing.assert_close(l_p, ref_lp, atol=atol, rtol=atol)
    o_b, l_b = _softmax_attention(q, kb, vb, block_mask, scale)
    out, lse = lse_merge(o_p, l_p, o_b, l_b)
    ref, ref_lse = _softmax_attention(q, torch.cat([k, kb], 1), torch.cat([v, vb], 1),
                                      torch.cat([key_valid.expand(7, 45), block_mask], dim=1), scale)
    # lse_merge computes its weights in fp32 whatever the input dtype: fp32 accuracy for both
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse.double(), ref_lse.double(), atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.parametrize("page_size", [1, 4, 16])
def test_page_score_bounds_the_group_summed_qk_of_every_key_in_the_page(seed, page_size):
    q, k, _ = _qkv(hq=6, hkv=2, a=9, p=53, seed=seed, dtype=torch.float64)
    kmin, kmax = quest_page_summaries(k, page_size)
    scores = quest_page_scores(q, kmin, kmax)  # (Hkv, A, n_pages)
    exact = torch.einsum("gjad,gpd->gap", q.view(2, 3, 9, 8), k)  # group-summed q.k per key
    n_pages = -(-53 // page_size)
    pad = n_pages * page_size - 53
    exact = torch.cat([exact, exact.new_full((2, 9, pad), float("-inf"))], -1)
    page_max = exact.view(2, 9, n_pages, page_size).amax(-1)
    assert scores.shape == (2, 9, n_pages)
    assert bool((scores.double() >= page_max - 1e-5).all())
    if page_size == 1:  # a one-key page: the bound is the exact score
        torch.testing.assert_close(scores.double(), page_max, atol=1e-5, rtol=1e-5)


def test_page_summaries_cover_a_partial_last_page():
    k = torch.arange(2 * 10 * 3, dtype=torch.float32).view(2, 10, 3)
    kmin, kmax = quest_page_summaries(k, 4)
    assert kmin.shape == (2, 3, 3)
    torch.testing.assert_close(kmin[:, 2], k[:, 8:10].amin(1))
    torch.testing.assert_close(kmax[:, 2], k[:, 8:10].amax(1))
    torch.testing.assert_close(kmax[:, 0], k[:, 0:4].amax(1))
    assert quest_page_summaries(k[:, :0], 4)[0].shape == (2, 0, 3)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (6, 2)])
def test_full_selection_equals_dense_attention_and_page_order_does_not_matter(hq, hkv):
    q, k, v = _qkv(hq, hkv, a=5, p=45)
    scale = 0.3
    dense_out, dense_lse = dense_attention_lse(q[None], k[None], v[None], None, scale)
    pages = _all_pages(hkv, 45, 8)
    out, lse = union_sparse_prefix_attention(q, k, v, pages, 8, scale)
    torch.testing.assert_close(out, dense_out[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse, dense_lse[0], atol=1e-6, rtol=1e-5)
    shuffled = torch.cat([pages.flip(1), torch.full((hkv, 3), -1)], 1)  # reversed, with unused slots
    out2, lse2 = union_sparse_prefix_attention(q, k, v, shuffled, 8, scale)
    torch.testing.assert_close(out2, out, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(lse2, lse, atol=1e-6, rtol=1e-5)
    pre_out, pre_lse = prefix_attention_lse(q, k, v, scale)
    torch.testing.assert_close(pre_out, dense_out[0], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(pre_lse, dense_lse[0], atol=1e-6, rtol=1e-5)


def test_subset_selection_equals_dense_attention_over_exactly_those_keys_per_kv_head():
    q, k, v = _qkv(6, 2, a=4, p=37)
    page_index = torch.tensor([[4, 0, -1], [1, 2, -1]])  # head 0: keys 0..7 + 32..36 (partial page); head 1: 8..23
    key_valid = torch.ones(37, dtype=torch.bool)
    key_valid[2] = False
    out, lse = union_sparse_prefix_attention(q, k, v, page_index, 8, 0.5, key_valid)
    for g, keys in enumerate([[0, 1, 3, 4, 5, 6, 7, 32, 33, 34, 35, 36], list(range(8, 24))]):
        heads = slice(3 * g, 3 * g + 3)
        ref, ref_lse = dense_attention_lse(q[None, heads], k[None, g:g + 1, keys], v[None, g:g + 1, keys], None, 0.5)
        torch.testing.assert_close(out[heads], ref[0], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(lse[heads], ref_lse[0], atol=1e-6, rtol=1e-5)


def test_no_selected_key_gives_zero_output_and_minus_inf_lse():
    q, k, v = _qkv(4, 2, a=3, p=20)
    out, lse = union_sparse_prefix_attention(q, k, v, torch.full((2, 2), -1), 8, 0.5)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    out, lse = union_sparse_prefix_attention(q, k, v, torch.zeros(2, 0, dtype=torch.long), 8, 0.5)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())
    # a selected page whose keys are all invalid counts as empty as well
    valid = torch.ones(20, dtype=torch.bool)
    valid[:8] = False
    out, lse = union_sparse_prefix_attention(q, k, v, torch.tensor([[0], [0]]), 8, 0.5, valid)
    assert torch.equal(out, torch.zeros_like(out)) and bool(torch.isneginf(lse).all())


def test_bad_arguments_are_refused():
    q, k, v = _qkv(4, 2, a=3, p=20)
    with pytest.raises(ValueError, match="page_size"):
        union_sparse_prefix_attention_reference(q, k, v, torch.zeros(2, 1, dtype=torch.long), 0, 0.5)
    with pytest.raises(ValueError, match="twice"):
        union_sparse_prefix_attention_reference(q, k, v, torch.tensor([[1, 1], [0, -1]]), 8, 0.5)
    with pytest.raises(ValueError, match="lie in"):
        union_sparse_prefix_attention_reference(q, k, v, torch.tensor([[3], [0]]), 8, 0.5)
    with pytest.raises(ValueError, match="multiple"):
        union_sparse_prefix_attention_reference(q[:3], k, v, torch.zeros(2, 1, dtype=torch.long), 8, 0.5)
    with pytest.raises(ValueError, match="page_size"):
        quest_page_summaries(k, -1)


def test_union_page_selection_is_the_set_union_of_each_querys_top_pages():
    g = torch.Generator().manual_seed(3)
    scores = torch.randn(3, 5, 11, generator=g)
    page_valid = torch.ones(11, dtype=torch.bool)
    page_valid[0] = False
    index = select_union_pages(scores, 2, page_valid)
    for head in range(3):
        expect = set()
        for a in range(5):
            ranked = [p for p in scores[head, a].argsort(descending=True).tolist() if p != 0]
            expect |= set(ranked[:2])
        got = [p for p in index[head].tolist() if p >= 0]
        assert got == sorted(expect)
    assert index.shape[1] == max(len([p for p in row if p >= 0]) for row in index.tolist())
    assert select_union_pages(scores[:, :0], 2).shape == (3, 0)
    assert select_union_pages(scores, 50).shape == (3, 11)  # more pages asked than exist: all of them


def test_dispatch_takes_the_reference_on_cpu_and_a_missing_twin_disables_the_triton_path():
    from hf_fastslow.kernels.dispatch import force_backend
    from hf_fastslow.kernels.losa import _twin

    assert _twin("hf_fastslow.kernels.no_such_losa_twin:f") is None  # a twin not written yet: reference only
    assert union_sparse_prefix_attention.reference is union_sparse_prefix_attention_reference
    q, k, v = _qkv(4, 2, a=3, p=20)
    with force_backend("torch"):
        out, lse = union_sparse_prefix_attention(q, k, v, _all_pages(2, 20, 8), 8, 0.5)
    ref, ref_lse = union_sparse_prefix_attention_reference(q, k, v, _all_pages(2, 20, 8), 8, 0.5)
    assert torch.equal(out, ref) and torch.equal(lse, ref_lse)
