"""SVG-EAR in models (modeling/ear.py): the registered "ear" attention on a tiny random Llama, the Wan processor on a
tiny random Wan transformer, and the q/k/v capture of evaluation/attn_error.py."""

import pytest
import torch
import torch.nn.functional as F

from hf_fastslow.evaluation.attn_error import attention_error_by_layer, capture_qkv, dense_attention, relative_error
from hf_fastslow.modeling.ear import EARConfig, disable_ear_attention, ear_attention_forward, enable_ear_attention
from tests.conftest import tiny_llama

torch.set_num_threads(1)

SMALL = dict(causal_chunk=16, min_q_len=8, num_q_clusters=4, num_k_clusters=4)


def _ids(batch=2, n=70, seed=0):
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def test_density_one_logits_equal_sdpa_and_low_density_really_runs_ear():
    model = tiny_llama(attn_implementation="sdpa")
    ids = _ids()
    expected = model(ids).logits
    enable_ear_attention(model, EARConfig(density=1.0, **SMALL))
    assert model.config._attn_implementation == "ear"
    torch.testing.assert_close(model(ids).logits, expected, atol=1e-5, rtol=1e-5)
    enable_ear_attention(model, EARConfig(density=0.1, **SMALL))
    sparse = model(ids).logits
    assert not torch.allclose(sparse, expected, atol=1e-4)
    # chunks 0 and 1 are exact (sinks + diagonal): the first 32 positions are untouched
    torch.testing.assert_close(sparse[:, :32], expected[:, :32], atol=1e-5, rtol=1e-5)
    disable_ear_attention(model)
    assert model.config._attn_implementation == "sdpa"
    assert not hasattr(model.model.layers[0].self_attn, "_ear_config")
    assert torch.equal(model(ids).logits, expected)


@torch.no_grad()
def test_bf16_model_keeps_its_dtype_and_stays_close_to_sdpa():
    model = tiny_llama(attn_implementation="sdpa").to(torch.bfloat16)
    ids = _ids()
    expected = model(ids).logits
    enable_ear_attention(model, EARConfig(density=1.0, **SMALL))
    got = model(ids).logits
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), expected.float(), atol=2e-2, rtol=2e-2)


@torch.no_grad()
def test_left_padding_goes_through_the_registered_mask():
    model = tiny_llama(attn_implementation="sdpa")
    ids = _ids()
    ids[1, :10] = 0
    mask = torch.ones_like(ids)
    mask[1, :10] = 0
    expected = model(ids, attention_mask=mask).logits
    enable_ear_attention(model, EARConfig(density=1.0, **SMALL))
    got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got[0], expected[0], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[1, 10:], expected[1, 10:], atol=1e-5, rtol=1e-5)
    # sparse: the padded row gives what the same tokens give alone without padding (chunks start at real tokens)
    enable_ear_attention(model, EARConfig(density=0.2, **SMALL))
    padded = model(ids, attention_mask=mask).logits
    alone = model(ids[1:, 10:]).logits
    torch.testing.assert_close(padded[1, 10:], alone[0], atol=1e-5, rtol=1e-5)
    assert not torch.allclose(padded[1, 10:], expected[1, 10:], atol=1e-4)


@torch.no_grad()
def test_future_tokens_never_change_earlier_logits():
    model = enable_ear_attention(tiny_llama(attn_implementation="sdpa"), EARConfig(density=0.2, **SMALL))
    ids = _ids(batch=1, n=80)
    base = model(ids).logits
    for t in (37, 56):
        changed = ids.clone()
        changed[:, t:] = _ids(batch=1, n=80 - t, seed=t)
        out = model(changed).logits
        torch.testing.assert_close(out[:, :t], base[:, :t], atol=1e-6, rtol=0)
        assert not torch.allclose(out[:, t:], base[:, t:])


