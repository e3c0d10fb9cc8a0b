"""MAST traces: the Trace type, MAD loading with composite keys, the fixtures, the heuristics baseline, and the
adapters from the package's own agent runs (scripted backends: real runs of the real loops)."""

import json
import random
import re

import pytest

from hf_fastslow.backends.testing import ScriptedBackend
from hf_fastslow.evaluation.mast import mast_agreement
from hf_fastslow.evaluation.mast_fixtures import fixture_traces
from hf_fastslow.evaluation.mast_heuristics import HEURISTIC_CODES, HeuristicAnnotator, heuristic_modes
from hf_fastslow.evaluation.mast_taxonomy import MAST_CODES
from hf_fastslow.evaluation.mast_traces import (
    Trace,
    Turn,
    load_mad,
    trace_from_agent,
    trace_from_catts,
    trace_from_evolve,
    trace_from_staircase,
)


def test_trace_roundtrip_and_bad_labels():
    t = Trace("7", "task", [("a", "hi"), Turn("b", "yo")], source="x/y", labels={"1.1": True}, max_turns=3)
    assert t.key == ("x/y", "7") and t.turns[0] == Turn("a", "hi")
    assert Trace.from_dict(json.loads(json.dumps(t.to_dict()))) == t
    assert t.render() == "TASK: task\n[a] hi\n[b] yo"
    with pytest.raises(ValueError, match="1.6"):
        Trace("1", "t", [], labels={"1.6": True})


def test_load_mad_composite_keys(tmp_path):
    rows = [{"mas_name": "ChatDev", "llm_name": "gpt-4o", "trace_id": 1, "trace": "A: hi",
             "mast_annotation": {"1.1": 1, "1.3": 0, "FM-2.6": "yes"}},
            {"mas_name": "MetaGPT", "llm_name": "gpt-4o", "trace_id": 1, "trace": {"trajectory": "B: yo"},
             "mast_annotation": {"3.3": True}},
            {"mas_name": "MetaGPT", "llm_name": "gpt-4o", "trace_id": 1, "trace": "again"}]
    path = tmp_path / "mad.json"
    path.write_text(json.dumps(rows))
    traces = load_mad(path)
    assert [t.key for t in traces] == [("ChatDev/gpt-4o", "1"), ("MetaGPT/gpt-4o", "1"), ("MetaGPT/gpt-4o", "1#2")]
    assert traces[0].labels == {"1.1": True, "1.3": False, "2.6": True}
    assert traces[1].turns[0].content == "B: yo" and traces[2].labels is None


def test_fixtures_one_positive_per_mode_and_clean_ones():
    traces = fixture_traces()
    assert len({t.key for t in traces}) == len(traces) == 24
    planted = [t for t in traces if t.meta["planted"]]
    assert sorted(t.meta["planted"] for t in planted) == sorted(MAST_CODES)
    assert all(t.labels[t.meta["planted"]] for t in planted)
    clean = [t for t in traces if not t.meta["planted"]]
    assert len(clean) == 10 and all(not any(t.labels.values()) and t.task_completed for t in clean)
    assert all(set(t.labels) == set(MAST_CODES) for t in traces)


def test_heuristics_on_fixtures_and_noise():
    traces = fixture_traces()
    r = mast_agreement(HeuristicAnnotator().annotate_many(traces), traces)
    for code in ("1.3", "1.5", "2.1", "2.2", "3.1"):
        assert r["per_label"][code]["f1"] == 1.0, code
    assert all(r["per_label"][c]["tp"] + r["per_label"][c]["fp"] == 0 for c in MAST_CODES if c not in HEURISTIC_CODES)
    # a quality check that must fail on noise: random labels score far below the heuristics
    rng = random.Random(0)
    noise = [{c: rng.random() < 0.5 for c in MAST_CODES} for _ in traces]
    assert mast_agreement(noise, traces)["pooled_kappa"] < r["pooled_kappa"] - 0.3


def test_heuristic_rules_individually():
    base = [("planner", "Solver, compute 2 + 2."), ("solver", "2 + 2 = 4."), ("verifier", "Checked: 4."),
            ("planner", "FINAL ANSWER: 4")]
    assert not any(heuristic_modes(Trace("c", "2+2", base)).values())
    long_msg = "I will look up the exchange rate in the table and report it back to the planner now."
    assert heuristic_modes(Trace("r", "t", base[:1] + [("a", long_msg), ("b", long_msg.upper() + " ")] + base[1:]))[
        "1.3"]
    assert heuristic_modes(Trace("l", "t", base[:2], max_turns=2))["1.5"]
    # adapters say whether the run hit its limit: 4 rendered lines under a 3-step limit are not a hit by themselves
    assert not heuristic_modes(Trace("s", "t", base, max_turns=3, meta={"hit_limit": False}))["1.5"]
    assert heuristic_modes(Trace("s", "t", base, max_turns=30, meta={"hit_limit": True}))["1.5"]
    assert heuristic_modes(Trace("p", "t", base[:2]))["3.1"]
    assert heuristic_modes(Trace("v", "t", [base[0], base[1], base[3]]))["3.2"]
    assert heuristic_modes(Trace("z", "t", base[:2] + [("a", "Let's start over from scratch.")] + base[2:]))["2.1"]


