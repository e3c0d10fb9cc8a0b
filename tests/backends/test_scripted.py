"""The backend base (options, capabilities, ledger) through the public ScriptedBackend."""

import asyncio

import pytest

from hf_fastslow.backends import (
    BackendFeatureError,
    Capabilities,
    Completion,
    Ledger,
    ManualClock,
    ScriptedBackend,
    Usage,
)
from hf_fastslow.backends.base import CallRecord
from hf_fastslow.backends.testing import word_pieces

USER = [{"role": "user", "content": "what is two plus two"}]
NO_EXTRAS = Capabilities(native_n=False, logprobs=False, max_top_logprobs=0, streaming=True,
                         continue_final_message=False, prompt_scoring=False, seed=True)


def echo_index(messages, index, kwargs):
    return f"sample {index} seed {kwargs['seed']} says four"


def test_word_pieces_concatenate_back():
    for text in ["", "   ", "a", " a  b\tc \n", "one two three "]:
        assert "".join(word_pieces(text)) == text
    assert len(word_pieces(" a  b\tc \n")) == 3


def test_chat_n_samples_seeds_and_ledger():
    be = ScriptedBackend(echo_index, capabilities=NO_EXTRAS)
    out = be.chat(USER, n=3, seed=10)
    assert [c.text for c in out] == [f"sample {i} seed {10 + i} says four" for i in range(3)]
    assert [c.completion_tokens for c in out] == [6, 6, 6] and out[0].prompt_tokens == 5
    assert [call.sample_index for call in be.calls] == [0, 1, 2]
    (rec,) = be.ledger.records
    assert (rec.kind, rec.requests, rec.samples, rec.prompt_tokens, rec.completion_tokens) == ("chat", 3, 3, 15, 18)
    assert rec.ttft_s is None and rec.cpu_seconds >= 0


def test_defaults_then_call_kwargs_and_system():
    be = ScriptedBackend(lambda m, i, kw: "a b c d e", system="be brief", max_new_tokens=3, temperature=0.5)
    (c,) = be.chat(USER)
    assert c.text == "a b c" and c.finish_reason == "length"
    assert be.calls[0].messages[0] == {"role": "system", "content": "be brief"}
    assert be.calls[0].kwargs["temperature"] == 0.5
    (c,) = be.chat(USER, max_new_tokens=10, temperature=0.0, stop=["d"])
    assert c.text == "a b c " and c.finish_reason == "stop"
    assert be.calls[1].kwargs["temperature"] == 0.0
    # a conversation that already has a system message keeps it
    be.chat([{"role": "system", "content": "mine"}] + USER)
    assert [m["content"] for m in be.calls[2].messages if m["role"] == "system"] == ["mine"]


def test_missing_features_fail_up_front_with_names():
    be = ScriptedBackend("x", capabilities=NO_EXTRAS, name="Weak(http://h/v1)")
    with pytest.raises(BackendFeatureError, match=r"Weak\(http://h/v1\) does not support log-probs.*confidence"):
        be.require("logprobs", "confidence")
    with pytest.raises(BackendFeatureError, match="log-probs"):
        be.chat(USER, logprobs=True)
    with pytest.raises(BackendFeatureError, match="continuing a partial"):
        be.chat(USER + [{"role": "assistant", "content": "4"}], continue_final_message=True)
    with pytest.raises(BackendFeatureError, match="scoring"):
        be.score(USER, "four")
    assert be.calls == [] and len(be.ledger) == 0  # nothing was sent
    with pytest.raises(BackendFeatureError, match="k=30"):
        ScriptedBackend("x").chat(USER, top_logprobs=30)
    with pytest.raises(ValueError, match="Unknown backend feature"):
        be.require("telepathy", "x")