@torch.no_grad()
def test_short_forwards_and_decode_steps_run_sdpa_unchanged():
    model = tiny_llama(attn_implementation="sdpa")
    prompt = _ids(batch=1, n=40)
    expected_short = model(prompt[:, :20]).logits
    expected = model.generate(prompt, max_new_tokens=6, do_sample=False)
    enable_ear_attention(model, EARConfig(density=0.3, causal_chunk=16, min_q_len=30, num_q_clusters=4,
                                          num_k_clusters=4))
    assert torch.equal(model(prompt[:, :20]).logits, expected_short)  # below min_q_len: SDPA, bit for bit
    enable_ear_attention(model, EARConfig(density=1.0, causal_chunk=16, min_q_len=30, num_q_clusters=4,
                                          num_k_clusters=4))
    assert torch.equal(model.generate(prompt, max_new_tokens=6, do_sample=False), expected)
    # a decode step (q_len 1) goes to SDPA whatever the density
    attn = model.model.layers[0].self_attn
    attn._ear_config = EARConfig(density=0.0, min_q_len=1, causal_chunk=4)
    q, k, v = torch.randn(1, 4, 1, 16), torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    out, _ = ear_attention_forward(attn, q, k, v, None, scaling=0.25)
    ref = F.scaled_dot_product_attention(q, k, v, scale=0.25, enable_gqa=True).transpose(1, 2)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_masks_other_than_causal_padding_fall_back_to_sdpa():
    model = tiny_llama(attn_implementation="sdpa")
    attn = model.model.layers[0].self_attn
    attn._ear_config = EARConfig(density=0.0, **SMALL)
    q, k, v = torch.randn(1, 4, 40, 16), torch.randn(1, 2, 40, 16), torch.randn(1, 2, 40, 16)
    window = torch.ones(40, 40, dtype=torch.bool).tril() & ~torch.ones(40, 40, dtype=torch.bool).tril(-8)
    out, _ = ear_attention_forward(attn, q, k, v, window[None, None], scaling=0.25)
    ref = F.scaled_dot_product_attention(q, k, v, attn_mask=window, scale=0.25, enable_gqa=True)
    torch.testing.assert_close(out, ref.transpose(1, 2), atol=1e-6, rtol=1e-6)


def test_config_errors():
    for kwargs, match in [(dict(density=1.2), "density"), (dict(density=-0.5), "density"),
                          (dict(router="top_p"), "router"), (dict(causal_chunk=0), "causal_chunk"),
                          (dict(num_k_clusters=0), "num_k_clusters"), (dict(min_q_len=-1), "min_q_len")]:
        with pytest.raises(ValueError, match=match):
            EARConfig(**kwargs)


@torch.no_grad()
def test_capture_gives_the_post_rope_qkv_the_layer_attended_with():
    model = tiny_llama(attn_implementation="sdpa")
    ids = _ids(batch=1, n=24)
    seen = {}
    hook = model.model.layers[1].self_attn.o_proj.register_forward_hook(lambda m, a, o: seen.update(x=a[0]))
    captured = capture_qkv(model, ids, layers=[1])
    hook.remove()
    assert list(captured) == [1] and model.config._attn_implementation == "sdpa"
    t = captured[1]
    assert t["q"].shape == (1, 4, 24, 16) and t["k"].shape == (1, 2, 24, 16)
    attended = dense_attention(t["q"], t["k"], t["v"], causal=True).transpose(1, 2).flatten(2)
    torch.testing.assert_close(attended, seen["x"], atol=1e-5, rtol=1e-5)
    errors = attention_error_by_layer(captured, lambda q, k, v: dense_attention(q, k, v, causal=True) * 1.1,
                                      lambda q, k, v: dense_attention(q, k, v, causal=True))
    assert errors[1] == pytest.approx(0.1, rel=1e-6)
    with pytest.raises(ValueError, match="shapes differ"):
        relative_error(torch.zeros(2), torch.zeros(3))


# -- Wan ------------------------------------------------------------------------------------------------------------
@torch.no_grad()
def test_wan_processor_at_density_one_is_diffusers_default_and_remove_restores():
    pytest.importorskip("diffusers")
    from hf_fastslow.integrations.diffusers import WanSelfAttentionProcessor
    from hf_fastslow.modeling.ear import EARWanProcessor, apply_ear, remove_ear
    from tests.integration.test_diffusers_seam import tiny_wan, wan_inputs

    model, inputs = tiny_wan(), wan_inputs()
    expected = model(**inputs)[0]
    apply_ear(model, EARConfig(density=1.0, num_q_clusters=8, num_k_clusters=8))
    proc = model.blocks[0].attn1.processor
    assert isinstance(proc, EARWanProcessor) and isinstance(proc, WanSelfAttentionProcessor)
    torch.testing.assert_close(model(**inputs)[0], expected, atol=1e-5, rtol=1e-5)
    apply_ear(model, EARConfig(density=0.1, num_q_clusters=8, num_k_clusters=8))
    sparse = model(**inputs)[0]
    assert not torch.allclose(sparse, expected, atol=1e-4)
    proc = model.blocks[1].attn1.processor
    assert proc.state.calls == 1 and 0.0 < proc.last_density <= 0.1
    model(**inputs)
    assert proc.state.calls == 2  # the second step is warm-started from the first one's centroids
    apply_ear(model, EARConfig(density=0.1, num_q_clusters=8, num_k_clusters=8, dense_layers=2))
    torch.testing.assert_close(model(**inputs)[0], expected, atol=1e-5, rtol=1e-5)
    remove_ear(model)
    assert torch.equal(model(**inputs)[0], expected)
    assert not isinstance(model.blocks[0].attn1.processor, EARWanProcessor)
