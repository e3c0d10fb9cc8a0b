"""LOSA attention (modeling/losa.py): exactness at full budget vs SDPA (MHA / GQA, padding), stable reuse, density
bookkeeping vs a brute-force set union, block-boundary resets, the dense fallback, both active-set rules and both
reference rules, every refusal, and the protocol end to end through block_diffusion_generate."""

import math
from types import SimpleNamespace

import pytest
import torch
from transformers import DynamicCache

from hf_fastslow.integrations.caches import cache_kwargs
from hf_fastslow.kernels.losa import quest_page_summaries
from hf_fastslow.modeling.losa import LosaConfig, LosaState, kv_density, losa_attention, register_losa
from tests.conftest import tiny_llama

MASK_ID = 127


@pytest.fixture(scope="module", autouse=True)
def _registered():
    register_losa()


def _model(heads=6, kv_heads=2, layers=2):
    model = tiny_llama(num_layers=layers, hidden=8 * heads, heads=heads, kv_heads=kv_heads)
    model.set_attn_implementation("sdpa")
    return model


def _prefill(model, ids, pad=None, state=None):
    cache = DynamicCache(config=model.config)
    kw = {"losa_state": state} if state is not None else {}
    with torch.no_grad():
        model(input_ids=ids, attention_mask=pad, use_cache=True, **cache_kwargs(model, cache), **kw)
    return cache


def _block_logits(model, cache, block_ids, prefix_valid=None, state=None):
    """One denoising forward of a bidirectional block over the cached prefix; the block's KV is dropped again."""
    prefix, b = cache.get_seq_length(), block_ids.shape[1]
    mask = torch.ones(1, 1, b, prefix + b, dtype=torch.bool)
    if prefix_valid is not None:
        mask[..., :prefix] = prefix_valid.bool()
    kw = {"losa_state": state} if state is not None else {}
    with torch.no_grad():
        out = model(input_ids=block_ids, attention_mask=mask, use_cache=True, **cache_kwargs(model, cache), **kw)
    cache.crop(-b)
    return out.logits


