"""The speculative agent's runtime on scripted models under a virtual clock (no real sleeping): the commit rule and
cascading cancellation as properties over random event orders, revisions and REMOVE, equivalence with sequential
ReAct when everything arrives at t=0, malformed calls never executed, a raising tool reported to the model."""

import asyncio
import random

import pytest

from hf_fastslow.backends import ScriptedBackend
from hf_fastslow.generation.agent_grammar import ClockFormat, ToolCallAction
from hf_fastslow.generation.agent_tasks import make_fact_tasks, teacher_policy
from hf_fastslow.generation.agent_tools import CallStatus, InlineStream, Tool, ToolRuntime, run_virtual
from hf_fastslow.generation.speculative_agent import (
    SequentialReActAgent,
    SpeculativeAgent,
    feed_words,
    unsafe_violations,
)

GARBAGE = ["<tool_call id=x>{}</tool_call>", "<think>never closed", "<answer>no end", "<tool_call>{}</tool_call>",
           "<tool_call id=2>{not json}</tool_call>", "plain words", "<pause><pause>", "</think>", "<tool_call id=0>"
           "REMOVE</tool_call>", "<tool_call id=3>[1, 2]</tool_call>", ""]


def scripted(outputs):
    """A responder replaying `outputs` in order (then pausing forever)."""
    it = iter(outputs)
    return lambda messages, index, kwargs: next(it, "<pause>")


def call(i, name, **arguments):
    import json

    return f'<tool_call id={i}>{json.dumps({"name": name, "arguments": arguments})}</tool_call>'


def timed_tools(latency=0.1, sink=None):
    async def read(x):
        await asyncio.sleep(latency)
        return f"r({x})"

    async def write(x):
        await asyncio.sleep(latency)
        if sink is not None:
            sink.append(x)
        return f"w({x})"

    schema = {"parameters": {"properties": {"x": {}}, "required": ["x"]}}
    return [Tool("read", read, safe=True, schema=schema), Tool("write", write, safe=False, schema=schema)]


def run_agent(agent, chunks):
    async def go():
        for at, text, final in chunks:
            loop_now = asyncio.get_running_loop().time()
            await asyncio.sleep(max(0.0, at - (loop_now - start[0])))
            await agent.feed_user(text, final=final)
        return await agent.result()

    start = [0.0]

    async def main():
        start[0] = asyncio.get_running_loop().time()
        return await go()

    return run_virtual(asyncio.wait_for(main(), 3600))  # a deadlock fails at virtual hour one instead of hanging


# ---- the commit rule and the cascade, over random event orders ---------------------------------------------------
def random_model(rng):
    issued = [0]

    def respond(messages, index, kwargs):
        r = rng.random()
        top = issued[0]
        if r < 0.5:
            i = rng.randint(1, max(1, top - 1)) if rng.random() < 0.25 else top + 1  # new ids, some revisions
            issued[0] = max(top, i)
            recent = f"${rng.randint(max(1, top - 2), top)}" if top else "a"  # chains: depend on recent calls
            name = rng.choice(["read", "read", "read", "write", "write2", "flaky", "nope"])
            return call(i, name, x=recent if rng.random() < 0.7 else rng.choice(["a", "b"]))
        if r < 0.62 and top:  # withdraw mostly older calls: the roots of chains
            return f"<tool_call id={rng.randint(1, max(1, top - 2))}>REMOVE</tool_call>"
        if r < 0.85:
            return "<think>wait</think><pause>"
        if r < 0.9:
            return "<answer>done</answer>"
        return rng.choice(GARBAGE)

    return respond


def random_episode(seed):
    rng = random.Random(seed)
    latencies = random.Random(seed + 1)

    async def read(x):
        await asyncio.sleep(latencies.uniform(0, 1.5))
        return f"r({x})"

    async def write(x):
        await asyncio.sleep(latencies.uniform(0, 1.0))
        return f"w({x})"

    async def flaky(x):
        await asyncio.sleep(latencies.uniform(0, 0.5))
        raise RuntimeError("flaky tool")

    schema = {"parameters": {"properties": {"x": {}}, "required": ["x"]}}
    tools = [Tool("read", read, True, schema), Tool("write", write, False, schema), Tool("flaky", flaky, True, schema),
             Tool("write2", write, False, schema)]
    backend = InlineStream(ScriptedBackend(random_model(rng)), rng.uniform(0, 0.05))
    agent = SpeculativeAgent(backend, tools, max_turns=6, interrupt=rng.random() < 0.5)
    t, chunks = 0.0, []
    for k in range(rng.randint(1, 10)):
        t += rng.uniform(0, 1.2)
        chunks.append((t, f"chunk{k}", False))
    chunks[-1] = (chunks[-1][0], chunks[-1][1], True)
    return agent, run_agent(agent, chunks)


