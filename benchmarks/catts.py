"""CATTS vs greedy vs majority vote vs always-arbitrate on a multi-step environment (arXiv 2602.12276).

Environment: `RunningTotalEnv` (generated in code): keep a running total over `--steps` steps (start in 10-19, add a
number in 1-9 per step); the agent sees its own last total, so one wrong step fails the episode (errors compound, as
on web tasks). SmolLM2-135M-Instruct gets about half the steps right greedily, so episode success sits in the
useful band. Arms, all on the default model through one `HFLocalBackend`:
- `greedy`: one greedy sample per step (ReAct, N=1);
- `majority`: N samples at `--temperature`, the majority cluster;
- `always`: N samples, then the arbiter every step (`--arbiter score`: label log-probs via `backend.score()`;
  `generate`: a lettered prompt answered greedily);
- `catts-<signal>-<tau>`: N samples, the arbiter only when U > tau, for every signal and tau given (all reported;
  nothing is picked on the test episodes).
Every arm runs the same episodes with the same per-step seeds, so arms facing the same observation draw the same N
samples. Each arm has its own `ReplayBackend` over one shared memo: identical calls run once, and each arm's ledger is
charged the measured cost of every call it made (tokens, seconds, CPU seconds as first measured), i.e. what it would
have cost alone. Reported per arm: episode success (mean and spread over seeds, pooled 95 % Wilson interval),
per-step accuracy, tokens per episode (sampler prompt + generated, arbiter prompt + generated), arbiter calls per
episode, fraction of steps arbitrated, backend CPU-seconds per episode, and the paper's override check (steps where
the arbiter overrode a majority with margin > 0.7: their accuracy, and success of episodes with/without one).

    python benchmarks/catts.py --quick                          # < 3 min on an idle box
    python benchmarks/catts.py --episodes 20 --out catts.json   # the recorded run (3 seeds, N=8, tau 0.2/0.4/0.6)
    python benchmarks/catts.py --episodes 50 --out catts.json   # the issue's size (about 1.3 CPU-hours)
    (--plot catts.png: success vs share of steps arbitrated)
"""

import argparse
import json
import math
import os
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP workers must not spin on a shared 2-core box
import torch  # noqa: E402

from hf_fastslow import load_default_model  # noqa: E402
from hf_fastslow.backends.hf_local import HFLocalBackend  # noqa: E402
from hf_fastslow.evaluation.intervals import wilson_interval  # noqa: E402
from hf_fastslow.evaluation.timing import load_average, machine_state  # noqa: E402
from hf_fastslow.generation.catts import (  # noqa: E402
    AlwaysArbitratePolicy,
    CATTSConfig,
    CATTSPolicy,
    GreedyPolicy,
    MajorityVotePolicy,
)
from hf_fastslow.generation.catts_env import (  # noqa: E402
    ReplayBackend,
    RunningTotalEnv,
    run_episode,
    summarize,
)


def build_arms(inner, memo, env, args):
    """name -> policy, each on its own ReplayBackend (own ledger) over the shared memo."""
    base = CATTSConfig(n_samples=args.n, temperature=args.temperature, max_new_tokens=args.max_new_tokens,
                       arbiter=args.arbiter, max_retries=args.max_retries)

    def be(name):
        return ReplayBackend(inner, memo, name=name)

    arms = {"greedy": GreedyPolicy(be("greedy"), env.parse_action, config=base),
            "majority": MajorityVotePolicy(be("majority"), env.parse_action, config=base)}
    b = be("always")
    arms["always"] = AlwaysArbitratePolicy(b, b, env.parse_action, config=base)
    for signal in args.signals:
        for tau in args.taus:
            name = f"catts-{signal}-{tau:g}"
            b = be(name)
            cfg = CATTSConfig(**{**base.__dict__, "signal": signal, "tau": tau})
            arms[name] = CATTSPolicy(b, b, env.parse_action, config=cfg)
    return arms


