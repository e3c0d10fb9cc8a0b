"""XQuant / XQuant-CL cache: exactness without quantization, error bounds, memory accounting, generate() paths,
crop/beam/multi-turn, architectures, and clear errors for bad input."""

import json

import pytest
import torch
from transformers import DynamicCache, GenerationConfig

import hf_fastslow
from hf_fastslow import XQuantCache, XQuantConfig
from hf_fastslow.integrations import cache_kwargs
from hf_fastslow.quantizers import attach_xquant, compute_xquant_factors, detach_xquant
from tests.conftest import tiny_llama
from tests.quantizers.conftest import small_cfg, tiny_gemma3

pytestmark = pytest.mark.integration  # exercises the transformers seam: also run on 5.17 in CI

MODES = ["x", "latent", "cl", "auto"]




@pytest.fixture(scope="module")
def mha_model():
    return tiny_llama(num_layers=3, hidden=32, heads=2, kv_heads=2, seed=1)


def logits_with(model, ids, cache, **kw):
    return model(ids, **cache_kwargs(model, cache), **kw).logits


# ---------------------------------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------------------------------
def test_svd_identities(gqa_model):
    factors = compute_xquant_factors(gqa_model, torch.float64)
    x = torch.randn(5, 64, dtype=torch.float64)
    for attn, f in zip([layer.self_attn for layer in gqa_model.model.layers], factors):
        w_k = attn.k_proj.weight.double().t()
        w_v = attn.v_proj.weight.double().t()
        torch.testing.assert_close(x @ f["u_k"] @ f["m_k"], x @ w_k, atol=1e-10, rtol=0)
        torch.testing.assert_close(x @ f["u_v"] @ f["m_v"], x @ w_v, atol=1e-10, rtol=0)
        w_kv = torch.cat([w_k, w_v], 1)
        torch.testing.assert_close(x @ f["u_kv"] @ f["u_kv"].t() @ w_kv, x @ w_kv, atol=1e-10, rtol=0)
        # latent-from-K identity: L_k = K_pre B_k S_k^-1 (B_k orthogonal) equals X U_k
        u, s, vh = torch.linalg.svd(w_k, full_matrices=False)
        torch.testing.assert_close((x @ w_k) @ vh.t() / s, x @ f["u_k"], atol=1e-8, rtol=0)
    compute_xquant_factors(gqa_model)  # restore the cached fp32 factors for the other tests


