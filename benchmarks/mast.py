"""MAST annotation on the package's fixture traces and on traces of its own agent runs: generate vs score mode with the
default model (SmolLM2-135M-Instruct) as judge, the deterministic heuristics, and agentdash (the MAST authors'
annotator) on the same judge model through `transformers serve` (a `LocalServer`), all on the same traces.

Arms, interleaved per trace (a loaded box slows all alike):
- score: `MASTAnnotator(HFLocalBackend, "score")`, P(yes) per mode from the label logits over a cached shared prefix;
- generate: `MASTAnnotator(HFLocalBackend, "generate")`, greedy, the reference answer format, parsed (garbage counted);
- heuristics: `HeuristicAnnotator` (repetition, turn limit, restart, no-question-asked, no final answer, no check);
- agentdash: `agentdash.annotator` with its OpenAI client on the LocalServer (its prompt, temperature 1.0 and parser
  unchanged; answers capped at --agentdash-max-tokens new tokens, agentdash itself sends no cap).
Also: the prefix-cache speed-up of score mode (cached prefix + batched questions vs one full forward per question,
interleaved on the same traces).

Traces: the 24 hand-written fixtures (one planted failure per mode + 10 clean, gold labels by hand) and traces from
the package's agent loops (Squeeze Evolve, CATTS, MixtureOfAgents, the ReAct agent) run on the default model
(`--agent-runs model`) or on scripted models (`--agent-runs scripted`, the quick mode); these have no gold failure
labels, so the report gives each arm's failure rates and the pairwise kappa between arms there.

    python benchmarks/mast.py --quick          # 4 fixtures, scripted agent runs, 64-token answers, 1 timed trace
    python benchmarks/mast.py                  # all 24 fixtures, agent runs on the default model
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import re
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from hf_fastslow import load_default_model  # noqa: E402
from hf_fastslow.backends.hf_local import HFLocalBackend  # noqa: E402
from hf_fastslow.backends.testing import ScriptedBackend  # noqa: E402
from hf_fastslow.evaluation.mast import MASTAnnotator, _score_conversations, label_probabilities  # noqa: E402
from hf_fastslow.evaluation.mast_fixtures import fixture_traces  # noqa: E402
from hf_fastslow.evaluation.mast_heuristics import HeuristicAnnotator  # noqa: E402
from hf_fastslow.evaluation.mast_report import evaluate_annotators, plot_report  # noqa: E402
from hf_fastslow.evaluation.mast_taxonomy import MAST_CODES  # noqa: E402
from hf_fastslow.evaluation.mast_traces import (  # noqa: E402
    trace_from_agent,
    trace_from_catts,
    trace_from_evolve,
    trace_from_staircase,
)


# ----------------------------------------------------------------------------------------------------------------------
# The package's agent runs -> traces
# ----------------------------------------------------------------------------------------------------------------------
def agent_traces(kind: str, model=None, tok=None, max_new_tokens: int = 48):
    from hf_fastslow.generation.agent_grammar import grammar_prompt
    from hf_fastslow.generation.agent_tasks import TASK_EXAMPLE, make_fact_tasks, teacher_policy
    from hf_fastslow.generation.agent_tools import run_virtual
    from hf_fastslow.generation.catts import CATTSConfig, MajorityVotePolicy
    from hf_fastslow.generation.catts_env import RunningTotalEnv, run_episode
    from hf_fastslow.generation.speculative_agent import SequentialReActAgent, SpeculativeAgent, feed_words
    from hf_fastslow.generation.squeeze_evolve import SqueezeEvolve
    from hf_fastslow.generation.squeeze_evolve_config import SqueezeEvolveConfig, Tier
    from hf_fastslow.generation.staircase import MixtureOfAgents

    scripted = kind == "scripted"

    def local(**kw):
        return HFLocalBackend(model, tok, max_new_tokens=max_new_tokens, **kw)

    def adder(messages, i, kw):
        a, b = map(int, re.search(r"What is (\d+) \+ (\d+)", messages[-1]["content"]).groups())
        return f"{a} + {b} = {a + b + random.Random(kw.get('seed')).choice([0, 0, 1, -1])}"

    traces = []
    # Squeeze Evolve: one tier (the judge model) seeding 4 answers and recombining pairs for one loop
    problem = "What is 38 + 47? Put the final answer in \\boxed{}."
    sampler = (ScriptedBackend(lambda m, i, k: f"The answer is \\boxed{{{85 + (k.get('seed') or 0) % 3}}}")
               if scripted else local(temperature=0.8))
    cfg = SqueezeEvolveConfig(population=4, group_size=2, loops=1, fitness="diversity", percentiles=(),
                              max_new_tokens=max_new_tokens)
    res = SqueezeEvolve([Tier(sampler, "model", 1.0, 1.0)], cfg).run(problem)
    traces.append(trace_from_evolve(res, problem, gold_answer=85))
    # CATTS: two episodes of the running-total environment, majority vote over 3 samples
    env = RunningTotalEnv(n_steps=3)
    policy = MajorityVotePolicy(ScriptedBackend(adder) if scripted else local(),
                                env.parse_action, config=CATTSConfig(n_samples=3, temperature=0.8,
                                                                     max_new_tokens=max_new_tokens))
    for episode in range(2):
        first = env.reset(episode)
        result = run_episode(policy, env, episode=episode, seed=0)
        traces.append(trace_from_catts(result, first, max_steps=env.max_steps))
    # Mixture of agents: two proposers with different personas, one aggregator
    question = [{"role": "user", "content": "A shop sells pens at 3 dollars each. How much do 7 pens cost?"}]
    if scripted:
        props = [ScriptedBackend("7 pens at 3 dollars: 7 * 3 = 21 dollars.", name="p0"),
                 ScriptedBackend("Each pen is 3, so 7 pens are 24 dollars.", name="p1")]
        agg = ScriptedBackend("The proposals disagree; 7 * 3 = 21, so the answer is 21 dollars.", name="agg")
    else:
        props = [local(system="You are a careful accountant.", temperature=0.7),
                 local(system="You are a quick mental calculator.", temperature=0.7)]
        agg = local(temperature=0.0)
    moa = MixtureOfAgents(props, agg)
    "".join(moa.stream(question))
    traces.append(trace_from_staircase(moa.last_metrics, question, gold_answer=21))
    # The tool-using agents on the multi-hop fact task (the teacher policy when scripted, the raw model otherwise)
    task = make_fact_tasks(1, seed=4, lookup_latency_s=0.2, send_latency_s=0.1)[0]
    for cls in (SpeculativeAgent, SequentialReActAgent):
        tools = task.tools()
        backend = ScriptedBackend(teacher_policy(task)) if scripted else local(temperature=0.0)
        agent = cls(backend, tools, system_prompt=grammar_prompt([t.prompt_line() for t in tools], TASK_EXAMPLE),
                    max_turns=4, max_new_tokens=max_new_tokens)
        result = run_virtual(agent.run(feed_words(task.request, 8.0)))
        traces.append(trace_from_agent(result, task=task.request, gold_answer=None, source=f"agent/{cls.__name__}",
                                       max_turns=agent.max_turns))
    return traces


# ----------------------------------------------------------------------------------------------------------------------
def cache_speedup(model, tok, traces):
    """Score mode's 15 questions per trace: cached prefix + one batch vs one full forward per question."""
    rows = {"cached": [0.0, 0.0, 0], "full": [0.0, 0.0, 0]}  # seconds, CPU seconds, prefilled tokens
    for trace in traces:
        convs = list(_score_conversations(trace.render()).values())
        for path in ("cached", "full"):
            t0, c0 = time.perf_counter(), time.process_time()
            _, counters = label_probabilities(model, tok, convs, path=path)
            rows[path][0] += time.perf_counter() - t0
            rows[path][1] += time.process_time() - c0
            rows[path][2] += counters["prefilled_tokens"]
    return {k: {"seconds": v[0], "cpu_seconds": v[1], "prefilled_tokens": v[2]} for k, v in rows.items()}