# ----- adapters from real runs of the package's loops (scripted models) -----------------------------------------------
def test_trace_from_evolve():
    from hf_fastslow.generation.squeeze_evolve import SqueezeEvolve
    from hf_fastslow.generation.squeeze_evolve_config import SqueezeEvolveConfig, Tier

    def respond(messages, index, kwargs):
        return f"The answer is {42 if (kwargs.get('seed') or 0) % 3 else 41}"

    tiers = [Tier(ScriptedBackend(respond, name="cheap"), "cheap", 1, 1),
             Tier(ScriptedBackend(respond, name="strong"), "strong", 5, 5)]
    cfg = SqueezeEvolveConfig(population=4, group_size=2, loops=1, fitness="diversity", percentiles=(50.0,))
    res = SqueezeEvolve(tiers, cfg).run("What is 40 + 2?")
    trace = trace_from_evolve(res, "What is 40 + 2?", gold_answer=42)
    assert trace.task_completed == (res.answer == "42")
    assert trace.source.startswith("squeeze_evolve/") and trace.turns[0] == Turn("user", "What is 40 + 2?")
    members = [t for t in trace.turns if "(loop " in t.speaker]
    assert len(members) == len(res.population) and members[0].content == res.population[0].text
    assert "majority vote" in trace.turns[-1].content and str(res.answer) in trace.turns[-1].content
    assert HeuristicAnnotator().annotate(trace).key == trace.key


def test_trace_from_catts():
    from hf_fastslow.generation.catts import MajorityVotePolicy
    from hf_fastslow.generation.catts_env import RunningTotalEnv, run_episode

    def adder(messages, i, kw):
        a, b = map(int, re.search(r"What is (\d+) \+ (\d+)", messages[-1]["content"]).groups())
        return f"{a} + {b} = {a + b + random.Random(kw['seed']).choice([0, 0, 1])}"

    env = RunningTotalEnv(n_steps=3)
    first = env.reset(0)
    result = run_episode(MajorityVotePolicy(ScriptedBackend(adder), env.parse_action, n_samples=3), env)
    trace = trace_from_catts(result, first, max_steps=env.max_steps)
    assert trace.task_completed == result.success and trace.key == ("catts", "0-0")
    assert sum(t.speaker == "policy" for t in trace.turns) == len(result.steps)
    verdicts = [t.content for t in trace.turns if t.speaker == "environment"][1:-1]
    assert verdicts == [f"step {i}: action {'correct' if s.correct else 'wrong'}" for i, s in enumerate(result.steps)]
    assert trace.meta["hit_limit"] is False  # the episode ended by itself after its 3 steps
    assert not heuristic_modes(trace)["1.5"]


def test_trace_from_staircase():
    from hf_fastslow.generation.staircase import MixtureOfAgents

    props = [ScriptedBackend(f"proposal {k}: the answer is {40 + k}", name=f"p{k}") for k in range(2)]
    agg = ScriptedBackend("Combining the proposals, the answer is 41", name="agg")
    moa = MixtureOfAgents(props, agg)
    question = [{"role": "user", "content": "What is 20 + 21?"}]
    answer = "".join(moa.stream(question))
    trace = trace_from_staircase(moa.last_metrics, question, gold_answer=41)
    assert trace.task_completed is True and trace.task == "What is 20 + 21?"
    assert [t.content for t in trace.turns if t.speaker.startswith("proposer")] == \
        ["proposal 0: the answer is 40", "proposal 1: the answer is 41"]
    assert trace.turns[-1].content == f"answer: {answer}"


def test_trace_from_agent():
    from hf_fastslow.generation.agent_grammar import grammar_prompt
    from hf_fastslow.generation.agent_tasks import TASK_EXAMPLE, make_fact_tasks, teacher_policy
    from hf_fastslow.generation.agent_tools import run_virtual
    from hf_fastslow.generation.speculative_agent import SequentialReActAgent, feed_words

    task = make_fact_tasks(1, seed=4, lookup_latency_s=0.1, send_latency_s=0.1)[0]
    tools = task.tools()
    agent = SequentialReActAgent(ScriptedBackend(teacher_policy(task)), tools,
                                 system_prompt=grammar_prompt([t.prompt_line() for t in tools], TASK_EXAMPLE))
    result = run_virtual(agent.run(feed_words(task.request, 8.0)))
    trace = trace_from_agent(result, task=task.request, gold_answer=None, max_turns=agent.max_turns)
    assert trace.task == task.request and result.answer is not None
    assert trace.turns[-1].content == f"FINAL ANSWER: {result.answer}"
    assert any(t.speaker.startswith("tool ") for t in trace.turns)
    model_turns = [e for e in result.events if e.kind == "turn"]
    kept = sum(t.speaker == "agent" and "FINAL ANSWER" not in t.content for t in trace.turns)
    assert kept + trace.meta["pauses"] == len(model_turns)  # every model turn is shown or counted as a pause
    assert not any(a.speaker == b.speaker == "user" for a, b in zip(trace.turns, trace.turns[1:]))