@pytest.mark.parametrize("mode", MODES)
def test_unquantized_equals_dynamic_cache(gqa_model, mode):
    ids = torch.randint(3, 128, (2, 40))
    ref = logits_with(gqa_model, ids, DynamicCache(config=gqa_model.config))
    cache = XQuantCache(gqa_model, small_cfg(nbits=16, mode=mode))
    out = logits_with(gqa_model, ids, cache)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert cache.get_seq_length() == 40
    # then decode token by token: still equal
    nxt = torch.randint(3, 128, (2, 1))
    ref_cache = DynamicCache(config=gqa_model.config)
    logits_with(gqa_model, ids, ref_cache)
    torch.testing.assert_close(logits_with(gqa_model, nxt, cache), logits_with(gqa_model, nxt, ref_cache),
                               atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", ["x", "cl"])
def test_unquantized_equals_dynamic_cache_mha(mha_model, mode):
    ids = torch.randint(3, 128, (1, 33))
    ref = logits_with(mha_model, ids, DynamicCache(config=mha_model.config))
    out = logits_with(mha_model, ids, XQuantCache(mha_model, small_cfg(nbits=16, mode=mode)))
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_chunked_prefill_equals_token_by_token_at_16_bit(gqa_model, mode):
    ids = torch.randint(3, 128, (1, 37))
    chunked = XQuantCache(gqa_model, small_cfg(nbits=16, mode=mode))
    a = torch.cat([logits_with(gqa_model, ids[:, s : s + 10], chunked) for s in range(0, 37, 10)], dim=1)
    tbt = XQuantCache(gqa_model, small_cfg(nbits=16, mode=mode))
    b = torch.cat([logits_with(gqa_model, ids[:, t : t + 1], tbt) for t in range(37)], dim=1)
    torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_cl_with_8_bit_drift_is_bounded(gqa_model):
    ids = torch.randint(3, 128, (1, 48))
    ref = logits_with(gqa_model, ids, DynamicCache(config=gqa_model.config))
    out = logits_with(gqa_model, ids, XQuantCache(gqa_model, small_cfg(nbits=8, mode="cl")))
    assert (out - ref).abs().max() < 0.05


# ---------------------------------------------------------------------------------------------------------------------
# generate() integration
# ---------------------------------------------------------------------------------------------------------------------
def test_cache_implementation_builds_an_xquant_cache(gqa_model, monkeypatch):
    seen = []
    original = hf_fastslow.quantizers.xquant.XQuantCache.__init__

    def spy(self, *a, **k):
        original(self, *a, **k)
        seen.append(self)

    monkeypatch.setattr(hf_fastslow.quantizers.xquant.XQuantCache, "__init__", spy)
    ids = torch.randint(3, 128, (1, 12))
    cfg = {"nbits": 16, "group_size": 8, "residual_length": 16, "mode": "cl", "base_layer": 1}
    out = gqa_model.generate(ids, max_new_tokens=20, do_sample=False, cache_implementation="xquant", cache_config=cfg,
                             return_dict_in_generate=True)
    cache = hf_fastslow.integrations.output_cache(out)
    assert type(cache) is XQuantCache and seen and seen[-1] is cache
    assert cache.config.mode == "cl" and cache.get_seq_length() == 12 + 20 - 1
    ref = gqa_model.generate(ids, max_new_tokens=20, do_sample=False)
    assert torch.equal(out.sequences, ref)


def test_cache_object_path_and_greedy_equivalence(gqa_model):
    ids = torch.randint(3, 128, (2, 9))
    ref = gqa_model.generate(ids, max_new_tokens=25, do_sample=False)
    cache = XQuantCache(gqa_model, small_cfg(nbits=16, mode="latent"))
    out = gqa_model.generate(ids, max_new_tokens=25, do_sample=False, **cache_kwargs(gqa_model, cache))
    assert torch.equal(out, ref)


def test_left_padded_batch_matches_unpadded_rows(gqa_model):
    a = torch.randint(3, 128, (1, 12))
    b = torch.randint(3, 128, (1, 7))
    ids = torch.cat([a, torch.cat([torch.zeros(1, 5, dtype=torch.long), b], 1)])
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    cfg = {"nbits": 16, "group_size": 8, "residual_length": 8}
    out = gqa_model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=15, do_sample=False,
                             cache_implementation="xquant", cache_config=cfg)
    for row, single in ((0, a), (1, b)):
        solo = gqa_model.generate(single, max_new_tokens=15, do_sample=False, cache_implementation="xquant",
                                  cache_config=cfg)
        assert torch.equal(out[row, -15:], solo[0, -15:])


def test_sampling_and_beam_search_run_and_beams_match_dynamic(gqa_model):
    ids = torch.randint(3, 128, (2, 10))
    cfg = {"nbits": 16, "group_size": 8, "residual_length": 8, "mode": "cl", "base_layer": 1}
    torch.manual_seed(0)
    sampled = gqa_model.generate(ids, max_new_tokens=12, do_sample=True, top_k=20, cache_implementation="xquant",
                                 cache_config=cfg)
    torch.manual_seed(0)
    sampled_ref = gqa_model.generate(ids, max_new_tokens=12, do_sample=True, top_k=20)
    assert torch.equal(sampled, sampled_ref)
    beams = gqa_model.generate(ids, max_new_tokens=12, num_beams=3, do_sample=False, cache_implementation="xquant",
                               cache_config=cfg)
    beams_ref = gqa_model.generate(ids, max_new_tokens=12, num_beams=3, do_sample=False)
    assert torch.equal(beams, beams_ref)


def test_quantized_generation_runs_for_every_mode_and_bit_width(gqa_model):
    ids = torch.randint(3, 128, (2, 20))
    for mode in MODES:
        for nbits in (2, 3, 4, 8):
            out = gqa_model.generate(ids, max_new_tokens=6, do_sample=False, cache_implementation="xquant",
                                     cache_config={"nbits": nbits, "mode": mode, "group_size": 8,
                                                   "residual_length": 8, "base_layer": 1})
            assert out.shape == (2, 26)


