"""XQuantCache against transformers' own contract: `crop` with `DynamicCache.crop` semantics (every n, sliding
layers included), deep copies, and transformers' cache integration checks (batched left padding, beam reorder, extra
left padding, a copied prompt cache, assisted and prompt-lookup decoding) on the default model, unquantized and at
8 bits, each against what the same call returns with the default DynamicCache."""

import copy

import pytest
import torch
from packaging.version import Version
from transformers import DynamicCache

from hf_fastslow import XQuantCache, XQuantConfig
from hf_fastslow.integrations import TRANSFORMERS_VERSION, cache_kwargs
from tests.conftest import tiny_llama
from tests.quantizers.conftest import tiny_gemma3

pytestmark = pytest.mark.integration


def forward(model, ids, cache, **kw):
    with torch.no_grad():
        return model(ids, **cache_kwargs(model, cache), **kw).logits


def _llama():
    return tiny_llama(num_layers=4, hidden=64, heads=4, kv_heads=1, seed=0)




# ---------------------------------------------------------------------------------------------------------------------
# crop: DynamicCache semantics for every n
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("build,mode", [(_llama, "latent"), (_llama, "cl"), (tiny_gemma3, "latent"), (tiny_gemma3, "x"),
                                        (tiny_gemma3, "cl")], ids=["llama-latent", "llama-cl", "gemma3-sliding-latent",
                                                               "gemma3-sliding-x", "gemma3-sliding-cl"])
def test_crop_matches_dynamic_cache_for_every_n(build, mode):
    model = build()
    n_prompt = 30  # 3 quantized blocks of 8 + 6 in the window; the sliding window (8) is long past
    ids = torch.randint(3, 128, (1, n_prompt))
    nxt = torch.randint(3, 128, (1, 2))
    ours = XQuantCache(model, XQuantConfig(nbits=16, mode=mode, group_size=8, residual_length=8, base_layer=1))
    ref = DynamicCache(config=model.config)
    # What assisted decoding does first: sliding-window layers keep what a crop may need to restore.
    ours.activate_past_recording()
    ref.activate_past_recording()
    steps = torch.randint(3, 128, (1, 4))
    # The reference reads prompt and steps in one forward (transformers 5.17's sliding layers cannot run a second
    # forward while recording, before a crop); ours decodes the steps one by one, after each of which a sliding layer
    # that did not record its past would forget blocks.
    ref_logits = forward(model, torch.cat([ids, steps], 1), ref)
    torch.testing.assert_close(forward(model, ids, ours), ref_logits[:, :n_prompt], atol=1e-4, rtol=1e-4)
    for i in range(4):
        at = n_prompt + i
        torch.testing.assert_close(forward(model, steps[:, i : i + 1], ours), ref_logits[:, at : at + 1], atol=1e-4,
                                   rtol=1e-4)
    total = n_prompt + 4
    # crop(-n) removes n tokens (crop(0) removes none); a positive m keeps m tokens (DynamicCache 5.24 rejects
    # positive values: it is compared with the equivalent crop(m - length)).
    calls = [(-n, -n) for n in range(total + 1)] + [(m, m - total) for m in range(1, total + 1)]
    for ours_arg, ref_arg in calls:
        a, b = copy.deepcopy(ours), copy.deepcopy(ref)
        a.crop(ours_arg)
        b.crop(ref_arg)
        assert a.get_seq_length() == b.get_seq_length(), f"crop({ours_arg})"
        for la, lb in zip(a.layers, b.layers):  # sliding layers keep whole blocks: their offsets differ by design
            assert la.is_sliding or la.get_mask_sizes(2) == lb.get_mask_sizes(2)
        torch.testing.assert_close(forward(model, nxt, a), forward(model, nxt, b), atol=1e-4, rtol=1e-4,
                                   msg=lambda m, arg=ours_arg: f"crop({arg}): {m}")


def test_crop_zero_keeps_everything_and_quantized_crops_stay_consistent():
    model = _llama()
    ids = torch.randint(3, 128, (2, 37))
    cache = XQuantCache(model, XQuantConfig(nbits=4, mode="cl", group_size=8, residual_length=8, base_layer=1))
    forward(model, ids, cache)
    before = cache.nbytes()
    cache.crop(0)
    assert cache.get_seq_length() == 37 and cache.nbytes() == before
    cache.crop(-37 - 5)  # more than it holds: empty, as DynamicCache
    assert cache.get_seq_length() == 0
    forward(model, ids[:, :5], cache)  # and usable again
    assert cache.get_seq_length() == 5


