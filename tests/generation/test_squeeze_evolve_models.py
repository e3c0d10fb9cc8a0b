"""Squeeze Evolve on real backends: a tiny random Llama on HFLocalBackend (fast), the default model (slow), and one
test against a real `transformers serve` subprocess (the `served_model` fixture; marked serve)."""

import pytest
import torch

from hf_fastslow.backends.hf_local import HFLocalBackend
from hf_fastslow.generation.evolution_baselines import RSA
from hf_fastslow.generation.evolution_fitness import confidence_from_top_logprobs, token_confidence
from hf_fastslow.generation.squeeze_evolve import SqueezeEvolve
from hf_fastslow.generation.squeeze_evolve_config import SqueezeEvolveConfig, Tier
from tests.conftest import byte_tokenizer, tiny_llama

PROBLEM = "What is 12 + 30? Reply with just the number."


def prefill_confidence(model, prompt_ids, generated_ids, k):
    """C_i of each generated token from one forward over prompt + generated ids (no re-tokenization)."""
    ids = torch.tensor([prompt_ids + generated_ids])
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, len(prompt_ids) - 1: -1]
    return token_confidence(logits, k)


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_generation_confidence_equals_prefill_confidence(temperature):
    model, tok = tiny_llama(vocab=259), byte_tokenizer()
    backend = HFLocalBackend(model, tok)
    messages = [{"role": "user", "content": PROBLEM}]
    out = backend.chat(messages, n=2 if temperature else 1, max_new_tokens=12, temperature=temperature,
                       top_logprobs=5, seed=3)
    prompt = backend.render(messages)
    for c in out:
        assert c.token_ids and len(c.top_logprobs) == len(c.token_ids)
        recorded = torch.tensor(confidence_from_top_logprobs(c.top_logprobs, 5))
        # the recorder sees the logits before temperature: the same statistic as a plain prefill
        assert torch.allclose(recorded, prefill_confidence(model, prompt, c.token_ids, 5), atol=1e-4)


def two_tiny_tiers(**gen):
    tok = byte_tokenizer()
    cheap = HFLocalBackend(tiny_llama(vocab=259, seed=1), tok, **gen)
    strong = HFLocalBackend(tiny_llama(vocab=259, seed=2, num_layers=4), tok, **gen)
    return [Tier(cheap, "cheap", 1.0, 2.0, price_cpu_second=0.5), Tier(strong, "strong", 10.0, 20.0)]


def test_tiny_models_end_to_end_accounting():
    ts = two_tiny_tiers(max_new_tokens=6)
    cfg = SqueezeEvolveConfig(population=4, group_size=2, groups=4, loops=2, percentiles=(50.0,), top_k=5, seed=0)
    res = SqueezeEvolve(ts, cfg).run(PROBLEM)
    assert len(res.population) == 4 and len(res.per_loop) == 3
    assert all(c.confidence is not None and c.confidence > 0 for c in res.population if c.text)
    for tier in ts:
        led = tier.backend.ledger.total()
        got = res.usage_by_tier.get(tier.name)
        assert got is not None and (got.calls, got.prompt_tokens, got.completion_tokens) == (
            led.calls, led.prompt_tokens, led.completion_tokens)
        assert res.cost_by_tier[tier.name] == pytest.approx(tier.cost(led))
    cheap_led = ts[0].backend.ledger.total()
    assert cheap_led.cpu_seconds > 0 and res.cost_by_tier["cheap"] == pytest.approx(
        (cheap_led.prompt_tokens * 1.0 + cheap_led.completion_tokens * 2.0) / 1e6 + 0.5 * cheap_led.cpu_seconds)
    # the generated tokens are counted by the backend, not re-derived here: each member's ids end at EOS or 6
    assert res.usage_by_tier["strong"].completion_tokens <= 6 * (4 + 4 * 2)


def test_rsa_on_a_local_model_is_reproducible():
    tok = byte_tokenizer()
    cfg = SqueezeEvolveConfig(population=3, group_size=2, groups=3, loops=1, seed=5, max_new_tokens=5)
    runs = [RSA(Tier(HFLocalBackend(tiny_llama(vocab=259), tok), "m"), cfg).run(PROBLEM) for _ in range(2)]
    assert [c.text for c in runs[0].population] == [c.text for c in runs[1].population]


@pytest.mark.slow
def test_default_model_two_tiers(default_model):
    model, tok = default_model
    cheap = HFLocalBackend(model, tok, max_new_tokens=12)
    strong = HFLocalBackend(model, tok, max_new_tokens=24)
    cfg = SqueezeEvolveConfig(population=4, group_size=2, groups=4, loops=1, percentiles=(50.0,), temperature=0.7)
    res = SqueezeEvolve([Tier(cheap, "cheap", 0.1, 0.4), Tier(strong, "strong", 1.0, 4.0)], cfg).run(PROBLEM)
    assert res.per_loop[1].routes.count(0) in (1, 2, 3, 4) and res.answer is not None
    assert res.usage_by_tier["strong"].completion_tokens == strong.ledger.total().completion_tokens


@pytest.mark.serve
def test_over_transformers_serve(served_model, default_model):
    """The server returns no log-probs: confidence fitness is refused with a pointer to diversity; diversity fitness
    runs; a local scorer (the default model in-process, its own tokenizer) supplies confidence instead."""

    def tiers():
        return [Tier(served_model.backend(), "cheap", 0.1, 0.4), Tier(served_model.backend(), "strong", 1.0, 4.0)]

    cfg = dict(population=2, group_size=2, groups=2, loops=1, percentiles=(50.0,), max_new_tokens=8,
               temperature=0.7, seed=0)
    with pytest.raises(ValueError, match='fitness="diversity"'):
        SqueezeEvolve(tiers(), SqueezeEvolveConfig(**cfg))
    ts = tiers()
    res = SqueezeEvolve(ts, SqueezeEvolveConfig(fitness="diversity", **cfg)).run(PROBLEM)
    assert len(res.population) == 2 and "diversity" in res.fitness_source
    seeding = res.per_loop[0].usage["strong"]
    assert seeding.calls == 1 and seeding.samples == 2 and seeding.requests == 2  # n fanned out: the server ignores n
    for tier in ts:
        assert res.usage_by_tier.get(tier.name, tier.backend.ledger.total()) == tier.backend.ledger.total()
    model, tok = default_model
    scorer = HFLocalBackend(model, tok)
    res = SqueezeEvolve(tiers(), SqueezeEvolveConfig(**cfg), scorer=scorer).run(PROBLEM)
    assert "scorer HFLocalBackend" in res.fitness_source
    assert res.usage_by_tier["scoring"] == scorer.ledger.total() and scorer.ledger.total().calls == 2
