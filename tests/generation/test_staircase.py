"""Staircase streaming and its MoA baseline on scripted backends: the degenerate equivalence, proposal and stream
integrity, continuation of the partial answer, schedules, the latency model, failures and bad input."""

import asyncio
import math
import re
import time
import warnings

import pytest

from hf_fastslow.backends import BackendFeatureError, Capabilities, ScriptedBackend
from hf_fastslow.generation.staircase import (
    MixtureOfAgents,
    StaircaseMoA,
    aggregate_prompt,
    interleaved_prompt,
)

USER = [{"role": "user", "content": "name some colours"}]
LENGTHS = {"red": 5, "green": 9, "blue": 7}


def persona_proposer(messages, index, kwargs):
    """Proposal of `LENGTHS[persona]` words, the persona taken from the system message."""
    persona = messages[0]["content"]
    return " ".join(f"{persona}{k}" for k in range(LENGTHS[persona]))


def proposers(batched: bool = False, **kw):
    if batched:  # one object listed three times: one stream_batch / chat_batch call serves all three rows
        shared = ScriptedBackend(persona_proposer, name="shared", **kw)
        return [shared] * 3
    return [ScriptedBackend(persona_proposer, system=p, name=f"proposer-{p}", **kw) for p in LENGTHS]


def visible_words(messages) -> int:
    system = messages[0]["content"]
    return sum(len(text.split()) for text in re.findall(r"^Answer [^:\n]*: (.*)$", system, flags=re.MULTILINE))


def counting_aggregator(total: int = 12):
    """Answer words "a<k>/<proposal words seen>", k = 0..total-1; a continuation picks up at the next k."""
    def respond(messages, index, kwargs):
        partial = messages[-1]["content"] if kwargs["continue_final_message"] else ""
        seen = visible_words(messages)
        text = " ".join(f"a{k}/{seen}" for k in range(len(partial.split()), total))
        return " " + text if partial and not partial[-1].isspace() else text  # a real continuation's leading space
    return respond


def run(pipeline, messages=USER):
    pieces = list(pipeline.stream(messages))
    return pieces, pipeline.last_metrics


@pytest.mark.parametrize("chunk", [9, 64])
@pytest.mark.parametrize("batched", [False, True])
def test_staircase_with_one_chunk_equals_moa_exactly(chunk, batched):
    if batched:  # one object listed three times: one chat_batch / stream_batch call serves the three rows
        shared = ScriptedBackend(lambda m, i, kw: " ".join(f"w{k}" for k in range(9)), name="shared")
        props, seen = [shared] * 3, 27
    else:
        props, seen = proposers(), sum(LENGTHS.values())
    outputs, calls = [], []
    for cls, kw in ((MixtureOfAgents, {}), (StaircaseMoA, {"chunk_tokens": chunk, "agg_chunk_tokens": 3})):
        agg = ScriptedBackend(counting_aggregator(), name="aggregator")
        pieces, metrics = run(cls(props, agg, max_new_tokens=10, **kw))
        outputs.append("".join(pieces))
        calls.append([(c.messages, c.kwargs) for c in agg.calls])
        assert len(metrics.stairs) == 1 and metrics.stairs[0].final
    assert outputs[0] == outputs[1] == " ".join(f"a{k}/{seen}" for k in range(10))
    assert calls[0] == calls[1]


def test_proposer_chunks_concatenate_to_the_unchunked_output():
    props = proposers()
    moa = MixtureOfAgents(props, ScriptedBackend(counting_aggregator()))
    _, moa_metrics = run(moa)
    full = [persona_proposer([{"role": "system", "content": p}], 0, {}) for p in LENGTHS]
    assert moa_metrics.proposals == full
    for chunk in (1, 2, 4):
        sc = StaircaseMoA(props, ScriptedBackend(counting_aggregator(40)), chunk_tokens=chunk, agg_chunk_tokens=2)
        _, metrics = run(sc)
        assert metrics.proposals == full
        # what the aggregator saw at the last stair is the whole proposal, piece by piece
        assert [len(w.split()) for w in full] == metrics.stairs[-1].visible_tokens


def test_same_backend_object_is_served_by_one_batched_stream():
    shared = ScriptedBackend(lambda m, i, kw: "one two three four five six", name="shared")
    sc = StaircaseMoA([shared, shared, shared], ScriptedBackend(counting_aggregator()), chunk_tokens=2)
    run(sc)
    streams = [r for r in shared.ledger.records if r.kind == "stream"]
    assert len(streams) == 1 and streams[0].requests == 3
    assert sc.last_metrics.proposals == ["one two three four five six"] * 3