# ---------------------------------------------------------------------------------------------------------------------
# deepcopy
# ---------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["latent", "cl"])
def test_deepcopy_copies_storage_and_stays_bound_to_the_model(mode):
    model = _llama()
    ids = torch.randint(3, 128, (1, 20))
    cache = XQuantCache(model, XQuantConfig(nbits=4, mode=mode, group_size=8, residual_length=8, base_layer=1))
    forward(model, ids, cache)
    clone = copy.deepcopy(cache)
    assert clone.model is model and all(a.plan is b.plan for a, b in zip(clone.layers, cache.layers))
    nxt = torch.randint(3, 128, (1, 3))
    out_clone = forward(model, nxt, clone)  # the copy grows ...
    assert cache.get_seq_length() == 20 and clone.get_seq_length() == 23  # ... the original does not
    torch.testing.assert_close(forward(model, nxt, cache), out_clone)


# ---------------------------------------------------------------------------------------------------------------------
# transformers' cache integration checks, on the default model: the text must be what DynamicCache gives.
# Each takes 2-5 s on one thread: the 8-bit runs (which also quantize) are in the default suite, the unquantized
# runs are marked slow.
# ---------------------------------------------------------------------------------------------------------------------
XQUANT_SETTINGS = {
    "off": {"nbits": 16},
    # 8 bits with a window of 8 tokens, so that these short prompts really are read back quantized
    "8bit": {"nbits": 8, "group_size": 8, "residual_length": 8},
}
SETTINGS = [pytest.param("off", marks=pytest.mark.slow), "8bit"]


def greedy(model, inputs, max_new_tokens=10, **kw):
    with torch.no_grad():
        return model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, **kw)


