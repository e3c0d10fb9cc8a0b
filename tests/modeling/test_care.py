import copy
import json
import warnings

import pytest
import torch
from transformers import DynamicCache

from hf_fastslow.integrations import cache_kwargs
from hf_fastslow.modeling.care import (
    CAREConfig,
    KVMoments,
    care_kv_bytes_per_token,
    collect_kv_second_moments,
    convert_gqa_to_mla,
    from_pretrained_care,
    kv_width,
    latent_widths,
    svd_baseline,
)
from tests.conftest import tiny_llama


@pytest.fixture(autouse=True)
def _one_torch_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def qwen2():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, vocab_size=128)).eval()
    with torch.no_grad():  # q/k/v biases are zero at init: make them matter
        for layer in model.model.layers:
            for proj in (layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_()
    return model


def qwen3():
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    return Qwen3ForCausalLM(Qwen3Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                        vocab_size=128)).eval()


def gemma3():
    from tests.quantizers.conftest import tiny_gemma3

    return tiny_gemma3()  # sliding window 8: generation below crosses it


ARCHS = {"llama": lambda: tiny_llama(num_layers=3), "qwen2": qwen2, "qwen3": qwen3, "gemma3": gemma3}


def calibration(n=2, length=24):
    g = torch.Generator().manual_seed(1)
    return [torch.randint(3, 128, (4, length), generator=g) for _ in range(n)]


def care(model, rank, allocation="energy", **kw):
    return convert_gqa_to_mla(model, collect_kv_second_moments(model, calibration()),
                              CAREConfig(rank=rank, allocation=allocation, **kw))


def left_padded():
    ids = torch.randint(3, 128, (2, 14), generator=torch.Generator().manual_seed(2))
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    return ids, mask


@pytest.mark.parametrize("arch", list(ARCHS))
def test_full_rank_equals_original_with_left_padding_and_generate(arch):
    ref = ARCHS[arch]()
    width = kv_width(ref)
    with pytest.warns(UserWarning, match="clamped"):
        model = care(copy.deepcopy(ref), rank=width + 5)
    assert latent_widths(model) == ([width] * len(model.model.layers),) * 2
    ids, mask = left_padded()
    with torch.no_grad():
        diff = (model(ids, attention_mask=mask).logits - ref(ids, attention_mask=mask).logits)[mask.bool()]
    assert diff.abs().max() < 1e-4
    kw = dict(attention_mask=mask, max_new_tokens=12, do_sample=False)
    assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))
    if arch == "llama":  # beam search reorders the latent cache like any other
        assert torch.equal(model.generate(ids, num_beams=3, **kw), ref.generate(ids, num_beams=3, **kw))


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_svd_baseline_at_full_rank_equals_original(arch):
    ref = ARCHS[arch]()
    with pytest.warns(UserWarning, match="clamped"):
        model = svd_baseline(copy.deepcopy(ref), kv_width(ref))
    ids, mask = left_padded()
    with torch.no_grad():
        diff = (model(ids, attention_mask=mask).logits - ref(ids, attention_mask=mask).logits)[mask.bool()]
    assert diff.abs().max() < 1e-4