def test_stream_integrity_and_stairs():
    agg = ScriptedBackend(counting_aggregator(30), name="aggregator")
    sc = StaircaseMoA(proposers(), agg, chunk_tokens=2, agg_chunk_tokens=3)
    pieces, metrics = run(sc)
    answer = "".join(pieces)
    assert answer == metrics.answer == "".join(s.text for s in metrics.stairs)
    words = answer.split()
    assert [int(re.match(r"a(\d+)/", w).group(1)) for w in words] == list(range(30))  # no word twice, none lost
    # stairs every 2 proposal tokens until the longest proposal (9) is complete: 5 stairs, 3 answer tokens each
    # but the last, which finishes the answer over the complete proposals
    assert [s.index for s in metrics.stairs] == [1, 2, 3, 4, 5]
    assert [s.final for s in metrics.stairs] == [False] * 4 + [True]
    assert [s.visible_tokens for s in metrics.stairs] == [[2, 2, 2], [4, 4, 4], [5, 6, 6], [5, 8, 7], [5, 9, 7]]
    assert [s.new_tokens for s in metrics.stairs] == [3, 3, 3, 3, 18]
    seen = [int(w.split("/")[1]) for w in words]
    assert seen == [6] * 3 + [12] * 3 + [17] * 3 + [20] * 3 + [21] * 18  # each stair wrote over longer proposals
    # every stair after the first continues the answer so far
    for call in agg.calls[1:]:
        assert call.kwargs["continue_final_message"] is True
        assert call.messages[-1]["role"] == "assistant"
    assert [c.messages[-1]["content"] for c in agg.calls[1:]] == [
        "".join(s.text for s in metrics.stairs[:k]) for k in range(1, 5)]
    assert agg.calls[0].kwargs["continue_final_message"] is False
    assert metrics.ttft_s is not None and metrics.ttft_s <= metrics.total_s


def test_tokens_come_from_the_ledgers():
    props, agg = proposers(), ScriptedBackend(counting_aggregator(8))
    for b in [*props, agg]:
        b.chat(USER)  # earlier traffic is not part of the run
    sc = StaircaseMoA(props, agg, chunk_tokens=3, agg_chunk_tokens=2)
    marks = [b.ledger.mark() for b in [*props, agg]]
    _, metrics = run(sc)
    usages = [b.ledger.since(m) for b, m in zip([*props, agg], marks)]
    assert metrics.tokens.completion_tokens == sum(u.completion_tokens for u in usages)
    assert metrics.tokens.prompt_tokens == sum(u.prompt_tokens for u in usages)
    assert metrics.aggregator_tokens.completion_tokens == usages[-1].completion_tokens == 8
    assert metrics.proposer_tokens.completion_tokens == sum(LENGTHS.values())
    assert metrics.aggregator_tokens.calls == len(metrics.stairs)
    assert metrics.answer_tokens_per_s > 0 and metrics.cpu_s >= 0


def test_schedule_sets_the_stair_targets():
    agg = ScriptedBackend(counting_aggregator(20))
    sc = StaircaseMoA(proposers(), agg, chunk_tokens=1, agg_chunk_tokens=2, schedule=lambda j: 2 ** j,
                      agg_schedule=lambda j: j)
    _, metrics = run(sc)
    # targets 2, 6, 14: a stair sees the first T_j tokens of each proposal
    assert [s.visible_tokens for s in metrics.stairs] == [[2, 2, 2], [5, 6, 6], [5, 9, 7]]
    assert [s.new_tokens for s in metrics.stairs] == [1, 2, 17]
    with pytest.raises(ValueError, match="stair 1 must be a positive"):
        list(StaircaseMoA(proposers(), agg, schedule=lambda j: 0).stream(USER))


def test_max_new_tokens_caps_the_whole_answer():
    sc = StaircaseMoA(proposers(), ScriptedBackend(counting_aggregator(50)), chunk_tokens=2, agg_chunk_tokens=3,
                      max_new_tokens=7)
    pieces, metrics = run(sc)
    assert len("".join(pieces).split()) == 7 and metrics.aggregator_tokens.completion_tokens == 7


def test_aggregator_eos_before_the_proposals_ends_the_stream_cleanly():
    agg = ScriptedBackend(counting_aggregator(2), name="aggregator")
    sc = StaircaseMoA(proposers(), agg, chunk_tokens=1, agg_chunk_tokens=4)
    pieces, metrics = run(sc)
    assert "".join(pieces).split() == ["a0/3", "a1/3"]
    assert len(agg.calls) == 1 and metrics.stopped_early and not metrics.stairs[0].final
    # the proposers were closed and their records written before the metrics were taken
    assert metrics.tokens.calls == 3 + 1


class FailingStream(ScriptedBackend):
    """Streams `after` chunks, then raises (a server that drops the connection mid-answer)."""

    def __init__(self, *args, after: int, **kw):
        super().__init__(*args, **kw)
        self.after = after

    def _stream_batch(self, conversations, opts, chunk_tokens, meter):
        for k, chunk in enumerate(super()._stream_batch(conversations, opts, chunk_tokens, meter)):
            if k == self.after:
                raise ConnectionError("connection reset by peer")
            yield chunk


