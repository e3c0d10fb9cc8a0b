"""Self-labelling energy meters for IPW profiling: hardware counters where the machine has them, a labelled estimate
where it does not.

Every meter reads a cumulative energy (joules since the meter's baseline) as an `EnergyReading` that says whether it
was `measured` by a hardware counter or `estimated`, and from which `source`. A window's energy is the difference of
two readings (`energy_between`); it is None, never 0, when the counter was reset in between or the window is empty.

- `NVMLMeter`: NVIDIA GPUs through `nvidia-ml-py` (`nvmlDeviceGetTotalEnergyConsumption`, mJ since the driver
  loaded, Volta+; summed over the chosen devices). The counter updates every ~20-100 ms, so windows shorter than that
  read 0: meter such work in batches of queries. A counter that goes backwards (driver reload) starts a new epoch.
  Devices without the counter fall back to integrating `nvmlDeviceGetPowerUsage` (still a hardware reading).
- `RAPLMeter`: CPU package / DRAM energy from the Linux powercap files (`energy_uj`, wrapping at
  `max_energy_range_uj`; root-only on most kernels since the 2020 RAPL side-channel fix). A wrap is undone when the
  counter is read at least once per wrap period (a `PowerSampler` reading every 50 ms guarantees it).
- `CPUTimeEstimateMeter`: NOT a measurement: CPU-seconds (of this process, of given pids and their children, or of
  the whole machine) times an assumed power per busy core. Energy is then proportional to CPU time, so efficiency
  figures derived from it rank arms exactly as accuracy per CPU-second does.
- `CompositeMeter`: the sum of several meters, measured only if all of them are.
- `auto_meter()`: the measured counters the machine has, else the estimate, with `.fallback_reason` saying why.
- `PowerSampler`: a background thread reading a meter every `interval_s` for power statistics over a window.
"""

from __future__ import annotations

import bisect
import os
import re
import statistics
import threading
import time
import warnings
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "DEFAULT_WATTS_PER_CORE",
    "CPUTimeEstimateMeter",
    "CompositeMeter",
    "EnergyMeter",
    "EnergyMeterError",
    "EnergyReading",
    "NVMLMeter",
    "PowerSample",
    "PowerSampler",
    "RAPLMeter",
    "WindowPower",
    "auto_meter",
    "cpu_seconds",
    "energy_between",
    "integrate_power",
]

Clock = Callable[[], float]

# An assumption, not a measurement: about a server CPU's TDP over its cores (e.g. 205 W / 20 cores). Pass your CPU's
# figure (`tdp_watts=`, `cores=`) for a better estimate; the ranking of arms does not depend on it.
DEFAULT_WATTS_PER_CORE = 10.0


class EnergyMeterError(RuntimeError):
    """A meter that cannot be read; the message carries the reason (missing counter, permissions, dead process)."""


@dataclass(frozen=True)
class EnergyReading:
    """Cumulative energy since the meter's baseline at time `t` (the meter's clock, `time.perf_counter` by default).

    `epoch` changes when a counter was reset (e.g. an NVIDIA driver reload): readings of different epochs cannot be
    subtracted."""

    joules: float
    measured: bool
    source: str
    t: float
    epoch: int = 0

    @property
    def kind(self) -> str:
        return "measured" if self.measured else "estimated"


def energy_between(start: EnergyReading, end: EnergyReading) -> float | None:
    """Joules between two readings of one meter; None when a counter reset lies between them or the window is empty
    (t1 <= t0): an unknown energy, not zero."""
    if start.epoch != end.epoch or end.t <= start.t:
        return None
    return end.joules - start.joules


