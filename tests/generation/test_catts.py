"""CATTS logic on scripted backends: vote statistics, canonicalisation, the gate, baselines' equivalences, arbiter
robustness, bad input, the running-total environment, the episode runner and the replay cache."""

import json
import math
import random
import re

import pytest

from hf_fastslow.backends.base import BackendFeatureError, Capabilities, Usage
from hf_fastslow.backends.testing import ALL_CAPABILITIES, ScriptedBackend
from hf_fastslow.generation.catts import (
    AlwaysArbitratePolicy,
    CATTSConfig,
    CATTSPolicy,
    GreedyPolicy,
    MajorityVotePolicy,
    StepFailed,
    arbiter_messages,
    canonical_action,
    parse_choice,
    parse_json_action,
    vote_stats,
)
from hf_fastslow.generation.catts_env import (
    Environment,
    EpisodeResult,
    ReplayBackend,
    RunningTotalEnv,
    StepRecord,
    run_episode,
    summarize,
)

MSGS = [{"role": "user", "content": "pick"}]


# ----- vote statistics ---------------------------------------------------------------------------------------------
def test_vote_stats_unanimous():
    s = vote_stats(["a"] * 6)
    assert s.entropy == 0.0 and s.entropy_norm == 0.0 and s.margin == 1.0
    assert s.counts == [6] and s.p == [1.0]
    assert s.uncertainty("entropy") == 0.0 and s.uncertainty("margin") == 0.0


def test_vote_stats_uniform_over_distinct():
    s = vote_stats([str(i) for i in range(7)])
    assert s.entropy == pytest.approx(math.log(7))
    assert s.entropy_norm == pytest.approx(1.0) and s.entropy_norm <= 1.0
    assert s.margin == 0.0 and s.uncertainty("margin") == 1.0


def test_vote_stats_closed_form_two_to_one():
    s = vote_stats(["a", "b", "a"])
    assert s.p == pytest.approx([2 / 3, 1 / 3])
    assert s.entropy == pytest.approx(math.log(3) - (2 / 3) * math.log(2))
    assert s.entropy_norm == pytest.approx((math.log(3) - (2 / 3) * math.log(2)) / math.log(3))
    assert s.margin == pytest.approx(1 / 3)
    assert s.representatives == ["a", "b"] and s.members == [[0, 2], [1]]


def test_vote_stats_unnormalised_entropy_is_in_nats():
    s = vote_stats(["a", "b", "c", "d"], normalize="none")
    assert s.entropy_norm == pytest.approx(math.log(4)) and s.normalizer == 1.0


def test_vote_stats_order_invariant():
    actions = ["x"] * 4 + ["y"] * 3 + ["z"] * 2 + ["w"]
    base = vote_stats(actions)
    rng = random.Random(0)
    for _ in range(20):
        shuffled = actions[:]
        rng.shuffle(shuffled)
        s = vote_stats(shuffled)
        assert s.entropy == pytest.approx(base.entropy) and s.margin == pytest.approx(base.margin)
        assert dict(zip(s.keys, s.counts)) == dict(zip(base.keys, base.counts))


def test_vote_stats_tie_breaks_by_earliest_sample():
    assert vote_stats(["b", "a", "a", "b"]).majority == "b"
    assert vote_stats(["a", "b", "b", "a"]).majority == "a"


def test_canonicaliser_merges_equivalent_actions():
    assert canonical_action({"x": 1, "y": 2}) == canonical_action({"y": 2, "x": 1})
    assert canonical_action({"x": 1, "y": 2}) == canonical_action('{"y": 2,  "x": 1.0}')
    assert canonical_action({"action": "Type", "text": "  Hello   World "}) == canonical_action(
        {"action": "type", "text": "hello world"})
    assert canonical_action("1,234") == canonical_action(1234) == canonical_action("1234.0")
    assert canonical_action([1, "A"]) == canonical_action((1.0, "a"))
    assert canonical_action({"x": 1}) != canonical_action({"x": 2})
    assert canonical_action(True) != canonical_action(1)
    s = vote_stats([{"x": 1, "y": 2}, '{"y": 2, "x": 1}', {"x": 3}])
    assert s.counts == [2, 1]