def print_tables(report, title):
    arms = report["annotators"]
    print(f"\n### {title}\n")
    gold = {n: a["agreement"] for n, a in arms.items() if a.get("agreement")}
    if gold:
        print("| mode | " + " | ".join(f"{n} F1" for n in gold) + " |")
        print("|---|" + "---|" * len(gold))
        for c in MAST_CODES:
            print(f"| {c} | " + " | ".join(f"{g['per_label'][c]['f1']:.2f}" for g in gold.values()) + " |")
        print()
    print("| arm | macro F1 | pooled kappa | task-completed kappa | flagged per trace | unparsed answers | errors "
          "| s / trace | CPU-s / trace |")
    print("|---|---|---|---|---|---|---|---|---|")
    for name, a in arms.items():
        g = a.get("agreement")
        anns = [x for x in a["annotations"] if x is not None]
        flagged = sum(sum(bool(v) for v in x["modes"].values()) for x in anns) / max(1, len(anns))
        cells = (f"{g['macro_f1']:.3f} | {g['pooled_kappa']:.3f} | "
                 + (f"{g['task_completed_kappa']:.3f}" if g["task_completed_kappa"] is not None else "-")
                 if g else "- | - | -")
        print(f"| {name} | {cells} | {flagged:.2f} | {a['unparsed']} / {len(a['annotations'])} | "
              f"{a['failed_traces']} | {a['seconds_per_trace']:.2f} | {a['cpu_seconds_per_trace']:.2f} |")
    for pair, v in report["pairwise"].items():
        print(f"pairwise pooled kappa, {pair}: {v['pooled_kappa']:.3f} over {v['traces']} traces")
    for name, a in arms.items():
        for err in a["errors"][:2]:
            print(f"{name} error: {err}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true",
                    help="4 fixtures, scripted agent runs, 64-token answers, 1 timed trace")
    ap.add_argument("--limit", type=int, default=None, help="fixture traces (default 24, quick 4)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="generate-mode answer (default 200, quick 64)")
    ap.add_argument("--agentdash-max-tokens", type=int, default=None, help="cap on agentdash's answers (same default)")
    ap.add_argument("--agent-runs", choices=("model", "scripted", "none"), default=None)
    ap.add_argument("--no-agentdash", action="store_true")
    ap.add_argument("--speedup-traces", type=int, default=None,
                    help="traces timed for the score-mode cache figure (default 3, quick 1)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default="mast_benchmark.json")
    ap.add_argument("--plot", default=None, help="the PNG (default: beside the JSON report)")
    args = ap.parse_args(argv)
    limit = args.limit or (4 if args.quick else 24)
    max_new = args.max_new_tokens or (64 if args.quick else 200)
    runs = args.agent_runs or ("scripted" if args.quick else "model")
    if args.speedup_traces is None:
        args.speedup_traces = 1 if args.quick else 3
    elif args.speedup_traces < 1:
        ap.error("--speedup-traces must be at least 1 (the cache figure times that many fixture traces)")
    torch.set_num_threads(args.threads)
    logging.getLogger("agentdash").setLevel(logging.ERROR)  # it logs one warning per code it cannot find
    t_start, c_start = time.perf_counter(), time.process_time()

    model, tok = load_default_model()
    judge = HFLocalBackend(model, tok)
    fixtures = fixture_traces()
    if limit < len(fixtures):  # keep planted and clean traces in the subset
        planted = [t for t in fixtures if t.meta["planted"]]
        clean = [t for t in fixtures if not t.meta["planted"]]
        fixtures = planted[: (limit + 1) // 2] + clean[: limit // 2]
    print(f"{len(fixtures)} fixture traces; building agent-run traces ({runs}) ...", flush=True)
    agents = agent_traces(runs, model, tok) if runs != "none" else []

    annotators = {"score": MASTAnnotator(judge, "score"),
                  "generate": MASTAnnotator(judge, "generate", max_new_tokens=max_new),
                  "heuristics": HeuristicAnnotator()}
    server = None
    agentdash_setup = None
    if not args.no_agentdash:
        try:
            from hf_fastslow.backends.serve import LocalServer
            from hf_fastslow.default_model import default_model_path
            from hf_fastslow.evaluation.mast_agentdash import AgentDashAnnotator

            server = LocalServer(default_model_path(), threads=args.threads).start()
            annotators["agentdash"] = AgentDashAnnotator(server.base_url, server.model,
                                                         max_tokens=args.agentdash_max_tokens or max_new)
        except Exception as err:  # noqa: BLE001 - the report shows the exact failure
            agentdash_setup = f"{type(err).__name__}: {err}"
            print(f"agentdash arm not run: {agentdash_setup}")
    try:
        progress = lambda i, n: print(f"\r  {i}/{n} traces", end="", flush=True)  # noqa: E731
        rep_fix = evaluate_annotators(annotators, fixtures, progress=progress)
        print()
        Path(args.out).with_suffix(".partial.json").write_text(json.dumps(rep_fix, default=str))
        rep_agents = evaluate_annotators(annotators, agents, progress=progress) if agents else None
        print()
    finally:
        if server is not None:
            server.stop()
    speed = cache_speedup(model, tok, fixtures[: args.speedup_traces])

    print_tables(rep_fix, f"Fixture traces ({len(fixtures)}, gold by hand), judge SmolLM2-135M-Instruct")
    if rep_agents:
        print_tables(rep_agents, f"Agent-run traces ({len(agents)}, {runs} models; no gold failure labels)")
        for name, a in rep_agents["annotators"].items():
            rates = {c: sum(bool(x["modes"].get(c)) for x in a["annotations"] if x) for c in MAST_CODES}
            print(f"{name} flags on agent traces: " + ", ".join(f"{c}:{n}" for c, n in rates.items() if n))
    c, f = speed["cached"], speed["full"]
    print(f"\nscore mode on {args.speedup_traces} traces: cached prefix {c['seconds']:.2f} s "
          f"({c['cpu_seconds']:.2f} CPU-s, {c['prefilled_tokens']} tokens prefilled) vs one full forward per question "
          f"{f['seconds']:.2f} s ({f['cpu_seconds']:.2f} CPU-s, {f['prefilled_tokens']} tokens): "
          f"{f['seconds'] / max(c['seconds'], 1e-9):.1f}x faster")
    total = {"seconds": time.perf_counter() - t_start, "cpu_seconds": time.process_time() - c_start}
    print(f"benchmark total: {total['seconds']:.0f} s wall, {total['cpu_seconds']:.0f} CPU-s of this process "
          f"(the server's CPU is not included); load average {os.getloadavg()[0]:.1f}")
    out = Path(args.out)
    out.write_text(json.dumps({"args": vars(args), "fixtures": rep_fix, "agent_runs": rep_agents,
                               "agentdash_setup_error": agentdash_setup, "score_cache_speedup": speed,
                               "total": total}, indent=1, default=str))
    png = plot_report(rep_fix, args.plot or str(out.with_suffix(".png")),
                      title="MAST on the fixture traces: per-mode F1, SmolLM2-135M-Instruct as judge")
    print(f"report: {out}" + (f", plot: {png}" if png else ""))


if __name__ == "__main__":
    main()