def test_left_padding_by_four_keeps_rope_positions(default_model):
    """Rows padded by different amounts: the cache must rotate every rebuilt key at the row's own positions."""
    model, tok = default_model
    inputs = tok(["The capital of France is", "Everybody knows that the capital of France is"], padding=True,
                 padding_side="left", return_tensors="pt")
    assert int((inputs.attention_mask == 0).sum()) == 4
    kw = dict(output_logits=True, return_dict_in_generate=True)
    ref = greedy(model, inputs, **kw)
    # a window of 8: from the first decode step on, the prompts are rebuilt from the cache's quantized blocks
    out = greedy(model, inputs, cache_implementation="xquant",
                 cache_config={"nbits": 16, "group_size": 8, "residual_length": 8}, **kw)
    assert tok.batch_decode(out.sequences) == tok.batch_decode(ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("setting", SETTINGS)
def test_batched_left_padding(default_model, setting):
    model, tok = default_model
    inputs = tok(["A sequence: 1, 2, 3, 4, 5", "A sequence: A, B, C"], padding=True, padding_side="left",
                 return_tensors="pt")
    assert (inputs.attention_mask == 0).any()
    ref = greedy(model, inputs)
    out = greedy(model, inputs, cache_implementation="xquant", cache_config=XQUANT_SETTINGS[setting],
                 return_dict_in_generate=True)
    assert isinstance(out.past_key_values if hasattr(out, "past_key_values") else out.cache, XQuantCache)
    assert tok.batch_decode(out.sequences, skip_special_tokens=True) == tok.batch_decode(ref, skip_special_tokens=True)


@pytest.mark.parametrize("setting", SETTINGS)
def test_beam_search_reorders(default_model, setting):
    model, tok = default_model
    inputs = tok(["Blue is"], return_tensors="pt")
    kw = dict(num_beams=2, num_return_sequences=2, return_dict_in_generate=True)
    ref = greedy(model, inputs, **kw)
    out = greedy(model, inputs, cache_implementation="xquant", cache_config=XQUANT_SETTINGS[setting], **kw)
    assert any(len(set(beams.tolist())) > 1 for beams in out.beam_indices)  # reorder_cache had to move rows
    assert tok.batch_decode(out.sequences) == tok.batch_decode(ref.sequences)


@pytest.mark.parametrize("setting", SETTINGS)
def test_extra_left_padding_changes_nothing(default_model, setting):
    model, tok = default_model
    plain = tok(["The cat"], padding=True, padding_side="left", return_tensors="pt")
    padded = tok(["The cat"], padding=True, padding_side="left", pad_to_multiple_of=32, return_tensors="pt")
    assert padded.input_ids.shape[1] > plain.input_ids.shape[1]
    kw = dict(cache_implementation="xquant", cache_config=XQUANT_SETTINGS[setting])
    ref = tok.batch_decode(greedy(model, plain), skip_special_tokens=True)
    assert tok.batch_decode(greedy(model, plain, **kw), skip_special_tokens=True) == ref
    assert tok.batch_decode(greedy(model, padded, **kw), skip_special_tokens=True) == ref


@pytest.mark.parametrize("setting", SETTINGS)
def test_copied_prompt_cache_is_reused(default_model, setting):
    """A prefilled prompt cache, deep-copied for each question, gives what a freshly prefilled one gives (and, off,
    what plain greedy gives: at 8 bits the question reads the prompt back quantized, plain greedy does not)."""
    model, tok = default_model
    system = "You are a helpful assistant."
    system_ids = tok(system, return_tensors="pt").input_ids

    def prefilled():
        cache = XQuantCache(model, XQuantConfig(**XQUANT_SETTINGS[setting]))
        forward(model, system_ids, cache)
        return cache

    prompt_cache = prefilled()
    held = prompt_cache.get_seq_length()
    for question in [" Help me to write a blogpost about travelling.", " What is the capital of France?"]:
        inputs = tok(system + question, return_tensors="pt")
        assert torch.equal(inputs.input_ids[:, :held], system_ids)  # the cached tokens are a prefix of the prompt
        out = greedy(model, inputs, **cache_kwargs(model, copy.deepcopy(prompt_cache)))
        fresh = greedy(model, inputs, **cache_kwargs(model, prefilled()))
        assert tok.decode(out[0]) == tok.decode(fresh[0])
        if setting == "off":
            assert tok.decode(out[0]) == tok.decode(greedy(model, inputs)[0])
    assert prompt_cache.get_seq_length() == held  # the copies grew, the prompt cache did not


@pytest.fixture(scope="module")
def tiny_assistant(default_model):
    """A random 2-layer model with the default model's vocabulary: most of its drafts are rejected."""
    model, _ = default_model
    return tiny_llama(num_layers=2, hidden=64, heads=4, kv_heads=2, vocab=model.config.vocab_size, seed=7)


ASSISTANT_SKIP = pytest.mark.skipif(
    TRANSFORMERS_VERSION < Version("5.18"),
    reason="transformers 5.17 hands the main cache_implementation to the assistant's generate and then refuses it next "
    "to the assistant's own cache, for every cache implementation (DynamicCache included)")


@pytest.mark.parametrize("decoding,setting", [
    # itself as assistant: every draft accepted, crop(-0) each round; a tiny random one: crops of every size
    pytest.param("assistant: itself", "off", marks=[pytest.mark.slow, ASSISTANT_SKIP]),
    pytest.param("assistant: itself", "8bit", marks=ASSISTANT_SKIP),
    pytest.param("assistant: tiny random", "off", marks=[pytest.mark.slow, ASSISTANT_SKIP]),
    pytest.param("assistant: tiny random", "8bit", marks=ASSISTANT_SKIP),
    pytest.param("prompt lookup", "off", marks=pytest.mark.slow),
    ("prompt lookup", "8bit"),
])
def test_assisted_and_prompt_lookup_decoding_equal_greedy(default_model, tiny_assistant, decoding, setting):
    model, tok = default_model
    inputs = tok(["The cat sat on the mat. The dog sat on the log. The cat sat on the"], return_tensors="pt")
    extra = {"assistant: itself": {"assistant_model": model}, "assistant: tiny random": {
        "assistant_model": tiny_assistant}, "prompt lookup": {"prompt_lookup_num_tokens": 3}}[decoding]
    ref = greedy(model, inputs, max_new_tokens=12)
    out = greedy(model, inputs, max_new_tokens=12, cache_implementation="xquant",
                 cache_config=XQUANT_SETTINGS[setting], **extra)
    assert tok.decode(out[0]) == tok.decode(ref[0])