def _denoising_blocks(b=8, steps=3, seed=0):
    """Block contents over `steps` steps: all masked, then more and more slots filled with random tokens."""
    g = torch.Generator().manual_seed(seed)
    final = torch.randint(3, 120, (1, b), generator=g)
    order = torch.randperm(b, generator=g)
    blocks = []
    for s in range(steps):
        ids = torch.full((1, b), MASK_ID)
        filled = order[: (s * b) // steps]
        ids[0, filled] = final[0, filled]
        blocks.append(ids)
    return blocks


def _run_blocks(model, impl, prompt, pad, config, steps=3, b=8):
    model.set_attn_implementation(impl)
    state = LosaState(config, model) if impl == "losa" else None
    cache = _prefill(model, prompt, pad, state)
    logits = []
    if state is not None:
        state.start_block()
    for ids in _denoising_blocks(b, steps):
        logits.append(_block_logits(model, cache, ids, None if pad is None else pad[0], state))
    if state is not None:
        state.end_block()
    model.set_attn_implementation("sdpa")
    return torch.cat(logits), state


@pytest.mark.parametrize("heads,kv_heads", [(4, 4), (6, 2), (9, 3)])
@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("dense_first", [True, False])
def test_full_budget_with_every_token_active_equals_sdpa(heads, kv_heads, padded, dense_first):
    model = _model(heads, kv_heads)
    prompt = torch.randint(3, 120, (1, 45))
    pad = None
    if padded:  # batch 1 with a padding mask: the first 7 positions are padding
        pad = torch.ones(1, 45, dtype=torch.long)
        pad[0, :7] = 0
    config = LosaConfig(budget=64, page_size=8, active_k=8, min_prefix=0, dense_first_step=dense_first)
    dense, _ = _run_blocks(model, "sdpa", prompt, pad, config)
    losa, state = _run_blocks(model, "losa", prompt, pad, config)
    torch.testing.assert_close(losa, dense, atol=2e-5, rtol=1e-5)
    density = kv_density(state)
    # the LOSA path really ran: 2 layers x 3 steps, sparse after the (optional) dense first step, all pages loaded
    assert density["calls"]["fallback"] == 0
    assert density["calls"]["sparse"] == (4 if dense_first else 6)
    assert density["losa"] == pytest.approx(1.0) and density["naive"] == pytest.approx(1.0)


def test_bf16_model_full_budget_stays_close_to_sdpa():
    model = _model().to(torch.bfloat16)
    prompt = torch.randint(3, 120, (1, 45))
    config = LosaConfig(budget=64, page_size=8, active_k=8, min_prefix=0)
    dense, _ = _run_blocks(model, "sdpa", prompt, None, config)
    losa, state = _run_blocks(model, "losa", prompt, None, config)
    assert losa.dtype == torch.bfloat16 and state.counters["sparse"].calls == 4
    torch.testing.assert_close(losa.float(), dense.float(), atol=3e-2, rtol=3e-2)


def test_small_budget_changes_the_logits_so_the_exactness_test_can_fail():
    model = _model()
    prompt = torch.randint(3, 120, (1, 45))
    dense, _ = _run_blocks(model, "sdpa", prompt, None, LosaConfig(budget=8, page_size=8, min_prefix=0))
    losa, state = _run_blocks(model, "losa", prompt, None, LosaConfig(budget=8, page_size=8, active_k=8, min_prefix=0))
    assert not torch.allclose(losa[1:], dense[1:], atol=1e-4)
    torch.testing.assert_close(losa[0], dense[0], atol=2e-5, rtol=1e-5)  # the dense first step is exact
    assert kv_density(state)["losa_sparse_steps"] < 1.0


# -- the attention function driven directly --------------------------------------------------------------------------
def _module(groups, layer_idx=0, training=False, is_causal=False):
    return SimpleNamespace(layer_idx=layer_idx, num_key_value_groups=groups, is_causal=is_causal, training=training)


def _tensors(hq=6, hkv=2, prefix=100, b=6, d=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(1, hq, b, d, generator=g)
    k, v = torch.randn(1, hkv, prefix + b, d, generator=g), torch.randn(1, hkv, prefix + b, d, generator=g)
    return q, k, v


def _sdpa_rows(q, k, v, mask=None):
    group = q.shape[1] // k.shape[1]
    out = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(group, 1), v.repeat_interleave(group, 1), attn_mask=mask)
    return out.transpose(1, 2)


def test_stable_tokens_reuse_their_prefix_output_exactly_when_queries_are_unchanged():
    q, k, v = _tensors()
    state = LosaState(LosaConfig(budget=16, page_size=8, active_k=2, min_prefix=0), None)
    module = _module(3)
    state.start_block()
    first, _ = losa_attention(module, q, k, v, None, losa_state=state)
    torch.testing.assert_close(first, _sdpa_rows(q, k, v), atol=1e-6, rtol=1e-5)
    second, _ = losa_attention(module, q, k, v, None, losa_state=state)
    active = state.layer_cache(0).last_active
    assert active.numel() == 2
    stable = [i for i in range(6) if i not in active.tolist()]
    assert torch.equal(second[:, stable], first[:, stable])  # bit for bit: no prefix read for stable tokens
    assert not torch.allclose(second[:, active], first[:, active], atol=1e-4)  # 16 of 100 keys: an approximation


def test_error_of_reused_tokens_grows_with_the_query_perturbation():
    q, k, v = _tensors(seed=1)
    errors = []
    for eps in (0.0, 0.05, 0.2, 0.8):
        state = LosaState(LosaConfig(budget=16, page_size=8, active_k=1, min_prefix=0), None)
        state.start_block()
        losa_attention(_module(3), q, k, v, None, losa_state=state)
        moved = q + eps * torch.randn(q.shape, generator=torch.Generator().manual_seed(5))
        out, _ = losa_attention(_module(3), moved, k, v, None, losa_state=state)
        stable = [i for i in range(6) if i not in state.layer_cache(0).last_active.tolist()]
        errors.append((out[:, stable] - _sdpa_rows(moved, k, v)[:, stable]).abs().max().item())
    assert errors[0] < 1e-6 and errors == sorted(errors)


def _brute_force_union(queries, keys, page_size, pages_per_query, hkv):
    """Per KV head: the set union over queries of each query's top pages by the group-summed elementwise bound."""
    hq, _, d = queries.shape
    group, prefix = hq // hkv, keys.shape[1]
    loaded = 0
    n_pages = math.ceil(prefix / page_size)
    for g in range(hkv):
        chosen = set()
        for i in range(queries.shape[1]):
            scores = []
            for p in range(n_pages):
                page = keys[g, p * page_size:(p + 1) * page_size]
                kmin, kmax = page.min(0).values, page.max(0).values
                scores.append(sum(torch.maximum(queries[h, i] * kmin, queries[h, i] * kmax).sum().item()
                                  for h in range(g * group, (g + 1) * group)))
            chosen |= set(sorted(range(n_pages), key=lambda p: -scores[p])[:pages_per_query])
        loaded += sum(min(page_size, prefix - p * page_size) for p in chosen)
    return loaded


def test_density_bookkeeping_equals_a_brute_force_set_union():
    q, k, v = _tensors(prefix=101, seed=2)  # 13 pages of 8, the last one partial (5 keys)
    prefix = 101
    config = LosaConfig(budget=16, page_size=8, active_k=2, min_prefix=0)
    state = LosaState(config, None)
    state.start_block()
    losa_attention(_module(3), q, k, v, None, losa_state=state)
    kp = k[0, :, :prefix]
    naive_first = _brute_force_union(q[0], kp, 8, 2, 2)
    assert state.counters["dense_first"].loaded == 2 * prefix
    assert state.counters["dense_first"].naive == naive_first
    q2 = q + 0.3 * torch.randn(q.shape, generator=torch.Generator().manual_seed(7))
    losa_attention(_module(3), q2, k, v, None, losa_state=state)
    delta = (q2[0] - q[0]).pow(2).sum(-1).mean(0)
    active = delta.topk(2).indices.sort().values
    assert torch.equal(state.layer_cache(0).last_active, active)
    losa_loaded = _brute_force_union(q2[0][:, active], kp, 8, 2, 2)
    naive_loaded = _brute_force_union(q2[0], kp, 8, 2, 2)
    sparse = state.counters["sparse"]
    assert (sparse.loaded, sparse.naive, sparse.total) == (losa_loaded, naive_loaded, 2 * prefix)
    assert naive_loaded >= losa_loaded
    density = kv_density(state)
    assert density["losa_sparse_steps"] == pytest.approx(losa_loaded / (2 * prefix))
    assert density["losa"] == pytest.approx((2 * prefix + losa_loaded) / (4 * prefix))
    assert density["naive"] == pytest.approx((naive_first + naive_loaded) / (4 * prefix))


def test_quest_naive_density_is_at_least_losa_density_on_a_model():
    model = _model()
    prompt = torch.randint(3, 120, (1, 64))
    config = LosaConfig(budget=8, page_size=4, active_k=2, min_prefix=0, dense_first_step=False)
    _, state = _run_blocks(model, "losa", prompt, None, config, steps=4)
    density = kv_density(state)
    assert density["naive"] >= density["losa"] and density["losa"] < 1.0
    assert state.counters["sparse"].naive > state.counters["sparse"].loaded  # 8 selecting queries vs 2


def test_active_fraction_rule_and_active_k_rule():
    assert LosaConfig(active_frac=0.5, budget=16).active_count(16) == 8
    assert LosaConfig(active_frac=0.01, budget=16).active_count(16) == 1
    assert LosaConfig(active_k=5, budget=16).active_count(16) == 5
    assert LosaConfig(active_k=50, budget=16).active_count(16) == 16
    q, k, v = _tensors()
    state = LosaState(LosaConfig(budget=16, page_size=8, active_frac=0.5, min_prefix=0), None)
    state.start_block()
    losa_attention(_module(3), q, k, v, None, losa_state=state)
    losa_attention(_module(3), q + 0.1, k, v, None, losa_state=state)
    assert state.layer_cache(0).last_active.numel() == 3


@pytest.mark.parametrize("reference,expected", [("last_refresh", 0), ("previous", 2)])
def test_reference_rule_last_refresh_bounds_drift_previous_does_not(reference, expected):
    # token 0 drifts by e per step and is never refreshed at step 2; token 2 jumps by 1.5e at step 3 only
    q, k, v = _tensors()
    direction = torch.zeros_like(q)
    direction[..., 0] = 1.0
    e = 0.1
    state = LosaState(LosaConfig(budget=16, page_size=8, active_k=1, min_prefix=0, reference=reference), None)
    state.start_block()
    losa_attention(_module(3), q, k, v, None, losa_state=state)
    q2 = q.clone()
    q2[:, :, 0] += e * direction[:, :, 0]
    q2[:, :, 1] += 10 * e * direction[:, :, 1]
    losa_attention(_module(3), q2, k, v, None, losa_state=state)
    assert state.layer_cache(0).last_active.tolist() == [1]
    q3 = q2.clone()
    q3[:, :, 0] += e * direction[:, :, 0]
    q3[:, :, 2] += 1.5 * e * direction[:, :, 2]
    losa_attention(_module(3), q3, k, v, None, losa_state=state)
    assert state.layer_cache(0).last_active.tolist() == [expected]


def test_state_resets_at_block_boundaries_and_appends_committed_pages():
    q, k, v = _tensors(prefix=37)
    config = LosaConfig(budget=16, page_size=8, active_k=2, min_prefix=0)
    state = LosaState(config, None)
    state.start_block()
    losa_attention(_module(3), q, k, v, None, losa_state=state)
    losa_attention(_module(3), q + 0.1, k, v, None, losa_state=state)
    assert state.layer_cache(0).steps == 2
    state.end_block()
    assert state.layer_cache(0) is None and not state.in_block
    # the commit pass (outside the block) is dense and records nothing
    calls = dict(kv_density(state)["calls"])
    out, _ = losa_attention(_module(3, is_causal=True), q, k, v, None, losa_state=state)
    assert kv_density(state)["calls"] == calls
    # next block: the prefix grew by the committed 6 tokens (37 -> 43); its first step is dense again
    q2, k2, v2 = _tensors(prefix=43, seed=4)
    k2[:, :, :37], v2[:, :, :37] = k[:, :, :37], v[:, :, :37]
    state.start_block()
    losa_attention(_module(3), q2, k2, v2, None, losa_state=state)
    assert state.layer_cache(0).steps == 1 and state.counters["dense_first"].calls == 2
    kmin, kmax = state.page_summaries(0, k2[0, :, :43])
    ref_min, ref_max = quest_page_summaries(k2[0, :, :43], 8)
    assert torch.equal(kmin, ref_min) and torch.equal(kmax, ref_max)  # the partial page 4 (32..36) was recomputed
    with pytest.raises(ValueError, match="changed shape inside a block"):
        losa_attention(_module(3), q, k, v, None, losa_state=state)
    # start_block alone (no end_block in between) also forgets the cached outputs: a fresh dense first step
    losa_attention(_module(3), q2 + 0.1, k2, v2, None, losa_state=state)
    state.start_block()
    assert state.layer_cache(0) is None
    losa_attention(_module(3), q2, k2, v2, None, losa_state=state)
    assert state.layer_cache(0).steps == 1 and state.counters["dense_first"].calls == 3


def test_dense_fallback_below_min_prefix_is_sdpa_exactly():
    model = _model()
    prompt = torch.randint(3, 120, (1, 45))
    config = LosaConfig(budget=8, page_size=8, active_k=1, min_prefix=1024)
    dense, _ = _run_blocks(model, "sdpa", prompt, None, config)
    losa, state = _run_blocks(model, "losa", prompt, None, config)
    assert torch.equal(losa, dense)
    assert kv_density(state)["calls"] == {"dense_first": 0, "sparse": 0, "fallback": 6}
    skip = LosaConfig(budget=8, page_size=8, active_k=1, min_prefix=0, skip_layers=(0, 1))
    losa_skip, state = _run_blocks(model, "losa", prompt, None, skip)
    assert torch.equal(losa_skip, dense) and kv_density(state)["losa"] == 1.0


# -- refusals --------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    ({"budget": 8, "page_size": 16}, "budget"),
    ({"page_size": 0}, "page_size"),
    ({"page_size": -4}, "page_size"),
    ({"active_k": 0}, "active_k"),
    ({"active_frac": 1.5}, "active_frac"),
    ({"reference": "first"}, "reference"),
    ({"min_prefix": -1}, "min_prefix"),
])
def test_bad_configs_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        LosaConfig(**kwargs)