def test_a_proposer_raising_mid_stream_is_dropped_with_a_warning():
    props = proposers()
    props[1] = FailingStream(persona_proposer, system="green", name="flaky", after=2)
    agg = ScriptedBackend(counting_aggregator(20), name="aggregator")
    sc = StaircaseMoA(props, agg, chunk_tokens=2, agg_chunk_tokens=2)
    with pytest.warns(RuntimeWarning, match=r"proposer \[1\] \(flaky\) failed and is dropped: ConnectionError"):
        pieces, metrics = run(sc)
    assert "".join(pieces).split()[-1].startswith("a19/")
    assert metrics.dropped == {1: "ConnectionError: connection reset by peer"} and metrics.proposals[1] is None
    answers_per_call = [sum(line.startswith("Answer") for line in c.messages[0]["content"].splitlines())
                        for c in agg.calls]
    assert answers_per_call[0] == 3 and answers_per_call[-1] == 2 and metrics.stairs[-1].final


def test_moa_drops_a_failing_proposer_and_fails_when_all_do():
    def broken(messages, index, kwargs):
        raise TimeoutError("no answer")

    props = proposers()
    props[0] = ScriptedBackend(broken, name="broken")
    moa = MixtureOfAgents(props, ScriptedBackend(counting_aggregator(4)))
    with pytest.warns(RuntimeWarning, match=r"proposer \[0\] \(broken\) failed"):
        pieces, metrics = run(moa)
    assert metrics.proposals[0] is None and "".join(pieces) == "a0/16 a1/16 a2/16 a3/16"
    for cls in (MixtureOfAgents, StaircaseMoA):
        everyone_broken = cls([ScriptedBackend(broken, name=f"b{i}") for i in range(2)], ScriptedBackend("x"))
        with warnings.catch_warnings(), pytest.raises(RuntimeError, match="every proposer failed.*TimeoutError"):
            warnings.simplefilter("ignore")
            list(everyone_broken.stream(USER))


def test_bad_input_gives_clear_errors():
    props, agg = proposers(), ScriptedBackend("x")
    for bad in (0, -3):
        with pytest.raises(ValueError, match="chunk_tokens must be a positive number of tokens"):
            StaircaseMoA(props, agg, chunk_tokens=bad)
        with pytest.raises(ValueError, match="agg_chunk_tokens must be a positive"):
            StaircaseMoA(props, agg, agg_chunk_tokens=bad)
    for cls in (MixtureOfAgents, StaircaseMoA):
        with pytest.raises(ValueError, match="at least one proposer"):
            cls([], agg)
        with pytest.raises(TypeError, match="Backend instances"):
            cls(["gpt"], agg)
        with pytest.raises(ValueError, match="must end with the user's turn"):
            list(cls(props, agg).stream(USER + [{"role": "assistant", "content": "hi"}]))
    no_continue = Capabilities(native_n=True, logprobs=False, max_top_logprobs=0, streaming=True,
                               continue_final_message=False, prompt_scoring=False, seed=True)
    with pytest.raises(BackendFeatureError, match=r"Server\(http://h/v1\) does not support continuing"):
        StaircaseMoA(props, ScriptedBackend("x", capabilities=no_continue, name="Server(http://h/v1)"))
    MixtureOfAgents(props, ScriptedBackend("x", capabilities=no_continue))  # MoA never continues: fine


def test_astream_yields_what_stream_yields():
    def make():
        return StaircaseMoA(proposers(), ScriptedBackend(counting_aggregator(9)), chunk_tokens=3, agg_chunk_tokens=2)

    sync_pieces, _ = run(make())

    async def collect():
        sc = make()
        return [p async for p in sc.astream(USER)], sc.last_metrics

    async_pieces, metrics = asyncio.run(collect())
    assert async_pieces == sync_pieces and metrics.answer == "".join(sync_pieces)

    async def bad_input():
        return [p async for p in make().astream([{"role": "assistant", "content": "hi"}])]

    with pytest.raises(ValueError, match="must end with the user's turn"):  # errors reach the event loop
        asyncio.run(bad_input())


def test_interleaved_prompt_is_append_only_and_moa_at_one_stair():
    sc = StaircaseMoA(proposers(), ScriptedBackend(counting_aggregator(20)), chunk_tokens=2, agg_chunk_tokens=2,
                      prompt_builder=interleaved_prompt)
    agg = sc.aggregator
    _, metrics = run(sc)
    systems = [c.messages[0]["content"] for c in agg.calls]
    assert len(systems) == 5
    for before, after in zip(systems, systems[1:]):
        assert after.startswith(before)  # each stair only appends: a prefix cache keeps all earlier stairs
    assert "Answer 1 is complete." in systems[2] and "Answer 2 is complete." not in systems[3]
    full = [[persona_proposer([{"role": "system", "content": p}], 0, {})] for p in LENGTHS]
    assert interleaved_prompt(USER, full, [True] * 3) == aggregate_prompt(USER, full, [True] * 3)
    # and the answers it lists are the proposals, piece by piece
    listed = re.findall(r"Answer 2, part \d: (.*)", systems[-1])
    assert "".join(listed).split() == [f"green{k}" for k in range(9)]


