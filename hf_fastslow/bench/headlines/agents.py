"""Headline extractors for the agents benchmarks (see hf_fastslow/bench/headlines/__init__.py): Squeeze Evolve, CATTS,
staircase streaming, speculative interaction agents, the multi-process trainers and the replica router's failover.

Each reads its script's JSON by key (a renamed arm fails with a KeyError) and works on the quick and the full profile
alike: the profiles differ in sizes, not in the report's shape. Arms that a flag leaves out (an arm family, a setting)
are skipped only where the report's own arguments say they were not asked for.
"""

from __future__ import annotations

import statistics

from hf_fastslow.bench.headlines import index_rows
from hf_fastslow.bench.registry import Figure


def _share(count: float, total: float) -> float | None:
    return count / total if total else None


# ----------------------------------------------------------------------------------------------------------------------
# Squeeze Evolve (benchmarks/squeeze_evolve.py --out)
# ----------------------------------------------------------------------------------------------------------------------
def _squeeze_evolve(report: dict) -> list[Figure]:
    args, arms = report["args"], report["summary"]
    rsa, vote = arms["rsa"], arms["majority_vote"]
    size = (f"{rsa['problems']} two-digit sums, N={args['population']} K={args['group_size']} M={args['groups']} "
            f"T={args['loops']}, expensive tier {args['expensive']}")
    peer = f"peer: RSA (expensive tier only, same N/K/M/T); {size}"
    ours = arms["squeeze_evolve"]
    figures = [
        Figure("accuracy (share of problems right), higher is better", ours["accuracy"], rsa["accuracy"],
               note=f"{peer}; majority vote over as many samples: {vote['correct']}/{vote['problems']}",
               paper="equal or better than RSA"),
        Figure("cost per problem ($, stated token prices), lower is better", ours["cost_total_per_problem"],
               rsa["cost_total_per_problem"], note=peer, paper="RSA's cost / 1.3-3.3"),
    ]
    if args["lite_fraction"] > 0:  # the lite arm exists exactly when asked for
        lite = arms["squeeze_evolve_lite"]
        note = f"lite route ({args['lite_fraction']:g} of cheap groups settled by a vote); {peer}"
        figures += [Figure("accuracy, Squeeze Evolve lite vs RSA, higher is better", lite["accuracy"], rsa["accuracy"],
                           note=note),
                    Figure("cost per problem ($), Squeeze Evolve lite vs RSA, lower is better",
                           lite["cost_total_per_problem"], rsa["cost_total_per_problem"], note=note)]
    return figures