def test_refusals_at_run_time():
    model = _model()
    with pytest.raises(ValueError, match="not LOSA"):
        LosaState(LosaConfig(), model)  # the model still runs sdpa
    with pytest.raises(TypeError, match="LosaConfig"):
        LosaState({"budget": 16}, None)
    model.set_attn_implementation("losa")
    ids = torch.randint(3, 120, (1, 10))
    with pytest.raises(ValueError, match="no `losa_state`"):
        model(input_ids=ids)
    state = LosaState(LosaConfig(min_prefix=0, budget=16, page_size=8), model)
    with pytest.raises(ValueError, match="batch size 1"):
        model(input_ids=ids.repeat(2, 1), losa_state=state)
    model.config.attention_dropout = 0.1
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = 0.1
    model.train()
    with pytest.raises(ValueError, match="dropout"):
        model(input_ids=ids, losa_state=state)
    model.eval()
    q, k, v = _tensors()
    state.start_block()
    mask = torch.ones(1, 1, 6, 106, dtype=torch.bool)
    mask[0, 0, 2, 5] = False  # one block query does not see a prefix key another one sees
    with pytest.raises(ValueError, match="different prefix keys"):
        losa_attention(_module(3), q, k, v, mask, losa_state=state)
    with pytest.raises(TypeError, match="LosaState"):
        losa_attention(_module(3), q, k, v, None, losa_state=object())


