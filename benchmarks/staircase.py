"""Staircase streaming vs Mixture-of-Agents (arXiv 2510.05059 vs 2406.04692) on the default model.

Three proposers (SmolLM2-135M-Instruct with three system personas, temperature 0.7, one batched `generate` split per
row) and one greedy aggregator (the same model). Arms, in one process, the order rotated from item to item:
`moa` (full proposals, then the aggregator's answer, streamed) and `staircase c=<c>` for each chunk size (aggregate
as soon as every proposer has c tokens, continue the partial answer over a prefix cache at every stair). Both arms
of an item get the same seed, so that they can see the same proposals and differ only in how they aggregate; the
table says for how many items they did (a generate running concurrently in another thread can disturb the seeded
sampler's RNG stream).

Items: two-digit additions (`evaluation.prompts.arithmetic_problems`, scored with `evaluation.answers`) and short
instructions (latency only). Settings: `in-process` (`HFLocalBackend`) and `serve` (`EndpointBackend` against
`transformers serve --continuous-batching` started by `backends.serve.LocalServer`; the aggregator continues through
/v1/completions with a locally rendered prompt). Without continuous batching `transformers serve` runs one
`generate` at a time on one inference thread, so the aggregator's first request would queue behind the proposals
(`--serve-args ""` measures that). Reported per arm: TTFT median and p90, total time, answer tokens per second,
tokens per run (every call: proposals, every stair's prompt and answer), aggregator prompt tokens and those served
from its prefix cache, this process's CPU seconds (and the server's, over serve), addition accuracy.

Two shared CPU cores cannot show the overlap that separate engines give (the aggregator competes with the
proposers for the same cores). So beside the measurements a REPLAY ESTIMATE (a model, not a measurement) recomposes
timings measured in isolation: each item's proposals streamed alone (arrival time of every chunk) and each arm's
aggregator calls re-run alone in order; stair j starts when every proposal has T_j tokens and the previous stair
has ended, as with proposers and aggregator on separate devices.

    python benchmarks/staircase.py --quick          # 1 addition + 1 instruction, both settings (< 3 min idle)
    python benchmarks/staircase.py --additions 20 --instructions 20 --chunks 16 32 --proposal-tokens 96 \\
        --answer-tokens 64 --out staircase.json
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import time
from collections.abc import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP workers must not spin on a shared 2-core box

import torch  # noqa: E402

from hf_fastslow import load_default_model  # noqa: E402
from hf_fastslow.evaluation.answers import answers_match  # noqa: E402
from hf_fastslow.evaluation.prompts import arithmetic_problems  # noqa: E402
from hf_fastslow.evaluation.timing import load_average, machine_state, rotated  # noqa: E402
from hf_fastslow.generation.staircase import MixtureOfAgents, StaircaseMoA, interleaved_prompt  # noqa: E402

PERSONAS = (
    "You are a careful assistant. Check your work before you answer.",
    "You are a concise assistant. Answer directly and briefly.",
    "You are a friendly teacher.",
)
ADDITION_SUFFIX = " Reply with just the number."  # the phrasing calibrated for this model (squeeze-evolve card)
INSTRUCTIONS = [
    "Explain KV caching in two sentences.", "Give three tips for writing clear emails.",
    "What is the difference between a list and a tuple in Python?", "Describe how a rainbow forms.",
    "Suggest a name for a bakery and say why.", "Why do we have seasons on Earth?",
    "Write a haiku about autumn rain.", "What does a compiler do?", "List three uses of a paperclip.",
    "How does a bicycle stay upright?", "Summarize the water cycle.", "What is a prime number? Give an example.",
    "Give two reasons to learn a second language.", "Explain what an API is to a child.",
    "What should I pack for a day hike?", "Why is the sky blue?", "Describe the taste of a lemon.",
    "What is photosynthesis?", "Give a tip for sleeping better.", "How do vaccines work, briefly?",
]


def make_items(additions: int, instructions: int, seed: int) -> list[dict]:
    """Additions (with their answers) and instructions (answer None), alternating while both last."""
    adds = [{"prompt": p["question"] + ADDITION_SUFFIX, "gold": p["answer"], "kind": "addition"}
            for p in arithmetic_problems(additions, seed=seed)]
    instr = [{"prompt": q, "gold": None, "kind": "instruction"} for q in INSTRUCTIONS[:instructions]]
    items = []
    for k in range(max(len(adds), len(instr))):
        items += ([adds[k]] if k < len(adds) else []) + ([instr[k]] if k < len(instr) else [])
    return items


def p90(values: list[float]) -> float:
    return statistics.quantiles(values, n=10, method="inclusive")[-1] if len(values) > 1 else values[0]


class CpuMeter:
    """CPU seconds of this process and (over serve) of the server process."""

    def __init__(self, server_pid: int | None = None):
        import psutil

        self.server = psutil.Process(server_pid) if server_pid else None

    def read(self) -> tuple[float, float]:
        server = 0.0
        if self.server is not None:
            t = self.server.cpu_times()
            server = t.user + t.system + t.children_user + t.children_system
        return time.process_time(), server


def build_arms(proposers, make_aggregator: Callable[[], object], args) -> dict:
    common = dict(proposal_max_new_tokens=args.proposal_tokens, max_new_tokens=args.answer_tokens)
    arms = {"moa": MixtureOfAgents(proposers, make_aggregator(), **common)}
    for c in args.chunks:
        arms[f"staircase c={c}"] = StaircaseMoA(proposers, make_aggregator(), chunk_tokens=c,
                                                agg_chunk_tokens=args.agg_chunk or c, **common)
    if args.interleaved:  # the append-only layout: more of each stair's prompt comes from the prefix cache
        c = min(args.chunks)
        arms[f"staircase c={c} interleaved"] = StaircaseMoA(
            proposers, make_aggregator(), chunk_tokens=c, agg_chunk_tokens=args.agg_chunk or c,
            prompt_builder=interleaved_prompt, **common)
    return arms


def run_once(pipeline, item: dict, seed: int, cpu: CpuMeter) -> dict:
    pipeline.seed = seed
    messages = [{"role": "user", "content": item["prompt"]}]
    before = cpu.read()
    answer = "".join(pipeline.stream(messages))
    after = cpu.read()
    m = pipeline.last_metrics
    stairs = m.stairs
    return {
        "kind": item["kind"], "ttft_s": m.ttft_s, "total_s": m.total_s, "proposals_s": m.proposals_s,
        "cpu_s": after[0] - before[0], "server_cpu_s": after[1] - before[1],
        "tokens": m.tokens.prompt_tokens + m.tokens.completion_tokens,
        "answer_tokens": m.aggregator_tokens.completion_tokens, "answer_tokens_per_s": m.answer_tokens_per_s,
        "agg_prompt_tokens": sum(s.prompt_tokens or 0 for s in stairs),
        "agg_reused_tokens": sum(s.reused_prompt_tokens or 0 for s in stairs),
        "stairs": len(stairs), "stopped_early": m.stopped_early, "dropped": len(m.dropped),
        "correct": None if item["gold"] is None else answers_match(answer, item["gold"]),
        "answer": answer, "proposals": m.proposals,
        "calls": [{"conversation": s.conversation, "partial": "".join(t.text for t in stairs[:k]),
                   "new_tokens": s.new_tokens, "final": s.final, "visible": s.visible_tokens}
                  for k, s in enumerate(stairs)],
    }


def run_setting(name: str, proposers, make_aggregator, items, args, cpu: CpuMeter) -> dict:
    arms = build_arms(proposers, make_aggregator, args)
    names = list(arms)
    warm = {"prompt": "Say hello.", "gold": None, "kind": "warm-up"}
    for arm in names:  # first calls pay one-off costs (allocations, the server's first request)
        run_once(arms[arm], warm, args.seed, cpu)
    rows = {arm: [] for arm in names}
    for k, item in enumerate(items):
        for arm in rotated(names, k):
            rows[arm].append(run_once(arms[arm], item, args.seed + k, cpu))
        print(f"[{name}] item {k + 1}/{len(items)} ({item['kind']}): " + ", ".join(
            f"{arm} TTFT {rows[arm][-1]['ttft_s']:.2f}s total {rows[arm][-1]['total_s']:.2f}s" for arm in names),
            flush=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------------
# Replay estimate (a model of separate engines, from timings measured in isolation)
# ----------------------------------------------------------------------------------------------------------------------
def proposal_arrivals(proposer, conversations, chunk: int, seed: int, max_new_tokens: int) -> list[list[tuple]]:
    """Stream the proposals alone; per row the (tokens so far, seconds) after each chunk."""
    arrivals = [[(0, 0.0)] for _ in conversations]
    counts = [0] * len(conversations)
    start = time.perf_counter()
    for piece in proposer.stream_batch(conversations, chunk_tokens=chunk, seed=seed, max_new_tokens=max_new_tokens):
        counts[piece.row] += len(piece.token_ids or [])
        arrivals[piece.row].append((counts[piece.row], time.perf_counter() - start))
    return arrivals


def time_to(arrivals: list[tuple], tokens: int) -> float:
    """When a proposal had `tokens` tokens (or had ended)."""
    for count, t in arrivals:
        if count >= tokens:
            return t
    return arrivals[-1][1]


def replay_aggregator(make_aggregator, calls: list[dict]) -> list[tuple[float, float]]:
    """Re-run an arm's aggregator calls alone, in order, on a fresh backend: (first text, end) seconds per call."""
    agg = make_aggregator()
    out = []
    for call in calls:
        conversation, kwargs = list(call["conversation"]), {"max_new_tokens": max(1, call["new_tokens"] or 1)}
        if call["partial"]:
            conversation.append({"role": "assistant", "content": call["partial"]})
            kwargs["continue_final_message"] = True
        start, first = time.perf_counter(), None
        for delta in agg.stream(conversation, **kwargs):
            if delta and first is None:
                first = time.perf_counter() - start
        end = time.perf_counter() - start
        out.append((end if first is None else first, end))
    return out