class EnergyMeter(ABC):
    """A cumulative energy counter. `available()` probes once and sets `reason` when it cannot be read; `read()`
    raises `EnergyMeterError(reason)` then. `measured` says whether readings come from hardware; `scope` what they
    cover ("gpu", "cpu-package", "process", "pids", "machine")."""

    measured: bool = False
    scope: str = "unknown"

    def __init__(self, clock: Clock | None = None):
        self.clock = clock or time.perf_counter
        self.reason: str | None = None
        self._probed: bool | None = None
        self._lock = threading.Lock()

    @property
    @abstractmethod
    def source(self) -> str:
        """What the readings come from, in words (e.g. "RAPL package-0 (powercap)")."""

    @abstractmethod
    def _probe(self) -> str | None:
        """None when the meter can be read, else the reason it cannot. Sets the baseline."""

    @abstractmethod
    def _joules(self) -> tuple[float, int]:
        """(cumulative joules since the baseline, epoch)."""

    def available(self) -> bool:
        if self._probed is None:
            self.reason = self._probe()
            self._probed = self.reason is None
        return self._probed

    def read(self) -> EnergyReading:
        if not self.available():
            raise EnergyMeterError(f"{self.source}: {self.reason}")
        with self._lock:
            joules, epoch = self._joules()
            t = self.clock()
        return EnergyReading(joules, self.measured, self.source, t, epoch)

    def power(self) -> float | None:
        """Instantaneous watts where the hardware reports it (NVML); None otherwise (the sampler then differentiates
        consecutive readings)."""
        return None

    def __repr__(self) -> str:
        state = "available" if self._probed else f"unavailable: {self.reason}" if self._probed is False else "unprobed"
        return f"{type(self).__name__}({self.source}; {'measured' if self.measured else 'estimated'}; {state})"


# ----- NVIDIA GPUs -------------------------------------------------------------------------------------------------
class NVMLMeter(EnergyMeter):
    """`NVMLMeter(device_indices=None)`: total energy of the chosen GPUs (all by default; pass the devices your
    process uses, as a concurrent job on another GPU is not yours). `nvml=` injects the module (tests)."""

    measured = True
    scope = "gpu"

    def __init__(self, device_indices: Sequence[int] | None = None, *, nvml: Any = None, clock: Clock | None = None):
        super().__init__(clock)
        self.device_indices = None if device_indices is None else list(device_indices)
        self._nvml = nvml
        self._handles: list[Any] = []
        self._last_mj: list[float] = []
        self._total_j = 0.0
        self._epoch = 0
        self._use_power: list[bool] = []
        self._last_t = 0.0
        self._last_w: list[float] = []

    @property
    def source(self) -> str:
        which = "all GPUs" if self.device_indices is None else f"GPUs {self.device_indices}"
        return f"NVML total energy ({which})"

    def _probe(self) -> str | None:
        nvml = self._nvml
        if nvml is None:
            try:
                import pynvml as nvml
            except ImportError:
                return "nvidia-ml-py is not installed (pip install 'hf_fastslow[eval]')"
            self._nvml = nvml
        try:
            nvml.nvmlInit()
            count = nvml.nvmlDeviceGetCount()
        except Exception as err:  # NVMLError_* (no driver, no device): the reason is the answer
            return f"NVML cannot start ({type(err).__name__}: {err}); no NVIDIA driver or GPU on this machine"
        indices = list(range(count)) if self.device_indices is None else self.device_indices
        if not indices:
            return "NVML sees no GPU"
        bad = [i for i in indices if not 0 <= i < count]
        if bad:
            return f"GPU indices {bad} out of range (NVML sees {count})"
        self._handles = [nvml.nvmlDeviceGetHandleByIndex(i) for i in indices]
        self._use_power = []
        for h in self._handles:
            try:
                nvml.nvmlDeviceGetTotalEnergyConsumption(h)
                self._use_power.append(False)
            except nvml.NVMLError_NotSupported:  # pre-Volta: integrate the power reading instead
                self._use_power.append(True)
            except Exception as err:
                return f"NVML energy counter unreadable ({type(err).__name__}: {err})"
        self._last_mj = [self._counter_mj(i) for i in range(len(self._handles))]
        self._last_w = [self._power_w(i) for i in range(len(self._handles))]
        self._last_t = self.clock()
        return None

    def _counter_mj(self, i: int) -> float:
        if self._use_power[i]:
            return 0.0
        return float(self._nvml.nvmlDeviceGetTotalEnergyConsumption(self._handles[i]))

    def _power_w(self, i: int) -> float:
        return self._nvml.nvmlDeviceGetPowerUsage(self._handles[i]) / 1000.0

    def _joules(self) -> tuple[float, int]:
        now = self.clock()
        for i in range(len(self._handles)):
            if self._use_power[i]:
                watts = self._power_w(i)
                self._total_j += 0.5 * (watts + self._last_w[i]) * (now - self._last_t)  # trapezoid
                self._last_w[i] = watts
                continue
            mj = self._counter_mj(i)
            if mj < self._last_mj[i]:  # driver reload reset the counter: what happened in between is unknown
                self._epoch += 1
            else:
                self._total_j += (mj - self._last_mj[i]) / 1000.0
            self._last_mj[i] = mj
        self._last_t = now
        return self._total_j, self._epoch

    def power(self) -> float | None:
        if not self.available():
            return None
        return sum(self._power_w(i) for i in range(len(self._handles)))


