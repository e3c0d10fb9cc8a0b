"""Staircase streaming on in-process models (HFLocalBackend over a tiny random Llama): same-model proposers in one
batched generate whose chunks rebuild the unchunked proposals, the degenerate equivalence with MoA, and the
aggregator's continuation over a reused prefix cache equal to a full re-prefill."""

import pytest
import torch

from hf_fastslow.backends.hf_local import HFLocalBackend
from hf_fastslow.generation.staircase import MixtureOfAgents, StaircaseMoA, interleaved_prompt
from tests.conftest import byte_tokenizer, tiny_llama

PERSONAS = ["Be brief.", "Be formal.", "Be playful."]
USER = [{"role": "user", "content": "Why is the sky blue?"}]


@pytest.fixture(scope="module")
def model_and_tokenizer():
    return tiny_llama(vocab=259, seed=3), byte_tokenizer()


def local_proposers(model, tok, **kw):
    return [HFLocalBackend(model, tok, system=p, temperature=0.0, **kw) for p in PERSONAS]


def test_same_model_proposers_share_one_batched_generate_and_chunks_rebuild_the_proposals(model_and_tokenizer):
    model, tok = model_and_tokenizer
    props = local_proposers(model, tok)
    sc = StaircaseMoA(props, HFLocalBackend(model, tok, temperature=0.0), chunk_tokens=3, agg_chunk_tokens=4,
                      proposal_max_new_tokens=10, max_new_tokens=12)
    list(sc.stream(USER))
    # one stream call on the first proposer's backend serves all three personas
    records = [r for p in props for r in p.ledger.records]
    assert [(r.kind, r.requests, r.samples) for r in records] == [("stream", 1, 3)]
    assert len(props[1].ledger) == len(props[2].ledger) == 0
    # the chunks concatenate to the unchunked, batched proposals (MoA: one chat_batch, no streamer)
    moa = MixtureOfAgents(local_proposers(model, tok), HFLocalBackend(model, tok, temperature=0.0),
                          proposal_max_new_tokens=10, max_new_tokens=12)
    list(moa.stream(USER))
    assert sc.last_metrics.proposals == moa.last_metrics.proposals
    assert all(p for p in sc.last_metrics.proposals)
    # and each row is its persona's own answer
    for persona, text in zip(PERSONAS, sc.last_metrics.proposals):
        (alone,) = HFLocalBackend(model, tok, system=persona, temperature=0.0).chat(USER, max_new_tokens=10)
        assert alone.text == text
    assert sc.last_metrics.proposer_tokens.completion_tokens == moa.last_metrics.proposer_tokens.completion_tokens


def test_one_chunk_equals_moa_on_a_local_model(model_and_tokenizer):
    model, tok = model_and_tokenizer
    answers = []
    for cls, kw in ((MixtureOfAgents, {}), (StaircaseMoA, {"chunk_tokens": 64, "agg_chunk_tokens": 2})):
        pipeline = cls(local_proposers(model, tok), HFLocalBackend(model, tok, temperature=0.0),
                       proposal_max_new_tokens=8, max_new_tokens=10, **kw)
        answers.append("".join(pipeline.stream(USER)))
        assert len(pipeline.last_metrics.stairs) == 1
    assert answers[0] == answers[1] and answers[0]


@pytest.mark.parametrize("builder", [None, interleaved_prompt], ids=["moa_layout", "interleaved"])
def test_prefix_cache_continuation_equals_a_full_reprefill(model_and_tokenizer, builder):
    model, tok = model_and_tokenizer
    kw = {} if builder is None else {"prompt_builder": builder}
    runs = {}
    for cached in (True, False):
        agg = HFLocalBackend(model, tok, temperature=0.0, prefix_cache=cached)
        sc = StaircaseMoA(local_proposers(model, tok), agg, chunk_tokens=3, agg_chunk_tokens=3,
                          proposal_max_new_tokens=9, max_new_tokens=14, **kw)
        runs[cached] = (agg, "".join(sc.stream(USER)), sc.last_metrics)
    (agg_c, text_c, m_c), (agg_p, text_p, m_p) = runs[True], runs[False]
    assert text_c == text_p
    assert len(m_c.stairs) == 3  # 9-token proposals in chunks of 3: the third stair sees them complete
    reused = [s.reused_prompt_tokens for s in m_c.stairs]
    assert reused[0] == 0 and all(r > 0 for r in reused[1:])  # every continuation started from a cached prefix
    assert all(s.reused_prompt_tokens == 0 for s in m_p.stairs)
    # next-token log-probs of a continuation over the cached prefix == over a full prefill: the last stair's
    # prompt, half-way through its answer (the cache holds that stair's prompt and answer)
    last = m_c.stairs[-1]
    partial = "".join(s.text for s in m_c.stairs[:-1]) + last.text[: len(last.text) // 2]
    conversation = [*last.conversation, {"role": "assistant", "content": partial}]
    outs = []
    for agg in (agg_c, agg_p):
        (c,) = agg.chat(conversation, continue_final_message=True, max_new_tokens=3, top_logprobs=5)
        outs.append(c)
    assert agg_c.last_reused_tokens > len(agg_c.render(last.conversation)) // 2 and agg_p.last_reused_tokens == 0
    assert outs[0].token_ids == outs[1].token_ids
    torch.testing.assert_close(torch.tensor(outs[0].top_logprobs), torch.tensor(outs[1].top_logprobs), atol=1e-4,
                               rtol=0)


def test_batch_key_groups_only_compatible_local_backends(model_and_tokenizer):
    from hf_fastslow.backends import ScriptedBackend
    from hf_fastslow.generation.staircase_runtime import batch_key, group_proposers

    model, tok = model_and_tokenizer
    a, b = (HFLocalBackend(model, tok, system=p, temperature=0.7) for p in PERSONAS[:2])
    greedy = HFLocalBackend(model, tok, system=PERSONAS[2], temperature=0.0)
    other_model = HFLocalBackend(tiny_llama(vocab=259, seed=4), tok, system=PERSONAS[0], temperature=0.7)
    no_persona = HFLocalBackend(model, tok, temperature=0.7)
    scripted = ScriptedBackend("x")
    assert batch_key(a) == batch_key(b)
    assert len({batch_key(x) for x in (a, greedy, other_model, no_persona, scripted)}) == 5
    groups = group_proposers([a, scripted, b, greedy, scripted], USER)
    assert [(g.backend, g.indices) for g in groups] == [(a, [0, 2]), (scripted, [1, 4]), (greedy, [3])]
    assert [conv[0]["content"] for conv in groups[0].conversations] == PERSONAS[:2]  # each row keeps its persona