def aggregate(per_seed: dict[int, dict], pooled: dict) -> dict:
    seeds = sorted(per_seed)
    success = [per_seed[s]["success"] for s in seeds]
    episodes = pooled["episodes"]
    wins = round(pooled["success"] * episodes)
    return {
        "success_per_seed": success,
        "success_mean": statistics.fmean(success),
        "success_sd": statistics.stdev(success) if len(success) > 1 else 0.0,
        "success_ci95": wilson_interval(wins, episodes),
        **{k: pooled[k] for k in ("episodes", "step_accuracy", "step_accuracy_ci95", "arbitrated_fraction",
                                  "arbiter_fallbacks", "overrides", "consensus_overrides",
                                  "consensus_override_step_accuracy", "success_with_consensus_override",
                                  "success_without_consensus_override", "failed_steps", "tokens_per_episode")},
        "sampler_tokens_per_episode": (pooled["sampler_prompt_tokens"] + pooled["sampler_completion_tokens"])
        / episodes,
        "generated_tokens_per_episode": pooled["sampler_completion_tokens"] / episodes,
        "arbiter_tokens_per_episode": (pooled["arbiter_prompt_tokens"] + pooled["arbiter_completion_tokens"])
        / episodes,
        "arbiter_calls_per_episode": pooled["arbiter_calls"] / episodes,
        "backend_cpu_s_per_episode": pooled["backend_cpu_seconds"] / episodes,
        "backend_s_per_episode": pooled["backend_seconds"] / episodes,
    }


def fmt_rate(x):
    return "–" if x is None else f"{100 * x:.0f} %"


def table(arms: dict) -> str:
    lines = ["| arm | success (mean ± sd over seeds) | 95 % CI (pooled) | step acc. | tokens / ep. (generated) "
             "| arbiter calls / ep. | steps arbitrated | backend CPU s / ep. | consensus overrides: step acc. "
             "| success with / without |", "|---|---|---|---|---|---|---|---|---|---|"]
    for name, a in arms.items():
        lo, hi = a["success_ci95"]
        lines.append(
            f"| {name} | {100 * a['success_mean']:.1f} ± {100 * a['success_sd']:.1f} % "
            f"| {100 * lo:.0f}–{100 * hi:.0f} % | {100 * a['step_accuracy']:.1f} % "
            f"| {a['tokens_per_episode']:,.0f} ({a['generated_tokens_per_episode']:,.0f})"
            f" | {a['arbiter_calls_per_episode']:.2f} | {100 * a['arbitrated_fraction']:.0f} % "
            f"| {a['backend_cpu_s_per_episode']:.1f} | {a['consensus_overrides']}: "
            f"{fmt_rate(a['consensus_override_step_accuracy'])} | {fmt_rate(a['success_with_consensus_override'])} / "
            f"{fmt_rate(a['success_without_consensus_override'])} |")
    return "\n".join(lines)


def targets(arms: dict) -> list[str]:
    """The issue's targets, checked per CATTS arm: success >= always-arbitrate with <= half its arbiter calls, and
    success >= majority vote (on the seed means)."""
    always, majority = arms["always"], arms["majority"]
    out = []
    for name, a in arms.items():
        if not name.startswith("catts"):
            continue
        ok_always = a["success_mean"] >= always["success_mean"]
        ok_calls = a["arbiter_calls_per_episode"] <= 0.5 * always["arbiter_calls_per_episode"]
        ok_majority = a["success_mean"] >= majority["success_mean"]
        out.append(f"{name}: success >= always-arbitrate {'yes' if ok_always else 'NO'}; arbiter calls <= 1/2 of "
                   f"always {'yes' if ok_calls else 'NO'} ({a['arbiter_calls_per_episode']:.2f} vs "
                   f"{always['arbiter_calls_per_episode']:.2f}); success >= majority {'yes' if ok_majority else 'NO'}")
    return out