@pytest.mark.parametrize("block", range(4))
def test_commit_rule_and_cascade_hold_over_random_event_orders(block):
    unsafe_started = transitive = 0
    for seed in range(block * 250, (block + 1) * 250):
        agent, result = random_episode(seed)
        events = result.events
        assert unsafe_violations(events) == [], seed
        final_t = next(e.t for e in events if e.kind == "user_final")
        cancelled, commits = set(), 0
        for e in events:
            if e.kind == "cancelled" and e.text != "revised":  # a revised call lives on as its new version
                cancelled.add(e.call_id)
            if e.kind == "committed":  # every committed unsafe call was live at commit
                commits += 1
                ids = {int(i) for i in e.text.split(",") if i}
                assert not ids & cancelled, seed
            if e.kind == "cancelled" and "depends on" in e.text:  # a cascade reaching past direct dependents
                root = int(e.text.split("depends on ")[1].rstrip(")"))
                transitive += root not in agent.runtime.calls[e.call_id].deps
            if e.kind == "started" and not e.safe:
                unsafe_started += 1
                assert e.t >= final_t and commits, seed
        calls = agent.runtime.calls
        for c in calls.values():
            if not c.safe and c.started:
                assert c.committed, seed
            if c.status is not CallStatus.CANCELLED and not (not c.safe and c.started):
                assert all(calls[d].status is not CallStatus.CANCELLED for d in c.deps), seed  # cascade complete
        context = "\n".join(m["content"] for m in agent.render())
        for c in calls.values():
            if c.status is CallStatus.CANCELLED:
                assert f"result {c.call_id}:" not in context, seed
    assert unsafe_started > 20 and transitive >= 1  # the properties were exercised, not vacuous


# ---- cascade, revision, REMOVE -------------------------------------------------------------------------------
@pytest.mark.parametrize("revise", [False, True])
def test_cancelling_a_call_cancels_exactly_its_transitive_dependents_over_random_graphs(revise):
    async def scenario(seed):
        rng = random.Random(seed)

        async def read(x):
            await asyncio.sleep(rng.uniform(0, 0.3))
            return "r"

        runtime = ToolRuntime([Tool("read", read, safe=True)], lambda event: None)
        graph: dict[int, set[int]] = {}
        for i in range(1, rng.randint(3, 14)):
            live = [k for k in graph if runtime.calls[k].status is not CallStatus.CANCELLED]
            deps = set(rng.sample(live, rng.randint(0, min(3, len(live)))))
            assert runtime.submit(ToolCallAction(i, "read", {"x": " ".join(f"${d}" for d in deps) or "a"})) is None
            graph[i] = deps
            await asyncio.sleep(rng.uniform(0, 0.2))  # some results are in before the cancel, some not
        target = rng.choice(list(graph))
        expected, grew = {target}, True
        while grew:  # the transitive closure, computed here from the graph the test built
            more = {k for k, deps in graph.items() if deps & expected} - expected
            expected |= more
            grew = bool(more)
        before = {k for k, c in runtime.calls.items() if c.status is CallStatus.CANCELLED}
        if revise:
            runtime.submit(ToolCallAction(target, "read", {"x": "changed"}))
            expected.discard(target)  # the revised call lives on as its new version
        else:
            runtime.remove(target)
        after = {k for k, c in runtime.calls.items() if c.status is CallStatus.CANCELLED}
        assert after == before | expected, seed
        await asyncio.sleep(5)  # whatever survived finishes; nothing cancelled comes back
        assert {k for k, c in runtime.calls.items() if c.status is CallStatus.CANCELLED} == after
        return len(expected)

    sizes = [run_virtual(scenario(seed)) for seed in range(300)]
    assert sum(n > 2 for n in sizes) > 30  # deep cascades were exercised