# ----- CPU RAPL through powercap -----------------------------------------------------------------------------------
_ZONE_RE = re.compile(r"^intel-rapl:\d+(:\d+)?$")
_INSIDE_PACKAGE = ("core", "uncore")


class RAPLMeter(EnergyMeter):
    """`RAPLMeter(domains=("package",), root="/sys/class/powercap")`: summed `energy_uj` of the powercap zones
    whose name is a domain ("package" matches package-0, package-1, ...; also "dram", "core", "uncore", "psys").
    AMD Zen exposes the same `intel-rapl:*` tree on recent kernels."""

    measured = True
    scope = "cpu-package"

    def __init__(self, domains: Sequence[str] = ("package",), *, root: str | os.PathLike = "/sys/class/powercap",
                 clock: Clock | None = None):
        super().__init__(clock)
        self.domains = tuple(domains)
        if "package" in self.domains and any(d in self.domains for d in _INSIDE_PACKAGE):
            raise ValueError(f"domains {self.domains}: core/uncore energy is part of the package's; counting both "
                             "would count it twice")
        self.root = Path(root)
        self.zones: list[tuple[str, Path, int | None]] = []  # (name, energy_uj path, max_energy_range_uj)
        self._last_uj: list[int] = []
        self._total_uj = 0
        self._epoch = 0

    @property
    def source(self) -> str:
        names = ", ".join(z[0] for z in self.zones) or "/".join(self.domains)
        return f"RAPL {names} (powercap)"

    def _read_uj(self, path: Path) -> int:
        return int(path.read_text().strip())

    def _probe(self) -> str | None:
        if not self.root.is_dir():
            return (f"no powercap: {self.root} does not exist (no RAPL driver; typical inside a VM such as "
                    "KVM/Firecracker guests)")
        zones = []
        for zone in sorted(self.root.iterdir()):
            if not _ZONE_RE.match(zone.name) or not (zone / "name").is_file():
                continue
            try:
                name = (zone / "name").read_text().strip()
            except OSError:
                continue
            if any(name == d or name.startswith(d + "-") for d in self.domains):
                zones.append((name, zone))
        if not zones:
            return f"no powercap zone named {'/'.join(self.domains)} under {self.root}"
        self.zones = []
        for name, zone in zones:
            energy = zone / "energy_uj"
            try:
                self._read_uj(energy)
            except PermissionError:
                return (f"{energy} is not readable (PermissionError): root-only on most kernels since the 2020 RAPL "
                        "side-channel fix; run as root or grant read access (e.g. chmod o+r on the energy_uj files)")
            except (OSError, ValueError) as err:
                return f"{energy} is unreadable ({type(err).__name__}: {err})"
            try:
                max_range = self._read_uj(zone / "max_energy_range_uj")
            except (OSError, ValueError):
                max_range = None  # then a backwards step cannot be told from a reset: a new epoch
            self.zones.append((name, energy, max_range))
        self._last_uj = [self._read_uj(path) for _, path, _ in self.zones]
        return None

    def _joules(self) -> tuple[float, int]:
        for i, (_, path, max_range) in enumerate(self.zones):
            try:
                uj = self._read_uj(path)
            except OSError as err:
                raise EnergyMeterError(f"{path}: {type(err).__name__}: {err}") from err
            delta = uj - self._last_uj[i]
            if delta < 0:
                if max_range:
                    delta += max_range  # one wrap: the counter restarts from 0 after max_energy_range_uj
                else:
                    self._epoch, delta = self._epoch + 1, 0
            self._total_uj += delta
            self._last_uj[i] = uj
        return self._total_uj / 1e6, self._epoch


