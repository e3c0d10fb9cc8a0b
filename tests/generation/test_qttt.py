"""qTTT: frozen-cache span passes, parameter scope, bit-for-bit restore, the zero-step reduction, errors."""

import pytest
import torch

from hf_fastslow.generation.qttt import QTTTConfig, QueryOnlyTTT, encode_context_question, qttt_generate
from hf_fastslow.modeling.block_diffusion import additive_attention_mask
from hf_fastslow.modeling.frozen_cache import FrozenContextCache, span_attention_mask
from tests.conftest import byte_tokenizer, tiny_llama


def _full_logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("start,length", [(0, 5), (7, 9), (20, 11)])
def test_span_logits_over_frozen_cache_equal_full_forward(impl, start, length):
    model = tiny_llama(kv_heads=2, attn_implementation=impl)  # GQA: 4 query heads share 2 kv heads
    ids = torch.randint(3, 128, (1, 32))
    full = _full_logits(model, ids)
    with QueryOnlyTTT(model, QTTTConfig(steps=0)) as ttt:
        cache = ttt.prefill(ids)
        with torch.no_grad():
            loss = ttt.span_loss(ids, cache, start, length)
            mask = additive_attention_mask(span_attention_mask(start, length, 32), torch.float32)
            pos = torch.arange(start, start + length)[None]
            from hf_fastslow.integrations import cache_kwargs

            span = model(input_ids=ids[:, start:start + length], attention_mask=mask, position_ids=pos,
                         **cache_kwargs(model, cache)).logits
    torch.testing.assert_close(span, full[:, start:start + length], atol=1e-5, rtol=1e-5)
    ref = torch.nn.functional.cross_entropy(full[0, start:start + length], ids[0, start + 1:start + length + 1])
    torch.testing.assert_close(loss, ref, atol=1e-5, rtol=1e-5)
    assert cache.get_seq_length() == 32  # reading never grew the frozen cache


def test_wrong_query_offset_is_detected():
    # Negative control: a span whose mask lets every query see the whole context differs from the full forward.
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 24))
    full = _full_logits(model, ids)
    with QueryOnlyTTT(model, QTTTConfig(steps=0)) as ttt:
        cache = ttt.prefill(ids)
        from hf_fastslow.integrations import cache_kwargs

        with torch.no_grad():
            span = model(input_ids=ids[:, 4:10], attention_mask=torch.zeros(1, 1, 6, 24),
                         position_ids=torch.arange(4, 10)[None], **cache_kwargs(model, cache)).logits
    assert (span - full[:, 4:10]).abs().max() > 1e-3


def test_only_query_projections_change_and_reset_restores_bit_for_bit():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    ids = torch.randint(3, 128, (1, 40))
    with QueryOnlyTTT(model, QTTTConfig(steps=4, span_len=8, lr=1e-2)) as ttt:
        state = ttt.adapt(ids)
        kv_before = [(k.clone(), v.clone()) for k, v in state.cache.layer_tensors()]
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
        ttt.generate(torch.cat([ids, torch.tensor([[5, 6]])], 1), state, max_new_tokens=3, do_sample=False)
        for (k0, v0), (k1, v1) in zip(kv_before, state.cache.layer_tensors()):
            assert torch.equal(k0, k1) and torch.equal(v0, v1)  # answering copied the cache, never wrote into it
    assert changed and all(".q_proj." in n for n in changed)
    assert len(changed) == 3  # every layer's query projection moved
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]), n
        assert p.requires_grad == flags[n]
    assert len(state.losses) == 4


def test_full_parameter_target_updates_more_than_queries():
    model = tiny_llama()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with QueryOnlyTTT(model, QTTTConfig(steps=2, span_len=8, lr=1e-2, target="all")) as ttt:
        ttt.adapt(torch.randint(3, 128, (1, 30)))
        changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(".mlp." in n for n in changed) and any(".q_proj." in n for n in changed)


