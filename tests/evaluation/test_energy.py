"""Energy meters: RAPL over a fake powercap tree (deltas, wraparound, permissions), NVML over a patched module
(baseline, reset, multi-device, power fallback), the CPU-time estimate, composition, auto_meter on this machine,
window attribution and the background sampler."""

import os
import sys
import time
from pathlib import Path

import pytest

from hf_fastslow.evaluation.energy import (
    CompositeMeter,
    CPUTimeEstimateMeter,
    EnergyMeterError,
    EnergyReading,
    NVMLMeter,
    PowerSampler,
    RAPLMeter,
    auto_meter,
    cpu_seconds,
    energy_between,
    integrate_power,
)


class FakeClock:
    def __init__(self, t=0.0):
        self.t = t

    def __call__(self):
        return self.t


def powercap_tree(root: Path, zones: dict) -> Path:
    """zones: {"intel-rapl:0": ("package-0", energy_uj, max_range or None), ...}"""
    for zone, (name, energy, max_range) in zones.items():
        d = root / zone
        d.mkdir(parents=True)
        (d / "name").write_text(name + "\n")
        (d / "energy_uj").write_text(f"{energy}\n")
        if max_range is not None:
            (d / "max_energy_range_uj").write_text(f"{max_range}\n")
    return root


def set_uj(root: Path, zone: str, value: int) -> None:
    (root / zone / "energy_uj").write_text(f"{value}\n")


# ----- RAPL ------------------------------------------------------------------------------------------------------
def test_rapl_sums_packages_and_dram_not_core(tmp_path):
    root = powercap_tree(tmp_path, {
        "intel-rapl:0": ("package-0", 1_000_000, 2**32), "intel-rapl:1": ("package-1", 5_000_000, 2**32),
        "intel-rapl:0:0": ("core", 0, 2**32), "intel-rapl:0:1": ("dram", 100, 2**32),
        "intel-rapl:0:2": ("uncore", 0, 2**32),
        "intel-rapl-mmio:0": ("package-0", 0, 2**32),  # the MMIO twin of package-0: not counted twice
    })
    clock = FakeClock()
    meter = RAPLMeter(root=root, clock=clock)
    assert meter.available(), meter.reason
    assert [z[0] for z in meter.zones] == ["package-0", "package-1"]
    r0 = meter.read()
    set_uj(root, "intel-rapl:0", 3_500_000)
    set_uj(root, "intel-rapl:1", 6_000_000)
    set_uj(root, "intel-rapl:0:0", 9_000_000)  # core is inside package: never added
    clock.t = 1.0
    r1 = meter.read()
    assert energy_between(r0, r1) == pytest.approx(3.5)
    assert r1.measured and r1.kind == "measured" and "package-0" in r1.source

    both = RAPLMeter(("package", "dram"), root=root, clock=clock)
    assert both.available() and sorted(z[0] for z in both.zones) == ["dram", "package-0", "package-1"]
    core = RAPLMeter(("core",), root=root, clock=clock)
    assert core.available() and [z[0] for z in core.zones] == ["core"]  # a domain is a name, not a substring
    with pytest.raises(ValueError, match="twice"):
        RAPLMeter(("package", "core"), root=root)


def test_rapl_undoes_wraparound_at_max_energy_range(tmp_path):
    max_range = 10_000_000
    root = powercap_tree(tmp_path, {"intel-rapl:0": ("package-0", 9_000_000, max_range)})
    clock = FakeClock()
    meter = RAPLMeter(root=root, clock=clock)
    r0 = meter.read()
    set_uj(root, "intel-rapl:0", 500_000)  # 1.0 J to the top, wrapped, 0.5 J more
    clock.t = 1.0
    r1 = meter.read()
    assert energy_between(r0, r1) == pytest.approx(1.5)
    assert r1.epoch == r0.epoch
    set_uj(root, "intel-rapl:0", 2_500_000)
    clock.t = 2.0
    assert energy_between(r1, meter.read()) == pytest.approx(2.0)


