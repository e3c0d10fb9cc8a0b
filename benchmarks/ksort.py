"""K-Sort Eval (arXiv 2602.09411): synthetic arenas with known skills, then a real text arena with a known order.

Part 1, synthetic (`Arena.synthetic`): 20 models with true skills uniform in [15, 35] (leaderboard = true skill,
sigma 0.6), K = 4, 500 instances ranked by simulated humans (Plackett-Luce, Gumbel scale 3.25 = noise std 4.17 =
TrueSkill's beta) and kept when their Spearman agreement with the leaderboard is > 0.75 (the paper's filter). Per
seed, `--new-models` models under test with true skills uniform in [17, 33]. Judges (stated noise):
- `pl`: Plackett-Luce, Gumbel scale 3.25 (noise std 4.17);
- `biased`: the same, but on 30 % of instances it ranks by a nuisance feature anti-correlated with quality (the
  order reversed).
Arms per judge: K-Sort (dynamic matching + posterior correction, the code's variance rule), no correction, static
matching (the arena walked in its stored random order, i.e. no active selection), and the paper's variance rule.
Reported: mean runs, share converged within 90 runs (the paper's target: >= 90 %), share converged at all (max 150),
mean / median |mu - true skill|, rank error (place by mu among the 20 vs true place), CPU-seconds.

Part 2, real text arena (skipped with --skip-text): `--prompts` short instructions answered greedily by the default
model (SmolLM2-135M-Instruct); the arena's four "models" are those answers with 0 / 25 / 50 / 75 % of their words
shuffled (known quality order = the human ranking; leaderboard mu 30 / 27 / 24 / 21, sigma 0.5); the model under test
is the 35 % variant (true place 3 of 5, interpolated skill 25.8). Judges, both the default model itself:
- generate mode (the paper's): `TextRankJudge(HFLocalBackend)`, lenient parser, on `--generate-judge-runs` runs
  only: a 135M model rarely returns a permutation of the five labels; every failure is counted;
- score mode: `LikelihoodRankJudge`, the outputs ranked by the model's mean token log-prob (memoised across arms).
Arms (score-mode judge): K-Sort, no correction, static matching, and the peer a user would otherwise run: a static
judge over the whole benchmark + Bradley-Terry for the new model (its pairwise wins/losses implied by the static
arm's rankings, opponents fixed at the leaderboard, logistic scale beta), no extra judge calls.

    python benchmarks/ksort.py --quick                      # < 3 min on an idle box (5 seeds x 2 models, 12 prompts)
    python benchmarks/ksort.py --out ksort.json             # the documented size (50 seeds x 5 models, 60 prompts)
"""

import argparse
import json
import math
import os
import random
import statistics
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hf_fastslow.evaluation.ksort import Arena, ArenaInstance, KSortEvaluator  # noqa: E402
from hf_fastslow.evaluation.ksort_judges import (  # noqa: E402
    BiasedJudge,
    LikelihoodRankJudge,
    PlackettLuceJudge,
    SyntheticOutput,
    TextRankJudge,
)
from hf_fastslow.evaluation.ksort_rating import DEFAULT_BETA, Skill  # noqa: E402
from hf_fastslow.evaluation.timing import load_average  # noqa: E402

SYNTHETIC_ARMS = {  # name -> KSortEvaluator keyword arguments
    "k-sort": {},
    "no-correction": {"correction": False},
    "static-matching": {"matching": "static"},
    "paper-variance": {"variance_rule": "paper"},
}
TOPICS = [
    "a rainbow", "photosynthesis", "a volcano", "gravity", "a library", "the moon", "a bicycle", "rain", "a compass",
    "an orchestra", "a glacier", "electricity", "a bee", "a lighthouse", "friction", "a desert", "a vaccine",
    "a calendar", "an echo", "a bridge", "the heart", "a thermometer", "a river delta", "a telescope", "a recipe",
    "an island", "a magnet", "a map", "a seed", "a battery", "thunder", "a museum", "a spider web", "a clock",
    "a forest fire", "a microscope", "a passport", "an eclipse", "a coral reef", "a wind turbine", "a poem", "a tide",
    "a vitamin", "a password", "a dam", "a comet", "a kite", "an earthquake", "a lens", "a market", "a fossil",
    "a snowflake", "a compost heap", "a satellite", "an alphabet", "a cloud", "a hurricane", "a violin", "a harbor",
    "a pyramid",
]