def test_parse_json_action_and_choice():
    assert parse_json_action('Sure: ```json\n{"action": "click", "id": 3}\n```') == {"action": "click", "id": 3}
    assert parse_json_action("{not json} then {\"a\": 1}") == {"a": 1}
    assert parse_json_action("no action here") is None
    assert parse_choice("B", 3) == 1
    assert parse_choice("(C) because", 3) == 2
    assert parse_choice("The best one is B.", 3) == 1
    assert parse_choice("D", 3) is None  # out of range
    assert parse_choice("A or B", 3) is None  # ambiguous
    assert parse_choice("maybe A or B", 3) is None
    assert parse_choice("none", 3) is None


def test_arbiter_messages_append_lettered_options_with_counts():
    out = arbiter_messages([{"role": "system", "content": "s"}, {"role": "user", "content": "q"}], ["1", "2"], [3, 1])
    assert len(out) == 2 and out[0]["content"] == "s"
    assert "A. 1 (3 of 4 votes)" in out[1]["content"] and "B. 2 (1 of 4 votes)" in out[1]["content"]
    assert arbiter_messages([{"role": "assistant", "content": "x"}], ["1"])[-1]["role"] == "user"


# ----- the gate -----------------------------------------------------------------------------------------------------
def fixed_sampler(replies):
    """A sampler whose sample i replies replies[i] (JSON actions)."""
    return ScriptedBackend(lambda messages, i, kw: json.dumps({"v": replies[i % len(replies)]}))


def letter_arbiter(letter="B"):
    return ScriptedBackend(lambda messages, i, kw: letter)


def policy(replies, tau, signal="entropy", arbiter=None, **cfg):
    arbiter = arbiter or letter_arbiter()
    cfg = CATTSConfig(n_samples=len(replies), tau=tau, signal=signal, **cfg)
    return CATTSPolicy(fixed_sampler(replies), arbiter, config=cfg), arbiter


@pytest.mark.parametrize("signal", ["entropy", "margin"])
def test_gate_never_calls_arbiter_when_unanimous(signal):
    pol, arb = policy([1, 1, 1, 1], tau=0.0, signal=signal)
    d = pol.step(MSGS)
    assert not d.arbitrated and d.action == {"v": 1} and arb.calls == [] and len(arb.ledger) == 0
    assert d.arbiter_usage == Usage()


def test_gate_threshold_entropy():
    # [1,1,1,2]: H = -(.75 ln .75 + .25 ln .25), normalised by ln 4 -> 0.4056
    u = -(0.75 * math.log(0.75) + 0.25 * math.log(0.25)) / math.log(4)
    pol, arb = policy([1, 1, 1, 2], tau=u + 1e-9)
    d = pol.step(MSGS)
    assert d.uncertainty == pytest.approx(u) and not d.arbitrated and arb.calls == []
    pol, arb = policy([1, 1, 1, 2], tau=u - 1e-6)
    d = pol.step(MSGS)
    assert d.arbitrated and len(arb.calls) == 1 and len(arb.ledger) == 1
    assert d.choice == 1 and d.action == {"v": 2} and d.overrode_majority
    assert d.arbiter_usage.calls == 1 and d.arbiter_usage.prompt_tokens > 0


def test_gate_threshold_margin_is_inclusive():
    pol, arb = policy([1, 1, 1, 2], tau=0.5, signal="margin")  # U = 1 - (0.75 - 0.25) = 0.5 <= tau
    assert not pol.step(MSGS).arbitrated and arb.calls == []
    pol, arb = policy([1, 1, 1, 2], tau=0.49, signal="margin")
    assert pol.step(MSGS).arbitrated and len(arb.calls) == 1


def test_arbiter_sees_one_representative_per_cluster_with_counts():
    pol, arb = policy([5, 7, 5, 9], tau=0.0)
    pol.step(MSGS)
    prompt = arb.calls[0].messages[-1]["content"]
    assert 'A. {"v": 5} (2 of 4 votes)' in prompt and 'B. {"v": 7} (1 of 4 votes)' in prompt
    assert 'C. {"v": 9} (1 of 4 votes)' in prompt and "D." not in prompt
    assert arb.calls[0].kwargs["temperature"] == 0.0


