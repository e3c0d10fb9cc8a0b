"""The interleaved wall-clock helper every benchmark times its arms with, on fake arms and a fake clock: the order
the arms run in, what is timed (and what is not), medians, spreads, paired ratios, failures."""

import pytest
import torch

from hf_fastslow.evaluation.timing import (
    Spread,
    interleave,
    load_average,
    machine_state,
    paired_ratio_table,
    paired_ratios,
    quartiles,
    rotated,
    timed_call,
)


class FakeClock:
    """Time moves only when an arm "works" (advance), so every timing is known exactly."""

    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now

    def advance(self, seconds):
        self.now += seconds


def fake_arms(clock, durations, log):
    """Arms that take the given seconds per successive call, logging their calls in the order they really ran."""

    def arm(name):
        calls = iter(durations[name])

        def run():
            log.append(name)
            seconds = next(calls)
            clock.advance(seconds)
            return f"{name}:{seconds}"

        return run

    return {name: arm(name) for name in durations}


def run_fake(durations, **kw):
    clock, cpu, log = FakeClock(), FakeClock(), []
    result = interleave(fake_arms(clock, durations, log), clock=clock, cpu_clock=cpu, **kw)
    return result, log, clock


def test_arms_run_round_by_round_in_one_process():
    durations = {"a": [9, 3, 1, 2], "b": [8, 5, 4, 6], "c": [7, 1, 1, 1]}
    result, log, _ = run_fake(durations, repeats=3, warmup=1)
    assert log == ["a", "b", "c"] * 4  # one run of every arm per round, never all rounds of one arm first
    assert result.order == [(r, n) for r in range(4) for n in "abc"]


def test_rotation_changes_who_goes_first_each_round():
    durations = {"a": [1] * 4, "b": [1] * 4, "c": [1] * 4}
    _, log, _ = run_fake(durations, repeats=3, warmup=1, rotate=True)
    assert log == ["a", "b", "c", "b", "c", "a", "c", "a", "b", "a", "b", "c"]
    assert rotated(["a", "b"], 0) == ["a", "b"] and rotated(["a", "b"], 3) == ["b", "a"]


def test_warmup_is_run_but_not_timed_and_medians_spreads_ratios_are_per_round():
    durations = {"peer": [100, 4, 2, 8], "ours": [100, 2, 2, 2]}
    result, _, _ = run_fake(durations, repeats=3, warmup=1)
    assert result["peer"].wall == [4, 2, 8]
    assert result["peer"].spread == Spread(median=4, low=2, high=8, n=3)
    assert result["ours"].spread == Spread(median=2, low=2, high=2, n=3)
    assert result.ratios("ours", "peer") == [0.5, 1.0, 0.25]
    assert result["ours"].values == ["ours:2"] * 3
    assert result.last == {"peer": "peer:8", "ours": "ours:2"}


def test_even_number_of_rounds_takes_the_mean_of_the_middle_two():
    result, _, _ = run_fake({"a": [0, 1, 10, 3, 5]}, repeats=4, warmup=1)
    assert result["a"].spread.median == 4


def test_cpu_time_is_measured_with_its_own_clock():
    clock, cpu = FakeClock(), FakeClock()

    def arm():
        clock.advance(3)
        cpu.advance(1)

    result = interleave({"a": arm}, repeats=2, warmup=0, clock=clock, cpu_clock=cpu)
    assert result["a"].wall == [3, 3] and result["a"].cpu == [1, 1]


def test_before_each_runs_outside_the_timed_interval():
    clock, cpu, log = FakeClock(), FakeClock(), []
    arms = fake_arms(clock, {"a": [1, 2, 3]}, log)
    seen = []

    def reset(name):
        seen.append(name)
        clock.advance(1000)  # a slow reset must not show in the arm's time

    result = interleave(arms, repeats=2, warmup=1, before_each=reset, clock=clock, cpu_clock=cpu)
    assert seen == ["a"] * 3
    assert result["a"].wall == [2, 3]