def test_aggregate_prompt_marks_unfinished_answers_and_keeps_the_users_system_text():
    msgs = [{"role": "system", "content": "Be terse."}, *USER]
    out = aggregate_prompt(msgs, [["abc ", "def"], ["xyz"]], [False, True])
    assert out[1:] == USER and out[0]["content"].startswith("Be terse.\n\n")
    assert "Answer 1 (unfinished): abc def" in out[0]["content"] and "Answer 2: xyz" in out[0]["content"]
    assert "still being written" in out[0]["content"]
    assert "still being written" not in aggregate_prompt(USER, [["a"], ["b"]], [True, True])[0]["content"]
    with pytest.raises(ValueError, match="one `finished` flag per proposal"):
        aggregate_prompt(USER, [["a"]], [True, False])


# ---------------------------------------------------------------------------------------------------------------------
# Latency model (card §2): TTFT_normal ~ L_max * d_P + d_A, TTFT_staircase ~ c * d_P + d_A. Real sleeps, no compute.
# ---------------------------------------------------------------------------------------------------------------------
def test_latency_model_with_token_delays():
    d_p, d_a, chunk = 0.04, 0.02, 3
    props = [ScriptedBackend(persona_proposer, system=p, token_delay_s=d_p) for p in LENGTHS]
    l_max = max(LENGTHS.values())

    def measure(cls, **kw):
        pipeline = cls(props, ScriptedBackend(counting_aggregator(6), token_delay_s=d_a), **kw)
        ticks = []
        start = time.perf_counter()
        for _ in pipeline.stream(USER):
            ticks.append(time.perf_counter() - start)
        return ticks[0], pipeline.last_metrics

    ttft_moa, m_moa = measure(MixtureOfAgents)
    ttft_sc, m_sc = measure(StaircaseMoA, chunk_tokens=chunk, agg_chunk_tokens=2)
    model_moa, model_sc = l_max * d_p + d_a, chunk * d_p + d_a
    # sleeps never undershoot, but they overshoot and threads wake late on a loaded box (load 12 on 2 cores: +45 ms
    # over 3 sleeps and a wake-up), so the bound is one-sided-tight: a staircase waiting for whole proposals would
    # sit near model_moa, far outside its band
    for measured, model in ((ttft_moa, model_moa), (ttft_sc, model_sc)):
        assert model - 0.01 <= measured <= 1.5 * model + 0.1, (measured, model)
    assert model_sc * 1.5 + 0.1 < model_moa  # the bands do not overlap
    assert ttft_sc < ttft_moa / 2
    assert math.isclose(m_moa.ttft_s, ttft_moa, abs_tol=0.01) and math.isclose(m_sc.ttft_s, ttft_sc, abs_tol=0.01)
    # MoA's answer starts only after the last proposal; the staircase's proposals finish while it answers
    assert m_moa.proposals_s <= m_moa.ttft_s and m_sc.ttft_s < m_sc.proposals_s


def test_injected_clock_times_the_run():
    ticks = iter(range(0, 1000, 5))
    sc = StaircaseMoA(proposers(), ScriptedBackend(counting_aggregator(4)), chunk_tokens=2, agg_chunk_tokens=2,
                      clock=lambda: float(next(ticks)))
    _, metrics = run(sc)
    assert metrics.total_s % 5 == 0 and metrics.ttft_s % 5 == 0 and 0 < metrics.ttft_s < metrics.total_s



def test_closing_the_stream_early_closes_the_proposers_and_keeps_the_metrics():
    props = [ScriptedBackend(persona_proposer, system=p, token_delay_s=0.01) for p in LENGTHS]
    sc = StaircaseMoA(props, ScriptedBackend(counting_aggregator(30)), chunk_tokens=1, agg_chunk_tokens=2)
    stream = sc.stream(USER)
    taken = [next(stream), next(stream)]
    stream.close()
    m = sc.last_metrics
    assert m.answer == "".join(taken) == m.stairs[0].text and len(m.stairs) == 1  # the open call, closed
    assert m.aggregator_tokens.calls == 1
    assert [len(p.ledger) for p in props] == [1, 1, 1]  # each proposal stream was closed and accounted
    assert all(len(text.split()) < n for text, n in zip(m.proposals, LENGTHS.values()))  # and stopped early
