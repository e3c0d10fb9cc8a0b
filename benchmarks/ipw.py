"""Intelligence per Watt on this machine (arXiv 2511.07885): the default model in fp32, bf16 and int8 dynamic
quantization in this process, and the same fp32 model through `transformers serve` (LocalServer + EndpointBackend),
on two-digit additions with checkable answers, arms interleaved per query (rotating order).

Per arm: accuracy (95 % Wilson interval), energy per query, mean power, IPW, APJ, J/token, CPU-seconds per query,
accuracy per CPU-second, TTFT and latency. Every energy figure says whether it is measured or estimated.
- Meters: `auto_meter()` decides. On a machine with NVML/RAPL counters the figures are measured; on one without
  (this build box: no /sys/class/powercap, no GPU) they are ESTIMATED from CPU time (`CPUTimeEstimateMeter`,
  `--watts-per-core` W per busy core, an assumption). In-process arms meter this process; the served arm meters
  the server's process and this client together (`--serve-scope pids`, default) or the whole machine
  (`--serve-scope machine`, which on a shared box also counts other users' work).
- Beside them, for the same windows: a whole-machine CPU-time estimate, and the peer a user would otherwise reach
  for, CodeCarbon's `OfflineEmissionsTracker(tracking_mode="process")` (one task per query; with no RAPL it runs in
  its constant/TDP mode, so it is also an estimate, and it sees this process only: not the server's work).
- With CPU-time estimates power is nearly constant, so IPW mostly restates the watts-per-core assumption; the
  ranking by accuracy per CPU-second is the hardware-honest efficiency figure here and is printed beside it.
- Routing (the paper's local/cloud simulation): int8 in-process as "local", the served fp32 model as "cloud".

    python benchmarks/ipw.py --quick                 # 8 problems, all four arms (< 3 min on an idle box)
    python benchmarks/ipw.py --problems 50 --out ipw.json
    python benchmarks/ipw.py --random-weights --device cuda --problems 200 --max-new-tokens 64   # GPU: NVML J/token

Threads: one torch thread per process (`OMP_WAIT_POLICY=PASSIVE`: OpenMP spinning on a loaded box inflates CPU
time several-fold); the server also gets one thread.
"""

import argparse
import copy
import functools
import json
import os
import time
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
import torch  # noqa: E402

from hf_fastslow import load_default_model  # noqa: E402
from hf_fastslow.backends.hf_local import HFLocalBackend  # noqa: E402
from hf_fastslow.evaluation.energy import CPUTimeEstimateMeter, auto_meter, energy_between  # noqa: E402
from hf_fastslow.evaluation.ipw import IPWProfiler, reports_table, simulate_routing  # noqa: E402
from hf_fastslow.evaluation.prompts import arithmetic_problems  # noqa: E402
from hf_fastslow.evaluation.timing import machine_state, rotated  # noqa: E402

SUFFIX = " Reply with just the number."