def test_sync_brackets_every_call():
    events = []
    clock = FakeClock()

    def arm():
        events.append("run")
        clock.advance(1)

    interleave({"a": arm}, repeats=2, warmup=0, sync=lambda: events.append("sync"), clock=clock, cpu_clock=clock)
    assert events == ["sync", "run", "sync"] * 2


def test_keep_values_false_holds_no_output():
    result, _, _ = run_fake({"a": [1, 2]}, repeats=1, warmup=1, keep_values=False)
    assert result["a"].values == [] and result.last == {}
    assert result["a"].wall == [2]


def test_a_failing_peer_is_reported_and_left_out_of_later_rounds():
    clock, cpu, log = FakeClock(), FakeClock(), []
    arms = fake_arms(clock, {"a": [1, 1, 1], "b": [1, 1, 1]}, log)
    calls = {"n": 0}

    def broken():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("peer bug")
        clock.advance(1)

    arms["broken"] = broken
    result = interleave(arms, repeats=2, warmup=1, record_failures=True, clock=clock, cpu_clock=cpu)
    assert result.failed == {"broken": "RuntimeError: peer bug"}
    assert calls["n"] == 2  # not called again after it failed
    assert result["a"].wall == [1, 1] and result["b"].wall == [1, 1]
    with pytest.raises(RuntimeError, match="peer bug"):
        calls["n"] = 1
        interleave({"broken": broken}, repeats=1, warmup=0, clock=clock, cpu_clock=cpu)


def test_bad_sizes_are_refused():
    with pytest.raises(ValueError):
        interleave({"a": lambda: None}, repeats=0)
    with pytest.raises(ValueError):
        interleave({"a": lambda: None}, repeats=1, warmup=-1)


def test_timed_call_returns_value_wall_and_cpu():
    clock, cpu = FakeClock(), FakeClock()

    def work():
        clock.advance(2.5)
        cpu.advance(0.5)
        return 42

    call = timed_call(work, clock=clock, cpu_clock=cpu)
    assert (call.value, call.wall, call.cpu) == (42, 2.5, 0.5)


def test_spread_helpers():
    s = Spread.of([2.0, 4.0, 8.0])
    assert s.format(".1f") == "4.0 (2.0-8.0)"
    assert s.scaled(1e3) == Spread(4000.0, 2000.0, 8000.0, 3)
    assert s.rate(8) == Spread(2.0, 1.0, 4.0, 3)  # tokens/s: the slowest round gives the lowest rate
    with pytest.raises(ValueError):
        Spread.of([])
    assert quartiles([5.0]) == (5.0, 5.0, 5.0)
    assert quartiles([1.0, 2.0, 3.0, 4.0, 5.0]) == (1.5, 3.0, 4.5)
    with pytest.raises(ValueError):
        paired_ratios([1.0], [1.0, 2.0])


def test_paired_ratio_table():
    wall = {"plain": [10.0, 20.0, 30.0], "das": [5.0, 30.0, 15.0]}
    cpu = {"plain": [1.0, 1.0, 1.0], "das": [2.0, 2.0, 4.0]}
    lines = paired_ratio_table(wall, cpu, peer="plain")
    assert lines[0].startswith("| arm | median wall s | min-max wall s | wall / plain")
    assert lines[2] == "| plain | 20.0 | 10.0-30.0 | 1.000 (1.000-1.000) | 1.0 | 1.000 (1.000-1.000) |"
    assert lines[3] == "| das | 15.0 | 5.0-30.0 | 0.500 (0.500-1.500) | 2.0 | 2.000 (2.000-4.000) |"


def test_machine_state_records_threads_and_load():
    state = machine_state()
    assert state["torch_threads"] == torch.get_num_threads()
    assert len(state["load_average"].split("/")) == 3 and len(load_average().split("/")) == 3
    result, _, _ = run_fake({"a": [1, 1]}, repeats=1)
    assert f"torch threads {torch.get_num_threads()}" in result.describe_machine()