# ----------------------------------------------------------------------------------------------------------------------
# CATTS (benchmarks/catts.py --out)
# ----------------------------------------------------------------------------------------------------------------------
def catts_headline_arm(args: dict) -> str:
    """The CATTS arm the table shows, fixed before the run (never picked on its results): the entropy signal (the
    paper's first) at tau 0.4 (the script's quick setting), else the middle tau / the first signal that was run."""
    signal = "entropy" if "entropy" in args["signals"] else args["signals"][0]
    taus = sorted(args["taus"])
    tau = 0.4 if 0.4 in taus else taus[len(taus) // 2]
    return f"catts-{signal}-{tau:g}"


def _catts(report: dict) -> list[Figure]:
    args, arms = report["args"], report["arms"]
    name = catts_headline_arm(args)
    ours, always, majority = arms[name], arms["always"], arms["majority"]
    size = (f"{len(args['seeds'])} seed(s) x {args['episodes']} episodes x {args['steps']} steps, N={args['n']}, "
            f"{args['arbiter']} arbiter, SmolLM2-135M")
    label = name.replace("catts-", "CATTS ").replace("-", ", tau ")
    return [
        Figure("episode success (seed mean), higher is better", ours["success_mean"], always["success_mean"],
               note=f"{label} vs always-arbitrate; {size}", paper="47.9 % vs 44.0 % (WebArena-Lite, N=10, best tau)"),
        Figure("share of steps sent to the arbiter, lower is cheaper", ours["arbitrated_fraction"],
               always["arbitrated_fraction"], note=f"{label} vs always-arbitrate; {size}",
               paper="the gate fires on ~40-60 % of steps"),
        Figure("episode success (seed mean), higher is better", ours["success_mean"], majority["success_mean"],
               note=f"{label} vs majority vote; {size}", paper="47.9 % vs 43.2 % (WebArena-Lite, N=10, best tau)"),
        Figure("tokens per episode (sampler + arbiter), lower is better", ours["tokens_per_episode"],
               majority["tokens_per_episode"], note=f"{label} vs majority vote; {size}",
               paper="745K vs 920K (WebArena-Lite, entropy)"),
    ]


# ----------------------------------------------------------------------------------------------------------------------
# Staircase streaming (benchmarks/staircase.py --out)
# ----------------------------------------------------------------------------------------------------------------------
def _staircase(report: dict) -> list[Figure]:
    args = report["args"]
    arm = f"staircase c={min(args['chunks'])}"
    size = (f"{args['additions']} additions + {args['instructions']} instructions, proposals <= "
            f"{args['proposal_tokens']} tokens, answers <= {args['answer_tokens']}, c={min(args['chunks'])}")
    figures, right, asked = [], {arm: 0, "moa": 0}, 0
    for setting in args["settings"]:  # each setting asked for has its summary
        summary = report["settings"][setting]["summary"]
        ours, moa = summary[arm], summary["moa"]
        where = "in process" if setting == "in-process" else "over transformers serve (continuous batching)"
        figures.append(Figure(f"time to first token, median s, {where}, lower is better", ours["ttft_median_s"],
                              moa["ttft_median_s"], note=f"peer: Mixture-of-Agents; {size}",
                              paper="up to 93 % lower (0.07x MoA)"))
        right[arm] += ours["addition_correct"]
        right["moa"] += moa["addition_correct"]
        asked += moa["additions"]
    if "replay" in report:
        replay = report["replay"]
        figures.append(Figure("time to first token, median s, replay estimate of separate engines, lower is better",
                              statistics.median(replay[arm]["ttft_s"]), statistics.median(replay["moa"]["ttft_s"]),
                              measured=False, note="a model recomposed from timings measured alone, not a "
                              f"measurement; peer: Mixture-of-Agents; {size}", paper="up to 93 % lower (0.07x MoA)"))
    figures.append(Figure("additions answered right (share), higher is better", _share(right[arm], asked),
                          _share(right["moa"], asked), note=f"peer: Mixture-of-Agents; {asked} addition runs over "
                          f"the settings run ({', '.join(args['settings'])})", paper="quality maintained"))
    return figures


# ----------------------------------------------------------------------------------------------------------------------
# Speculative interaction agents (benchmarks/speculative_agent.py --out)
# ----------------------------------------------------------------------------------------------------------------------
def _speculative_agent(report: dict) -> list[Figure]:
    args, teacher = report["args"], report["teacher"]
    virtual = (f"scripted teacher on a virtual clock, {args['teacher_episodes']} episodes, "
               f"{args['words_per_second']:g} words/s typed")
    real = "tuned" if "tuned" in report else "base"
    model = report[real]
    before, after = report["validity_before"], report["validity_after"]
    return [
        Figure("latency from the final user chunk to the answer, median s, lower is better",
               teacher["speculative"]["latency_median_s"], teacher["react"]["latency_median_s"],
               note=f"peer: sequential ReAct; {virtual}", paper="1.3-2.2x lower (0.45-0.77x ReAct)"),
        Figure("accuracy (share of episodes right), higher is better",
               _share(teacher["speculative"]["correct"], teacher["speculative"]["episodes"]),
               _share(teacher["react"]["correct"], teacher["react"]["episodes"]),
               note=f"peer: sequential ReAct; {virtual}", paper="minor loss (HotpotQA 71.0 % vs 71.6 %)"),
        Figure("accuracy (share of episodes right), SmolLM2-135M in real time, higher is better",
               _share(model["speculative"]["correct"], model["speculative"]["episodes"]),
               _share(model["react"]["correct"], model["react"]["episodes"]),
               note=f"peer: sequential ReAct; {'after' if real == 'tuned' else 'before'} clock SFT, "
               f"{args['episodes']} episode(s) per arm"),
        Figure("grammar-valid turns on held-out decision prompts (share), after vs before clock SFT",
               _share(after["valid"], after["prompts"]), _share(before["valid"], before["prompts"]),
               note=f"peer: the base model; {args['sft_steps']} LoRA steps of batch {args['sft_batch']}, "
               f"{after['prompts']} prompts; teacher's exact action {after['teacher_match']} after, "
               f"{before['teacher_match']} before"),
    ]


# ----------------------------------------------------------------------------------------------------------------------
# Multi-process trainers (benchmarks/multiprocess_trainers.py --out)
# ----------------------------------------------------------------------------------------------------------------------
def _multiprocess_trainers(report: dict) -> list[Figure]:
    by_arm = index_rows(report["rows"], "arm", grouped=True)  # one row per repeat
    size = f"{report['repeats']} repeat(s), torchrun gloo on {report['cpu_count']} shared CPUs, no speed-up claimed"

    def train_s(arm):
        return statistics.fmean(r["train_s"] for r in by_arm[arm])

    figures, agree = [], []
    if any(arm.startswith("fst") for arm in by_arm):
        figures.append(Figure("FST trainer.train() seconds (slowest rank), 2 processes vs 1, lower is better",
                              train_s("fst_2proc"), train_s("fst_1proc"), note=f"peer: 1 process, same global "
                              f"batch; {size}"))
        agree += [r["same_fast_context"] and r["same_pool_and_scores"] for r in by_arm["fst_2proc"]]
    if any(arm.startswith("das") for arm in by_arm):
        figures.append(Figure("DAS rollouts trainer.train() seconds (slowest rank), 2 processes vs 1, lower is better",
                              train_s("das_2proc_shared"), train_s("das_1proc"), note=f"peer: 1 process, same global "
                              f"batch; tiny random Llama; {size}"))
        shared, per_rank = by_arm["das_2proc_shared"], by_arm["das_2proc_per_rank"]
        agree += [r["same_history"] for r in shared]
        figures.append(Figure("DAS draft acceptance (mean over ranks), all-gathered history vs a history per rank",
                              statistics.fmean(a for r in shared for a in r["acceptance_per_rank"]),
                              statistics.fmean(a for r in per_rank for a in r["acceptance_per_rank"]),
                              note=f"peer: share_across_ranks=False; {size}"))
    figures.append(Figure("2-process runs whose ranks hold the same state (FST context/pool, DAS history; share)",
                          _share(sum(agree), len(agree)), None, note=f"{len(agree)} run(s); {size}"))
    return figures


# ----------------------------------------------------------------------------------------------------------------------
# Replica failover (benchmarks/replica_failover.py --out)
# ----------------------------------------------------------------------------------------------------------------------
def _replica_failover(report: dict) -> list[Figure]:
    args, phases = report["args"], report["phases"]
    n = args["requests"]
    calm, routed, single = phases["router"], phases["router, A killed"], phases["one endpoint, B killed"]
    size = (f"{n} greedy requests of {args['max_new_tokens']} tokens, {args['concurrency']} client threads, kill "
            f"after {args['kill_after']} answers; 2 transformers serve replicas on shared CPUs")
    return [
        Figure("requests answered with a replica SIGKILLed mid-run (share), higher is better",
               _share(routed["answered"], n), _share(single["answered"], n),
               note=f"ReplicaRouter over 2 replicas vs one EndpointBackend; {routed['failovers']} failover(s); {size}"),
        Figure("replies equal to the no-kill run's (share), higher is better", _share(routed["same_as_reference"], n),
               _share(single["same_as_reference"], n), note=f"ReplicaRouter vs one EndpointBackend; {size}"),
        Figure("median request latency (s) with a replica killed vs nobody killed, lower is better",
               routed["latency_median_s"], calm["latency_median_s"],
               note=f"the cost of a failover (peer: the router's no-failure phase, same servers); {size}"),
    ]


EXTRACTORS = {
    "squeeze_evolve": _squeeze_evolve,
    "catts": _catts,
    "staircase": _staircase,
    "speculative_agent": _speculative_agent,
    "multiprocess_trainers": _multiprocess_trainers,
    "replica_failover": _replica_failover,
}