def test_multi_turn_reuse_of_a_cache(gqa_model):
    turn1 = torch.randint(3, 128, (1, 14))
    cache = XQuantCache(gqa_model, small_cfg(nbits=16, mode="latent"))
    out1 = gqa_model.generate(turn1, max_new_tokens=8, do_sample=False, **cache_kwargs(gqa_model, cache))
    turn2 = torch.cat([out1, torch.randint(3, 128, (1, 6))], 1)
    out2 = gqa_model.generate(turn2, max_new_tokens=8, do_sample=False, **cache_kwargs(gqa_model, cache))
    ref2 = gqa_model.generate(turn2, max_new_tokens=8, do_sample=False)
    assert torch.equal(out2, ref2)
    assert cache.get_seq_length() == turn2.shape[1] + 7


# ---------------------------------------------------------------------------------------------------------------------
# crop / beams / batch ops
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", MODES)
def test_crop_inside_window_is_exact(gqa_model, mode):
    ids = torch.randint(3, 128, (1, 40))  # 32 quantized + 8 in the window
    cache = XQuantCache(gqa_model, small_cfg(nbits=2, mode=mode))
    logits_with(gqa_model, ids, cache)
    cache.crop(-5)
    assert cache.get_seq_length() == 35
    fresh = XQuantCache(gqa_model, small_cfg(nbits=2, mode=mode))
    logits_with(gqa_model, ids[:, :35], fresh)
    nxt = torch.randint(3, 128, (1, 1))
    torch.testing.assert_close(logits_with(gqa_model, nxt, cache), logits_with(gqa_model, nxt, fresh))


@pytest.mark.parametrize("mode", MODES)
def test_crop_into_quantized_blocks(gqa_model, mode):
    ids = torch.randint(3, 128, (1, 40))
    cache = XQuantCache(gqa_model, small_cfg(nbits=16, mode=mode))
    logits_with(gqa_model, ids, cache)
    cache.crop(-15)  # back into the second quantized block
    assert cache.get_seq_length() == 25
    ref_cache = DynamicCache(config=gqa_model.config)
    logits_with(gqa_model, ids[:, :25], ref_cache)
    nxt = torch.randint(3, 128, (1, 3))
    torch.testing.assert_close(logits_with(gqa_model, nxt, cache), logits_with(gqa_model, nxt, ref_cache),
                               atol=1e-4, rtol=1e-4)
    cache.crop(20)  # older convention: the length to keep
    assert cache.get_seq_length() == 20


def _left_padded(lengths, total, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, (len(lengths), total), generator=g)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        mask[row, total - n :] = 1
    ids = ids.masked_fill(mask == 0, 0)
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # what generate() computes
    return ids, mask, positions


@pytest.mark.parametrize("mode", ["latent", "cl", "x"])
def test_batch_ops_follow_rows_padded_by_different_amounts(gqa_model, mode):
    """Beam reorder, batch selection and repetition must move every row's stored tokens *and* its RoPE positions."""
    ids, mask, pos = _left_padded([20, 16, 13], 20)
    nxt = torch.randint(3, 128, (3, 1))

    def prefilled(rows):
        cache = XQuantCache(gqa_model, small_cfg(nbits=4, mode=mode))
        logits_with(gqa_model, ids[rows], cache, attention_mask=mask[rows], position_ids=pos[rows])
        return cache

    def next_logits(cache, rows):
        step_mask = torch.cat([mask[rows], torch.ones(len(rows), 1, dtype=mask.dtype)], 1)
        return logits_with(gqa_model, nxt[rows], cache, attention_mask=step_mask, position_ids=pos[rows, -1:] + 1)

    for edit, rows in [("reorder", [2, 0, 1]), ("reorder", [1, 1, 2]), ("select", [0, 2]), ("repeat", [0, 0, 1, 1,
                                                                                                      2, 2])]:
        cache = prefilled([0, 1, 2])
        if edit == "reorder":
            cache.reorder_cache(torch.tensor(rows))
        elif edit == "select":
            cache.batch_select_indices(torch.tensor(rows))
        else:
            cache.batch_repeat_interleave(2)
        torch.testing.assert_close(next_logits(cache, rows), next_logits(prefilled(rows), rows), atol=1e-4,
                                   rtol=1e-4, msg=lambda m, e=edit, r=rows: f"{e} {r}: {m}")


# ---------------------------------------------------------------------------------------------------------------------
# Architectures
# ---------------------------------------------------------------------------------------------------------------------
def _qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    return Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=1, vocab_size=128,
                                        max_position_embeddings=256)).eval()


def _qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                                        num_attention_heads=4, num_key_value_heads=1, head_dim=16, vocab_size=128,
                                        max_position_embeddings=256)).eval()




