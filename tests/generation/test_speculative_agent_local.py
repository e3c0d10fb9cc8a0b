"""The agents on real backends: interrupt-and-extend on a tiny Llama (the stopping criterion stops `generate` within
one step; resuming over the returned cache gives the logits of a fresh prefill), an episode over `HFLocalBackend`,
and one episode over `transformers serve` (the `served_model` fixture)."""

import asyncio
import threading

import pytest
import torch
from transformers import DynamicCache, LogitsProcessor, LogitsProcessorList, StoppingCriteriaList

from hf_fastslow.generation.agent_tasks import make_fact_tasks
from hf_fastslow.generation.speculative_agent import (
    InterruptOnEvent,
    SequentialReActAgent,
    SpeculativeAgent,
    feed_words,
    unsafe_violations,
)
from hf_fastslow.integrations import cache_kwargs, output_cache
from tests.conftest import byte_tokenizer, tiny_llama


class _SetAfter(LogitsProcessor):
    """Sets the event from inside `generate` once `k` tokens have been scored (a user chunk arriving mid-turn)."""

    def __init__(self, event: threading.Event, k: int):
        self.event, self.k, self.calls = event, k, 0

    def __call__(self, input_ids, scores):
        self.calls += 1
        if self.calls == self.k:
            self.event.set()
        return scores


@pytest.mark.parametrize("k", [1, 4])
def test_interrupt_stops_within_one_step_and_resume_over_the_cache_equals_fresh_prefill(k):
    model = tiny_llama(vocab=128)
    prompt = torch.randint(3, 128, (1, 11))
    event = threading.Event()
    cache = DynamicCache()
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=40, do_sample=False,
                         logits_processor=LogitsProcessorList([_SetAfter(event, k)]),
                         stopping_criteria=StoppingCriteriaList([InterruptOnEvent(event)]),
                         return_dict_in_generate=True, pad_token_id=0, **cache_kwargs(model, cache))
    sequence = out.sequences
    assert sequence.shape[1] - prompt.shape[1] == k  # the token of the step that saw the event, none after
    cache = output_cache(out) or cache
    assert cache.get_seq_length() == sequence.shape[1] - 1  # the last token is not forwarded yet
    new_input = torch.randint(3, 128, (1, 6))  # the next user chunk
    with torch.no_grad():
        resumed = model(torch.cat([sequence[:, -1:], new_input], 1), **cache_kwargs(model, cache)).logits[:, -1]
        fresh = model(torch.cat([sequence, new_input], 1)).logits[:, -1]
    torch.testing.assert_close(resumed, fresh, atol=1e-4, rtol=0)
    assert cache.get_seq_length() == sequence.shape[1] + new_input.shape[1]  # only the new tokens were prefilled


def test_agents_run_over_hf_local_backend_without_breaking_the_commit_rule():
    from hf_fastslow.backends.hf_local import HFLocalBackend

    model, tok = tiny_llama(vocab=259), byte_tokenizer()
    task = make_fact_tasks(1, seed=0, lookup_latency_s=0.0, send_latency_s=0.0)[0]
    for cls in (SpeculativeAgent, SequentialReActAgent):
        backend = HFLocalBackend(model, tok, temperature=0)
        agent = cls(backend, task.tools(), max_turns=2, max_new_tokens=6)
        chunks = [(0.0, c) for _, c in feed_words("find the employer of Ada Holm", 100.0, words_per_chunk=3)]
        result = asyncio.run(agent.run(chunks))
        assert result.metrics.turns_after_final == 2 and result.answer is None  # a random model never answers
        assert unsafe_violations(result.events) == []
        assert len(backend.ledger.records) == result.metrics.turns + result.metrics.interrupted_turns
        assert all(r.kind == "stream" and r.completion_tokens <= 6 for r in backend.ledger.records)


@pytest.mark.serve
def test_speculative_agent_over_transformers_serve(served_model):
    task = make_fact_tasks(1, seed=0, lookup_latency_s=0.05, send_latency_s=0.05)[0]
    backend = served_model.backend()
    agent = SpeculativeAgent(backend, task.tools(), max_turns=1, max_new_tokens=16, temperature=0)
    result = asyncio.run(agent.run(feed_words("find the employer of Ada Holm please", 20.0, words_per_chunk=3)))
    turns = [e for e in result.events if e.kind == "turn"]
    assert result.metrics.turns_after_final == 1 and len(turns) == result.metrics.turns
    assert all(e.text for e in turns)  # the server streamed text for every turn
    assert unsafe_violations(result.events) == []
    assert sum(r.kind == "stream" for r in backend.ledger.records) == len(turns) + result.metrics.interrupted_turns


def test_prefix_reuse_gives_the_same_turns_and_prefills_less():
    from transformers import AutoTokenizer

    from hf_fastslow.backends.hf_local import HFLocalBackend

    try:
        from hf_fastslow.default_model import default_model_path

        tok = AutoTokenizer.from_pretrained(str(default_model_path()))  # SmolLM2's ChatML template
    except (ImportError, FileNotFoundError) as err:
        pytest.skip(str(err))
    model = tiny_llama(vocab=len(tok), hidden=32, num_layers=2)
    task = make_fact_tasks(1, seed=0, lookup_latency_s=0.0, send_latency_s=0.0)[0]
    runs = {}
    for reuse in (False, True):
        backend = HFLocalBackend(model, tok, temperature=0)
        agent = SpeculativeAgent(backend, task.tools(), max_turns=3, max_new_tokens=5, prefix_reuse=reuse)
        chunks = [(0.0, c) for _, c in feed_words(task.request, 100.0, words_per_chunk=4)]
        result = asyncio.run(agent.run(chunks))
        runs[reuse] = ([e.text for e in result.events if e.kind == "turn"], backend.reused_prompt_tokens)
    assert runs[True][0] == runs[False][0] and len(runs[True][0]) >= 3
    assert runs[False][1] == 0 and runs[True][1] > 200  # later turns resumed from the cached context
