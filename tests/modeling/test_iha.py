"""IHA conversion: the identity initialisation is the original model (logits, padding, generate), on Llama (MHA, GQA,
MQA), Qwen2 (q/k/v biases), Qwen3 and Gemma 3 (QK-norm, sliding layers); masks and causality."""

import pytest
import torch

from hf_fastslow.integrations import cache_from_kwargs, cache_kwargs
from hf_fastslow.modeling.iha import IHAConfig, IHAMixer, apply_iha, is_iha_model
from tests.modeling.iha_helpers import (
    VOCAB,
    logits,
    max_diff_on_tokens,
    padded_batch,
    tiny,
    tiny_gemma3,
    tiny_qwen2,
    tiny_qwen3,
)

ATOL = 1e-4



@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["MHA", "GQA", "MQA"])
@pytest.mark.parametrize("num_pseudo_heads", [1, 2, 3, None], ids=["P1", "P2", "P3", "PH"])
def test_identity_init_reproduces_logits_with_left_padding(num_pseudo_heads, kv_heads):
    model = tiny(kv_heads=kv_heads)
    ids, mask = padded_batch()
    ref = logits(model, ids, mask)
    apply_iha(model, IHAConfig(num_pseudo_heads=num_pseudo_heads, init_noise=0.0))
    mixer = model.model.layers[0].self_attn.iha
    assert mixer.num_pseudo_heads == (num_pseudo_heads or 4)
    assert model.config._attn_implementation == "iha"
    assert max_diff_on_tokens(logits(model, ids, mask), ref, mask) < ATOL


@pytest.mark.parametrize("kv_heads", [2, 1], ids=["GQA", "MQA"])
def test_identity_init_global_collapse(kv_heads):
    model = tiny(kv_heads=kv_heads)
    ids, mask = padded_batch()
    ref = logits(model, ids, mask)
    apply_iha(model, IHAConfig(num_pseudo_heads=3, collapse="global", init_noise=0.0))
    assert model.model.layers[1].self_attn.iha.collapse.shape == (4, 4, 3)
    assert max_diff_on_tokens(logits(model, ids, mask), ref, mask) < ATOL


@pytest.mark.parametrize("cache_implementation", [None, "static"])
@pytest.mark.parametrize("num_pseudo_heads", [2, None])
def test_identity_init_greedy_generate_token_identical(num_pseudo_heads, cache_implementation):
    model = tiny(kv_heads=2)
    ids, mask = padded_batch()
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    if cache_implementation:
        kw["cache_implementation"] = cache_implementation
    with torch.no_grad():
        expected = model.generate(input_ids=ids, attention_mask=mask, **kw)
        apply_iha(model, IHAConfig(num_pseudo_heads=num_pseudo_heads, init_noise=0.0))
        got = model.generate(input_ids=ids, attention_mask=mask, **kw)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("build", [tiny_qwen2, tiny_qwen3, tiny_gemma3], ids=["qwen2", "qwen3", "gemma3"])
def test_identity_init_other_architectures(build):
    model = build()
    ids, mask = padded_batch(length=12)  # longer than Gemma's sliding window (4): the sliding mask matters
    with torch.no_grad():
        ref = logits(model, ids, mask)
        gen_ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    apply_iha(model, IHAConfig(num_pseudo_heads=3, init_noise=0.0))
    assert max_diff_on_tokens(logits(model, ids, mask), ref, mask) < ATOL
    with torch.no_grad():
        gen = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(gen, gen_ref)


def test_mask_interface_is_registered_and_padding_matters():
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS

    model = apply_iha(tiny(), IHAConfig(num_pseudo_heads=2, init_noise=0.0))
    assert "iha" in ALL_MASK_ATTENTION_FUNCTIONS._global_mapping
    ids, mask = padded_batch()
    # If the padding mask never reached the attention, row 0 would attend to its pad tokens and change.
    assert max_diff_on_tokens(logits(model, ids, mask), logits(model, ids, torch.ones_like(mask)), mask) > 1e-3


def test_only_chosen_layers_are_converted():
    model = tiny(layers=3)
    ids, mask = padded_batch()
    ref = logits(model, ids, mask)
    apply_iha(model, IHAConfig(num_pseudo_heads=2, layers=[1], init_noise=0.0))
    has = [hasattr(layer.self_attn, "iha") for layer in model.model.layers]
    assert has == [False, True, False]
    assert max_diff_on_tokens(logits(model, ids, mask), ref, mask) < ATOL