# ----- CPU-time estimate -------------------------------------------------------------------------------------------
def cpu_seconds(pids: Sequence[int] | None = None, *, machine: bool = False, include_children: bool = True) -> float:
    """CPU seconds (user + system) used so far: of this process (all threads) by default, of `pids` (each with its
    live children when `include_children`), or of the whole machine (busy time over all CPUs)."""
    if machine:
        import psutil

        t = psutil.cpu_times()
        idle = getattr(t, "idle", 0.0) + getattr(t, "iowait", 0.0)
        guest = getattr(t, "guest", 0.0) + getattr(t, "guest_nice", 0.0)  # already inside user time on Linux
        return sum(t) - idle - guest
    if pids is None:
        return time.process_time()
    import psutil

    total = 0.0
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            procs = [proc] + (proc.children(recursive=True) if include_children else [])
            for p in procs:
                try:
                    c = p.cpu_times()
                except psutil.NoSuchProcess:
                    continue  # a child that exited between listing and reading
                total += c.user + c.system + (c.children_user + c.children_system if include_children else 0.0)
        except psutil.NoSuchProcess as err:
            raise EnergyMeterError(f"process {pid} is gone: its CPU time can no longer be read") from err
    return total


class CPUTimeEstimateMeter(EnergyMeter):
    """`CPUTimeEstimateMeter(watts_per_core=None, *, tdp_watts=None, cores=None, pids=None, machine=False,
    idle_watts=0.0)`: ESTIMATED joules = CPU-seconds x watts per busy core (+ `idle_watts` x elapsed time).

    Watts per core: given, else `tdp_watts / cores` (cores default `os.cpu_count()`), else `DEFAULT_WATTS_PER_CORE`.
    Scope: this process (default), `pids` with their children (e.g. a `transformers serve` process and this client),
    or `machine=True` (every process on the box, including other users' work on a shared machine)."""

    measured = False

    def __init__(self, watts_per_core: float | None = None, *, tdp_watts: float | None = None,
                 cores: int | None = None, pids: Sequence[int] | None = None, machine: bool = False,
                 idle_watts: float = 0.0, include_children: bool = True, cpu_clock: Clock | None = None,
                 clock: Clock | None = None):
        super().__init__(clock)
        if watts_per_core is None:
            watts_per_core = tdp_watts / (cores or os.cpu_count() or 1) if tdp_watts else DEFAULT_WATTS_PER_CORE
        if watts_per_core <= 0 or idle_watts < 0:
            raise ValueError(f"need watts_per_core > 0 and idle_watts >= 0 (got {watts_per_core}, {idle_watts})")
        if machine and pids is not None:
            raise ValueError("pass pids= or machine=True, not both")
        self.watts_per_core = float(watts_per_core)
        self.idle_watts = float(idle_watts)
        self.pids = None if pids is None else list(pids)
        self.machine = machine
        self.scope = "machine" if machine else "pids" if pids is not None else "process"
        self._cpu_clock = cpu_clock or (lambda: cpu_seconds(self.pids, machine=machine,
                                                            include_children=include_children))
        self._cpu0 = 0.0
        self._t0 = 0.0

    @property
    def source(self) -> str:
        what = {"machine": "whole machine", "pids": f"pids {self.pids}", "process": "this process"}[self.scope]
        idle = f" + {self.idle_watts:g} W idle" if self.idle_watts else ""
        return f"CPU-time estimate ({what}, {self.watts_per_core:g} W per busy core{idle})"

    def _probe(self) -> str | None:
        try:
            self._cpu0 = self._cpu_clock()
        except EnergyMeterError as err:
            return str(err)
        except ImportError:
            return "psutil is needed to read other processes' or the machine's CPU time (pip install psutil)"
        self._t0 = self.clock()
        return None

    def cpu_seconds(self) -> float:
        """CPU seconds of the metered scope since the baseline."""
        self.available()
        return self._cpu_clock() - self._cpu0

    def _joules(self) -> tuple[float, int]:
        busy = self._cpu_clock() - self._cpu0
        return busy * self.watts_per_core + self.idle_watts * (self.clock() - self._t0), 0


