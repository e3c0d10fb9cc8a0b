"""MAST failure annotation: a trace with a planted failure, judged by the default model in score and generate mode
and by the deterministic heuristics; then a trace of one of the package's own agent runs (CATTS on the running-total
environment, scripted sampler) through the same annotators.
"""

import random
import re

import torch

from hf_fastslow import load_default_model
from hf_fastslow.backends.hf_local import HFLocalBackend
from hf_fastslow.backends.testing import ScriptedBackend
from hf_fastslow.evaluation.mast import MASTAnnotator, mast_agreement
from hf_fastslow.evaluation.mast_fixtures import fixture_traces
from hf_fastslow.evaluation.mast_heuristics import HeuristicAnnotator
from hf_fastslow.evaluation.mast_taxonomy import mode
from hf_fastslow.evaluation.mast_traces import trace_from_catts
from hf_fastslow.generation.catts import MajorityVotePolicy
from hf_fastslow.generation.catts_env import RunningTotalEnv, run_episode


def main():
    torch.set_num_threads(2)
    model, tok = load_default_model()
    judge = HFLocalBackend(model, tok)
    score, generate = MASTAnnotator(judge, "score"), MASTAnnotator(judge, "generate", max_new_tokens=120)
    heuristics = HeuristicAnnotator()

    traces = {t.trace_id: t for t in fixture_traces()}
    trace = traces["fm-1.3"]
    print(f"Trace with a planted failure ({mode('1.3').label}):\n{trace.render()}\n")
    ann = score.annotate(trace)
    top = sorted(ann.p_yes.items(), key=lambda kv: -kv[1])[:3]
    print("score mode, highest P(yes):", ", ".join(f"{c} {p:.2f}" for c, p in top),
          f"| prefix tokens prefilled once: {score.prefill_tokens['prefix_tokens']}")
    gen = generate.annotate(trace)
    print("generate mode:", gen.failed_modes if gen.parse_error is None else f"unparsed ({gen.parse_error[:80]}...)",
          f"| garbage answers so far: {generate.garbage}")
    print("heuristics:", heuristics.annotate(trace).failed_modes)

    subset = [traces[k] for k in ("fm-1.3", "fm-1.5", "fm-3.2", "clean-01", "clean-02")]
    for name, annotator in (("score", score), ("heuristics", heuristics)):
        r = mast_agreement(annotator.annotate_many(subset), subset)
        print(f"{name:>10} on {len(subset)} fixtures: pooled kappa {r['pooled_kappa']:.2f}, "
              f"micro F1 {r['micro_f1']:.2f}, unparsed {r['unparsed']}")

    def adder(messages, i, kw):  # a sampler that is right about half the time
        a, b = map(int, re.search(r"What is (\d+) \+ (\d+)", messages[-1]["content"]).groups())
        return f"{a} + {b} = {a + b + random.Random(kw['seed']).choice([0, 1, -1])}"

    env = RunningTotalEnv(n_steps=3)
    first = env.reset(0)
    result = run_episode(MajorityVotePolicy(ScriptedBackend(adder), env.parse_action, n_samples=3), env)
    run_trace = trace_from_catts(result, first, max_steps=env.max_steps)
    print(f"\nCATTS episode (success {result.success}) as a trace:\n{run_trace.render()}")
    print("score mode flags:", score.annotate(run_trace).failed_modes)
    print("heuristics flag:", heuristics.annotate(run_trace).failed_modes)


if __name__ == "__main__":
    main()