def test_latent_cache_holds_only_latents_and_decoding_matches_the_full_forward():
    model = care(tiny_llama(num_layers=3), rank=6)
    k_ranks, v_ranks = latent_widths(model)
    assert len(set(k_ranks + v_ranks)) > 1  # allocated ranks differ per layer: the cache must cope
    ids = torch.randint(3, 128, (2, 20), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        full = model(ids).logits
        cache = DynamicCache(config=model.config)
        out = [model(ids[:, :12], **cache_kwargs(model, cache)).logits]
        for t in range(12, 20):
            out.append(model(ids[:, t : t + 1], **cache_kwargs(model, cache)).logits)
        assert (torch.cat(out, 1) - full).abs().max() < 1e-4
        for layer, (r_k, r_v) in enumerate(zip(k_ranks, v_ranks)):
            assert tuple(cache.layers[layer].keys.shape) == (2, 1, 20, r_k)
            assert tuple(cache.layers[layer].values.shape) == (2, 1, 20, r_v)
        cache.crop(-5)  # drop 5 tokens, re-feed them: same logits
        again = model(ids[:, 15:], **cache_kwargs(model, cache)).logits
        assert (again - full[:, 15:]).abs().max() < 1e-4
        cache.crop(0)
        assert cache.get_seq_length() == 20


def test_kv_bytes_per_token_is_the_walked_latent_storage():
    ref = tiny_llama(num_layers=3)
    model = care(copy.deepcopy(ref), rank=6)
    k_ranks, v_ranks = latent_widths(model)
    bytes_per_value = 4  # fp32
    assert care_kv_bytes_per_token(model)["bytes_per_token"] == pytest.approx(
        (sum(k_ranks) + sum(v_ranks)) * bytes_per_value)
    assert care_kv_bytes_per_token(ref)["bytes_per_token"] == pytest.approx(2 * 3 * kv_width(ref) * bytes_per_value)


def test_static_cache_generation_matches_the_dynamic_cache():
    model = care(tiny_llama(num_layers=3), rank=6)
    ids, mask = left_padded()
    kw = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(model.generate(ids, cache_implementation="static", **kw), model.generate(ids, **kw))


def test_whitened_factorisation_reaches_the_tail_energy_and_beats_plain_svd():
    from hf_fastslow.modeling.care import whitened_factors, whitening_matrices

    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 12, generator=g, dtype=torch.float64) * torch.logspace(0, -2, 12, dtype=torch.float64)
    w = torch.randn(12, 8, generator=g, dtype=torch.float64)
    moment = x.T @ x / x.shape[0]
    down, sigma, up = whitened_factors(whitening_matrices(moment, 0.0), w)
    chol = torch.linalg.cholesky(moment).T  # another square root: S^T S = C gives the same minimiser
    c_down, _, c_up = whitened_factors((chol, torch.linalg.inv(chol)), w)
    for r in range(1, 8):
        approx = down[:, :r] @ up[:r]
        err = ((x @ (w - approx)) ** 2).sum() / x.shape[0]
        assert err.item() == pytest.approx(sigma[r:].pow(2).sum().item(), rel=1e-6)
        u, s, vh = torch.linalg.svd(w, full_matrices=False)
        plain = ((x @ (w - u[:, :r] * s[:r] @ vh[:r])) ** 2).sum() / x.shape[0]
        assert err <= plain + 1e-12
        assert torch.allclose(c_down[:, :r] @ c_up[:r], approx, atol=1e-8)