def test_rapl_backwards_without_max_range_is_a_reset_not_energy(tmp_path):
    root = powercap_tree(tmp_path, {"intel-rapl:0": ("package-0", 9_000_000, None)})
    clock = FakeClock()
    meter = RAPLMeter(root=root, clock=clock)
    r0 = meter.read()
    set_uj(root, "intel-rapl:0", 100)
    clock.t = 1.0
    r1 = meter.read()
    assert r1.epoch != r0.epoch and energy_between(r0, r1) is None


def test_rapl_permission_error_is_reported_with_reason(tmp_path, monkeypatch):
    root = powercap_tree(tmp_path, {"intel-rapl:0": ("package-0", 1, 2**32)})
    original = RAPLMeter._read_uj

    def denied(self, path):
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return original(self, path)

    monkeypatch.setattr(RAPLMeter, "_read_uj", denied)
    meter = RAPLMeter(root=root)
    assert meter.available() is False
    assert "PermissionError" in meter.reason and "root" in meter.reason
    with pytest.raises(EnergyMeterError, match="PermissionError"):
        meter.read()


def test_rapl_missing_tree_and_missing_domain(tmp_path):
    meter = RAPLMeter(root=tmp_path / "absent")
    assert not meter.available() and "no powercap" in meter.reason
    root = powercap_tree(tmp_path / "pc", {"intel-rapl:0": ("package-0", 1, 2**32)})
    meter = RAPLMeter(("dram",), root=root)
    assert not meter.available() and "dram" in meter.reason


@pytest.mark.skipif(not sys.platform.startswith("linux") or os.path.exists("/sys/class/powercap"),
                    reason="asserts the real environment of a machine without powercap")
def test_rapl_on_this_machine_says_no_powercap():
    meter = RAPLMeter()
    assert meter.available() is False and "no powercap" in meter.reason


# ----- NVML ------------------------------------------------------------------------------------------------------
class FakeNVML:
    """The subset of pynvml the meter uses; energy in mJ and power in mW per device, set by the test."""

    class NVMLError(Exception):
        pass

    class NVMLError_NotSupported(NVMLError):
        pass

    def __init__(self, energy_mj, power_mw=None, unsupported=()):
        self.energy_mj = list(energy_mj)
        self.power_mw = list(power_mw or [0] * len(energy_mj))
        self.unsupported = set(unsupported)
        self.inits = 0

    def nvmlInit(self):
        self.inits += 1

    def nvmlDeviceGetCount(self):
        return len(self.energy_mj)

    def nvmlDeviceGetHandleByIndex(self, i):
        return i

    def nvmlDeviceGetTotalEnergyConsumption(self, h):
        if h in self.unsupported:
            raise self.NVMLError_NotSupported("Not Supported")
        return self.energy_mj[h]

    def nvmlDeviceGetPowerUsage(self, h):
        return self.power_mw[h]


def test_nvml_baseline_multi_device_sum_and_reset():
    nvml = FakeNVML([50_000, 7_000])
    clock = FakeClock()
    meter = NVMLMeter(nvml=nvml, clock=clock)
    assert meter.available(), meter.reason
    r0 = meter.read()
    assert r0.joules == 0.0  # energy since the baseline, not since the driver loaded
    nvml.energy_mj = [51_500, 9_000]
    clock.t = 1.0
    r1 = meter.read()
    assert energy_between(r0, r1) == pytest.approx(3.5) and r1.measured
    nvml.energy_mj = [10, 9_500]  # device 0's driver reloaded: its counter restarted
    clock.t = 2.0
    r2 = meter.read()
    assert energy_between(r1, r2) is None
    nvml.energy_mj = [1_010, 10_500]
    clock.t = 3.0
    assert energy_between(r2, meter.read()) == pytest.approx(2.0)  # new epoch, new baseline

    only_one = NVMLMeter([1], nvml=nvml, clock=clock)
    s0 = only_one.read()
    nvml.energy_mj = [99_999, 11_500]
    clock.t = 4.0
    assert energy_between(s0, only_one.read()) == pytest.approx(1.0)
    assert not NVMLMeter([5], nvml=nvml).available()