# ----- composition and choice ----------------------------------------------------------------------------------------
class CompositeMeter(EnergyMeter):
    """The sum of `meters` (e.g. GPUs by NVML + CPU package by RAPL). Measured only if every part is; every part
    must be available (an unavailable part's reason is the composite's)."""

    def __init__(self, meters: Sequence[EnergyMeter], clock: Clock | None = None):
        if not meters:
            raise ValueError("CompositeMeter needs at least one meter")
        super().__init__(clock or meters[0].clock)
        self.meters = list(meters)
        self.measured = all(m.measured for m in self.meters)
        self.scope = "+".join(m.scope for m in self.meters)

    @property
    def source(self) -> str:
        return " + ".join(m.source for m in self.meters)

    def _probe(self) -> str | None:
        missing = [f"{m.source}: {m.reason}" for m in self.meters if not m.available()]
        return "; ".join(missing) or None

    def _joules(self) -> tuple[float, int]:
        readings = [m.read() for m in self.meters]
        # Epochs only ever grow, so their sum changes whenever any part resets.
        return sum(r.joules for r in readings), sum(r.epoch for r in readings)

    def power(self) -> float | None:
        parts = [m.power() for m in self.meters]
        return None if any(p is None for p in parts) else sum(parts)


def auto_meter(*, nvml: bool = True, rapl: bool = True, device_indices: Sequence[int] | None = None,
               rapl_root: str | os.PathLike = "/sys/class/powercap", estimate: dict | None = None,
               warn: bool = True) -> EnergyMeter:
    """The machine's measured counters (NVML GPUs, RAPL package), summed; else a `CPUTimeEstimateMeter(**estimate)`.

    The returned meter has `.fallback_reason`: None when measured counters are used, else why each one could not
    be (e.g. "NVML: ...no NVIDIA driver...; RAPL: no powercap ..."), and `.skipped`: {source: reason} of every
    counter that was tried and is unavailable (a GPU box without RAPL measures the GPUs and skips the CPU)."""
    tried: list[EnergyMeter] = []
    if nvml:
        tried.append(NVMLMeter(device_indices))
    if rapl:
        tried.append(RAPLMeter(root=rapl_root))
    usable = [m for m in tried if m.available()]
    skipped = {m.source: m.reason for m in tried if m not in usable}
    if usable:
        meter = usable[0] if len(usable) == 1 else CompositeMeter(usable)
        meter.fallback_reason = None
    else:
        meter = CPUTimeEstimateMeter(**(estimate or {}))
        meter.fallback_reason = ("no measured energy counter: " + "; ".join(f"{k}: {v}" for k, v in skipped.items())
                                 if skipped else "no counter was tried (nvml=False, rapl=False)")
        if warn:
            warnings.warn(f"auto_meter: energy is ESTIMATED from CPU time ({meter.fallback_reason})", stacklevel=2)
    meter.skipped = skipped
    return meter