@pytest.mark.parametrize("build", [_qwen2, _qwen3, tiny_gemma3], ids=["qwen2-bias", "qwen3-knorm", "gemma3-sliding"])
@pytest.mark.parametrize("mode", ["latent", "cl", "x"])
def test_other_architectures_unquantized_equal_dynamic(build, mode):
    model = build()
    ids = torch.randint(3, 128, (2, 30))
    ref = model.generate(ids, max_new_tokens=10, do_sample=False)
    out = model.generate(ids, max_new_tokens=10, do_sample=False, cache_implementation="xquant",
                         cache_config={"nbits": 16, "mode": mode, "group_size": 8, "residual_length": 8,
                                       "base_layer": 1})
    assert torch.equal(out, ref)
    quantized = model.generate(ids, max_new_tokens=4, do_sample=False, cache_implementation="xquant",
                               cache_config={"nbits": 2, "mode": mode, "group_size": 8, "residual_length": 8,
                                             "base_layer": 1})
    assert quantized.shape == (2, 34)


def test_fused_qkv_architecture_is_rejected():
    from transformers import Phi3Config, Phi3ForCausalLM

    model = Phi3ForCausalLM(Phi3Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                       num_attention_heads=2, num_key_value_heads=2, vocab_size=64,
                                       pad_token_id=0)).eval()
    with pytest.raises(NotImplementedError, match="fused"):
        XQuantCache(model, XQuantConfig())
    assert not hasattr(model, "_hf_fastslow_xquant_hooks")


# ---------------------------------------------------------------------------------------------------------------------
# Errors: clear, and nothing corrupted
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [dict(nbits=5), dict(nbits=1), dict(group_size=12), dict(group_size=0),
                                 dict(residual_length=100, group_size=64), dict(mode="kv"),
                                 dict(high_precision_bits=6)])
def test_bad_config_values(bad):
    with pytest.raises(ValueError):
        XQuantConfig(**bad)


def test_group_size_not_dividing_width(gqa_model):
    with pytest.raises(ValueError, match="does not divide"):
        XQuantCache(gqa_model, XQuantConfig(nbits=2, mode="x", group_size=48, residual_length=48))


def test_unknown_cache_config_key_in_generate(gqa_model):
    with pytest.raises(ValueError, match="Unknown XQuantConfig keys"):
        gqa_model.generate(torch.randint(3, 128, (1, 5)), max_new_tokens=2, cache_implementation="xquant",
                           cache_config={"bits": 2})


def test_latent_mode_on_mha_is_rejected(mha_model):
    with pytest.raises(ValueError, match="latent"):
        XQuantCache(mha_model, XQuantConfig(mode="latent", group_size=8, residual_length=8))


def test_cache_used_on_another_model_raises_and_changes_nothing(gqa_model):
    other = tiny_llama(num_layers=4, hidden=64, heads=4, kv_heads=1, seed=5)
    cache = XQuantCache(gqa_model, small_cfg(nbits=4))
    ids = torch.randint(3, 128, (1, 10))
    logits_with(gqa_model, ids, cache)
    before = (cache.get_seq_length(), cache.nbytes())
    # `other` has no hooks: the cache gets K/V but no X
    with pytest.raises(RuntimeError, match="attach_xquant|another model"):
        logits_with(other, ids, cache)
    attach_xquant(other)
    with pytest.raises(RuntimeError, match="another model"):
        logits_with(other, ids, cache)
    detach_xquant(other)
    assert (cache.get_seq_length(), cache.nbytes()) == before
    nxt = torch.randint(3, 128, (1, 1))
    ref = XQuantCache(gqa_model, small_cfg(nbits=4))
    logits_with(gqa_model, ids, ref)
    torch.testing.assert_close(logits_with(gqa_model, nxt, cache), logits_with(gqa_model, nxt, ref))


def test_batch_size_change_is_rejected(gqa_model):
    cache = XQuantCache(gqa_model, small_cfg(nbits=4))
    logits_with(gqa_model, torch.randint(3, 128, (2, 10)), cache)
    with pytest.raises(ValueError, match="batch"):
        logits_with(gqa_model, torch.randint(3, 128, (3, 1)), cache)
    assert cache.get_seq_length() == 10


