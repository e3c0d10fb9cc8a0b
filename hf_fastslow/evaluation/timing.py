"""Wall-clock timing of benchmark arms, the way the guide asks for speed: the arms run in one process, interleaved
round by round (one run of each arm per round), so that a change of load on a shared box hits every arm alike; per
arm the median and the spread (min-max) of the rounds, paired ratios to a peer (arm / peer within the same round),
and the machine state that explains the figures (torch threads, CPUs, load average before and after).

`interleave` covers the common case (a few zero-argument arms, warm-up rounds, repeats). Benchmarks whose unit of
interleaving is finer than a round (per prompt, per batch) build on the same pieces: `timed_call`, `rotated`,
`Spread`, `paired_ratios`, `load_average`.
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

__all__ = [
    "ArmTimes",
    "InterleavedRun",
    "Spread",
    "TimedCall",
    "interleave",
    "load_average",
    "machine_state",
    "paired_ratio_table",
    "paired_ratios",
    "quartiles",
    "rotated",
    "timed_call",
]

Clock = Callable[[], float]


@dataclass(frozen=True)
class TimedCall:
    """What one call returned, its wall-clock seconds and this process's CPU seconds."""

    value: Any
    wall: float
    cpu: float


def timed_call(fn: Callable[[], Any], sync: Callable[[], None] | None = None, clock: Clock = time.perf_counter,
               cpu_clock: Clock = time.process_time) -> TimedCall:
    """Run `fn()` once and time it. `sync` (e.g. `torch.cuda.synchronize`) runs before the clock starts and before it
    stops, so the interval holds exactly the work `fn` queued."""
    if sync is not None:
        sync()
    wall, cpu = clock(), cpu_clock()
    value = fn()
    if sync is not None:
        sync()
    return TimedCall(value, clock() - wall, cpu_clock() - cpu)


@dataclass(frozen=True)
class Spread:
    """Median and range of repeated measurements."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if not values:
            raise ValueError("no measurements")
        return cls(statistics.median(values), min(values), max(values), len(values))

    def scaled(self, factor: float) -> Spread:
        """The same figures times `factor` (e.g. 1e3 for ms)."""
        return Spread(self.median * factor, self.low * factor, self.high * factor, self.n)

    def rate(self, amount: float) -> Spread:
        """`amount / seconds` for each figure (e.g. tokens/s): the median rate of the median time, its range flipped."""
        return Spread(amount / self.median, amount / self.high, amount / self.low, self.n)

    def format(self, spec: str = ".2f") -> str:
        return f"{self.median:{spec}} ({self.low:{spec}}-{self.high:{spec}})"


def quartiles(values: Sequence[float]) -> tuple[float, float, float]:
    """(first quartile, median, third quartile); one value is all three."""
    if len(values) == 1:
        return (values[0],) * 3
    q = statistics.quantiles(values, n=4)
    return q[0], q[1], q[2]


def paired_ratios(times: Sequence[float], peer_times: Sequence[float]) -> list[float]:
    """Per-round ratios arm / peer: each compares two runs made under the same load."""
    if len(times) != len(peer_times):
        raise ValueError(f"paired ratios need as many rounds on both sides ({len(times)} vs {len(peer_times)})")
    return [t / p for t, p in zip(times, peer_times)]


def rotated(names: Sequence[str], shift: int) -> list[str]:
    """`names` starting at position `shift` (mod len): the run order of round `shift`, so that no arm always goes
    first (after a pause) or last (after the others warmed the caches)."""
    k = shift % len(names)
    return list(names[k:]) + list(names[:k])


def load_average() -> str:
    """The 1/5/15-minute load averages as "a/b/c" ("n/a" where the OS has none)."""
    try:
        return "/".join(f"{x:.1f}" for x in os.getloadavg())
    except (AttributeError, OSError):
        return "n/a"


def machine_state() -> dict:
    """What the timings depend on beyond the code: torch threads, CPUs, load average."""
    return {"torch_threads": torch.get_num_threads(), "cpus": os.cpu_count(), "load_average": load_average()}


@dataclass
class ArmTimes:
    """One arm's timed rounds (warm-up rounds excluded), in round order."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)
    values: list[Any] = field(default_factory=list)

    @property
    def spread(self) -> Spread:
        return Spread.of(self.wall)

    @property
    def cpu_spread(self) -> Spread:
        return Spread.of(self.cpu)


