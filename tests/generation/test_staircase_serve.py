"""Staircase streaming against a real OpenAI-compatible server: `transformers serve` on the default model (the
session fixture `served_model`). Proposers stream concurrently over chat completions; the aggregator continues its
partial answer through /v1/completions with a locally rendered prompt."""

import pytest

from hf_fastslow.generation.staircase import MixtureOfAgents, StaircaseMoA

PERSONAS = ["You are a careful assistant.", "You are a concise assistant.", "You are a friendly teacher."]
QUESTION = [{"role": "user", "content": "What is 23 + 45?"}]


@pytest.mark.serve
def test_staircase_over_transformers_serve(served_model):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(served_model.model)  # the served folder: continuation renders locally
    settings = dict(proposal_max_new_tokens=8, max_new_tokens=12)

    def pipeline(cls, **kw):
        proposers = [served_model.backend(system=p, temperature=0.0) for p in PERSONAS]
        return cls(proposers, served_model.backend(temperature=0.0, tokenizer=tok), **settings, **kw)

    sc = pipeline(StaircaseMoA, chunk_tokens=4, agg_chunk_tokens=4)
    pieces = list(sc.stream(QUESTION))
    m = sc.last_metrics
    assert "".join(pieces) == m.answer and m.answer.strip()
    assert len(m.stairs) >= 2 and not m.dropped and all(m.proposals)
    assert m.stairs[0].visible_tokens == [4, 4, 4]
    later = [s for s in m.stairs[1:] if s.new_tokens]
    assert later and all(s.conversation[-1]["role"] == "user" for s in later)  # partial answer appended per call
    assert m.tokens.completion_tokens >= m.aggregator_tokens.completion_tokens > 0
    assert 0 < m.ttft_s <= m.total_s
    # the degenerate staircase (one chunk holds every proposal) is MoA, request for request, over the server too
    moa, one_stair = pipeline(MixtureOfAgents), pipeline(StaircaseMoA, chunk_tokens=64, agg_chunk_tokens=4)
    assert "".join(moa.stream(QUESTION)) == "".join(one_stair.stream(QUESTION))
    assert moa.last_metrics.proposals == one_stair.last_metrics.proposals