def test_nvml_power_fallback_integrates_and_reports_power():
    nvml = FakeNVML([0], power_mw=[100_000], unsupported={0})
    clock = FakeClock()
    meter = NVMLMeter(nvml=nvml, clock=clock)
    r0 = meter.read()
    clock.t = 2.0
    nvml.power_mw = [300_000]
    r1 = meter.read()
    assert energy_between(r0, r1) == pytest.approx(0.5 * (100 + 300) * 2.0)
    assert meter.power() == pytest.approx(300.0)


def test_nvml_unavailable_reasons():
    class Broken(FakeNVML):
        def nvmlInit(self):
            raise self.NVMLError("NVML Shared Library Not Found")

    meter = NVMLMeter(nvml=Broken([0]))
    assert not meter.available() and "Shared Library Not Found" in meter.reason
    with pytest.raises(EnergyMeterError, match="Not Found"):
        meter.read()
    assert not NVMLMeter(nvml=FakeNVML([])).available()


# ----- estimate, composite, auto --------------------------------------------------------------------------------
def test_cpu_estimate_is_labelled_and_scales_cpu_time():
    cpu, clock = FakeClock(100.0), FakeClock(0.0)
    meter = CPUTimeEstimateMeter(tdp_watts=80.0, cores=8, idle_watts=2.0, cpu_clock=cpu, clock=clock)
    r0 = meter.read()
    cpu.t, clock.t = 103.0, 5.0
    r1 = meter.read()
    assert energy_between(r0, r1) == pytest.approx(3.0 * 10.0 + 2.0 * 5.0)
    assert not r1.measured and r1.kind == "estimated" and "estimate" in r1.source
    assert meter.cpu_seconds() == pytest.approx(3.0)
    with pytest.raises(ValueError):
        CPUTimeEstimateMeter(0.0)


def test_cpu_seconds_of_this_process_and_of_pids():
    mine = cpu_seconds()
    by_pid = cpu_seconds([os.getpid()])
    t0 = time.process_time()
    while time.process_time() - t0 < 0.05:
        pass
    assert cpu_seconds() - mine >= 0.05
    assert cpu_seconds([os.getpid()]) - by_pid >= 0.04  # psutil's clock ticks are coarser
    assert cpu_seconds(machine=True) > 0
    dead = CPUTimeEstimateMeter(pids=[2**22 + 12345])
    assert not dead.available() and "gone" in dead.reason


def test_composite_mixing_measured_and_estimated_is_estimated(tmp_path):
    root = powercap_tree(tmp_path, {"intel-rapl:0": ("package-0", 0, 2**32)})
    clock, cpu = FakeClock(), FakeClock()
    rapl = RAPLMeter(root=root, clock=clock)
    est = CPUTimeEstimateMeter(5.0, cpu_clock=cpu, clock=clock)
    both = CompositeMeter([rapl, est])
    r0 = both.read()
    set_uj(root, "intel-rapl:0", 2_000_000)
    cpu.t, clock.t = 1.0, 1.0
    r1 = both.read()
    assert energy_between(r0, r1) == pytest.approx(2.0 + 5.0)
    assert not r1.measured and "RAPL" in r1.source and "estimate" in r1.source
    assert CompositeMeter([RAPLMeter(root=root)]).measured
    broken = CompositeMeter([rapl, RAPLMeter(root=tmp_path / "nope")])
    assert not broken.available() and "no powercap" in broken.reason


