"""SVG-EAR attention (kernels/ear.py), PyTorch reference: exactness cases, routing budget, causality, errors."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_fastslow.kernels.dispatch import force_backend
from hf_fastslow.kernels.ear import EARState, ear_attention, route_blocks

PEERS = [("error", True), ("score", True), ("score", False)]


@pytest.fixture(autouse=True)
def _reference_backend():
    with force_backend("torch"):
        yield


def _qkv(b=1, hq=4, hk=2, nq=48, nk=64, d=16, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(b, hq, nq, d, generator=g)
    k = torch.randn(b, hk, nk, d, generator=g)
    v = torch.randn(b, hk, nk, d, generator=g)
    return q.to(dtype), k.to(dtype), v.to(dtype)


def _sdpa(q, k, v, causal=False):
    mask = None
    if causal:
        mask = torch.ones(q.shape[2], k.shape[2], dtype=torch.bool).tril(k.shape[2] - q.shape[2])
    return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)


@pytest.mark.parametrize("router, compensate", PEERS)
def test_density_one_is_sdpa(router, compensate):
    q, k, v = _qkv(b=2)
    out, info = ear_attention(q, k, v, density=1.0, num_q_clusters=6, num_k_clusters=7, router=router,
                              compensate=compensate, return_info=True)
    torch.testing.assert_close(out, _sdpa(q, k, v), atol=1e-5, rtol=1e-5)
    assert info.density == 1.0


@pytest.mark.parametrize("density", [0.0, 0.3])
@pytest.mark.parametrize("router", ["error", "score"])
def test_singleton_key_clusters_are_exact_at_any_density(density, router):
    q, k, v = _qkv()
    # more clusters than keys: capped at one cluster per key (not an error)
    out, info = ear_attention(q, k, v, density=density, num_q_clusters=5, num_k_clusters=1000, router=router,
                              return_info=True)
    torch.testing.assert_close(out, _sdpa(q, k, v), atol=1e-5, rtol=1e-5)
    assert info.block_mask.shape[-1] == 64


def test_duplicated_keys_are_exact_at_any_density():
    g = torch.Generator().manual_seed(1)
    distinct_k, distinct_v = torch.randn(1, 2, 8, 16, generator=g), torch.randn(1, 2, 8, 16, generator=g)
    copies = torch.randint(0, 8, (64,), generator=g)
    copies[:8] = torch.arange(8)
    k, v = distinct_k[:, :, copies], distinct_v[:, :, copies]
    q = torch.randn(1, 4, 32, 16, generator=g)
    for density in (0.0, 0.2):
        # warm-started from the distinct keys, k-means keeps one cluster per distinct key
        state = EARState(k_centroids=distinct_k.clone(), calls=1)
        out = ear_attention(q, k, v, density=density, num_q_clusters=4, num_k_clusters=8, state=state)
        torch.testing.assert_close(out, _sdpa(q, k, v), atol=1e-5, rtol=1e-5)
        assert state.calls == 2


def test_compensation_beats_dropping_and_error_decreases_with_density():
    q, k, v = _qkv(nq=64, nk=96, seed=3)
    ref = _sdpa(q, k, v)
    errors = {}
    for router, compensate in PEERS:
        for density in (0.1, 0.4, 0.8):
            out = ear_attention(q, k, v, density=density, num_q_clusters=8, num_k_clusters=12, router=router,
                                compensate=compensate)
            errors[router, compensate, density] = ((out - ref).norm() / ref.norm()).item()
    for density in (0.1, 0.4, 0.8):
        assert errors["score", True, density] < errors["score", False, density]
    for peer in PEERS:
        assert errors[(*peer, 0.8)] < errors[(*peer, 0.1)]


@pytest.mark.parametrize("router, compensate", PEERS)
def test_budget_respected_within_one_block_and_selection_monotone(router, compensate):
    q, k, v = _qkv(b=2, nq=64, nk=80, seed=4)
    previous = None
    for density in (0.0, 0.05, 0.2, 0.5, 0.9):
        _, info = ear_attention(q, k, v, density=density, num_q_clusters=6, num_k_clusters=10, router=router,
                                compensate=compensate, return_info=True)
        cost, mask = info.block_cost, info.block_mask
        spent = torch.where(mask, cost, 0).sum((-2, -1))
        budget = math.floor(density * 64 * 80)
        largest = cost.flatten(-2).max(-1).values
        if compensate:
            assert (spent <= budget).all() and (budget - spent < largest).all(), (density, spent, budget)
        else:  # each query cluster keeps its best block; past those, the same prefix rule
            forced = cost.max(-1).values.sum(-1)
            assert (spent <= torch.clamp(forced, min=budget)).all()
            assert ((mask.any(-1)) | (cost.sum(-1) == 0)).all()
        if previous is not None:
            assert (mask | ~previous).all(), f"a block chosen at a lower density was dropped at {density}"
        previous = mask


@pytest.mark.parametrize("seed", [0, 1])
def test_error_router_never_worse_than_score_router_on_the_probe_objective(seed):
    q, k, v = _qkv(nq=64, nk=96, seed=10 + seed)
    for density in (0.05, 0.1, 0.2, 0.3):
        common = dict(density=density, num_q_clusters=8, num_k_clusters=12, return_info=True)
        _, by_error = ear_attention(q, k, v, router="error", **common)
        _, by_score = ear_attention(q, k, v, router="score", **common)
        # same clustering (same seed), same probe; the objective is the probe error left uncomputed
        assert torch.equal(by_error.probe_error, by_score.probe_error)
        left_error = by_error.probe_error[~by_error.block_mask].sum()
        left_score = by_score.probe_error[~by_score.block_mask].sum()
        assert left_error <= left_score + 1e-6, (density, left_error, left_score)
        # the error router's choice is a prefix of the error-to-size order: no skipped block has a higher ratio
        # (one block map per batch row and KV head)
        ratio = (by_error.probe_error / by_error.block_cost.clamp(min=1)).flatten(0, 1)
        live, mask = (by_error.block_cost > 0).flatten(0, 1), by_error.block_mask.flatten(0, 1)
        for r, m, ok in zip(ratio, mask, live):
            chosen, skipped = r[m & ok], r[~m & ok]
            if chosen.numel() and skipped.numel():
                assert chosen.min() >= skipped.max() * (1 - 1e-5), density


def test_route_blocks_takes_the_prefix_of_the_priority_order():
    priority = torch.tensor([[[3.0, 1.0], [2.0, float("-inf")]]])
    cost = torch.tensor([[[4, 4], [2, 0]]])
    assert route_blocks(priority, cost, torch.tensor([6])).tolist() == [[[True, False], [True, False]]]
    # the third block (cost 4) does not fit in 7: the prefix stops there
    assert route_blocks(priority, cost, torch.tensor([7])).tolist() == [[[True, False], [True, False]]]
    assert route_blocks(priority, cost, torch.tensor([3])).tolist() == [[[False, False], [False, False]]]
    per_row = route_blocks(priority, cost, torch.tensor([[4, 9]]), per_row=True)
    assert per_row.tolist() == [[[True, False], [True, False]]]


@pytest.mark.parametrize("nq, nk, chunk", [(70, 70, 16), (25, 70, 16), (64, 64, 64), (7, 70, 16)])
def test_causal_density_one_is_causal_sdpa(nq, nk, chunk):
    q, k, v = _qkv(nq=nk, nk=nk, seed=5)
    q = q[:, :, nk - nq:]
    out, info = ear_attention(q, k, v, density=1.0, causal=True, causal_chunk=chunk, num_q_clusters=4,
                              num_k_clusters=4, return_info=True)
    torch.testing.assert_close(out, _sdpa(q, k, v, causal=True), atol=1e-5, rtol=1e-5)
    assert info.density == 1.0


@pytest.mark.parametrize("router, compensate", PEERS)
def test_causal_chunking_future_tokens_never_change_earlier_outputs(router, compensate):
    q, k, v = _qkv(nq=80, nk=80, seed=6)
    kw = dict(density=0.2, causal=True, causal_chunk=16, num_q_clusters=4, num_k_clusters=4, router=router,
              compensate=compensate)
    base = ear_attention(q, k, v, **kw)
    for t in (40, 57):  # a chunk start and mid-chunk
        q2, k2, v2 = q.clone(), k.clone(), v.clone()
        g = torch.Generator().manual_seed(t)
        for x in (q2, k2, v2):
            x[:, :, t:] = torch.randn(x[:, :, t:].shape, generator=g) * 3
        out = ear_attention(q2, k2, v2, **kw)
        assert torch.equal(out[:, :, :t], base[:, :, :t]), t
        assert not torch.equal(out[:, :, t:], base[:, :, t:])
    # and the error is not zero: chunks 2+ are routed
    assert not torch.allclose(base, _sdpa(q, k, v, causal=True), atol=1e-4)


def test_causal_prefix_of_a_sequence_gives_the_same_outputs():
    q, k, v = _qkv(nq=80, nk=80, seed=7)
    kw = dict(density=0.3, causal=True, causal_chunk=16, num_q_clusters=4, num_k_clusters=4)
    full = ear_attention(q, k, v, **kw)
    part = ear_attention(q[:, :, :50], k[:, :, :50], v[:, :, :50], **kw)
    torch.testing.assert_close(part, full[:, :, :50], atol=1e-6, rtol=1e-6)


def test_half_precision_in_half_out():
    q, k, v = _qkv(dtype=torch.bfloat16)
    out = ear_attention(q, k, v, density=1.0, num_q_clusters=4, num_k_clusters=8)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _sdpa(q, k, v), atol=2e-2, rtol=2e-2)


def test_bad_input_gives_a_clear_error_and_changes_nothing():
    q, k, v = _qkv()
    saved = [t.clone() for t in (q, k, v)]
    cases = [
        (dict(density=-0.1), ValueError, "density must be in"),
        (dict(density=1.5), ValueError, "density must be in"),
        (dict(density=float("nan")), ValueError, "density must be in"),
        (dict(num_k_clusters=0), ValueError, "num_k_clusters"),
        (dict(router="mass"), ValueError, "router"),
        (dict(causal=True, causal_chunk=0), ValueError, "causal_chunk"),
        (dict(causal=True, state=EARState()), ValueError, "non-causal"),
    ]
    for kwargs, err, match in cases:
        with pytest.raises(err, match=match):
            ear_attention(q, k, v, **kwargs)
    with pytest.raises(ValueError, match="head dim"):
        ear_attention(q, k[..., :8], v)
    with pytest.raises(ValueError, match="not a multiple"):
        ear_attention(q[:, :3], k, v)
    with pytest.raises(ValueError, match="Nq <= Nk"):
        ear_attention(q, k[:, :, :20], v[:, :, :20], causal=True)
    with pytest.raises(ValueError, match=r"\(B, H, N, D\)"):
        ear_attention(q[0], k, v)
    for before, after in zip(saved, (q, k, v)):
        assert torch.equal(before, after)
    ear_attention(q, k, v, density=0.2, num_q_clusters=4, num_k_clusters=8)  # a normal call leaves inputs alone too
    for before, after in zip(saved, (q, k, v)):
        assert torch.equal(before, after)