@dataclass
class InterleavedRun:
    """The result of `interleave`: per-arm times, failures, the order the runs were made in, the machine state."""

    arms: dict[str, ArmTimes]
    failed: dict[str, str]
    order: list[tuple[int, str]]  # (round, arm) in run order; rounds < warmup are the warm-up
    last: dict[str, Any]  # the last value each arm returned (warm-up included)
    warmup: int
    before: dict
    after: dict

    def __getitem__(self, name: str) -> ArmTimes:
        return self.arms[name]

    def ratios(self, name: str, peer: str) -> list[float]:
        return paired_ratios(self.arms[name].wall, self.arms[peer].wall)

    def describe_machine(self) -> str:
        return (f"torch threads {self.before['torch_threads']}, {self.before['cpus']} CPUs, load average "
                f"{self.before['load_average']} before, {self.after['load_average']} after")


def interleave(arms: Mapping[str, Callable[[], Any]], repeats: int, warmup: int = 1, rotate: bool = False,
               record_failures: bool = False, before_each: Callable[[str], None] | None = None,
               sync: Callable[[], None] | None = None, keep_values: bool = True, clock: Clock = time.perf_counter,
               cpu_clock: Clock = time.process_time) -> InterleavedRun:
    """Run every arm once per round, `warmup` untimed rounds then `repeats` timed ones, in one process.

    Within a round the arms run in the mapping's order, or rotated by the round index when `rotate`. `before_each(name)`
    runs before each call, outside the timed interval (reset a counter). With `record_failures` an arm that raises is
    reported in `failed` ("Type: message") and left out of later rounds, as a result rather than a crash: a peer failing
    is something a benchmark reports. `keep_values=False` drops what the arms return (`values` and `last` stay empty),
    so that no output outlives its call (kernel timings, where held outputs would change what the allocator reuses).
    """
    if repeats < 1 or warmup < 0:
        raise ValueError(f"need repeats >= 1 and warmup >= 0 (got {repeats}, {warmup})")
    names = list(arms)
    result = InterleavedRun(arms={n: ArmTimes() for n in names}, failed={}, order=[], last={}, warmup=warmup,
                            before=machine_state(), after={})
    for rnd in range(warmup + repeats):
        for name in rotated(names, rnd) if rotate else names:
            if name in result.failed:
                continue
            if before_each is not None:
                before_each(name)
            result.order.append((rnd, name))
            try:
                call = timed_call(arms[name], sync=sync, clock=clock, cpu_clock=cpu_clock)
            except Exception as err:
                if not record_failures:
                    raise
                result.failed[name] = f"{type(err).__name__}: {str(err)[:80]}"
                continue
            if keep_values:
                result.last[name] = call.value
            if rnd >= warmup:
                times = result.arms[name]
                times.wall.append(call.wall)
                times.cpu.append(call.cpu)
                if keep_values:
                    times.values.append(call.value)
            del call  # with keep_values=False the output dies here, before the next call
    result.after = machine_state()
    return result


def paired_ratio_table(wall: Mapping[str, Sequence[float]], cpu: Mapping[str, Sequence[float]],
                       peer: str) -> list[str]:
    """Markdown rows, one per arm: median wall seconds, their range, the median (range) of the per-repeat ratio to
    `peer`, and the same for CPU seconds (less sensitive to load than wall time)."""
    lines = [f"| arm | median wall s | min-max wall s | wall / {peer}, median (min-max) of repeats | "
             f"median CPU s | CPU / {peer}, median (min-max) |", "|---|---|---|---|---|---|"]
    for arm, ts in wall.items():
        ratios = Spread.of(paired_ratios(ts, wall[peer]))
        cpu_ratios = Spread.of(paired_ratios(cpu[arm], cpu[peer]))
        lines.append(f"| {arm} | {statistics.median(ts):.1f} | {min(ts):.1f}-{max(ts):.1f} | {ratios.format('.3f')} | "
                     f"{statistics.median(cpu[arm]):.1f} | {cpu_ratios.format('.3f')} |")
    return lines
