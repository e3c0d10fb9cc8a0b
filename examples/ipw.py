"""Intelligence per Watt of the default model on this machine: accuracy, energy per query, IPW and APJ, with every
energy figure labelled measured or estimated.

    python examples/ipw.py             # the default model in fp32 and int8 dynamic quantization, 6 additions each
    python examples/ipw.py --serve     # also the fp32 model through `transformers serve`, metering the server

`auto_meter()` reads hardware counters where the machine has them (NVML on NVIDIA GPUs, RAPL through powercap);
where it has none it falls back to an estimate from CPU time and says why. With an estimate, power is nearly
constant, so accuracy per CPU-second is printed beside IPW as the efficiency figure that does not rest on an
assumed wattage.
"""

import argparse
import os
import warnings

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

from hf_fastslow import load_default_model  # noqa: E402
from hf_fastslow.backends import HFLocalBackend  # noqa: E402
from hf_fastslow.evaluation.energy import CPUTimeEstimateMeter, auto_meter  # noqa: E402
from hf_fastslow.evaluation.ipw import IPWProfiler, reports_table, simulate_routing  # noqa: E402
from hf_fastslow.evaluation.prompts import arithmetic_problems  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=6)
    ap.add_argument("--serve", action="store_true", help="also profile the model behind `transformers serve`")
    args = ap.parse_args()
    torch.set_num_threads(1)

    items = [{"question": row["question"] + " Reply with just the number.", "answer": row["answer"]}
             for row in arithmetic_problems(args.problems, seed=0)]
    model, tok = load_default_model()

    meter = auto_meter(warn=False)
    print(f"meter: {meter.source}; {'measured' if meter.measured else 'ESTIMATED'}")
    if meter.fallback_reason:
        print(f"why it fell back: {meter.fallback_reason}")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's dynamic quantization is deprecated, still working
        int8 = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8, inplace=False)
    reports = {}
    for name, m in (("fp32", model), ("int8 dynamic", int8)):
        profiler = IPWProfiler(HFLocalBackend(m, tok), items, meter=meter, warmup=1, name=name, max_new_tokens=16)
        reports[name] = profiler.run()
        print(reports[name].summary())

    if args.serve:
        from hf_fastslow.backends import LocalServer
        from hf_fastslow.default_model import default_model_path

        with LocalServer(default_model_path(), threads=1) as server:
            pids = [server.pid, os.getpid()]  # the server does the work: meter its process and this client
            served = meter if meter.measured else CPUTimeEstimateMeter(pids=pids)
            profiler = IPWProfiler(server.backend(), items, meter=served, warmup=1, name="serve fp32",
                                   max_new_tokens=16, cpu_pids=pids)
            reports["serve fp32"] = profiler.run()
            print(reports["serve fp32"].summary())

    print()
    print("\n".join(reports_table(reports, peer="fp32")))
    rec = reports["fp32"].records[0]
    print(f"\nfirst query: {rec.reply!r} (answer {rec.answer}), {rec.energy_j:.2f} J "
          f"{'measured' if rec.measured else 'estimated'} by {rec.source}, TTFT {rec.ttft_s:.3f} s")
    route = simulate_routing(reports["int8 dynamic"], reports["fp32"])
    print(f"routing int8 -> fp32 (oracle router): {route.local_share:.0%} of queries stay on int8, accuracy "
          f"{route.accuracy:.2f} vs {route.cloud_accuracy:.2f} all-fp32, energy saving "
          f"{route.energy_saving:.0%} ({route.energy_label})")


if __name__ == "__main__":
    main()