def _true_place(skill, board):
    return 1 + sum(s.mu > skill for s in board.values())


def synthetic_part(args):
    rows = {}
    for judge_name in ("pl", "biased"):
        for arm in SYNTHETIC_ARMS:
            rows[f"{judge_name}/{arm}"] = {"runs": [], "err": [], "rank_err": [], "conv90": [], "conv": [], "cpu": 0.0}
    for seed in range(args.seeds):
        arena = Arena.synthetic(n_models=20, n_instances=500, k=4, seed=seed)
        skills = [random.Random(10_000 + seed * 100 + i).uniform(17, 33) for i in range(args.new_models)]
        for m, skill in enumerate(skills):
            for judge_name in ("pl", "biased"):
                for arm, kw in SYNTHETIC_ARMS.items():
                    judge_seed = seed * 1000 + m
                    judge = (PlackettLuceJudge(3.25, seed=judge_seed) if judge_name == "pl"
                             else BiasedJudge(3.25, lapse=0.3, seed=judge_seed))
                    cpu0 = time.process_time()
                    res = KSortEvaluator(arena, judge, seed=judge_seed, **kw).evaluate(
                        lambda p, s=skill: SyntheticOutput("new", s))
                    row = rows[f"{judge_name}/{arm}"]
                    row["cpu"] += time.process_time() - cpu0
                    row["runs"].append(res.runs)
                    row["err"].append(abs(res.mu - skill))
                    row["rank_err"].append(abs(_true_place(res.mu, arena.leaderboard)
                                               - _true_place(skill, arena.leaderboard)))
                    row["conv90"].append(res.converged and res.runs <= 90)
                    row["conv"].append(res.converged)
        print(f"  seed {seed + 1}/{args.seeds} done (load {load_average()})", flush=True)
    table = {}
    for name, r in rows.items():
        table[name] = {"evaluations": len(r["runs"]), "mean_runs": statistics.mean(r["runs"]),
                       "converged_within_90": statistics.mean(r["conv90"]), "converged": statistics.mean(r["conv"]),
                       "mean_abs_err": statistics.mean(r["err"]), "median_abs_err": statistics.median(r["err"]),
                       "mean_rank_err": statistics.mean(r["rank_err"]), "cpu_s": r["cpu"]}
    return table


def degrade(text, fraction, rng):
    """Shuffle `fraction` of the words among their own positions (0 -> unchanged)."""
    words = text.split()
    k = round(fraction * len(words))
    if k < 2:
        return text
    pos = sorted(rng.sample(range(len(words)), k))
    moved = [words[p] for p in pos]
    rng.shuffle(moved)
    for p, w in zip(pos, moved):
        words[p] = w
    return " ".join(words)


class CachedLikelihoodJudge(LikelihoodRankJudge):
    """The score-mode judge with its per-output scores memoised: arms that show the same outputs share the cost
    (the ranking of a shown order is a pure function of the outputs)."""

    def __init__(self, backend):
        super().__init__(backend)
        self.memo = {}

    def reply(self, prompt, outputs):
        key = (prompt, tuple(outputs))
        if key not in self.memo:
            self.memo[key] = super().reply(prompt, outputs)
        return self.memo[key]


def bradley_terry_new(wins, opponents_mu, scale):
    """MLE of the new model's strength s with P(new beats k) = sigmoid((s - mu_k) / scale), opponents fixed, on a
    0.1 grid over [0, 50] (all wins / all losses have no finite MLE and land on the grid's ends)."""
    def loglik(s):
        return sum(w * math.log(1 / (1 + math.exp(-(s - mu) / scale))) +
                   (1 - w) * math.log(1 / (1 + math.exp((s - mu) / scale))) for w, mu in zip(wins, opponents_mu))
    grid = [x / 10 for x in range(0, 501)]
    return max(grid, key=loglik)