def test_remove_cancels_exactly_the_transitive_dependents_and_retracts_their_results():
    outputs = [call(1, "read", x="a"), call(2, "read", x="$1"), call(3, "read", x="$2"), call(4, "read", x="b"),
               call(5, "read", x="$4"), "<tool_call id=1>REMOVE</tool_call>", "<answer>ok</answer>"]
    backend = ScriptedBackend(scripted(outputs))
    agent = SpeculativeAgent(backend, timed_tools(0.1))
    result = run_agent(agent, [(0.0, "go", False), (10.0, "now", True)])
    assert result.answer == "ok"
    status = {i: c.status for i, c in agent.runtime.calls.items()}
    assert {i for i, s in status.items() if s is CallStatus.CANCELLED} == {1, 2, 3}
    assert status[4] is status[5] is CallStatus.DONE
    assert agent.runtime.calls[3].arguments == {"x": "$2"}
    last_context = backend.calls[-1].messages[-1]["content"] + backend.calls[-1].messages[-2]["content"]
    context = "\n".join(m["content"] for m in backend.calls[-1].messages)
    for i in (1, 2, 3):
        assert f"result {i}:" not in context and f"cancelled {i}" in context
    assert "result 4: r(b)" in context and "result 5: r(r(b))" in context
    assert "now" in last_context
    assert result.metrics.wasted_calls == 3  # three lookups ran for nothing


def test_revision_same_args_no_rerun_new_args_rerun_and_no_id_reuse_after_remove():
    outputs = [call(1, "read", x="a"), call(1, "read", x="a"), call(1, "read", x="b"),
               "<tool_call id=1>REMOVE</tool_call>", call(1, "read", x="c"), "<tool_call id=1>REMOVE</tool_call>",
               "<answer>ok</answer>"]
    agent = SpeculativeAgent(ScriptedBackend(scripted(outputs)), timed_tools(0.1))
    result = run_agent(agent, [(0.0, "go", False), (1.0, "on", False), (2.0, "end", True)])
    started = [e for e in result.events if e.kind == "started"]
    assert [e.text for e in started] == ["{'x': 'a'}", "{'x': 'b'}"]  # the repeat did not run again
    assert [e.text for e in result.events if e.kind == "cancelled"] == ["revised", "removed"]
    rejected = [e.text for e in result.events if e.kind == "rejected"]
    assert rejected == ["id 1 was cancelled; use a new id", "REMOVE 1: already cancelled"]
    assert result.answer == "ok" and result.metrics.wasted_calls == 2


def test_unsafe_call_waits_for_the_final_chunk_and_a_commit_point():
    sink = []
    outputs = [call(1, "write", x="a"), "<pause>", "<pause>", call(2, "read", x="b"), "<answer>ok</answer>"]
    agent = SpeculativeAgent(ScriptedBackend(scripted(outputs)), timed_tools(0.1, sink))
    result = run_agent(agent, [(0.0, "go", False), (1.0, "on", False), (5.0, "end", True)])
    kinds = [(e.kind, e.call_id) for e in result.events if e.kind in ("held", "started", "committed", "user_final")]
    # held before final; the pause after the final chunk is no commit point before it (turn 3 is still pre-final)
    assert kinds[0] == ("held", 1)
    final_at = kinds.index(("user_final", None))
    assert ("started", 1) in kinds[final_at:] and ("started", 1) not in kinds[:final_at]
    assert sink == ["a"] and unsafe_violations(result.events) == []


def test_answer_before_the_final_chunk_is_held_and_a_never_committed_unsafe_call_is_discarded():
    sink = []
    outputs = ["<answer>early</answer>", call(1, "write", x="a"), "<answer>late</answer>"]
    agent = SpeculativeAgent(ScriptedBackend(scripted(outputs)), timed_tools(0.1, sink))
    result = run_agent(agent, [(0.0, "go", False), (1.0, "on", False), (2.0, "end", True)])
    assert [e.text for e in result.events if e.kind == "tentative_answer"] == ["early"]
    assert result.answer == "late" and result.metrics.latency_after_final_s == 0.0
    assert sink == [] and [e.text for e in result.events if e.kind == "cancelled"] == ["never committed"]