def test_noise_makes_the_mixers_live():
    model = tiny()
    ids, mask = padded_batch()
    ref = logits(model, ids, mask)
    apply_iha(model, IHAConfig(num_pseudo_heads=2, init_noise=0.05))
    diff = max_diff_on_tokens(logits(model, ids, mask), ref, mask)
    assert diff > 1e-3, "IHA weights have no effect on the output"


def test_mixed_heads_are_used():
    """A mixer that swaps head 0's query for head 1's changes the output (the mixing really reaches attention)."""
    model = apply_iha(tiny(kv_heads=4), IHAConfig(num_pseudo_heads=1, init_noise=0.0))
    ids, mask = padded_batch()
    ref = logits(model, ids, mask)
    with torch.no_grad():
        aq = model.model.layers[0].self_attn.iha.alpha_q
        aq[:, 0, 0] = 0.0
        aq[1, 0, 0] = 1.0
    assert max_diff_on_tokens(logits(model, ids, mask), ref, mask) > 1e-3


@pytest.mark.parametrize("collapse", ["per_head", "global"])
def test_token_causal(collapse):
    """With random mixing, changing tokens after position t leaves logits up to t unchanged."""
    model = apply_iha(tiny(), IHAConfig(num_pseudo_heads=3, collapse=collapse, init_noise=0.3))
    g = torch.Generator().manual_seed(3)
    ids = torch.randint(3, VOCAB, (1, 10), generator=g)
    other = ids.clone()
    other[0, 6:] = torch.randint(3, VOCAB, (4,), generator=g)
    ones = torch.ones_like(ids)
    a, b = logits(model, ids, ones), logits(model, other, ones)
    assert (a[0, :6] - b[0, :6]).abs().max() < 1e-5
    assert (a[0, 6:] - b[0, 6:]).abs().max() > 1e-3


def test_cached_decoding_matches_full_forward_with_noise():
    """Prefill + one cached step == full forward on the same tokens, with non-identity mixing (the bottom-right
    aligned mask and the pseudo-keys mixed from the cached keys)."""
    model = apply_iha(tiny(), IHAConfig(num_pseudo_heads=3, init_noise=0.3))
    ids, mask = padded_batch(length=9)
    full = logits(model, ids, mask)
    with torch.no_grad():
        out = model(input_ids=ids[:, :-1], attention_mask=mask[:, :-1], use_cache=True)
        cache = cache_from_kwargs(dict(out.items()))
        step = model(input_ids=ids[:, -1:], attention_mask=mask, **cache_kwargs(model, cache)).logits
    assert (step[:, -1] - full[:, -1]).abs().max() < 1e-4


def test_symmetry_trap():
    """From the exact init the P copies of a head get identical gradients (they never separate); noise breaks it."""

    def step(noise):
        model = apply_iha(tiny(), IHAConfig(num_pseudo_heads=2, init_noise=noise))
        ids, mask = padded_batch()
        opt = torch.optim.AdamW([p for m in model.modules() if isinstance(m, IHAMixer) for p in m.parameters()],
                                lr=1e-2)
        model(input_ids=ids, attention_mask=mask, labels=ids).loss.backward()
        opt.step()
        return model.model.layers[0].self_attn.iha

    exact = step(0.0)
    for name in ("alpha_q", "alpha_k", "alpha_v", "collapse"):
        param = getattr(exact, name)
        assert torch.allclose(param[..., 0], param[..., 1], atol=1e-7), f"{name}: copies split without noise"
        assert not torch.equal(param.grad, torch.zeros_like(param.grad)), f"{name}: no gradient"
    noisy = step(1e-3)
    assert (noisy.alpha_q.grad[..., 0] - noisy.alpha_q.grad[..., 1]).abs().max() > 0


def test_bf16_conversion_close():
    model = tiny().to(torch.bfloat16)
    ids, mask = padded_batch()
    ref = logits(model, ids, mask).float()
    apply_iha(model, IHAConfig(num_pseudo_heads=3, init_noise=0.0))
    assert model.model.layers[0].self_attn.iha.alpha_q.dtype == torch.bfloat16
    assert max_diff_on_tokens(logits(model, ids, mask).float(), ref, mask) < 0.1


def test_is_iha_model():
    model = tiny()
    assert not is_iha_model(model)
    assert is_iha_model(apply_iha(model, IHAConfig(num_pseudo_heads=2)))