def test_bad_arguments():
    be = ScriptedBackend("x")
    with pytest.raises(ValueError, match="n must be"):
        be.chat(USER, n=0)
    with pytest.raises(TypeError, match="list of conversations"):
        be.chat_batch(USER)
    with pytest.raises(ValueError, match="last message to be an assistant"):
        be.chat(USER, continue_final_message=True)
    with pytest.raises(TypeError, match="unexpected keyword"):
        list(be.stream_batch([USER], temprature=0.1))


def test_logprobs_of_a_scripted_reply_and_scripted_completion():
    be = ScriptedBackend("four . done")
    (c,) = be.chat(USER, top_logprobs=3)
    assert c.token_logprobs == [0.0] * 3 and len(c.top_logprobs) == 3 and c.top_logprobs[0][0] == 0.0
    scripted = Completion("x", 1, 1, token_logprobs=[-0.7])
    (c,) = ScriptedBackend(lambda m, i, kw: scripted).chat(USER, logprobs=True)
    assert c.token_logprobs == [-0.7]


def test_stream_batch_chunks_concatenate_and_ttft_on_manual_clock():
    replies = ["one two three four five", "alpha beta", ""]
    clock = ManualClock()
    be = ScriptedBackend(lambda m, i, kw: replies[int(m[-1]["content"])], token_delay_s=0.5, clock=clock)
    convs = [[{"role": "user", "content": str(r)}] for r in range(3)]
    chunks = list(be.stream_batch(convs, chunk_tokens=2))
    for row, reply in enumerate(replies):
        mine = [c for c in chunks if c.row == row]
        assert "".join(c.text for c in mine) == reply
        assert [c.done for c in mine] == [False] * (len(mine) - 1) + [True]
    assert [len(c.text.split()) for c in chunks if c.row == 0] == [2, 2, 1]
    (rec,) = be.ledger.records
    assert rec.kind == "stream" and rec.ttft_s == pytest.approx(1.0)  # first chunk: 2 tokens at 0.5 s each
    assert rec.seconds == pytest.approx(2.5) and rec.completion_tokens == 7 and rec.samples == 3
    assert clock.time() == pytest.approx(2.5)


def test_stream_and_astream_deltas():
    be = ScriptedBackend("the answer is four")
    assert "".join(be.stream(USER)) == "the answer is four"

    async def collect():
        return [d async for d in be.astream(USER)]

    deltas = asyncio.run(collect())
    assert deltas == ["the ", "answer ", "is ", "four"]
    assert [r.kind for r in be.ledger.records] == ["stream", "stream"]
    assert be.ledger.records[1].ttft_s is not None


def test_closing_a_stream_early_still_records():
    be = ScriptedBackend("a b c d")
    it = be.stream(USER)
    assert next(it) == "a "
    it.close()
    assert len(be.ledger) == 1


def test_async_chat_batch_and_score():
    be = ScriptedBackend(echo_index, scorer=lambda m, cont: [-1.0] * len(cont.split()))
    out = asyncio.run(be.achat_batch([USER, USER], n=2, seed=0))
    assert [[c.text.split()[1] for c in row] for row in out] == [["0", "1"], ["0", "1"]]
    assert be.score(USER, "four now") == [-1.0, -1.0]
    assert [r.kind for r in be.ledger.records] == ["chat", "score"]
    assert be.ledger.records[0].requests == 2  # native n: one request per conversation


def test_ledger_mark_since_and_usage_sum():
    ledger = Ledger()
    rec = CallRecord("b", "chat", 1, 2, 10, 5, 1.5, None, 0.25)
    ledger.add(rec)
    mark = ledger.mark()
    ledger.add(CallRecord("b", "stream", 1, 1, 3, 4, 0.5, 0.1, 0.5))
    assert ledger.since(mark) == Usage(1, 3, 4, 0.5, 0.5, 1, 1)
    total = ledger.total()
    assert (total.calls, total.prompt_tokens, total.completion_tokens, total.total_tokens) == (2, 13, 9, 22)
    assert ledger.since(0) + ledger.since(mark) == Usage(3, 16, 13, 2.5, 1.25, 3, 4)
