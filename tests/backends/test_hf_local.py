"""HFLocalBackend on a tiny random Llama + byte tokenizer: batching, log-probs, chunked streams, cached continuation."""

import asyncio

import pytest
import torch

from hf_fastslow.backends.hf_local import HFLocalBackend
from hf_fastslow.backends.streamers import BatchChunkStreamer
from tests.conftest import byte_tokenizer, tiny_llama

A = [{"role": "user", "content": "hi"}]
B = [{"role": "user", "content": "a longer question here"}]


def make_backend(**kw):
    # float64: batched (left-padded) and unbatched greedy runs must not flip on the random model's near-ties
    model = tiny_llama(vocab=259).double()
    return HFLocalBackend(model, byte_tokenizer(), **kw)


def manual_logprobs(backend, messages, generated):
    prompt = backend.render(messages)
    ids = torch.tensor([prompt + generated])
    with torch.no_grad():
        logits = backend.model(input_ids=ids).logits[0, len(prompt) - 1 : -1]
    return torch.log_softmax(logits.double(), -1)


def test_batched_sampling_n_and_seeds():
    be = make_backend(max_new_tokens=6)
    out = be.chat_batch([A, B], n=3, temperature=1.0, seed=5)
    assert [len(row) for row in out] == [3, 3]
    assert [c.prompt_tokens for c in out[0]] == [len(be.render(A))] * 3
    assert [c.prompt_tokens for c in out[1]] == [len(be.render(B))] * 3
    again = be.chat_batch([A, B], n=3, temperature=1.0, seed=5)
    assert [[c.token_ids for c in r] for r in out] == [[c.token_ids for c in r] for r in again]
    assert len({tuple(c.token_ids) for c in out[0]}) > 1  # samples differ
    other = be.chat_batch([A, B], n=3, temperature=1.0, seed=6)
    assert [[c.token_ids for c in r] for r in out] != [[c.token_ids for c in r] for r in other]
    (rec,) = be.ledger.records[:1]
    generated = sum(c.completion_tokens for r in out for c in r)
    assert (rec.requests, rec.samples, rec.completion_tokens) == (1, 6, generated)
    with pytest.raises(ValueError, match="need sampling"):
        be.chat(A, n=2, temperature=0)


def test_seeded_calls_leave_the_rng_alone_unseeded_calls_draw_from_it():
    # A seeded call forks torch's RNG (the caller's stream is untouched); an unseeded one samples from the global RNG
    # like plain generate and must not restore it afterwards: restoring would rewind a seeded sampler in another thread.
    be = make_backend(max_new_tokens=6)
    torch.manual_seed(123)
    before = torch.random.get_rng_state()
    be.chat(A, temperature=1.0, seed=7)
    assert torch.equal(torch.random.get_rng_state(), before)
    torch.manual_seed(123)
    first = be.chat(A, temperature=1.0)[0].token_ids
    assert not torch.equal(torch.random.get_rng_state(), before)
    second = be.chat(A, temperature=1.0)[0].token_ids  # continues the stream rather than replaying it
    torch.manual_seed(123)
    assert be.chat(A, temperature=1.0)[0].token_ids == first
    assert be.chat(A, temperature=1.0)[0].token_ids == second


def test_left_padded_batch_equals_rows_alone():
    be = make_backend(max_new_tokens=8, temperature=0)
    batched = be.chat_batch([A, B])
    alone = [be.chat(A)[0], be.chat(B)[0]]
    assert [r[0].token_ids for r in batched] == [c.token_ids for c in alone]
    assert [r[0].text for r in batched] == [c.text for c in alone]


def test_logprobs_are_raw_model_log_softmax():
    be = make_backend(max_new_tokens=6)
    # temperature and top_p change the sampling distribution, not the recorded log-probs
    out = be.chat_batch([A, B], n=2, temperature=0.6, top_p=0.9, seed=1, top_logprobs=4)
    for messages, row in zip([A, B], out):
        for c in row:
            ref = manual_logprobs(be, messages, c.token_ids)
            chosen = ref.gather(1, torch.tensor(c.token_ids)[:, None])[:, 0]
            assert torch.allclose(torch.tensor(c.token_logprobs, dtype=torch.double), chosen, atol=1e-5)
            top = ref.topk(4, -1).values
            assert torch.allclose(torch.tensor(c.top_logprobs, dtype=torch.double), top, atol=1e-5)


def test_score_equals_manual_forward():
    be = make_backend()
    scores = be.score(A, "the answer")
    cont = be.tokenizer("the answer", add_special_tokens=False)["input_ids"]
    ref = manual_logprobs(be, A, cont).gather(1, torch.tensor(cont)[:, None])[:, 0]
    assert len(scores) == len(cont)
    assert torch.allclose(torch.tensor(scores, dtype=torch.double), ref, atol=1e-5)
    assert be.ledger.records[-1].kind == "score"