def test_rank_allocation_sums_to_the_budget_within_bounds_and_favours_flat_spectra():
    from hf_fastslow.modeling.care_config import allocate_ranks

    flat = torch.ones(16)
    steep = 2.0 ** -torch.arange(16.0)
    medium = 1.0 / (1 + torch.arange(16.0))
    spectra = [steep, flat, medium]
    for rule in ("paper", "energy"):
        for rank in range(2, 11):
            ranks = allocate_ranks(spectra, rank, rule)
            assert sum(ranks) == 3 * rank
            assert all(max(1, rank // 2) <= r <= min(2 * rank, 16) for r in ranks)
        ranks = allocate_ranks(spectra, 6, rule)
        if rule == "energy":
            assert ranks[1] > ranks[0]  # a flat spectrum needs more rank than a steep one
        else:  # the paper's score is a share of the remaining tail: a geometric spectrum keeps scoring 3/4 forever
            assert ranks[0] > ranks[1]
        previous = None
        for rank in range(4, 9):  # fixed bounds: a larger budget never takes rank away from a layer
            ranks = allocate_ranks(spectra, rank, rule, rank_min=2, rank_max=16)
            assert previous is None or all(a >= b for a, b in zip(ranks, previous))
            previous = ranks
        tied = allocate_ranks([flat] * 3, 5, rule, rank_min=1, rank_max=16)
        assert tied == allocate_ranks([flat] * 3, 5, rule, rank_min=1, rank_max=16)
        # equal gains: energy deals them round robin (earlier layer first); the paper's score grows with the rank
        # on a flat spectrum (1 / remaining), so the first layer runs away with the budget
        assert tied == ([5, 5, 5] if rule == "energy" else [13, 1, 1])
    assert allocate_ranks(spectra, 5, "uniform") == [5, 5, 5]
    with pytest.raises(ValueError, match="cannot be met"):
        allocate_ranks(spectra, 4, "energy", rank_min=6)
    with pytest.raises(ValueError, match="cannot be met"):
        allocate_ranks(spectra, 12, "paper", rank_max=8)


def test_bad_input_raises_a_clear_error_and_leaves_the_model_unchanged():
    model = tiny_llama(num_layers=3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    moments = collect_kv_second_moments(model, calibration())

    def unchanged():
        assert {k: v for k, v in model.state_dict().items()}.keys() == before.keys()
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
        assert type(model.model.layers[0].self_attn).__name__ == "LlamaAttention"

    with pytest.raises(ValueError, match="rank must be >= 1"):
        CAREConfig(rank=0)
    with pytest.raises(ValueError, match="allocation"):
        CAREConfig(rank=4, allocation="greedy")
    for allocation in ("uniform", "paper", "energy"):
        with pytest.raises(ValueError, match="cannot be met"):
            convert_gqa_to_mla(model, moments, CAREConfig(rank=4, rank_min=8, allocation=allocation))
        unchanged()
    with pytest.raises(ValueError, match="moments for 2 layers"):
        convert_gqa_to_mla(model, KVMoments(moments.second[:2], moments.n_tokens), CAREConfig(rank=4))
    unchanged()
    bad = [m.clone() for m in moments.second]
    bad[1][0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer 1 are not finite"):
        convert_gqa_to_mla(model, KVMoments(bad, moments.n_tokens), CAREConfig(rank=4))
    unchanged()
    with pytest.raises(ValueError, match="no calibration batches"):
        collect_kv_second_moments(model, [])
    with pytest.raises(TypeError, match="input_ids"):
        collect_kv_second_moments(model, [torch.randn(2, 8)])
    unchanged()
    convert_gqa_to_mla(model, moments, CAREConfig(rank=4))
    with pytest.raises(ValueError, match="already converted"):
        convert_gqa_to_mla(model, moments, CAREConfig(rank=4))


def test_unsupported_architectures_are_refused_by_name():
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64))
    with pytest.raises(NotImplementedError, match="model_type='gpt2'"):
        collect_kv_second_moments(gpt2, [torch.randint(0, 64, (1, 8))])
    with pytest.raises(NotImplementedError, match="model_type='gpt2'"):
        svd_baseline(gpt2, 4)
    llama = tiny_llama(num_layers=2)
    llama.config.partial_rotary_factor = 0.5
    with pytest.raises(NotImplementedError, match="partial RoPE"):
        svd_baseline(llama, 4)
    assert type(llama.model.layers[0].self_attn).__name__ == "LlamaAttention"


@pytest.mark.parametrize("arch,method", [("llama", "care"), ("qwen2", "care"), ("qwen2", "svd")])
def test_save_pretrained_and_reload_round_trip(tmp_path, arch, method):
    ref = ARCHS[arch]()
    model = care(ref, rank=6) if method == "care" else svd_baseline(ref, 6)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["care"]["k_ranks"] == latent_widths(model)[0] and saved["care"]["method"] == method
    reloaded = from_pretrained_care(tmp_path)
    assert latent_widths(reloaded) == latent_widths(model)
    ids, mask = left_padded()
    with torch.no_grad():
        assert torch.equal(reloaded(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits)
    plain = tmp_path / "plain"
    tiny_llama(num_layers=2).save_pretrained(plain)
    with pytest.raises(ValueError, match="not a CARE-converted checkpoint"):
        from_pretrained_care(plain)


@pytest.mark.slow
def test_default_model_half_kv_width_one_shot_care_beats_svd(default_model):
    model, tok = default_model
    from hf_fastslow.evaluation.kv_ppl import cache_perplexity
    from hf_fastslow.evaluation.prompts import bundled_text_ids, gsm8k_rows

    # the benchmark's calibration: 256 GSM8K questions x 32 tokens (never the evaluation text)
    questions = [tok(row["question"], return_tensors="pt").input_ids[0] for row in gsm8k_rows(320)]
    calib = list(torch.stack([q[:32] for q in questions if len(q) >= 32][:256]).split(32))
    ids = bundled_text_ids(tok, 512)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        base = cache_perplexity(model, ids, None)["ppl"]
        half = kv_width(model) // 2
        care_ppl = cache_perplexity(care_model := convert_gqa_to_mla(
            copy.deepcopy(model), collect_kv_second_moments(model, calib), CAREConfig(rank=half)), ids, None)["ppl"]
        svd_ppl = cache_perplexity(svd_baseline(copy.deepcopy(model), half), ids, None)["ppl"]
    # measured (docs/care.md): 28.99 -> CARE 44.30 (x1.53), SVD 26,642
    assert care_ppl < 1.6 * base and svd_ppl > 100 * care_ppl
    del care_model


def test_bf16_model_converts_and_caches_bf16_latents():
    ref = tiny_llama(num_layers=2).to(torch.bfloat16)
    model = care(copy.deepcopy(ref), rank=kv_width(ref) // 2, allocation="uniform")
    assert model.model.layers[0].self_attn.k_down.weight.dtype == torch.bfloat16
    ids, mask = left_padded()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, return_dict_in_generate=True)
    from hf_fastslow.integrations import output_cache

    cache = output_cache(out)
    assert cache.layers[0].keys.dtype == torch.bfloat16 and cache.layers[0].keys.shape[-1] == kv_width(ref) // 2
