"""The transformers seam (hf_fastslow.integrations), run against every supported transformers version (5.17, 5.24)."""

import inspect

import pytest
import torch
from transformers import DynamicCache, GenerationConfig

import hf_fastslow
from hf_fastslow import integrations
from hf_fastslow.integrations import cache_kwarg_name, cache_kwargs, output_cache
from tests.conftest import tiny_llama

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def model():
    return tiny_llama(num_layers=2, hidden=32, heads=2, kv_heads=1)


def test_cache_kwarg_matches_installed_transformers(model):
    params = inspect.signature(type(model).forward).parameters
    expected = "cache" if "cache" in params else "past_key_values"
    assert cache_kwarg_name(model) == expected
    assert cache_kwarg_name() == expected
    cache = DynamicCache(config=model.config)
    out = model(torch.randint(3, 128, (1, 5)), **cache_kwargs(model, cache))
    assert output_cache(out) is cache and cache.get_seq_length() == 5


def test_registered_factory_receives_model_and_config(model):
    calls = []

    def factory(m, cfg):
        calls.append((m, cfg))
        return DynamicCache(config=m.config)

    hf_fastslow.register_cache_implementation("test_factory", factory)
    try:
        out = model.generate(torch.randint(3, 128, (1, 4)), max_new_tokens=3, do_sample=False,
                             cache_implementation="test_factory", cache_config={"a": 1}, return_dict_in_generate=True)
        assert calls and calls[0][0] is model and calls[0][1] == {"a": 1}
        assert type(output_cache(out)) is DynamicCache
    finally:
        hf_fastslow.unregister_cache_implementation("test_factory")
    assert "test_factory" not in integrations.registered_cache_implementations()


def test_registered_name_and_user_cache_together_is_rejected(model):
    with pytest.raises(ValueError, match="unsupported|Passing both"):
        model.generate(torch.randint(3, 128, (1, 4)), max_new_tokens=2, cache_implementation="xquant",
                       **cache_kwargs(model, DynamicCache(config=model.config)))


def test_builtin_xquant_names_registered():
    assert {"xquant", "xquant_cl"} <= set(integrations.registered_cache_implementations())
    GenerationConfig(cache_implementation="xquant").validate()


def test_bad_registration_arguments():
    with pytest.raises(ValueError):
        hf_fastslow.register_cache_implementation("", lambda m, c: None)
    with pytest.raises(TypeError):
        hf_fastslow.register_cache_implementation("x_not_callable", 3)


def test_register_attention_adds_function_and_mask(model):
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.masking_utils import AttentionMaskInterface

    calls = []

    def counting_sdpa(module, q, k, v, mask, **kw):
        calls.append(q.shape)
        return sdpa_attention_forward(module, q, k, v, mask, **kw)

    hf_fastslow.register_attention("hf_fastslow_test_sdpa", counting_sdpa)
    assert "hf_fastslow_test_sdpa" in AttentionInterface._global_mapping
    assert "hf_fastslow_test_sdpa" in AttentionMaskInterface._global_mapping
    ids = torch.randint(3, 128, (1, 6))
    ref = model(ids).logits
    model.set_attn_implementation("hf_fastslow_test_sdpa")
    try:
        out = model(ids).logits
    finally:
        model.set_attn_implementation("sdpa")
    assert len(calls) == 2
    torch.testing.assert_close(out, ref)


def test_strip_gguf_quantization_allows_save(tmp_path, model):
    class FakeQuantizer:
        pass

    model.hf_quantizer = FakeQuantizer()
    model.config.quantization_config = {"quant_method": "gguf"}
    integrations.strip_gguf_quantization(model)
    assert model.hf_quantizer is None and getattr(model.config, "quantization_config", None) is None
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()


def test_rotary_helpers_match_the_model(model):
    attn = model.model.layers[0].self_attn
    pos = torch.arange(7).unsqueeze(0)
    x = torch.zeros(1, 7, 32)
    cos, sin = integrations.rotary_embeddings(model, attn, x, pos)
    ref_cos, ref_sin = model.model.rotary_emb(x, pos)
    torch.testing.assert_close(cos, ref_cos)
    torch.testing.assert_close(sin, ref_sin)
    assert callable(integrations.apply_rotary_fn(attn))