@pytest.mark.parametrize("reply", ["Z", "I cannot tell", "", "A and B"])
def test_invalid_arbiter_reply_falls_back_to_majority(reply, caplog):
    pol, arb = policy([1, 2, 1, 3], tau=0.0, arbiter=letter_arbiter(reply))
    with caplog.at_level("INFO", logger="hf_fastslow.generation.catts"):
        d = pol.step(MSGS)
    assert d.arbitrated and d.arbiter_fallback and d.choice == 0 and d.action == {"v": 1}
    assert not d.overrode_majority and d.arbiter_reply == reply
    assert "names no option" in caplog.text


def test_arbiter_writing_the_action_itself_is_matched_to_its_cluster():
    pol, _ = policy([1, 2, 1, 3], tau=0.0, arbiter=letter_arbiter('{"v": 3}'))
    d = pol.step(MSGS)
    assert d.choice == 2 and d.action == {"v": 3} and not d.arbiter_fallback


# ----- scripted episodes: tau >= 1 is majority vote, tau < 0 is always-arbitrate ------------------------------------
def noisy_adder(messages, i, kw):
    """Right about half the time; the error depends on the sample's seed, so runs are reproducible."""
    a, b = map(int, re.search(r"What is (\d+) \+ (\d+)", messages[-1]["content"]).groups())
    rng = random.Random(kw["seed"])
    return f"{a} + {b} = {a + b + rng.choice([0, 0, 0, 1, -1, 2])}"


def seeded_arbiter(messages, i, kw):
    """Picks an option from the prompt's letters, deterministically from the prompt."""
    letters = re.findall(r"^([A-Z])\. ", messages[-1]["content"], flags=re.M)
    return letters[sum(map(ord, messages[-1]["content"])) % len(letters)]


def episode_actions(pol, env, episodes=12):
    results = [run_episode(pol, env, episode=e, seed=3) for e in range(episodes)]
    return [[s.action["value"] for s in r.steps] for r in results], results


@pytest.mark.parametrize("signal", ["entropy", "margin"])
def test_tau_at_least_one_is_majority_vote(signal):
    env = RunningTotalEnv(n_steps=4)
    arb = ScriptedBackend(seeded_arbiter)
    cfg = CATTSConfig(n_samples=6, signal=signal, tau=1.0)
    catts, _ = episode_actions(CATTSPolicy(ScriptedBackend(noisy_adder), arb, env.parse_action, config=cfg), env)
    majority, _ = episode_actions(MajorityVotePolicy(ScriptedBackend(noisy_adder), env.parse_action, n_samples=6), env)
    assert catts == majority and arb.calls == []


@pytest.mark.parametrize("signal", ["entropy", "margin"])
def test_tau_below_zero_is_always_arbitrate(signal):
    env = RunningTotalEnv(n_steps=4)
    cfg = CATTSConfig(n_samples=6, signal=signal, tau=-0.01)
    arb1, arb2 = ScriptedBackend(seeded_arbiter), ScriptedBackend(seeded_arbiter)
    catts, res = episode_actions(CATTSPolicy(ScriptedBackend(noisy_adder), arb1, env.parse_action, config=cfg), env)
    always, _ = episode_actions(AlwaysArbitratePolicy(ScriptedBackend(noisy_adder), arb2, env.parse_action,
                                                      n_samples=6), env)
    assert catts == always
    assert len(arb1.calls) == len(arb2.calls) == sum(len(r.steps) for r in res)
    majority, _ = episode_actions(MajorityVotePolicy(ScriptedBackend(noisy_adder), env.parse_action, n_samples=6), env)
    assert catts != majority  # the arbiter changes decisions on these episodes (else the equivalences are vacuous)


def test_intermediate_tau_arbitrates_only_contentious_steps():
    env = RunningTotalEnv(n_steps=4)
    arb = ScriptedBackend(seeded_arbiter)
    pol = CATTSPolicy(ScriptedBackend(noisy_adder), arb, env.parse_action, config=CATTSConfig(n_samples=6, tau=0.5))
    _, res = episode_actions(pol, env)
    steps = [s for r in res for s in r.steps]
    assert all(s.arbitrated == (s.uncertainty > 0.5) for s in steps)
    assert 0 < sum(s.arbitrated for s in steps) < len(steps)
    assert len(arb.calls) == sum(s.arbitrated for s in steps)