def plot_success_vs_arbitrated(arms: dict, args, path: str) -> None:
    """Episode success (seed mean, pooled 95 % interval) against the share of steps sent to the arbiter: one line
    per CATTS signal over its taus, between majority vote (0 %) and always-arbitrate (100 %)."""
    from hf_fastslow.evaluation.cli_support import pyplot_or_reason

    plt, reason = pyplot_or_reason()
    if plt is None:
        print(reason)
        return
    fig, ax = plt.subplots(figsize=(6.4, 4.2))

    def point(name, a, **style):
        lo, hi = a["success_ci95"]
        y = 100 * a["success_mean"]
        ax.errorbar([100 * a["arbitrated_fraction"]], [y], yerr=[[y - 100 * lo], [100 * hi - y]], capsize=3,
                    label=name, **style)

    point("greedy (N = 1)", arms["greedy"], marker="v", color="grey", linestyle="none")
    point(f"majority vote (N = {args.n})", arms["majority"], marker="s", color="black", linestyle="none")
    point(f"always-arbitrate (N = {args.n})", arms["always"], marker="D", color="tab:red", linestyle="none")
    for signal, color in zip(args.signals, ("tab:blue", "tab:green")):
        names = [f"catts-{signal}-{tau:g}" for tau in args.taus]
        xs = [100 * arms[n]["arbitrated_fraction"] for n in names]
        ys = [100 * arms[n]["success_mean"] for n in names]
        ax.plot(xs, ys, marker="o", color=color, label=f"CATTS {signal}, tau {', '.join(f'{t:g}' for t in args.taus)}")
        for x, y, tau in zip(xs, ys, args.taus):
            ax.annotate(f"{tau:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=8, color=color)
    ax.set_xlabel("share of steps arbitrated (%)")
    ax.set_ylabel("episode success (%); bars: pooled 95 % CI")
    ax.set_title(f"CATTS on RunningTotalEnv, SmolLM2-135M: {len(args.seeds)} seed(s) x {args.episodes} episodes",
                 fontsize=9)
    ax.set_xlim(-5, 105)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--episodes", type=int, default=50)
    ap.add_argument("--steps", type=int, default=3, help="steps per episode (additions)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--n", type=int, default=8, help="samples per step (voting arms)")
    ap.add_argument("--taus", type=float, nargs="+", default=[0.2, 0.4, 0.6])
    ap.add_argument("--signals", nargs="+", default=["entropy", "margin"], choices=["entropy", "margin"])
    ap.add_argument("--arbiter", choices=["score", "generate"], default="score")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--max-retries", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="6 episodes, 1 seed, N=6, tau 0.4 (< 3 min on an idle box)")
    ap.add_argument("--out", help="write the report as JSON here")
    ap.add_argument("--plot", help="draw episode success vs share of steps arbitrated into this PNG")
    args = ap.parse_args()
    if args.quick:
        args.episodes, args.seeds, args.n, args.taus = 6, [0], 6, [0.4]
    torch.set_num_threads(args.threads)
    report = {"args": vars(args), "machine_before": machine_state()}
    wall0, cpu0 = time.perf_counter(), time.process_time()
    model, tok = load_default_model()
    inner = HFLocalBackend(model, tok)
    env = RunningTotalEnv(n_steps=args.steps)
    memo: dict = {}
    arms = build_arms(inner, memo, env, args)
    results = {name: {seed: [] for seed in args.seeds} for name in arms}
    for seed in args.seeds:
        for episode in range(args.episodes):
            for name, policy in arms.items():  # interleaved: every arm runs this episode before the next one
                results[name][seed].append(run_episode(policy, env, episode=episode, seed=seed))
            memo.clear()  # later episodes never repeat this one's calls
        done = {name: summarize(results[name][seed])["success"] for name in arms}
        print(f"seed {seed}: " + ", ".join(f"{k} {100 * v:.0f} %" for k, v in done.items()), flush=True)
    summary = {}
    for name in arms:
        per_seed = {seed: summarize(results[name][seed]) for seed in args.seeds}
        pooled = summarize([r for seed in args.seeds for r in results[name][seed]])
        summary[name] = aggregate(per_seed, pooled)
    unique = inner.ledger.total()
    report.update(arms=summary, targets=targets(summary), wall_s=time.perf_counter() - wall0,
                  process_cpu_s=time.process_time() - cpu0, unique_backend_calls=unique.calls,
                  unique_backend_cpu_s=unique.cpu_seconds, machine_after={"load_average": load_average()})
    print(table(summary))
    print("\n".join(report["targets"]))
    print(f"{len(args.seeds)} seeds x {args.episodes} episodes x {args.steps} steps, N={args.n}, arbiter="
          f"{args.arbiter}, T={args.temperature}; run: {report['wall_s']:.0f} s wall, {report['process_cpu_s']:.0f} "
          f"process CPU s ({unique.calls} distinct backend calls, {unique.cpu_seconds:.0f} CPU s; per-arm CPU figures "
          f"are the replayed cost of each arm's own calls); load {report['machine_before']['load_average']} before, "
          f"{report['machine_after']['load_average']} after")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1, default=lambda x: None if isinstance(x, float) and math.isnan(x) else x)
    if args.plot:
        plot_success_vs_arbitrated(summary, args, args.plot)


if __name__ == "__main__":
    main()