def text_part(args):
    import torch

    from hf_fastslow import load_default_model
    from hf_fastslow.backends import HFLocalBackend

    torch.set_num_threads(args.threads)
    model, tok = load_default_model()
    answerer = HFLocalBackend(model, tok, max_new_tokens=args.answer_tokens, do_sample=False)
    prompts = [f"In one or two sentences, explain what {t} is." for t in TOPICS[: args.prompts]]
    cpu0, wall0 = time.process_time(), time.perf_counter()
    answers = [c[0].text.strip() for c in answerer.chat_batch([[{"role": "user", "content": p}] for p in prompts])]
    answer_cost = {"wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0}
    fractions = {"shuffle-0%": 0.0, "shuffle-25%": 0.25, "shuffle-50%": 0.5, "shuffle-75%": 0.75}
    board = {name: Skill(30.0 - 3.0 * i, 0.5) for i, name in enumerate(fractions)}
    instances = []
    for i, (p, a) in enumerate(zip(prompts, answers)):
        rng = random.Random(i)
        outs = tuple(degrade(a, f, rng) for f in fractions.values())
        instances.append(ArenaInstance(f"t{i:02d}", p, outs, tuple(fractions), (0.0, 1.0, 2.0, 3.0)))
    arena = Arena(instances, board, modality="text")
    new_outputs = {p: degrade(a, 0.35, random.Random(1000 + i)) for i, (p, a) in enumerate(zip(prompts, answers))}
    true_skill = 27.0 - 3.0 * (0.35 - 0.25) / 0.25  # 25.8, between the 25 % and 50 % models
    judge_backend = HFLocalBackend(model, tok, max_new_tokens=30, do_sample=False)
    out = {"answers_cost": answer_cost, "true_skill": true_skill, "true_place": 3, "prompts": len(prompts)}
    # The generate-mode judge (the paper's: "rank these, reply 'Answer 3, Answer 1, ...'") on a few runs: a 135M
    # model rarely returns a permutation, and every failure is counted. Then the score-mode judge on every arm.
    gen_judge = TextRankJudge(judge_backend, strict=False, max_new_tokens=30)
    lik_judge = CachedLikelihoodJudge(judge_backend)
    arms = {"generate-judge/k-sort": (gen_judge, {"max_runs": args.generate_judge_runs}),
            "likelihood-judge/k-sort": (lik_judge, {}), "likelihood-judge/no-correction": (lik_judge,
                                                                                         {"correction": False}),
            "likelihood-judge/static-matching": (lik_judge, {"matching": "static"})}
    static_steps = None
    for arm, (judge, kw) in arms.items():
        mark = judge_backend.ledger.mark()
        cpu0, wall0 = time.process_time(), time.perf_counter()
        kw = {"max_runs": len(arena), **kw}
        res = KSortEvaluator(arena, judge, seed=0, **kw).evaluate(lambda p: new_outputs[p])
        usage = judge_backend.ledger.since(mark)
        lams = [s.lam for s in res.steps if s.lam is not None]
        rhos = [s.rho for s in res.steps if s.rho is not None]
        out[arm] = {"mu": res.mu, "sigma": res.sigma, "score": res.score, "place_by_mu": _true_place(res.mu, board),
                    "runs": res.runs, "converged": res.converged, "judge_calls": usage.calls,
                    "judge_failures": res.judge_failures, "skipped_runs": res.skipped_runs,
                    "mean_lambda": statistics.mean(lams) if lams else None,
                    "mean_rho": statistics.mean(rhos) if rhos else None,
                    "abs_err": abs(res.mu - true_skill), "wall_s": time.perf_counter() - wall0,
                    "cpu_s": time.process_time() - cpu0,
                    "failed_replies_sample": [r for s in res.steps for r in s.judge_replies][:3]}
        if arm == "likelihood-judge/static-matching":
            static_steps = res.steps
        print(f"  text arm {arm}: {out[arm]}", flush=True)
    wins, opp_mu = [], []
    by_id = {inst.id: inst for inst in instances}
    for step in static_steps:
        if step.ranks is None:
            continue
        for k, name in enumerate(by_id[step.instance].models):
            wins.append(1.0 if step.ranks[-1] < step.ranks[k] else 0.0)
            opp_mu.append(board[name].mu)
    s_bt = bradley_terry_new(wins, opp_mu, DEFAULT_BETA) if wins else None
    out["static-judge+bradley-terry"] = {
        "mu": s_bt, "place_by_mu": _true_place(s_bt, board) if s_bt is not None else None,
        "pairwise_judgments": len(wins), "win_rate": statistics.mean(wins) if wins else None,
        "abs_err": abs(s_bt - true_skill) if s_bt is not None else None,
        "judge_calls": "shared with static-matching"}
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--new-models", type=int, default=5)
    ap.add_argument("--prompts", type=int, default=60)
    ap.add_argument("--answer-tokens", type=int, default=48)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--generate-judge-runs", type=int, default=6, help="runs of the generate-mode LLM judge")
    ap.add_argument("--skip-text", action="store_true")
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--quick", action="store_true", help="5 seeds x 2 models, 12 prompts")
    ap.add_argument("--out", default="ksort_bench.json")
    args = ap.parse_args()
    if args.quick:
        args.seeds, args.new_models, args.prompts = 5, 2, 12
    report = {"args": vars(args), "load_before": load_average()}
    wall0, cpu0 = time.perf_counter(), time.process_time()
    if not args.skip_synthetic:
        table = synthetic_part(args)
        report["synthetic"] = table
        print(f"\nSynthetic arenas: 20 models, K=4, {args.seeds} seeds x {args.new_models} models under test; judge "
              "noise Gumbel scale 3.25 (std 4.17 = beta); biased = 30 % reversed rankings")
        print("| judge / arm | evaluations | mean runs | converged <= 90 runs | converged <= 150 | mean abs(mu - true) "
              "| median | mean rank error | CPU s |")
        print("|---|---|---|---|---|---|---|---|---|")
        for name, r in table.items():
            print(f"| {name} | {r['evaluations']} | {r['mean_runs']:.1f} | {100 * r['converged_within_90']:.0f} % | "
                  f"{100 * r['converged']:.0f} % | {r['mean_abs_err']:.3f} | {r['median_abs_err']:.3f} | "
                  f"{r['mean_rank_err']:.2f} | {r['cpu_s']:.1f} |")
    if not args.skip_text:
        text = text_part(args)
        report["text"] = text
        print(f"\nText arena: {text['prompts']} prompts, default model answers shuffled 0/25/50/75 %; new model = 35 % "
              f"(true skill {text['true_skill']:.1f}, place 3 of 5); judges = the default model (generate mode, "
              "lenient parser; score mode = mean token log-prob)")
        print("| judge / arm | mu | place | runs | converged | judge calls | failures | mean rho | mean lambda "
              "| abs(mu - true) | CPU s |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for arm in ("generate-judge/k-sort", "likelihood-judge/k-sort", "likelihood-judge/no-correction",
                    "likelihood-judge/static-matching"):
            r = text[arm]
            lam = "-" if r["mean_lambda"] is None else f"{r['mean_lambda']:.2f}"
            rho = "-" if r["mean_rho"] is None else f"{r['mean_rho']:.2f}"
            print(f"| {arm} | {r['mu']:.2f} | {r['place_by_mu']} | {r['runs']} | {r['converged']} | "
                  f"{r['judge_calls']} | {r['judge_failures']} | {rho} | {lam} | {r['abs_err']:.2f} | "
                  f"{r['cpu_s']:.0f} |")
        bt = text["static-judge+bradley-terry"]
        if bt["mu"] is not None:
            print(f"| static judge + Bradley-Terry (peer) | {bt['mu']:.2f} | {bt['place_by_mu']} | "
                  f"{bt['pairwise_judgments']} pairs | - | shared | - | - | - | {bt['abs_err']:.2f} | - |")
    report["wall_s"], report["cpu_s"], report["load_after"] = (time.perf_counter() - wall0,
                                                               time.process_time() - cpu0, load_average())
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"\nwall {report['wall_s']:.0f} s, process CPU {report['cpu_s']:.0f} s, load {report['load_after']}; "
          f"report: {args.out}")


if __name__ == "__main__":
    main()