# ----- background power sampling -----------------------------------------------------------------------------------
@dataclass(frozen=True)
class PowerSample:
    """One sampler tick: time, power (instantaneous, or the mean since the previous tick), cumulative joules."""

    t: float
    watts: float | None
    joules: float
    epoch: int


@dataclass(frozen=True)
class WindowPower:
    """Power statistics of the samples inside one window and their trapezoid energy over the window."""

    samples: int
    mean_w: float
    median_w: float
    min_w: float
    max_w: float
    energy_j: float


def integrate_power(times: Sequence[float], watts: Sequence[float], t0: float, t1: float) -> float | None:
    """Trapezoid integral of power over [t0, t1] from the samples inside it, held flat from the first sample back to
    t0 and from the last one on to t1. None for an empty window or one without a sample (its energy is unknown)."""
    if t1 <= t0:
        return None
    inside = [(t, w) for t, w in zip(times, watts) if t0 <= t <= t1 and w is not None]
    if not inside:
        return None
    points = [(t0, inside[0][1]), *inside, (t1, inside[-1][1])]
    return sum(0.5 * (wa + wb) * (tb - ta) for (ta, wa), (tb, wb) in zip(points, points[1:]))


class PowerSampler:
    """`PowerSampler(meter, interval_s=0.05)`: reads `meter` every `interval_s` in a daemon thread (start/stop, or
    a `with` block). The regular reads also let a wrapping counter (RAPL) be unwrapped over long windows.
    `window(t0, t1)` gives power statistics and the trapezoid energy of the samples inside [t0, t1]."""

    def __init__(self, meter: EnergyMeter, interval_s: float = 0.05):
        if interval_s <= 0:
            raise ValueError(f"interval_s must be > 0, got {interval_s}")
        self.meter = meter
        self.interval_s = interval_s
        self.samples: list[PowerSample] = []
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def sample(self) -> PowerSample:
        """Take one sample now (the thread calls this; tests may too)."""
        watts = self.meter.power()
        reading = self.meter.read()
        with self._lock:
            prev = self.samples[-1] if self.samples else None
            if watts is None and prev is not None and prev.epoch == reading.epoch and reading.t > prev.t:
                watts = (reading.joules - prev.joules) / (reading.t - prev.t)
            s = PowerSample(reading.t, watts, reading.joules, reading.epoch)
            self.samples.append(s)
        return s

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.sample()
            except Exception as err:  # noqa: BLE001 - kept and reported; a dead sampler must not kill the run
                self.errors.append(f"{type(err).__name__}: {err}")
                return
            self._stop.wait(self.interval_s)

    def start(self) -> PowerSampler:
        if self._thread is None:
            if not self.meter.available():
                raise EnergyMeterError(f"{self.meter.source}: {self.meter.reason}")
            self._stop.clear()
            self._thread = threading.Thread(target=self._loop, name="PowerSampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join()
            self._thread = None

    def __enter__(self) -> PowerSampler:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def window(self, t0: float, t1: float) -> WindowPower | None:
        """Statistics of the samples with t0 <= t <= t1 (None for an empty window or one without a power sample)."""
        with self._lock:
            times = [s.t for s in self.samples]
            lo, hi = bisect.bisect_left(times, t0), bisect.bisect_right(times, t1)
            inside = [s for s in self.samples[lo:hi] if s.watts is not None]
        energy = integrate_power([s.t for s in inside], [s.watts for s in inside], t0, t1)
        if energy is None:
            return None
        watts = [s.watts for s in inside]
        return WindowPower(len(watts), statistics.fmean(watts), statistics.median(watts), min(watts), max(watts),
                           energy)