def test_greedy_policy_one_greedy_sample():
    sampler = ScriptedBackend(noisy_adder)
    env = RunningTotalEnv(n_steps=2)
    r = run_episode(GreedyPolicy(sampler, env.parse_action), env)
    assert [c.kwargs["temperature"] for c in sampler.calls] == [0.0, 0.0]
    assert all(s.sampler_usage.samples == 1 and not s.arbitrated for s in r.steps)


# ----- retries and bad input ----------------------------------------------------------------------------------------
def test_invalid_samples_are_resampled_then_step_fails():
    replies = iter(["junk"] * 4 + ['{"v": 1}', "junk"])
    sampler = ScriptedBackend(lambda m, i, kw: next(replies))
    d = CATTSPolicy(sampler, config=CATTSConfig(n_samples=2, arbiter=None, max_retries=2)).step(MSGS, seed=10)
    assert d.attempts == 3 and d.invalid_samples == 5 and d.action == {"v": 1}
    assert [c.kwargs["seed"] for c in sampler.calls] == [10, 11, 12, 13, 14, 15]
    assert d.sampler_usage.calls == 3
    sampler = ScriptedBackend("never an action")
    with pytest.raises(StepFailed, match="after 2 retries") as err:
        CATTSPolicy(sampler, config=CATTSConfig(n_samples=3, arbiter=None, max_retries=2)).step(MSGS)
    assert len(err.value.samples) == 9 and err.value.usage.calls == 3


def test_step_failure_ends_the_episode_unsuccessfully():
    env = RunningTotalEnv(n_steps=3)
    r = run_episode(MajorityVotePolicy(ScriptedBackend("no idea"), env.parse_action, n_samples=2,
                                       config=CATTSConfig(max_retries=1)), env)
    assert not r.success and r.failed and len(r.steps) == 1 and r.steps[0].sampler_usage.calls == 2