def int8_dynamic(model):
    """int8 weights, dynamically quantized activations for every nn.Linear (deprecated in torch.ao, still working)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from torch.ao.quantization import quantize_dynamic

        return quantize_dynamic(copy.deepcopy(model), {torch.nn.Linear}, dtype=torch.qint8)


class CodeCarbonWindows:
    """CodeCarbon's offline tracker, one task per query window (the peer estimate); None where it is missing."""

    def __init__(self):
        self.error = None
        self.tracker = None
        try:
            import logging

            from codecarbon import OfflineEmissionsTracker

            logging.getLogger("codecarbon").setLevel(logging.ERROR)
            self.tracker = OfflineEmissionsTracker(country_iso_code="USA", tracking_mode="process",
                                                   save_to_file=False, log_level="error", measure_power_secs=1)
            self.tracker.start()
        except Exception as err:  # noqa: BLE001 - reported in the output as the peer's failure
            self.error = f"{type(err).__name__}: {err}"

    def window(self, fn):
        if self.tracker is None:
            return fn(), None
        self.tracker.start_task("query")
        try:
            value = fn()
        finally:
            data = self.tracker.stop_task()
        kwh_to_j = 3.6e6
        return value, {"cpu_j": data.cpu_energy * kwh_to_j, "total_j": data.energy_consumed * kwh_to_j}

    def stop(self):
        if self.tracker is not None:
            try:
                self.tracker.stop()
            except Exception:  # noqa: BLE001 - the figures are already taken
                pass


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--problems", type=int, default=50)
    ap.add_argument("--quick", action="store_true", help="8 problems, one warm-up query per arm")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=16)  # "a + b = c" takes ~12
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--watts-per-core", type=float, default=None)
    ap.add_argument("--arms", default="fp32,bf16,int8,serve")
    ap.add_argument("--serve-scope", default="pids", choices=("pids", "machine"))
    ap.add_argument("--no-codecarbon", action="store_true")
    ap.add_argument("--out", default=None, help="JSON report (a PNG is written beside it)")
    ap.add_argument("--plot", default=None, help="the PNG (default: beside the JSON report)")
    ap.add_argument("--random-weights", action="store_true",
                    help="a random-init model of the default model's shape (GPU calibration: joules per token, no "
                         "accuracy, so no IPW); arms fp32/bf16 only")
    ap.add_argument("--device", default="cpu", help="device of the in-process arms (e.g. cuda)")
    args = ap.parse_args()
    n = 8 if args.quick else args.problems
    if args.quick:
        args.warmup = min(args.warmup, 1)
    torch.set_num_threads(1)
    arms = args.arms.split(",")
    items = [{"question": r["question"] + SUFFIX, "answer": r["answer"]} for r in arithmetic_problems(n, args.seed)]
    state_before = machine_state()
    t_start, cpu_start = time.perf_counter(), time.process_time()

    model, tok = load_default_model()
    if args.random_weights:
        from transformers import AutoModelForCausalLM

        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(model.config)  # same shape, random weights
        arms = [a for a in arms if a in ("fp32", "bf16")]
    model = model.to(args.device).eval()
    backends = {}
    if "fp32" in arms:
        backends["fp32"] = HFLocalBackend(model, tok, name="fp32")
    if "bf16" in arms:
        backends["bf16"] = HFLocalBackend(copy.deepcopy(model).to(torch.bfloat16), tok, name="bf16")
    if "int8" in arms:
        backends["int8"] = HFLocalBackend(int8_dynamic(model), tok, name="int8 dynamic")

    estimate = {"watts_per_core": args.watts_per_core}
    local_meter = auto_meter(estimate=estimate, warn=False)
    profilers = {name: IPWProfiler(b, items, meter=local_meter, warmup=args.warmup, name=name,
                                   max_new_tokens=args.max_new_tokens, sampler_interval_s=0.1)
                 for name, b in backends.items()}
    server = None
    try:
        if "serve" in arms:
            from hf_fastslow.backends.serve import LocalServer
            from hf_fastslow.default_model import default_model_path

            server = LocalServer(default_model_path(), threads=1, extra_args=["--dtype", "float32"]).start()
            pids = sorted({server.pid, os.getpid()})
            if local_meter.measured:  # counters cover the machine's hardware: the server's work is in them
                serve_meter = local_meter
            elif args.serve_scope == "machine":
                serve_meter = CPUTimeEstimateMeter(args.watts_per_core, machine=True)
            else:
                serve_meter = CPUTimeEstimateMeter(args.watts_per_core, pids=pids)
            profilers["serve fp32"] = IPWProfiler(server.backend(), items, meter=serve_meter, warmup=args.warmup,
                                                  name="serve fp32", max_new_tokens=args.max_new_tokens,
                                                  cpu_pids=pids, sampler_interval_s=0.1)
        machine_meter = CPUTimeEstimateMeter(args.watts_per_core, machine=True)
        codecarbon = None if args.no_codecarbon else CodeCarbonWindows()
        extra = {name: {"machine_j": [], "codecarbon_cpu_j": [], "codecarbon_total_j": []} for name in profilers}
        for p in profilers.values():
            p.start()  # warm-up queries, unrecorded
        names = list(profilers)
        for i, item in enumerate(items):
            for name in rotated(names, i):
                m0 = machine_meter.read()
                if codecarbon is not None:
                    _, cc = codecarbon.window(functools.partial(profilers[name].query, item, index=i))
                else:
                    profilers[name].query(item, index=i)
                    cc = None
                extra[name]["machine_j"].append(energy_between(m0, machine_meter.read()))
                if cc is not None:
                    extra[name]["codecarbon_cpu_j"].append(cc["cpu_j"])
                    extra[name]["codecarbon_total_j"].append(cc["total_j"])
            if (i + 1) % 5 == 0:
                print(f"  {i + 1}/{n} problems", flush=True)
        reports = {}
        for name, p in profilers.items():
            p.close()
            reports[name] = p.report()
        if codecarbon is not None:
            codecarbon.stop()
    finally:
        if server is not None:
            server.stop()

    peer = "fp32" if "fp32" in reports else next(iter(reports))
    if args.random_weights:
        print_random_weights(reports, n, args, state_before)
        return
    print(f"\nIPW on {n} two-digit additions (greedy, <= {args.max_new_tokens} new tokens), arms interleaved per "
          f"query; {machine_state()['cpus']} CPUs, load average {state_before['load_average']} before, "
          f"{machine_state()['load_average']} after")
    for name, rep in reports.items():
        why = f" ({rep.fallback_reason})" if rep.fallback_reason else ""
        print(f"- {name}: energy {rep.kind}, meter: {rep.meter_source}{why}")
    print()
    print("\n".join(reports_table(reports, peer=peer)))

    def mean(xs):
        xs = [x for x in xs if x is not None]
        return sum(xs) / len(xs) if xs else None

    def fmt(x, spec=".2f"):
        return "n/a" if x is None else format(x, spec)

    print("\nThe same windows through other meters (all ESTIMATES on a machine without counters):")
    print("| arm | ours J/query (scope) | whole-machine CPU-time estimate J/query | CodeCarbon CPU J/query "
          "(this process) | CodeCarbon CPU+RAM J/query | CodeCarbon CPU / ours |")
    print("|---|---|---|---|---|---|")
    summary_extra = {}
    for name, rep in reports.items():
        e = extra[name]
        ours, cc = rep.energy_per_query_j, mean(e["codecarbon_cpu_j"])
        summary_extra[name] = {"machine_j_per_query": mean(e["machine_j"]), "codecarbon_cpu_j_per_query": cc,
                               "codecarbon_total_j_per_query": mean(e["codecarbon_total_j"])}
        print(f"| {name} | {fmt(ours)} ({rep.meter_scope}) | {fmt(mean(e['machine_j']))} | {fmt(cc)} | "
              f"{fmt(mean(e['codecarbon_total_j']))} | {fmt(cc / ours if cc is not None and ours else None)} |")
    if codecarbon is not None and codecarbon.error:
        print(f"CodeCarbon failed: {codecarbon.error}")

    ranking = sorted(reports, key=lambda k: -(reports[k].accuracy_per_cpu_second or 0.0))
    print("\nRanking by accuracy per CPU-second (measured): " + " > ".join(
        f"{k} ({fmt(reports[k].accuracy_per_cpu_second, '.3f')})" for k in ranking))
    routing = {}
    if "int8" in reports and "serve fp32" in reports:
        for acc in (1.0, 0.8):
            r = simulate_routing(reports["int8"], reports["serve fp32"], router_accuracy=acc, seed=args.seed)
            routing[str(acc)] = r.__dict__
            print(f"Routing int8 (local) / serve fp32 (cloud), router accuracy {acc:.0%}: {r.local_share:.0%} of "
                  f"queries local (servable locally {r.servable_locally:.0%}), accuracy {r.accuracy:.2f} vs "
                  f"all-cloud {r.cloud_accuracy:.2f}, energy saving {fmt(r.energy_saving, '.0%')} "
                  f"({r.energy_label}), CPU-seconds saving {r.cpu_saving:.0%}")
    wall, cpu = time.perf_counter() - t_start, time.process_time() - cpu_start
    print(f"\nBenchmark: {wall:.0f} s wall, {cpu:.0f} s CPU in this process (the server's CPU is in the serve arm).")

    if args.out:
        payload = {"args": vars(args), "machine_before": state_before, "machine_after": machine_state(),
                   "wall_s": wall, "process_cpu_s": cpu, "reports": {k: r.to_dict() for k, r in reports.items()},
                   "other_meters": summary_extra, "routing": routing}
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        with open(args.out, "w") as f:
            json.dump(payload, f, indent=2, default=str)
        plot(reports, args.plot or os.path.splitext(args.out)[0] + ".png")


