"""QVGCache against transformers' generate on the default model: left padding, beams, a prefilled prompt cache, and
perplexity through the cache (quantized reads must stay close to DynamicCache, sinks must matter at int2)."""

import copy

import pytest
import torch

from hf_fastslow import QVGCache, QVGConfig
from hf_fastslow.evaluation.kv_ppl import bundled_text, cache_perplexity
from hf_fastslow.integrations import cache_kwargs

pytestmark = pytest.mark.integration

OFF = {"nbits": 16, "chunk_tokens": 4, "sink_tokens": 2}  # chunks of 4: the prompts are read back from spans



def greedy(model, inputs, max_new_tokens=8, **kw):
    with torch.no_grad():
        return model.generate(**inputs, do_sample=False, max_new_tokens=max_new_tokens, **kw)


def test_left_padded_batch_off_gives_dynamic_cache_text(default_model):
    model, tok = default_model
    inputs = tok(["A sequence: 1, 2, 3, 4, 5", "A sequence: A, B"], padding=True, padding_side="left",
                 return_tensors="pt")
    assert (inputs.attention_mask == 0).any()
    kw = dict(output_logits=True, return_dict_in_generate=True)
    ref = greedy(model, inputs, **kw)
    out = greedy(model, inputs, cache_implementation="qvg", cache_config=OFF, **kw)
    assert tok.batch_decode(out.sequences) == tok.batch_decode(ref.sequences)
    torch.testing.assert_close(torch.stack(out.logits), torch.stack(ref.logits), atol=1e-3, rtol=1e-3)


@pytest.mark.slow
def test_beam_search_off_equals_dynamic_cache(default_model):
    model, tok = default_model
    inputs = tok(["Blue is"], return_tensors="pt")
    kw = dict(num_beams=2, num_return_sequences=2, return_dict_in_generate=True)
    ref = greedy(model, inputs, **kw)
    out = greedy(model, inputs, cache_implementation="qvg", cache_config=OFF, **kw)
    assert any(len(set(beams.tolist())) > 1 for beams in out.beam_indices)  # reorder_cache had to move rows
    assert tok.batch_decode(out.sequences) == tok.batch_decode(ref.sequences)


@pytest.mark.slow
def test_prefilled_prompt_cache_is_reused(default_model):
    model, tok = default_model
    system = "You are a helpful assistant. Answer briefly."
    system_ids = tok(system, return_tensors="pt").input_ids
    prompt_cache = QVGCache(model, QVGConfig(**OFF))
    with torch.no_grad():
        model(system_ids, **cache_kwargs(model, prompt_cache))
    inputs = tok(system + " What is the capital of France?", return_tensors="pt")
    assert torch.equal(inputs.input_ids[:, : system_ids.shape[1]], system_ids)
    out = greedy(model, inputs, **cache_kwargs(model, copy.deepcopy(prompt_cache)))
    assert tok.decode(out[0]) == tok.decode(greedy(model, inputs)[0])
    assert prompt_cache.get_seq_length() == system_ids.shape[1]


@pytest.mark.slow
def test_perplexity_through_the_cache_stays_close_and_sinks_matter(default_model):
    model, tok = default_model
    ids = tok(bundled_text(), return_tensors="pt").input_ids[:, :256]

    def ppl(**kw):
        factory = None if not kw else (lambda: QVGCache(model, QVGConfig(chunk_tokens=64, **kw)))
        return cache_perplexity(model, ids, factory, chunk=64)["ppl"]

    ref = ppl()
    assert ppl(nbits=4, num_stages=1) < ref * 1.02
    with_sinks, without = ppl(nbits=2, num_stages=1), ppl(nbits=2, num_stages=1, sink_tokens=0)
    assert with_sinks < ref * 1.10 < without