# ---- malformed calls and raising tools --------------------------------------------------------------------------
def test_malformed_tool_calls_are_recorded_never_executed_and_the_run_continues():
    sink = []
    outputs = [call(1, "nope", x="a"), '<tool_call id=x>{"name": "write", "arguments": {"x": 1}}</tool_call>',
               call(2, "write"), call(3, "write", x="a", y="b"), '<tool_call id=4>{"name": write}</tool_call>',
               call(5, "write", x="$9"), "<answer>ok</answer>"]
    backend = ScriptedBackend(scripted(outputs))
    agent = SpeculativeAgent(backend, timed_tools(0.1, sink))
    result = run_agent(agent, [(0.0, "all at once", True)])
    assert result.answer == "ok" and sink == []
    assert not [e for e in result.events if e.kind in ("started", "held")]
    rejected = [e.text for e in result.events if e.kind == "rejected"]
    assert rejected == ["unknown tool 'nope' (tools: read, write)", "write: missing argument(s) x",
                        "write: unknown argument(s) y", "call 5 uses $9, which is not a live call"]
    errors = [e.text for e in result.events if e.kind == "protocol_error"]
    assert len(errors) == 2 and "'x' is not an integer" in errors[0] and "not JSON" in errors[1]
    assert "error: write: missing argument(s) x" in backend.calls[3].messages[-1]["content"]  # the model is told


def test_a_tool_that_raises_is_reported_to_the_model_and_the_run_continues():
    async def boom(x):
        raise ValueError("kaput")

    outputs = [call(1, "boom", x="a"), call(2, "read", x="$1"), "<answer>ok</answer>"]
    backend = ScriptedBackend(scripted(outputs))
    agent = SpeculativeAgent(backend, [Tool("boom", boom, safe=True), *timed_tools()])
    result = run_agent(agent, [(0.0, "go", True)])
    assert result.answer == "ok"
    assert "result 1: error: ValueError: kaput" in backend.calls[1].messages[-1]["content"]
    assert agent.runtime.calls[2].status is CallStatus.FAILED  # its input failed: it never ran
    assert agent.runtime.calls[2].result == "error: dependency 1 failed"


def test_cyclic_revision_is_rejected():
    outputs = [call(1, "read", x="a"), call(2, "read", x="$1"), call(1, "read", x="$2"), "<answer>ok</answer>"]
    result = run_agent(SpeculativeAgent(ScriptedBackend(scripted(outputs)), timed_tools()), [(0.0, "go", True)])
    assert [e.text for e in result.events if e.kind == "rejected"] == ["call 1: cyclic dependency"]


# ---- equivalence with ReAct, speculation helps ------------------------------------------------------------------
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_equals_sequential_react_when_everything_arrives_at_t0(seed):
    for task in make_fact_tasks(4, seed=seed, correction_rate=0.5, lookup_latency_s=0.0, send_latency_s=0.0):
        outs = {}
        for cls in (SpeculativeAgent, SequentialReActAgent):
            agent = cls(ScriptedBackend(teacher_policy(task)), task.tools())
            outs[cls] = run_agent(agent, [(0.0, task.request, True)])
            assert task.correct(outs[cls].answer)
        spec, react = outs[SpeculativeAgent], outs[SequentialReActAgent]
        assert spec.tool_log == react.tool_log and len(spec.tool_log) == 3
        assert spec.answer == react.answer


def test_streamed_input_speculation_answers_sooner_with_the_same_answers():
    tasks = make_fact_tasks(6, seed=3, correction_rate=0.5)
    for task in tasks:
        results = {}
        for cls in (SpeculativeAgent, SequentialReActAgent):
            backend = InlineStream(ScriptedBackend(teacher_policy(task, ClockFormat())), 0.02)
            results[cls] = run_virtual(cls(backend, task.tools()).run(feed_words(task.request, 3.0)))
            assert task.correct(results[cls].answer)
        spec, react = results[SpeculativeAgent], results[SequentialReActAgent]
        assert spec.metrics.latency_after_final_s < react.metrics.latency_after_final_s / 2
        if "I mean" in task.request:
            assert spec.metrics.wasted_calls >= 1


def test_interrupt_abandons_a_turn_when_new_input_arrives():
    slow = "<think>" + " word" * 30 + "</think> <pause>"
    for interrupt in (False, True):
        backend = InlineStream(ScriptedBackend(lambda m, i, k: slow if "(done)" not in m[-1]["content"]
                                               else "<answer>x</answer>"), 0.05)
        agent = SpeculativeAgent(backend, timed_tools(), interrupt=interrupt)
        result = run_agent(agent, [(0.0, "a", False), (0.5, "b", False), (1.0, "c", False), (1.5, "d", True)])
        assert result.answer == "x"
        interrupted = [e for e in result.events if e.kind == "interrupted"]
        assert (len(interrupted) > 0) == interrupt
        if interrupt:  # the answer came right after the final chunk instead of after the running turn
            assert result.metrics.latency_after_final_s < 0.5