@pytest.mark.parametrize("chunk_tokens", [1, 3])
def test_chunks_concatenate_to_unchunked_output(chunk_tokens):
    be = make_backend(max_new_tokens=9, temperature=0)
    # make the greedy 3rd token of row A an end-of-sequence id, so rows end at different steps
    third = be.chat(A)[0].token_ids[2]
    be.model.generation_config.eos_token_id = third
    be = HFLocalBackend(be.model, be.tokenizer, max_new_tokens=9, temperature=0)
    reference = [r[0] for r in be.chat_batch([A, B])]
    assert reference[0].finish_reason == "stop" and reference[0].token_ids[-1] == third
    chunks = list(be.stream_batch([A, B], chunk_tokens=chunk_tokens))
    for row, ref in enumerate(reference):
        mine = [c for c in chunks if c.row == row]
        assert "".join(c.text for c in mine) == ref.text
        ids = [t for c in mine for t in c.token_ids]
        assert ids == [t for t in ref.token_ids if t != third]  # the EOS id is not streamed
        assert all(len(c.token_ids) == chunk_tokens for c in mine[:-1]) and mine[-1].done
        assert [c.done for c in mine].count(True) == 1
    # unbatched: stream() of one row
    assert "".join(be.stream(B)) == reference[1].text
    rec = be.ledger.records[-1]
    assert rec.kind == "stream" and rec.ttft_s is not None and 0 < rec.ttft_s <= rec.seconds
    assert rec.completion_tokens == reference[1].completion_tokens and rec.cpu_seconds > 0


def test_stop_strings_cut_chat_and_stream_alike():
    be = make_backend(max_new_tokens=10, temperature=0)
    full = be.chat(B)[0].text
    at = next(i for i in range(2, len(full)) if full[i] != "\ufffd" and full.index(full[i]) == i)
    (cut,) = be.chat(B, stop=[full[at]])
    assert cut.text == full[:at] and cut.finish_reason == "stop"
    assert "".join(be.stream(B, stop=[full[at]])) == full[:at]


def test_continuation_over_cached_prefix_matches_fresh_render():
    cached = make_backend(max_new_tokens=6, temperature=0)
    fresh = HFLocalBackend(cached.model, cached.tokenizer, prefix_cache=False, max_new_tokens=6, temperature=0)
    first = cached.chat(B)[0]
    partial = B + [{"role": "assistant", "content": first.text[:3]}]
    (cont,) = cached.chat(partial, continue_final_message=True)
    assert cached.last_reused_tokens == len(cached.render(B))  # the prompt came from the cache
    (ref,) = fresh.chat(partial, continue_final_message=True)
    assert fresh.last_reused_tokens == 0
    assert cont.token_ids == ref.token_ids and cont.text == ref.text
    # the cached entry was copied, not consumed: a second continuation reuses it again and agrees
    (again,) = cached.chat(partial, continue_final_message=True)
    assert again.token_ids == ref.token_ids and cached.last_reused_tokens > 0
    # a streamed continuation (its chunks) gives the same text
    assert "".join(cached.stream(partial, continue_final_message=True)) == ref.text


def test_closing_a_stream_stops_generation():
    be = make_backend(max_new_tokens=200, temperature=0)
    it = be.stream_batch([A], chunk_tokens=1)
    next(it)
    it.close()
    rec = be.ledger.records[-1]
    assert rec.kind == "stream" and rec.completion_tokens < 200


def test_async_chat_and_stream():
    be = make_backend(max_new_tokens=5, temperature=0)

    async def run():
        out = await be.achat(A)
        deltas = [d async for d in be.astream(A)]
        return out, deltas

    out, deltas = asyncio.run(run())
    assert "".join(deltas) == out[0].text


def test_batch_chunk_streamer_unit():
    got = []
    s = BatchChunkStreamer(2, stop_token_ids={9}, on_chunk=got.append)
    s.put(torch.tensor([[5, 5, 5], [0, 5, 5]]))  # the prompt: skipped
    for step in ([1, 2], [3, 9], [4, 7], [5, 7]):
        s.put(torch.tensor(step))
    s.put(torch.tensor([[6, 8], [7, 7]]))  # several tokens per row at once
    s.end()
    rows = {r: [(c.token_ids, c.done) for c in got if c.row == r] for r in (0, 1)}
    assert rows[0] == [([1, 3], False), ([4, 5], False), ([6, 8], False), ([], True)]
    assert rows[1] == [([2], True)]  # ended at its stop id; the padding after it is ignored
    with pytest.raises(ValueError, match="chunk_tokens"):
        BatchChunkStreamer(0)


def test_sampled_continuation_with_n_over_a_repeated_cached_prefix():
    cached = make_backend(max_new_tokens=5)
    fresh = HFLocalBackend(cached.model, cached.tokenizer, prefix_cache=False, max_new_tokens=5)
    cached.chat(B, temperature=0)
    partial = B + [{"role": "assistant", "content": "ok"}]
    out = cached.chat(partial, continue_final_message=True, n=3, temperature=1.0, seed=7)
    assert cached.last_reused_tokens > 0  # the cached row was repeated for the 3 samples
    ref = fresh.chat(partial, continue_final_message=True, n=3, temperature=1.0, seed=7)
    assert [c.token_ids for c in out] == [c.token_ids for c in ref]


def test_bf16_model_logprobs_and_stream():
    model = tiny_llama(vocab=259).to(torch.bfloat16)
    be = HFLocalBackend(model, byte_tokenizer(), max_new_tokens=5, temperature=0)
    (c,) = be.chat(A, top_logprobs=2)
    assert len(c.token_logprobs) == len(c.token_ids) == 5 and all(lp <= 0 for lp in c.token_logprobs)
    assert all(top[0] >= top[1] for top in c.top_logprobs)
    assert "".join(be.stream(A)) == c.text