def test_auto_meter_falls_back_with_reasons_and_prefers_counters(tmp_path, monkeypatch):
    import hf_fastslow.evaluation.energy as energy

    class NoDriver(FakeNVML):
        def nvmlInit(self):
            raise self.NVMLError("NVML Shared Library Not Found")

    # hermetic on GPU machines too: NVML answers as on a machine without an NVIDIA driver
    monkeypatch.setattr(energy, "NVMLMeter", lambda indices=None: NVMLMeter(indices, nvml=NoDriver([])))
    with pytest.warns(UserWarning, match="ESTIMATED"):
        meter = auto_meter(rapl_root=tmp_path / "absent")
    assert isinstance(meter, CPUTimeEstimateMeter) and not meter.measured
    assert "NVML" in meter.fallback_reason and "no powercap" in meter.fallback_reason

    root = powercap_tree(tmp_path / "pc", {"intel-rapl:0": ("package-0", 0, 2**32)})
    measured = auto_meter(rapl_root=root)
    assert isinstance(measured, RAPLMeter) and measured.fallback_reason is None
    assert any("NVML" in k for k in measured.skipped)


# ----- windows and the sampler ----------------------------------------------------------------------------------
def test_integrate_power_exact_on_piecewise_constant_and_edges():
    # 10 W for 1 s then 30 W for 2 s, sampled at both sides of the step
    times = [0.0, 0.5, 1.0, 1.0, 2.0, 3.0]
    watts = [10, 10, 10, 30, 30, 30]
    assert integrate_power(times, watts, 0.0, 3.0) == pytest.approx(10 * 1 + 30 * 2)
    # samples outside the window are ignored; the window's ends are held flat from the nearest sample inside
    assert integrate_power([-5.0, *times, 9.0], [1000, *watts, 1000], 0.0, 3.0) == pytest.approx(70.0)
    assert integrate_power(times, watts, 1.5, 2.5) == pytest.approx(30.0)
    assert integrate_power(times, watts, 2.0, 2.0) is None  # zero-length window: unknown, not 0
    assert integrate_power(times, watts, 3.2, 3.9) is None  # no sample inside
    # a linear ramp is integrated exactly by the trapezoid rule
    ts = [i / 10 for i in range(11)]
    assert integrate_power(ts, [100 * t for t in ts], 0.0, 1.0) == pytest.approx(50.0)


def test_energy_between_refuses_resets_and_empty_windows():
    a = EnergyReading(1.0, True, "x", 0.0, 0)
    assert energy_between(a, EnergyReading(3.0, True, "x", 1.0, 0)) == 2.0
    assert energy_between(a, EnergyReading(3.0, True, "x", 1.0, 1)) is None
    assert energy_between(a, EnergyReading(1.0, True, "x", 0.0, 0)) is None


def test_sampler_differentiates_counter_and_windows_samples_inside():
    clock, cpu = FakeClock(), FakeClock()
    meter = CPUTimeEstimateMeter(10.0, cpu_clock=cpu, clock=clock)
    sampler = PowerSampler(meter, interval_s=0.1)
    for step in range(1, 11):  # 1 busy core for the first 5 s (10 W), then 2 busy cores (20 W)
        sampler.sample()
        clock.t += 1.0
        cpu.t += 1.0 if step <= 5 else 2.0
    sampler.sample()
    watts = [s.watts for s in sampler.samples]
    assert watts[0] is None and watts[1:6] == pytest.approx([10.0] * 5) and watts[6:] == pytest.approx([20.0] * 5)
    win = sampler.window(6.0, 9.0)
    assert win.samples == 4 and win.mean_w == pytest.approx(20.0) and win.energy_j == pytest.approx(60.0)
    assert sampler.window(2.5, 2.7) is None


def test_sampler_thread_collects_and_stops():
    meter = CPUTimeEstimateMeter(10.0)
    with PowerSampler(meter, interval_s=0.01) as sampler:
        time.sleep(0.15)
    n = len(sampler.samples)
    assert n >= 3 and not sampler.errors
    assert all(a.t < b.t for a, b in zip(sampler.samples, sampler.samples[1:]))
    time.sleep(0.05)
    assert len(sampler.samples) == n  # stopped
    with pytest.raises(EnergyMeterError):
        PowerSampler(RAPLMeter(root="/nonexistent/powercap")).start()


def test_nvml_without_the_package_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "pynvml", None)  # import pynvml raises ImportError
    meter = NVMLMeter()
    assert not meter.available() and "nvidia-ml-py is not installed" in meter.reason