def print_random_weights(reports, n, args, state_before) -> None:
    """Energy per token of a random-weight model: no accuracy (random weights answer nothing), so no IPW or APJ."""
    print(f"\nRandom-weight model of the default model's shape on {args.device}, {n} queries of up to "
          f"{args.max_new_tokens} new tokens, arms interleaved; load average {state_before['load_average']} before, "
          f"{machine_state()['load_average']} after. No accuracy (random weights): no IPW, no APJ.")
    print("| arm | energy J/query | J/token | mean power W | tokens/s | TTFT p50 s | counter vs sampled energy |")
    print("|---|---|---|---|---|---|---|")
    for name, rep in reports.items():  # one meter line per arm goes below the table
        sampled = [(r.sampled_energy_j, r.energy_j) for r in rep.metered if r.sampled_energy_j is not None]
        agree = (sum(a for a, _ in sampled) / sum(b for _, b in sampled)) if sampled else None
        k = rep.kind

        def fmt(x, spec=".3f"):
            return "n/a" if x is None else format(x, spec)

        print(f"| {name} | {fmt(rep.energy_per_query_j)} ({k}) | {fmt(rep.j_per_token, '.4f')} ({k}) | "
              f"{fmt(rep.mean_power_w, '.1f')} ({k}) | {fmt(rep.tokens_per_s, '.1f')} | {fmt(rep.ttft_p50_s)} | "
              f"{fmt(agree, '.3f')} |")
    for name, rep in reports.items():
        print(f"- {name} meter: {rep.meter_source}" + (f" ({rep.fallback_reason})" if rep.fallback_reason else ""))


def plot(reports, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        print(f"plot skipped: matplotlib is not installed ({err})")
        return
    names = list(reports)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.6))
    axes[0].bar(names, [reports[k].accuracy for k in names], color="tab:blue")
    axes[0].set_title("accuracy (measured)", fontsize=9)
    axes[1].bar(names, [reports[k].accuracy_per_cpu_second or 0 for k in names], color="tab:green")
    axes[1].set_title("accuracy per CPU-second (measured)", fontsize=9)
    axes[2].bar(names, [reports[k].energy_per_query_j or 0 for k in names], color="tab:orange")
    axes[2].set_title("energy per query, J (" + "/".join(sorted({reports[k].kind for k in names})) + ")",
                      fontsize=9)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8, rotation=15)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    main()