def replay(proposers, make_aggregator, items, rows, args) -> dict:
    """Per arm and item, (TTFT, total) of the composed timeline."""
    from hf_fastslow.generation.staircase_runtime import group_proposers

    model = {arm: {"ttft_s": [], "total_s": []} for arm in rows}
    for k, item in enumerate(items):
        (group,) = group_proposers(proposers, [{"role": "user", "content": item["prompt"]}])
        arrivals = proposal_arrivals(group.backend, group.conversations, math.gcd(*args.chunks), args.seed + k,
                                     args.proposal_tokens)
        for arm, arm_rows in rows.items():
            row = arm_rows[k]
            timings = replay_aggregator(make_aggregator, row["calls"])
            end = 0.0
            ttft = None
            for call, (first, duration) in zip(row["calls"], timings):
                if call["visible"] is None:  # MoA: every proposal complete
                    ready = max(a[-1][1] for a in arrivals)
                else:
                    ready = max(time_to(a, n) for a, n in zip(arrivals, call["visible"]))
                start = max(ready, end)
                ttft = start + first if ttft is None else ttft
                end = start + duration
            model[arm]["ttft_s"].append(ttft)
            model[arm]["total_s"].append(end)
    return model


# ----------------------------------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------------------------------
def summarize(rows: dict) -> dict:
    out = {}
    for arm, rs in rows.items():
        # the staircase stops its proposers once the aggregator ends, so its proposals are prefixes of MoA's when the
        # same seed drew the same samples: a prefix match is "the same proposals"
        same = sum(len(r["proposals"]) == len(m["proposals"])
                   and all(full.startswith(seen) for full, seen in zip(m["proposals"], r["proposals"]))
                   for r, m in zip(rs, rows["moa"]))
        ttft = [r["ttft_s"] for r in rs if r["ttft_s"] is not None]
        adds = [r["correct"] for r in rs if r["correct"] is not None]
        out[arm] = {
            "runs": len(rs), "ttft_median_s": statistics.median(ttft), "ttft_p90_s": p90(ttft),
            "total_median_s": statistics.median(r["total_s"] for r in rs),
            "answer_tokens_per_s": statistics.median(r["answer_tokens_per_s"] for r in rs),
            "tokens_per_run": statistics.mean(r["tokens"] for r in rs),
            "agg_prompt_tokens_per_run": statistics.mean(r["agg_prompt_tokens"] for r in rs),
            "agg_reused_tokens_per_run": statistics.mean(r["agg_reused_tokens"] for r in rs),
            "stairs_per_run": statistics.mean(r["stairs"] for r in rs),
            "cpu_s_per_run": statistics.mean(r["cpu_s"] for r in rs),
            "server_cpu_s_per_run": statistics.mean(r["server_cpu_s"] for r in rs),
            "addition_correct": sum(adds), "additions": len(adds),
            "stopped_early": sum(r["stopped_early"] for r in rs), "same_proposals_as_moa": same,
        }
    return out