def test_adaptation_lowers_the_context_loss():
    model = tiny_llama()
    ids = torch.randint(3, 128, (1, 48))
    with QueryOnlyTTT(model, QTTTConfig(steps=30, span_len=16, lr=3e-2, seed=1)) as ttt:
        state = ttt.adapt(ids)
        start = sum(state.losses[:5]) / 5
        end = sum(state.losses[-5:]) / 5
    assert end < start - 0.05, (start, end)


def test_zero_steps_equals_plain_greedy_generation():
    model = tiny_llama(vocab=259).double()
    tok = byte_tokenizer()
    context, question = "alpha: 17\nbeta: 42\ngamma: 99\n", "What is beta?"
    ids, start, end = encode_context_question(tok, context, question)
    assert tok.decode(ids[0, start:end]) == context
    answer = qttt_generate(model, tok, context, question, QTTTConfig(steps=0), max_new_tokens=8)
    with torch.no_grad():
        plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False)
    assert answer == tok.decode(plain[0, ids.shape[1]:], skip_special_tokens=True)


def test_qttt_generate_restores_weights_and_reports_spans_inside_the_context():
    model = tiny_llama(vocab=259)
    tok = byte_tokenizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    context = "key 1: red\nkey 2: blue\nkey 3: green\n" * 2
    _, state = qttt_generate(model, tok, context, "key 2?", QTTTConfig(steps=3, span_len=500, lr=1e-2),
                             return_state=True, max_new_tokens=4)
    _, start, end = encode_context_question(tok, context, "key 2?")
    for s, length in state.spans:  # span_len 500 > context: clamped, inputs and targets inside the context
        assert start <= s and s + length <= end - 1 and length == end - start - 1
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_weights_restored_when_generation_raises():
    model = tiny_llama(vocab=259)
    tok = byte_tokenizer()
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(ValueError):
        qttt_generate(model, tok, "some context here", "q?", QTTTConfig(steps=2, lr=1e-2), max_new_tokens=-3)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_span_sampler_is_seeded_and_clamped():
    model = tiny_llama()
    ttt = QueryOnlyTTT(model, QTTTConfig(steps=50, span_len=10, seed=3))
    spans = ttt.sample_spans(30, span_start=5)
    assert spans == QueryOnlyTTT(model, QTTTConfig(steps=50, span_len=10, seed=3)).sample_spans(30, 5)
    assert all(5 <= s and s + n <= 29 and n == 10 for s, n in spans)
    assert {n for _, n in ttt.sample_spans(8)} == {7}
    with pytest.raises(ValueError, match="at least 2 tokens"):
        ttt.sample_spans(6, span_start=5)


def test_errors():
    for bad in [dict(steps=-1), dict(span_len=0), dict(lr=0), dict(optimizer="lion"), dict(target="k_proj")]:
        with pytest.raises(ValueError):
            QTTTConfig(**bad)
    model = tiny_llama(vocab=259)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        qttt_generate(model, byte_tokenizer(), "x", "question?")
    ttt = QueryOnlyTTT(model)
    with pytest.raises(RuntimeError, match="context manager"):
        ttt.adapt(torch.randint(3, 100, (1, 10)))
    with QueryOnlyTTT(model) as ttt, pytest.raises(ValueError, match="one context"):
        ttt.adapt(torch.randint(3, 100, (2, 10)))
    with pytest.raises(TypeError, match="read-only"):
        FrozenContextCache([(torch.zeros(1, 1, 4, 2), torch.zeros(1, 1, 4, 2))]).crop(-1)


def test_fused_qkv_models_are_refused():
    from transformers import Phi3Config, Phi3ForCausalLM

    cfg = Phi3Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=4, pad_token_id=0)
    with pytest.raises(NotImplementedError, match="qkv"):
        QueryOnlyTTT(Phi3ForCausalLM(cfg))
