"""`hf-fastslow ksort`: K-Sort Eval of one model against an arena; writes a JSON report and a PNG of mu +- sigma.

    hf-fastslow ksort --synthetic --new-skill 27 --judge biased            # simulated arena and judge
    hf-fastslow ksort --arena DIR --answers answers.json --judge-endpoint http://127.0.0.1:8000/v1 --judge-model NAME
    hf-fastslow ksort --arena DIR --generate-default --judge-local          # text arena, default model both sides

`--answers` is a JSON object {prompt: output} (text, or an image path for image arenas) for the model under test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def add_parser(subparsers) -> None:
    p = subparsers.add_parser("ksort", help="K-Sort Eval: rate one model against an arena with a corrected judge",
                              description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_argument_group("arena")
    src.add_argument("--arena", help="directory in the public K-Sort-Eval layout (Image/, Video/ or Text/ + *_meta)")
    src.add_argument("--synthetic", action="store_true", help="a synthetic arena with known skills")
    src.add_argument("--n-models", type=int, default=20)
    src.add_argument("--k", type=int, default=4)
    src.add_argument("--instances", type=int, default=500)
    src.add_argument("--new-skill", type=float, default=27.0, help="synthetic: true skill of the model under test")
    model = p.add_argument_group("model under test (real arenas)")
    model.add_argument("--answers", help="JSON {prompt: output} of the model under test")
    model.add_argument("--generate-default", action="store_true", help="answer with the default model (text arenas)")
    model.add_argument("--max-new-tokens", type=int, default=96)
    judge = p.add_argument_group("judge")
    judge.add_argument("--judge", default="plackett-luce", choices=("plackett-luce", "biased"),
                       help="simulated judge for --synthetic")
    judge.add_argument("--judge-noise", type=float, default=3.25, help="simulated judge's Gumbel scale")
    judge.add_argument("--lapse", type=float, default=0.3, help="biased judge: share of reversed rankings")
    judge.add_argument("--judge-endpoint", help="OpenAI-compatible base URL of an LLM / VLM judge")
    judge.add_argument("--judge-model", help="model name sent to --judge-endpoint")
    judge.add_argument("--judge-local", action="store_true", help="the default model as an in-process text judge")
    judge.add_argument("--lenient", action="store_true", help="tolerate prose around the ranking list")
    judge.add_argument("--judge-retries", type=int, default=1)
    algo = p.add_argument_group("algorithm")
    algo.add_argument("--max-runs", type=int, default=150)
    algo.add_argument("--sigma-stop", type=float, default=0.75)
    algo.add_argument("--alpha", type=float, default=0.5)
    algo.add_argument("--kappa", type=float, default=5.0)
    algo.add_argument("--eta", type=float, default=3.0)
    algo.add_argument("--no-correction", action="store_true")
    algo.add_argument("--matching", default="dynamic", choices=("dynamic", "static"))
    algo.add_argument("--variance-rule", default="code", choices=("code", "paper"))
    algo.add_argument("--sigma-ref", default="code", choices=("code", "paper"))
    algo.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="ksort_report.json")
    p.add_argument("--no-plot", action="store_true")
    p.set_defaults(func=run)


def _answers_fn(path: str):
    with open(path) as f:
        answers = json.load(f)
    if not isinstance(answers, dict):
        raise SystemExit(f"--answers {path}: expected a JSON object {{prompt: output}}.")

    def generate(prompt: str):
        if prompt not in answers:
            raise KeyError(f"--answers has no output for the arena prompt {prompt[:80]!r}")
        return answers[prompt]

    return generate


def _default_backend(max_new_tokens: int):
    from hf_fastslow.evaluation.cli_support import backend_from_args

    return backend_from_args("default", max_new_tokens=max_new_tokens, do_sample=False)


def _plot(result, arena, png: str) -> str | None:
    from hf_fastslow.evaluation.cli_support import pyplot_or_reason

    plt, reason = pyplot_or_reason()
    if plt is None:
        return reason
    runs = [s.run for s in result.steps]
    mu = [s.mu for s in result.steps]
    sd = [s.sigma for s in result.steps]
    fig, ax = plt.subplots(figsize=(7, 4))
    for skill in arena.leaderboard.values():
        ax.axhline(skill.mu, color="0.85", lw=0.8, zorder=0)
    ax.plot(runs, mu, color="C0", label="new model mu")
    ax.fill_between(runs, [m - s for m, s in zip(mu, sd)], [m + s for m, s in zip(mu, sd)], alpha=0.25, color="C0",
                    label="+- sigma")
    fails = [s.run for s in result.steps if s.skipped]
    if fails:
        ax.scatter(fails, [mu[r - 1] for r in fails], marker="x", color="C3", label="skipped run (judge failure)")
    ax.set_xlabel("run")
    ax.set_ylabel("skill (grey: arena models)")
    ax.set_title(f"K-Sort Eval: score {result.score:.2f}, rank {result.rank}, {result.runs} runs, "
                 f"{'converged' if result.converged else 'NOT converged'}")
    ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return None


def run(args) -> int:
    from hf_fastslow.evaluation.ksort import Arena, KSortEvaluator
    from hf_fastslow.evaluation.ksort_judges import (
        BiasedJudge,
        PlackettLuceJudge,
        SyntheticOutput,
        TextRankJudge,
        VLMRankJudge,
    )

    if bool(args.arena) == bool(args.synthetic):
        print("ksort: give exactly one of --arena DIR or --synthetic", file=sys.stderr)
        return 2
    wall0, cpu0 = time.perf_counter(), time.process_time()
    report: dict = {"command": "ksort"}
    judge_backend = None
    if args.synthetic:
        arena = Arena.synthetic(args.n_models, args.instances, args.k, args.seed)
        judge = (PlackettLuceJudge(args.judge_noise, seed=args.seed) if args.judge == "plackett-luce"
                 else BiasedJudge(args.judge_noise, args.lapse, seed=args.seed))
        new_skill = args.new_skill

        def generate(prompt):
            return SyntheticOutput("new", new_skill)

        report["arena"] = {"kind": "synthetic", "true_skill_of_new_model": new_skill}
        report["judge"] = {"kind": args.judge, "gumbel_scale": args.judge_noise,
                           **({"lapse": args.lapse} if args.judge == "biased" else {})}
    else:
        arena = Arena.from_local_dir(args.arena)
        if args.answers:
            generate = _answers_fn(args.answers)
        elif args.generate_default:
            if arena.modality != "text":
                print("ksort: --generate-default answers text prompts only", file=sys.stderr)
                return 2
            model_backend = _default_backend(args.max_new_tokens)

            def generate(prompt):
                return model_backend.chat([{"role": "user", "content": prompt}])[0].text
        else:
            print("ksort: a real arena needs --answers FILE or --generate-default", file=sys.stderr)
            return 2
        if args.judge_endpoint:
            from hf_fastslow.backends import EndpointBackend

            judge_backend = EndpointBackend(args.judge_endpoint, args.judge_model)
        elif args.judge_local:
            judge_backend = _default_backend(40)
        else:
            print("ksort: a real arena needs --judge-endpoint URL or --judge-local", file=sys.stderr)
            return 2
        strict = not args.lenient
        judge = (TextRankJudge(judge_backend, strict=strict) if arena.modality == "text"
                 else VLMRankJudge(judge_backend, strict=strict,
                                   item_word="Video" if arena.modality == "video" else "Image"))
        report["arena"] = {"kind": arena.modality, "path": os.path.basename(os.path.abspath(args.arena))}
        report["judge"] = {"kind": type(judge).__name__, "backend": getattr(judge_backend, "name", None)}
    ev = KSortEvaluator(arena, judge, alpha=args.alpha, kappa=args.kappa, sigma_stop=args.sigma_stop, eta=args.eta,
                        max_runs=args.max_runs, correction=not args.no_correction, matching=args.matching,
                        variance_rule=args.variance_rule, sigma_ref=args.sigma_ref,
                        judge_retries=args.judge_retries, seed=args.seed)
    result = ev.evaluate(generate)
    report["arena"].update(instances=len(arena), k=arena.k, models=len(arena.leaderboard))
    report["result"] = result.to_dict()
    if judge_backend is not None:
        usage = judge_backend.ledger.total()
        report["judge"]["usage"] = {"calls": usage.calls, "seconds": usage.seconds, "cpu_seconds": usage.cpu_seconds,
                                    "prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens}
    report["wall_s"], report["cpu_s"] = time.perf_counter() - wall0, time.process_time() - cpu0
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1, default=str)
    print(f"K-Sort Eval: score {result.score:.3f} (mu {result.mu:.3f}, sigma {result.sigma:.3f}), rank {result.rank} "
          f"of {len(arena.leaderboard) + 1}, {result.runs} runs ({'converged' if result.converged else 'NOT converged'}"
          f"), judge failures {result.judge_failures}, skipped runs {result.skipped_runs}")
    print(f"report: {args.out}")
    if not args.no_plot:
        png = os.path.splitext(args.out)[0] + ".png"
        why = _plot(result, arena, png)
        print(why if why else f"plot: {png}")
    return 0
