"""The LSE-merge op (kernels/lse_merge.py): attention over a union of disjoint key sets from its two partials."""

import math

import pytest
import torch

from hf_fastslow.kernels.ear import dense_attention_lse
from hf_fastslow.kernels.lse_merge import lse_merge, lse_merge_reference
from hf_fastslow.kernels.testing import assert_matches_reference, triton_runnable


def _partials(seed=0, nk=40, split=None):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(2, 3, n, 8, generator=g) for n in (5, nk, nk))
    perm = torch.randperm(nk, generator=g)
    a, b = perm[: split or nk // 3], perm[split or nk // 3:]
    scale = 8 ** -0.5
    full = dense_attention_lse(q, k, v, None, scale)
    return full, dense_attention_lse(q, k[:, :, a], v[:, :, a], None, scale), dense_attention_lse(
        q, k[:, :, b], v[:, :, b], None, scale)


@pytest.mark.parametrize("seed", [0, 1])
def test_merging_two_disjoint_partials_equals_attention_over_the_union(seed):
    (o, lse), (o1, l1), (o2, l2) = _partials(seed)
    merged, merged_lse = lse_merge_reference(o1, l1, o2, l2)
    torch.testing.assert_close(merged, o, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(merged_lse, lse, atol=1e-6, rtol=1e-5)
    # symmetric in its two partials
    swapped, swapped_lse = lse_merge_reference(o2, l2, o1, l1)
    torch.testing.assert_close(swapped, merged, atol=1e-7, rtol=1e-6)


def test_empty_partials_are_ignored_and_two_empties_give_zero_not_nan():
    o1, o2 = torch.randn(4, 6), torch.full((4, 6), float("nan"))  # an empty partial's output may hold anything
    l1 = torch.tensor([0.5, -1.0, float("-inf"), 3.0])
    l2 = torch.tensor([float("-inf"), float("-inf"), float("-inf"), float("-inf")])
    out, lse = lse_merge_reference(o1, l1, o2, l2)
    assert torch.equal(out[[0, 1, 3]], o1[[0, 1, 3]]) and torch.equal(lse[[0, 1, 3]], l1[[0, 1, 3]])
    assert torch.equal(out[2], torch.zeros(6)) and lse[2].item() == -math.inf


def test_large_logits_do_not_overflow_and_half_outputs_keep_their_dtype():
    o1, o2 = torch.ones(3, 4, dtype=torch.float16), -torch.ones(3, 4, dtype=torch.float16)
    l1, l2 = torch.full((3,), 1000.0), torch.full((3,), 1000.0)
    out, lse = lse_merge_reference(o1, l1, o2, l2)
    assert out.dtype == torch.float16 and torch.equal(out, torch.zeros(3, 4, dtype=torch.float16))
    torch.testing.assert_close(lse, torch.full((3,), 1000.0 + math.log(2.0)))


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        lse_merge(torch.zeros(2, 3), torch.zeros(2), torch.zeros(2, 4), torch.zeros(2))
    with pytest.raises(ValueError, match="log-sum-exps"):
        lse_merge(torch.zeros(2, 3), torch.zeros(3), torch.zeros(2, 3), torch.zeros(2))


@pytest.mark.skipif(not triton_runnable("cpu"), reason="needs triton with TRITON_INTERPRET=1 (or CUDA)")
def test_triton_kernel_matches_the_reference():
    (_, _), (o1, l1), (o2, l2) = _partials(3, nk=30, split=7)
    l1 = l1.clone()
    l1[0, 0, :2] = float("-inf")
    l2 = l2.clone()
    l2[0, 0, 1] = float("-inf")  # row 1 of head 0: both empty
    assert_matches_reference(lse_merge, o1, l1, o2, l2, atol=1e-6)
    assert_matches_reference(lse_merge, o1[..., :5].contiguous(), l1, o2[..., :5].contiguous(), l2, atol=1e-6)
