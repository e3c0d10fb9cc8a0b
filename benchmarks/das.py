"""DAS wall-clock benchmark on the default model (SmolLM2-135M-Instruct, fp32, CPU, one torch thread).

What a user of DAS cares about is time, beside the peer they would otherwise run (plain `generate`), in one process,
arms interleaved:

(a) GRPO-style rollout generation: `--prompts` GSM8K prompts (x `--generations` siblings, adjacent), sampled at
    temperature 1 (top-k/top-p off, as GRPO's defaults) in left-padded batches of `--batch` rows, `--new-tokens` new
    tokens, for `--epochs` epochs; before every epoch after the first the weights drift (sigma * std(W) * N(0, 1) on
    every mlp.down_proj, seed = epoch) as a policy does between epochs. Arms per batch, order alternating: plain
    `generate` and `speculative_generate` with a default `DASDrafter()` (cost-aware, sighting window of 2, length
    classes). A repeat restores the weights and starts DAS with an empty history.
(b) Greedy serving, batch 1: `--serve-prompts` prompts (GSM8K + HumanEval), no drift. Arms per prompt, order
    rotating: plain greedy `generate`; prompt lookup (`prompt_lookup_num_tokens`, `max_matching_ngram_size`) at the best
    setting of a small sweep run first on the same prompts; DAS with no history (`record_rollouts=False`: it drafts
    only from the request's own tokens); DAS with a warm history (one untimed pass first; then every call adds to it).

Every arm's outputs are compared with plain generate's (greedy: must be equal). Reported: per arm the median over
`--repeats` repeats of the total wall time, the spread (min-max), the median of the per-repeat time ratio to plain,
tokens per target forward per row (which explain the time), and the load average of the machine during the run.
`--json PATH` also writes every printed figure (per part, per arm: the per-repeat wall and CPU seconds and their
medians, the paired ratios to plain, tokens per forward, mismatches) and the machine state to PATH.

Run:  python benchmarks/das.py        (defaults: the issue's minimum sizes; ~20-25 min on a shared 2-core box)
      python benchmarks/das.py --prompts 8 --epochs 2 --new-tokens 32 --repeats 2 --serve-prompts 2 --pld-tokens 10 \
          --pld-ngram 2 --json das.json      (`hf-fastslow bench das`'s quick profile: both parts at reduced size)
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hf_fastslow import load_default_model
from hf_fastslow.evaluation.prompts import encode_chat, gsm8k_prompts, humaneval_prompts
from hf_fastslow.evaluation.timing import (
    load_average,
    machine_state,
    paired_ratio_table,
    paired_ratios,
    quartiles,
    rotated,
    timed_call,
)
from hf_fastslow.generation import DASDrafter, speculative_generate


class ForwardCounter:
    """Target forwards, counted by a pre-hook on the decoder (the same for every arm)."""

    def __init__(self, model):
        self.count = 0
        self.handle = model.model.register_forward_pre_hook(self._hook)

    def _hook(self, *args):
        self.count += 1


def drift(model, sigma: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.down_proj.weight
            w.add_(sigma * w.std() * torch.randn(w.shape, generator=g))


def quartile_summary(values: list[float]) -> str:
    q1, med, q3 = quartiles(values)
    return f"median {med:.3f} (quartiles {q1:.3f}-{q3:.3f}, n={len(values)})"


def arm_figures(wall: list[float], cpu: list[float], peer_wall: list[float], peer_cpu: list[float]) -> dict:
    """One arm's per-repeat totals and the medians of its per-repeat ratios to the peer (the JSON's arm record)."""
    return {"wall_s": wall, "cpu_s": cpu, "median_wall_s": statistics.median(wall),
            "median_cpu_s": statistics.median(cpu),
            "wall_ratio_to_plain": statistics.median(paired_ratios(wall, peer_wall)),
            "cpu_ratio_to_plain": statistics.median(paired_ratios(cpu, peer_cpu))}


def timed_generate(model, enc: dict, kwargs: dict):
    call = timed_call(lambda: model.generate(**enc, **kwargs))
    return call.value, call.wall, call.cpu


def grpo_rollouts(model, tok, args) -> dict:
    prompts = gsm8k_prompts(args.prompts)
    rows = [p for p in prompts for _ in range(args.generations)]
    batches = [encode_chat(tok, rows[i : i + args.batch]) for i in range(0, len(rows), args.batch)]
    sample = dict(do_sample=True, temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=args.new_tokens)
    base = {n: p.detach().clone() for n, p in model.named_parameters() if "down_proj" in n}
    arms = ("plain", "das")
    times = {a: [] for a in arms}
    cpu = {a: [] for a in arms}
    per_epoch = {a: [[] for _ in range(args.epochs)] for a in arms}
    pair_wall, pair_cpu = [], []
    das_per_forward = []  # DAS tokens per forward per row, per repeat and epoch
    print(f"\n## (a) GRPO-style rollouts: {args.prompts} prompts x {args.generations} generations, batch {args.batch}, "
          f"{args.epochs} epochs, {args.new_tokens} new tokens, T=1, drift sigma={args.sigma}", flush=True)
    for rep in range(args.repeats):
        with torch.no_grad():
            for n, p in model.named_parameters():
                if n in base:
                    p.copy_(base[n])
        drafter = DASDrafter()
        total = dict.fromkeys(arms, 0.0)
        total_cpu = dict.fromkeys(arms, 0.0)
        for epoch in range(args.epochs):
            if epoch > 0 and args.sigma > 0:
                drift(model, args.sigma, seed=epoch)
            epoch_t = dict.fromkeys(arms, 0.0)
            d_stats = []
            for b, enc in enumerate(batches):
                order = rotated(arms, rep + epoch + b)
                wall, used = {}, {}
                for arm in order:
                    kwargs = dict(sample)
                    if arm == "das":
                        kwargs.update(custom_generate=speculative_generate, drafter=drafter)
                    torch.manual_seed(10_000 * rep + 100 * epoch + b)
                    _, wall[arm], used[arm] = timed_generate(model, enc, kwargs)
                    if arm == "das":
                        d_stats.append(drafter.last_stats)
                pair_wall.append(wall["das"] / wall["plain"])
                pair_cpu.append(used["das"] / used["plain"])
                for arm in arms:
                    epoch_t[arm] += wall[arm]
                    total_cpu[arm] += used[arm]
            for arm in arms:
                total[arm] += epoch_t[arm]
                per_epoch[arm][epoch].append(epoch_t[arm])
            rounds = sum(s.rounds for s in d_stats)
            emitted = sum(s.emitted for s in d_stats)
            das_per_forward.append(emitted / max(rounds, 1))
            print(f"repeat {rep} epoch {epoch}: plain {epoch_t['plain']:.1f}s das {epoch_t['das']:.1f}s "
                  f"(ratio {epoch_t['das'] / epoch_t['plain']:.3f}); DAS tokens per forward per row "
                  f"{emitted / max(rounds, 1):.3f}, drafted {sum(s.proposed for s in d_stats)} accepted "
                  f"{sum(s.accepted for s in d_stats)}, rounds with a verified draft {drafter.drafted_rounds} / "
                  f"skipped as not paying {drafter.skipped_rounds} (cumulative); load {load_average()}", flush=True)
        for arm in arms:
            times[arm].append(total[arm])
            cpu[arm].append(total_cpu[arm])
        a, b = drafter.cost_model.coefficients()
        print(f"repeat {rep} total: plain {total['plain']:.1f}s das {total['das']:.1f}s; DAS cost model: "
              f"{1e3 * a:.1f} ms + {1e3 * b:.2f} ms/token; history {len(drafter.history)} rollouts", flush=True)
    print("\nTotal over all epochs (wall = what a user waits; CPU = this process's CPU time, less sensitive to load):")
    print("\n".join(paired_ratio_table(times, cpu, peer="plain")))
    print(f"per-batch paired ratio DAS / plain: wall {quartile_summary(pair_wall)}; CPU {quartile_summary(pair_cpu)}")
    med = {a: [statistics.median(v) for v in per_epoch[a]] for a in arms}
    print("per epoch (median over repeats, wall s): " + "; ".join(
        f"epoch {e}: plain {med['plain'][e]:.1f} das {med['das'][e]:.1f}" for e in range(args.epochs)))
    print(f"load average after (a): {load_average()}", flush=True)
    return {"settings": {"prompts": args.prompts, "generations": args.generations, "batch": args.batch,
                         "epochs": args.epochs, "new_tokens": args.new_tokens, "repeats": args.repeats,
                         "sigma": args.sigma, "temperature": 1.0},
            "arms": {a: arm_figures(times[a], cpu[a], times["plain"], cpu["plain"]) for a in arms},
            "per_batch_wall_ratio": quartiles(pair_wall), "per_batch_cpu_ratio": quartiles(pair_cpu),
            "das_tokens_per_forward_per_row": das_per_forward,
            "per_epoch_median_wall_s": med, "load_average_after": load_average()}


def greedy_serving(model, tok, counter, args) -> dict:
    n_math = (args.serve_prompts + 1) // 2
    texts = gsm8k_prompts(n_math, offset=100) + humaneval_prompts(args.serve_prompts - n_math)
    encs = [encode_chat(tok, [t]) for t in texts]
    greedy = dict(do_sample=False, max_new_tokens=args.new_tokens)
    refs = [model.generate(**e, **greedy) for e in encs]  # also warms up the process

    def run(enc, arm_kwargs):
        counter.count = 0
        out, wall, used = timed_generate(model, enc, {**greedy, **arm_kwargs})
        return out, wall, used, counter.count

    # Prompt lookup sweep (one pass over the same prompts, interleaved per prompt), best total time wins.
    sweep = [(k, n) for k in args.pld_tokens for n in args.pld_ngram]
    sweep_t = dict.fromkeys(sweep, 0.0)
    sweep_fwd = dict.fromkeys(sweep, 0)
    plain_sweep = 0.0
    for enc in encs:
        plain_sweep += run(enc, {})[1]
        for k, n in sweep:
            _, dt, _, fwd = run(enc, {"prompt_lookup_num_tokens": k, "max_matching_ngram_size": n})
            sweep_t[(k, n)] += dt
            sweep_fwd[(k, n)] += fwd
    best = min(sweep, key=sweep_t.get)
    print(f"\n## (b) greedy serving, batch 1, {len(encs)} prompts, {args.new_tokens} new tokens")
    print(f"prompt-lookup sweep (one pass, s; plain {plain_sweep:.1f}): " + ", ".join(
        f"tokens={k} ngram={n}: {sweep_t[(k, n)]:.1f} ({len(encs) * args.new_tokens / sweep_fwd[(k, n)]:.2f} tok/fwd)"
        for k, n in sweep) + f"; best: tokens={best[0]} ngram={best[1]}; load {load_average()}", flush=True)

    cold = DASDrafter(budget=None, record_rollouts=False)
    warm = DASDrafter(budget=None)
    for enc in encs:  # the warm arm's history: one earlier answer per prompt (untimed)
        model.generate(**enc, **greedy, custom_generate=speculative_generate, drafter=warm)
    keys = {"plain": "plain", "prompt lookup": "prompt_lookup", "DAS, no history": "das_cold",
            "DAS, warm history": "das_warm"}  # the JSON's stable arm names (the printed one carries the setting)
    arms = {
        "plain": {},
        f"prompt lookup (tokens={best[0]}, ngram={best[1]})": {"prompt_lookup_num_tokens": best[0],
                                                              "max_matching_ngram_size": best[1]},
        "DAS, no history": {"custom_generate": speculative_generate, "drafter": cold},
        "DAS, warm history": {"custom_generate": speculative_generate, "drafter": warm},
    }
    names = list(arms)
    times = {a: [] for a in names}
    cpu = {a: [] for a in names}
    fwds = dict.fromkeys(names, 0)
    mismatches = dict.fromkeys(names, 0)
    for rep in range(args.repeats):
        total = dict.fromkeys(names, 0.0)
        total_cpu = dict.fromkeys(names, 0.0)
        for p, enc in enumerate(encs):
            for arm in rotated(names, rep + p):
                out, dt, used, fwd = run(enc, arms[arm])
                total[arm] += dt
                total_cpu[arm] += used
                fwds[arm] += fwd
                mismatches[arm] += int(not torch.equal(out, refs[p]))
        for arm in names:
            times[arm].append(total[arm])
            cpu[arm].append(total_cpu[arm])
        print(f"repeat {rep}: " + ", ".join(f"{a} {total[a]:.1f}s" for a in names) + f"; load {load_average()}",
              flush=True)
    print("\n".join(paired_ratio_table(times, cpu, peer="plain")))
    new = args.repeats * len(encs) * args.new_tokens
    print("tokens per target forward (batch 1): " + ", ".join(f"{a} {new / fwds[a]:.2f}" for a in names))
    print("outputs differing from plain greedy: " + ", ".join(f"{a} {mismatches[a]}" for a in names))
    for name, d in (("no history", cold), ("warm", warm)):
        a, b = d.cost_model.coefficients()
        print(f"DAS {name}: acceptance {d.stats.acceptance_rate:.2f}, rounds with a verified draft {d.drafted_rounds}, "
              f"skipped as not paying {d.skipped_rounds}; cost model {1e3 * a:.1f} ms + {1e3 * b:.2f} ms/token")
    print(f"load average after (b): {load_average()}", flush=True)
    drafters = {"das_cold": cold, "das_warm": warm}
    record = {}
    for arm in names:
        key = keys[arm.split(" (")[0]]
        record[key] = {**arm_figures(times[arm], cpu[arm], times["plain"], cpu["plain"]),
                       "tokens_per_forward": new / fwds[arm], "mismatches_vs_plain": mismatches[arm]}
        if key in drafters:
            record[key]["acceptance"] = drafters[key].stats.acceptance_rate
    return {"settings": {"prompts": len(encs), "new_tokens": args.new_tokens, "repeats": args.repeats, "batch": 1},
            "prompt_lookup_sweep_s": {f"tokens={k} ngram={n}": sweep_t[(k, n)] for k, n in sweep},
            "prompt_lookup_best": {"prompt_lookup_num_tokens": best[0], "max_matching_ngram_size": best[1]},
            "plain_sweep_s": plain_sweep, "arms": record, "load_average_after": load_average()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--parts", default="grpo,serve", help="comma-separated: grpo, serve")
    p.add_argument("--prompts", type=int, default=32)
    p.add_argument("--generations", type=int, default=1, help="GRPO siblings per prompt (adjacent rows)")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--sigma", type=float, default=0.05)
    p.add_argument("--serve-prompts", type=int, default=4)
    p.add_argument("--pld-tokens", type=int, nargs="+", default=[3, 6, 10])
    p.add_argument("--pld-ngram", type=int, nargs="+", default=[2, 3])
    p.add_argument("--json", default=None, help="also write every figure (and the machine state) to this JSON file")
    args = p.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    machine = machine_state()
    print(f"torch {torch.__version__}, threads={machine['torch_threads']}, cpus={machine['cpus']}, "
          f"load {machine['load_average']}, args={vars(args)}", flush=True)
    model, tok = load_default_model()
    counter = ForwardCounter(model)
    parts = args.parts.split(",")
    report = {"args": vars(args), "machine": machine}
    if "serve" in parts:
        report["serve"] = greedy_serving(model, tok, counter, args)
    if "grpo" in parts:
        report["grpo"] = grpo_rollouts(model, tok, args)
    report["wall_s"] = time.perf_counter() - start
    report["cpu_s"] = time.process_time()
    print(f"\nwall time {report['wall_s']:.0f}s, load average at the end {load_average()}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