@pytest.mark.parametrize("kwargs, match", [
    ({"n_samples": 0}, "n_samples"), ({"n_samples": 2.5}, "n_samples"), ({"tau": math.nan}, "tau"),
    ({"signal": "variance"}, "signal"), ({"arbiter": "vote"}, "arbiter"), ({"normalize": "log2"}, "normalize"),
    ({"max_retries": -1}, "max_retries"), ({"temperature": 0.0, "n_samples": 4}, "greedy"),
])
def test_bad_config(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CATTSConfig(**kwargs)


def test_bad_policy_input():
    with pytest.raises(ValueError, match="needs an arbiter backend"):
        CATTSPolicy(ScriptedBackend("x"), None, config=CATTSConfig(arbiter="generate"))
    no_scoring = ScriptedBackend("x", capabilities=Capabilities(**{**ALL_CAPABILITIES.__dict__,
                                                                   "prompt_scoring": False}))
    with pytest.raises(BackendFeatureError, match="scoring arbiter"):
        CATTSPolicy(ScriptedBackend("x"), no_scoring, config=CATTSConfig(arbiter="score"))
    with pytest.raises(TypeError, match="backend"):
        CATTSPolicy(lambda m: "x", config=CATTSConfig(arbiter=None))
    with pytest.raises(ValueError, match="at least one"):
        vote_stats([])


def test_scoring_arbiter_with_scripted_scores_and_multi_token_labels():
    scores = {"A": -2.0, "B": -0.5, "C": -3.0}
    arb = ScriptedBackend("x", scorer=lambda m, label: [scores[label]])
    pol = CATTSPolicy(fixed_sampler([1, 2, 1, 3]), arb, config=CATTSConfig(n_samples=4, tau=0.0, arbiter="score"))
    d = pol.step(MSGS)
    z = sum(math.exp(v) for v in scores.values())
    assert d.arbiter_probs == pytest.approx([math.exp(scores[c]) / z for c in "ABC"])
    assert d.choice == 1 and d.action == {"v": 2} and d.arbiter_usage.calls == 3
    two_tokens = ScriptedBackend("x", scorer=lambda m, label: [-1.0, -1.0])
    pol = CATTSPolicy(fixed_sampler([1, 2]), two_tokens, config=CATTSConfig(n_samples=2, tau=0.0, arbiter="score"))
    with pytest.raises(ValueError, match="single-token"):
        pol.step(MSGS)


# ----- environment, runner, summary, replay -------------------------------------------------------------------------
def test_running_total_env():
    env = RunningTotalEnv(n_steps=3, seed=1)
    assert isinstance(env, Environment)
    assert env.numbers_of(5) == env.numbers_of(5) != env.numbers_of(6)
    obs = env.reset(5)
    start, x1, x2, x3 = env.numbers
    assert f"running total is {start}" in obs[0]["content"] and f"Add {x1}" in obs[0]["content"]
    assert env.parse_action(f"{start} + {x1} = {start + x1}.") == {"action": "add", "value": start + x1}
    assert env.parse_action('{"action": "add", "value": "1,020"}') == {"action": "add", "value": 1020}
    assert env.parse_action("The answer is 2.5") is None and env.parse_action("no number") is None
    assert env.parse_action("Here is the answer: 17.") == {"action": "add", "value": 17}
    assert env.parse_action("12 + 2 equals 14.") == env.parse_action(" 14 ") == {"action": "add", "value": 14}
    assert env.parse_action("To add 2 to 12, which is 24, we need to multiply 12") is None  # prose: no action
    tr = env.step({"action": "add", "value": start + x1 + 1})  # wrong: the error carries on
    assert tr.correct is False and not tr.done and f"running total is {start + x1 + 1}" in tr.observation[0]["content"]
    tr = env.step({"action": "add", "value": start + x1 + 1 + x2})  # locally right
    assert tr.correct is True
    tr = env.step({"action": "add", "value": start + x1 + 1 + x2 + x3})
    assert tr.done and tr.correct and not tr.success and tr.info["true_total"] == start + x1 + x2 + x3
    with pytest.raises(RuntimeError, match="ended"):
        env.step({"action": "add", "value": 0})
    env.reset(5)
    with pytest.raises(ValueError, match="actions are"):
        env.step({"action": "sub", "value": 1})
    for value in (start + x1, start + x1 + x2, start + x1 + x2 + x3):
        tr = env.step({"action": "add", "value": value})
    assert tr.success
    stop = RunningTotalEnv(n_steps=3, seed=1, stop_on_error=True)
    stop.reset(5)
    assert stop.step({"action": "add", "value": -1}).done


def test_summary_override_check_and_wilson():
    def rec(correct, overrode, margin):
        return StepRecord({"v": 0}, correct, overrode, overrode, False, 0.5, margin, 0.5, 2, 0,
                          Usage(calls=1, prompt_tokens=10, completion_tokens=5), Usage(calls=int(overrode)))
    results = [EpisodeResult(0, 0, False, [rec(False, True, 0.8), rec(True, False, 1.0)]),
               EpisodeResult(1, 0, True, [rec(True, True, 0.5), rec(True, False, 1.0)]),
               EpisodeResult(2, 0, True, [rec(True, False, 1.0), rec(True, False, 1.0)])]
    s = summarize(results)
    assert s["success"] == pytest.approx(2 / 3) and s["step_accuracy"] == pytest.approx(5 / 6)
    assert s["consensus_overrides"] == 1 and s["consensus_override_step_accuracy"] == 0.0
    assert s["success_with_consensus_override"] == 0.0 and s["success_without_consensus_override"] == 1.0
    assert s["arbiter_calls"] == 2 and s["tokens"] == 6 * 15 and s["overrides"] == 2


def test_replay_backend_runs_shared_calls_once_and_charges_every_arm():
    inner = ScriptedBackend(noisy_adder)
    memo = {}
    env = RunningTotalEnv(n_steps=3)
    arms = [MajorityVotePolicy(ReplayBackend(inner, memo), env.parse_action, n_samples=4) for _ in range(2)]
    runs = [[run_episode(p, env, episode=e) for e in range(3)] for p in arms]
    assert [[s.action for s in r.steps] for r in runs[0]] == [[s.action for s in r.steps] for r in runs[1]]
    assert len(inner.ledger) == 9 and arms[0].sampler.ledger.total() == arms[1].sampler.ledger.total()
    assert arms[0].sampler.ledger.total().completion_tokens == inner.ledger.total().completion_tokens
    assert arms[1].sampler.hits == 9 and arms[0].sampler.hits == 0
    alone = MajorityVotePolicy(ScriptedBackend(noisy_adder), env.parse_action, n_samples=4)
    alone_runs = [run_episode(alone, env, episode=e) for e in range(3)]
    assert [r.sampler_usage.completion_tokens for r in alone_runs] == [r.sampler_usage.completion_tokens
                                                                       for r in runs[1]]
