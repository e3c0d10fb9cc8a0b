"""K-Sort Eval: rate a new model against a human-voted arena with a corrected judge, in a few dozen runs.

    python examples/ksort.py            # synthetic arena + simulated judges (seconds)
    python examples/ksort.py --llm      # also a small text arena judged by the default model (a few minutes)

Part 1: a synthetic arena (20 models with known skills, K = 4, human rankings simulated) and a model under test of
true skill 27. A good judge (Plackett-Luce noise) and a biased one (30 % of its rankings reversed) rank the K+1
outputs each run; the biased judge is shown with and without posterior correction. Part 2 (`--llm`): the same loop
on text, the arena's "models" being the default model's answers with more and more words shuffled, judged by the
default model itself through the backend layer (the judge's parse failures are counted in the result).
"""

import argparse
import random

from hf_fastslow.evaluation.ksort import Arena, ArenaInstance, KSortEvaluator
from hf_fastslow.evaluation.ksort_judges import BiasedJudge, PlackettLuceJudge, SyntheticOutput, TextRankJudge
from hf_fastslow.evaluation.ksort_rating import Skill


def synthetic() -> None:
    arena = Arena.synthetic(n_models=20, n_instances=500, k=4, seed=0)
    true_skill = 27.0
    place = 1 + sum(s.mu > true_skill for s in arena.leaderboard.values())
    print(f"arena: {len(arena)} instances, {len(arena.leaderboard)} models; model under test: skill {true_skill} "
          f"(true place {place} of 21)")
    for label, judge, correction in (("good judge", PlackettLuceJudge(seed=1), True),
                                     ("biased judge, corrected", BiasedJudge(seed=1), True),
                                     ("biased judge, uncorrected", BiasedJudge(seed=1), False)):
        ev = KSortEvaluator(arena, judge, correction=correction, seed=1)
        res = ev.evaluate(lambda prompt: SyntheticOutput("new", true_skill))
        lams = [s.lam for s in res.steps if s.lam is not None]
        mean_lam = f"{sum(lams) / len(lams):.2f}" if lams else "-"
        place = 1 + sum(s.mu > res.mu for s in arena.leaderboard.values())
        print(f"{label}: mu {res.mu:.2f} +- {res.sigma:.2f} after {res.runs} runs "
              f"({'converged' if res.converged else 'not converged'}), |mu - true| {abs(res.mu - true_skill):.2f}, "
              f"place {place}, mean lambda {mean_lam}")


def text_arena(n_prompts: int = 8) -> None:
    from hf_fastslow import load_default_model
    from hf_fastslow.backends import HFLocalBackend

    model, tok = load_default_model()
    backend = HFLocalBackend(model, tok, max_new_tokens=40, do_sample=False)
    topics = ["a rainbow", "gravity", "a volcano", "the moon", "a compass", "a glacier", "a bee", "an echo"]
    prompts = [f"In one or two sentences, explain what {t} is." for t in topics[:n_prompts]]
    answers = [c[0].text.strip() for c in backend.chat_batch([[{"role": "user", "content": p}] for p in prompts])]

    def shuffled(text: str, fraction: float, seed: int) -> str:
        words, rng = text.split(), random.Random(seed)
        pos = sorted(rng.sample(range(len(words)), round(fraction * len(words))))
        moved = [words[p] for p in pos]
        rng.shuffle(moved)
        for p, w in zip(pos, moved):
            words[p] = w
        return " ".join(words)

    names = ("intact", "25% shuffled", "50% shuffled", "75% shuffled")
    board = {n: Skill(30.0 - 3 * i, 0.5) for i, n in enumerate(names)}
    arena = Arena([ArenaInstance(f"q{i}", p, tuple(shuffled(a, f, i) for f in (0, 0.25, 0.5, 0.75)), names,
                                 (0, 1, 2, 3)) for i, (p, a) in enumerate(zip(prompts, answers))], board)
    new = {p: shuffled(a, 0.35, 100 + i) for i, (p, a) in enumerate(zip(prompts, answers))}
    judge = TextRankJudge(backend, strict=False)
    res = KSortEvaluator(arena, judge, max_runs=len(arena)).evaluate(lambda p: new[p])
    print(f"text arena judged by the default model: mu {res.mu:.2f} +- {res.sigma:.2f} after {res.runs} runs, "
          f"judge failures {res.judge_failures}, skipped runs {res.skipped_runs} (true skill ~25.8)")


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--llm", action="store_true", help="also run a small text arena judged by the default model")
    args = ap.parse_args()
    synthetic()
    if args.llm:
        text_arena()