def table(setting: str, summary: dict) -> str:
    moa = summary["moa"]["ttft_median_s"]
    lines = [f"### {setting}", "", "| arm | TTFT median s (x MoA) | TTFT p90 s | total median s | answer tok/s | "
             "tokens/run | aggregator prompt tok/run (from cache) | stairs | CPU s/run | additions right | "
             "same proposals as MoA (prefix) |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for arm, s in summary.items():
        cpu = f"{s['cpu_s_per_run']:.1f}" + (f" + server {s['server_cpu_s_per_run']:.1f}"
                                             if s["server_cpu_s_per_run"] else "")
        lines.append(
            f"| {arm} | {s['ttft_median_s']:.2f} ({s['ttft_median_s'] / moa:.2f}x) | {s['ttft_p90_s']:.2f} | "
            f"{s['total_median_s']:.2f} | {s['answer_tokens_per_s']:.1f} | {s['tokens_per_run']:,.0f} | "
            f"{s['agg_prompt_tokens_per_run']:,.0f} ({s['agg_reused_tokens_per_run']:,.0f}) | "
            f"{s['stairs_per_run']:.1f} | {cpu} | {s['addition_correct']}/{s['additions']} | "
            f"{s['same_proposals_as_moa']}/{s['runs']} |")
    return "\n".join(lines)


def replay_table(model: dict) -> str:
    moa = statistics.median(model["moa"]["ttft_s"])
    lines = ["### replay estimate (a MODEL of separate engines, recomposed from timings measured in isolation)", "",
             "| arm | TTFT median s (x MoA) | TTFT p90 s | total median s |", "|---|---|---|---|"]
    for arm, m in model.items():
        t = statistics.median(m["ttft_s"])
        lines.append(f"| {arm} | {t:.2f} ({t / moa:.2f}x) | {p90(m['ttft_s']):.2f} | "
                     f"{statistics.median(m['total_s']):.2f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="1 addition + 1 instruction, short caps (< 3 min idle)")
    p.add_argument("--additions", type=int, default=20)
    p.add_argument("--instructions", type=int, default=20)
    p.add_argument("--chunks", type=int, nargs="+", default=[16, 32])
    p.add_argument("--agg-chunk", type=int, default=None, help="aggregator tokens per stair (default: = chunk)")
    p.add_argument("--proposal-tokens", type=int, default=96)
    p.add_argument("--answer-tokens", type=int, default=64)
    p.add_argument("--settings", nargs="+", default=["in-process", "serve"], choices=["in-process", "serve"])
    p.add_argument("--serve-timeout", type=float, default=600.0,
                   help="seconds per request to the served model (a loaded box needs more than the usual 120)")
    p.add_argument("--serve-args", default="--continuous-batching",
                   help="extra `transformers serve` arguments (\"\" for the one-generate-at-a-time server)")
    p.add_argument("--interleaved", action="store_true",
                   help="add a staircase arm (smallest chunk) with the append-only interleaved_prompt layout")
    p.add_argument("--no-replay", action="store_true")
    p.add_argument("--threads", type=int, default=1, help="torch threads (the box is shared)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if args.quick:
        args.additions, args.instructions, args.chunks = 1, 1, [8]
        args.proposal_tokens, args.answer_tokens = 24, 16
    torch.set_num_threads(args.threads)
    from hf_fastslow.backends.hf_local import HFLocalBackend

    model, tok = load_default_model()
    items = make_items(args.additions, args.instructions, args.seed)
    report = {"args": vars(args), "machine_before": machine_state(), "settings": {}}
    started = time.perf_counter()
    local_props = [HFLocalBackend(model, tok, system=s, temperature=0.7) for s in PERSONAS]

    def local_aggregator():
        return HFLocalBackend(model, tok, temperature=0.0)

    for setting in args.settings:
        if setting == "in-process":
            rows = run_setting(setting, local_props, local_aggregator, items, args, CpuMeter())
            report["settings"][setting] = {"summary": summarize(rows), "rows": rows}
            if not args.no_replay:
                report["replay"] = replay(local_props, local_aggregator, items, rows, args)
        else:
            from hf_fastslow.backends.serve import LocalServer
            from hf_fastslow.default_model import default_model_path

            with LocalServer(default_model_path(), threads=args.threads, extra_args=args.serve_args.split()) as server:
                props = [server.backend(system=s, temperature=0.7, timeout=args.serve_timeout) for s in PERSONAS]
                # the first request to a continuous-batching server pays its start-up (40 s at load 15 here, past the
                # default 120 s timeout at load 25): the capability probes take it, outside every timed item
                probed = [b.capabilities for b in props]
                print(f"serve: proposers probed ({probed[0]})", flush=True)

                def served_aggregator():  # continues its answer through /v1/completions, rendered with `tok`
                    return server.backend(temperature=0.0, tokenizer=tok, timeout=args.serve_timeout)

                rows = run_setting(setting, props, served_aggregator, items, args, CpuMeter(server.pid))
            report["settings"][setting] = {"summary": summarize(rows), "rows": rows}
    report["machine_after"] = {"load_average": load_average()}
    report["wall_s"] = time.perf_counter() - started
    print(f"\n{len(items)} items ({args.additions} additions, {args.instructions} instructions), proposals <= "
          f"{args.proposal_tokens} tokens, answers <= {args.answer_tokens}; torch threads {args.threads}; load "
          f"{report['machine_before']['load_average']} before, {report['machine_after']['load_average']} after; "
          f"{report['wall_s']:.0f} s\n")
    for setting, data in report["settings"].items():
        print(table(setting, data["summary"]) + "\n")
    if "replay" in report:
        print(replay_table(report["replay"]))
    if args.out:
        with open(args.out, "w") as fh:
            json.dump(report, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