# -- end to end through the block-diffusion decoder -----------------------------------------------------------------
def _bd_model(heads=6, kv_heads=2, attention="block"):
    from hf_fastslow.modeling.block_diffusion import BlockDiffusionConfig, attach_block_diffusion

    model = _model(heads, kv_heads)
    return attach_block_diffusion(model, BlockDiffusionConfig(MASK_ID, 4, True, attention))


def _bd_generate(model, impl, ids, pad=None, losa=None, **kw):
    from hf_fastslow.generation.block_diffusion import block_diffusion_generate

    model.set_attn_implementation(impl)
    try:
        return model.generate(ids, attention_mask=pad, custom_generate=block_diffusion_generate, do_sample=False,
                              max_new_tokens=16, steps=2, eos_token_id=None, losa=losa, **kw)
    finally:
        model.set_attn_implementation("sdpa")


@pytest.mark.parametrize("heads,kv_heads,attention,padded", [(4, 4, "block", False), (6, 2, "block", True),
                                                             (9, 3, "causal", False)])
def test_block_diffusion_generate_with_full_budget_returns_the_dense_decoders_tokens(heads, kv_heads, attention,
                                                                                      padded, monkeypatch):
    from hf_fastslow.generation import block_diffusion as bd

    model = _bd_model(heads, kv_heads, attention)
    ids = torch.randint(3, 120, (1, 40), generator=torch.Generator().manual_seed(11))
    pad = torch.ones_like(ids)
    if padded:
        pad[0, :6] = 0
    dense = _bd_generate(model, "sdpa", ids, pad)
    states, original = [], bd.BlockDiffusionDecoder.generate

    def keep_state(self, *args, **kwargs):
        states.append(kwargs.get("losa_state"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(bd.BlockDiffusionDecoder, "generate", keep_state)
    losa = _bd_generate(model, "losa", ids, pad, losa=LosaConfig(budget=64, page_size=8, active_k=4, min_prefix=0))
    assert torch.equal(losa, dense)
    density = kv_density(states[0])  # the LOSA path ran: sparse steps, every page loaded
    assert density["calls"]["sparse"] > 0 and density["losa"] == pytest.approx(1.0)


def test_block_diffusion_generate_with_a_small_budget_loads_less_and_still_decodes():
    model = _bd_model()
    ids = torch.randint(3, 120, (1, 64), generator=torch.Generator().manual_seed(12))
    out = _bd_generate(model, "losa", ids, None, losa=LosaConfig(budget=8, page_size=8, active_k=1, min_prefix=0))
    assert out.shape == (1, 80) and not bool((out[:, 64:] == MASK_ID).any())
    with pytest.raises(ValueError, match="not LOSA"):
        _bd_generate(model, "sdpa", ids, None, losa=LosaConfig(budget=16, page_size=8))
