"""CATTS on real models: the scoring arbiter against a hand-computed softmax of label logits (a tiny random Llama;
SmolLM2 as a slow test), N samples through one batched HFLocalBackend call, and one step over `transformers serve`."""

import json

import pytest
import torch

from hf_fastslow.backends.hf_local import HFLocalBackend
from hf_fastslow.backends.testing import ScriptedBackend
from hf_fastslow.generation.catts import OPTION_LABELS, CATTSConfig, CATTSPolicy, arbiter_messages
from hf_fastslow.generation.catts_env import RunningTotalEnv, run_episode
from tests.conftest import byte_tokenizer, tiny_llama

MSGS = [{"role": "user", "content": "Name a letter."}]


def first_char(text):
    """A toy action: the first non-space character of the reply (random bytes from a tiny model cluster on it)."""
    text = text.strip()
    return text[0] if text else None


def hand_label_probs(backend, decision, messages):
    """softmax over the option labels' next-token logits, from one plain forward of the rendered arbiter prompt."""
    stats = decision.stats
    options = [a if isinstance(a, str) else json.dumps(a) for a in stats.representatives]
    ids = backend.render(arbiter_messages(messages, options, stats.counts))
    with torch.no_grad():
        logits = backend.model(input_ids=torch.tensor([ids])).logits[0, -1].float()
    label_ids = [backend.tokenizer(label, add_special_tokens=False)["input_ids"] for label in
                 OPTION_LABELS[:len(options)]]
    assert all(len(t) == 1 for t in label_ids)
    return torch.softmax(logits[[t[0] for t in label_ids]], -1)


def test_scoring_arbiter_probs_are_softmax_of_label_logits_tiny_llama():
    backend = HFLocalBackend(tiny_llama(vocab=259), byte_tokenizer())
    pol = CATTSPolicy(backend, backend, first_char,
                      config=CATTSConfig(n_samples=8, tau=-1.0, arbiter="score", temperature=1.5, max_new_tokens=3))
    d = pol.step(MSGS, seed=1)
    assert len(d.stats.keys) >= 2 and d.arbitrated
    want = hand_label_probs(backend, d, MSGS)
    assert d.arbiter_probs == pytest.approx(want.tolist(), abs=1e-5)
    assert sum(d.arbiter_probs) == pytest.approx(1.0)
    assert d.choice == int(want.argmax())
    assert d.arbiter_usage.calls == len(d.stats.keys)  # one score() per option label
    # N samples are ONE batched generate; the same seed gives the same decision
    assert d.sampler_usage.calls == 1 and d.sampler_usage.samples == 8 and d.sampler_usage.requests == 1
    again = pol.step(MSGS, seed=1)
    assert again.samples == d.samples and again.choice == d.choice


def test_generative_arbiter_and_episode_on_tiny_llama():
    backend = HFLocalBackend(tiny_llama(vocab=259), byte_tokenizer())
    env = RunningTotalEnv(n_steps=2)
    pol = CATTSPolicy(backend, backend, lambda t: {"action": "add", "value": len(t.strip())},
                      config=CATTSConfig(n_samples=4, tau=-1.0, temperature=1.5, max_new_tokens=4,
                                         arbiter_max_new_tokens=2))
    r = run_episode(pol, env, episode=0, seed=0)
    assert len(r.steps) == 2 and r.arbiter_calls == 2
    assert r.arbiter_usage.completion_tokens <= 2 * 2 and r.sampler_usage.samples == 8
    # random bytes rarely name an option: the fallback keeps the majority then
    assert all(s.arbiter_fallback or s.arbitrated for s in r.steps)


def test_label_tokenizer_check_at_construction():
    arb = ScriptedBackend("x", scorer=lambda m, label: [0.0])
    arb.tokenizer = lambda text, add_special_tokens=False: {"input_ids": [5, 6]}
    with pytest.raises(ValueError, match="single-token option labels"):
        CATTSPolicy(arb, arb, config=CATTSConfig(n_samples=2, arbiter="score"))


@pytest.mark.slow
def test_scoring_arbiter_probs_match_smollm2_label_logits(default_model):
    model, tok = default_model
    backend = HFLocalBackend(model, tok)
    env = RunningTotalEnv()
    messages = env.reset(0)
    pol = CATTSPolicy(backend, backend, env.parse_action,
                      config=CATTSConfig(n_samples=6, tau=-1.0, arbiter="score", temperature=1.0, max_new_tokens=16))
    d = pol.step(messages, seed=0)
    want = hand_label_probs(backend, d, messages)
    assert d.arbiter_probs == pytest.approx(want.tolist(), abs=1e-4)


@pytest.mark.serve
def test_catts_step_over_transformers_serve(served_model):
    """N samples fanned out as N seeded requests (the server ignores n), a generative arbiter (the server has no
    log-probs), accounting from the endpoint backend's ledger."""
    backend = served_model.backend()
    env = RunningTotalEnv()
    messages = env.reset(0)
    pol = CATTSPolicy(backend, backend, env.parse_action,
                      config=CATTSConfig(n_samples=3, tau=-1.0, temperature=0.7, max_new_tokens=16,
                                         arbiter_max_new_tokens=4, max_retries=3))
    d = pol.step(messages, seed=7)
    assert d.arbitrated and d.sampler_usage.samples >= 3 and d.sampler_usage.requests >= 3
    assert d.arbiter_usage.calls == 1 and d.arbiter_usage.completion_tokens <= 4
    assert d.action in d.stats.representatives and d.action["action"] == "add"
    with pytest.raises(Exception, match="scor"):
        CATTSPolicy(backend, backend, env.parse_action, config=CATTSConfig(n_samples=2, arbiter="score"))