# ---------------------------------------------------------------------------------------------------------------------
# The registry leaves stock caches alone and never writes our name into generation_config.json
# ---------------------------------------------------------------------------------------------------------------------
def test_stock_cache_implementations_untouched(gqa_model):
    ids = torch.randint(3, 128, (1, 6))
    out = gqa_model.generate(ids, max_new_tokens=3, do_sample=False, return_dict_in_generate=True)
    assert type(hf_fastslow.integrations.output_cache(out)) is DynamicCache
    out = gqa_model.generate(ids, max_new_tokens=3, do_sample=False, cache_implementation="dynamic",
                             return_dict_in_generate=True)
    assert type(hf_fastslow.integrations.output_cache(out)) is DynamicCache
    with pytest.raises(ValueError, match="built-in"):
        hf_fastslow.register_cache_implementation("static", lambda m, c: None)


def test_saved_generation_config_never_names_our_cache(tmp_path):
    cfg = GenerationConfig(max_new_tokens=4, cache_implementation="xquant", cache_config={"nbits": 2})
    cfg.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "generation_config.json").read_text())
    assert "cache_implementation" not in data and "cache_config" not in data
    assert cfg.cache_implementation == "xquant"  # the live object keeps it
    GenerationConfig.from_pretrained(tmp_path)


def test_unregister_restores_transformers_validation(gqa_model):
    hf_fastslow.register_cache_implementation("xquant_tmp", lambda m, c: XQuantCache(m, XQuantConfig(**c)))
    GenerationConfig(cache_implementation="xquant_tmp").validate()
    hf_fastslow.unregister_cache_implementation("xquant_tmp")
    with pytest.raises(ValueError, match="Invalid `cache_implementation`"):
        GenerationConfig(cache_implementation="xquant_tmp").validate()


# ---------------------------------------------------------------------------------------------------------------------
# With speculative decoding (the verify loop crops rejected drafts out of the cache)
# ---------------------------------------------------------------------------------------------------------------------
class _NoisyOracle:
    """Proposes the reference continuation, with every third draft token wrong (so crops happen)."""

    def __init__(self, reference, k=4):
        from hf_fastslow.generation import Drafter

        class _D(Drafter):
            max_draft_tokens = k

            def propose(self, context):
                out = []
                for row, ids in enumerate(context.input_ids):
                    n = ids.shape[0]
                    draft = reference[row, n : n + context.budgets[row]].clone()
                    draft[2::3] = (draft[2::3] + 1) % 128
                    out.append(draft)
                return out

            def observe(self, feedback):
                pass

        self.drafter = _D()


@pytest.mark.parametrize("mode", ["latent", "cl"])
def test_speculative_generate_through_xquant_cache(gqa_model, mode):
    from hf_fastslow.generation import speculative_generate

    ids = torch.randint(3, 128, (2, 11))
    cfg = {"nbits": 16, "mode": mode, "group_size": 8, "residual_length": 8, "base_layer": 1}
    reference = gqa_model.generate(ids, max_new_tokens=30, do_sample=False)
    out = gqa_model.generate(ids, max_new_tokens=30, do_sample=False, custom_generate=speculative_generate,
                             drafter=_NoisyOracle(reference).drafter, cache_implementation="xquant", cache_config=cfg)
    assert torch.equal(out, reference)


def test_sliding_window_layers_forget_old_blocks():
    model = tiny_gemma3()  # sliding window 8 on layers 0 and 2
    ids = torch.randint(3, 128, (1, 60))
    cache = XQuantCache(model, XQuantConfig(nbits=16, mode="latent", group_size=8, residual_length=8))
    ref_cache = DynamicCache(config=model.config)
    torch.testing.assert_close(logits_with(model, ids, cache), logits_with(model, ids, ref_cache), atol=1e-4,
                               rtol=1e-4)
    for _ in range(12):
        nxt = torch.randint(3, 128, (1, 1))
        torch.testing.assert_close(logits_with(model, nxt, cache), logits_with(model, nxt, ref_cache), atol=1e-4,
                                   rtol=1e-4)
    sliding = [layer for layer in cache.layers if layer.is_sliding]
    full = [layer for layer in cache.layers if not layer.is_sliding]
    assert sliding and full and cache.get_seq_length() == 72
    for layer in sliding:  # at most the window plus one block and the residual survive
        assert layer.evicted > 0 and layer.get_seq_length() == 72
        assert layer.get_seq_length() - layer.evicted <= 8 + 8 + 8
    assert all(layer.evicted == 0 for layer in full)
    with pytest.raises(RuntimeError, match="forgot"):
        cache.crop(-60)
    assert cache.get_seq_length() == 72
