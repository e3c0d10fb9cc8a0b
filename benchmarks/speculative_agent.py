"""Speculative interaction agent vs sequential ReAct on a multi-hop tool task generated in code, then a short
clock-SFT of the default model.

Task (hf_fastslow.generation.agent_tasks): invented people -> employer -> city behind a safe `lookup` tool (simulated
latency), an unsafe `send_message` tool, a request streamed word by word at a fixed rate (some requests correct the
person half-way). Per episode both arms run back to back in one process (order alternating), in real time, on
SmolLM2-135M-Instruct through HFLocalBackend: latency from the final user chunk to the answer, accuracy (right city
AND exactly the right message sent), wasted (cancelled) tool calls, valid-turn rate; unsafe calls before commit are
checked over every run (assert 0). The same two arms with the scripted teacher policy under the virtual clock
(`--teacher-seconds-per-word` of simulated generation per word) show what the runtime gives a model that follows
the protocol. Then LoRA clock-SFT (trl SFTTrainer, peft, use_cpu=True, bf16=False) on synthesized episodes; the
grammar-validity rate (and teacher-action match) of greedy outputs on held-out decision prompts before and after,
and the real-model arms again after training.

    python benchmarks/speculative_agent.py --quick        # < 3 min
    python benchmarks/speculative_agent.py                # 12 episodes per arm, SFT on 300 tasks' decisions
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import tempfile
import time

import torch

from hf_fastslow import load_default_model
from hf_fastslow.backends import ScriptedBackend
from hf_fastslow.backends.hf_local import HFLocalBackend
from hf_fastslow.evaluation.timing import load_average, machine_state
from hf_fastslow.generation.agent_grammar import grammar_prompt, parse_turn
from hf_fastslow.generation.agent_tasks import TASK_EXAMPLE, make_fact_tasks, teacher_policy
from hf_fastslow.generation.agent_tools import InlineStream, run_virtual
from hf_fastslow.generation.speculative_agent import (
    SequentialReActAgent,
    SpeculativeAgent,
    feed_words,
    unsafe_violations,
)
from hf_fastslow.trainers.clock_sft import (
    ClockTraceBuilder,
    clock_sft_trainer,
    make_clock_sft_dataset,
    synthesize_episodes,
)

ARMS = {"react": SequentialReActAgent, "speculative": SpeculativeAgent}


def system_prompt(task) -> str:
    return grammar_prompt([t.prompt_line() for t in task.tools()], TASK_EXAMPLE)


def run_episode(arm: str, task, backend, args, virtual: bool = False) -> dict:
    tools = task.tools()
    # the scripted teacher needs 4 turns after the final chunk under ReAct; a model gets the --max-turns budget
    agent = ARMS[arm](backend, tools, system_prompt=system_prompt(task), temperature=0,
                      max_turns=max(8, args.max_turns) if virtual else args.max_turns,
                      max_new_tokens=args.max_new_tokens, prefix_reuse=not virtual)
    chunks = feed_words(task.request, args.words_per_second, args.words_per_chunk)
    cpu0, wall0 = time.process_time(), time.perf_counter()
    result = run_virtual(agent.run(chunks)) if virtual else asyncio.run(agent.run(chunks))
    m = result.metrics
    final_t = next(e.t for e in result.events if e.kind == "user_final")
    return {"arm": arm, "answer": result.answer, "correct": task.correct(result.answer),
            "latency_after_final_s": m.latency_after_final_s, "end_after_final_s": result.events[-1].t - final_t,
            "turns": m.turns, "valid_turns": m.valid_turns, "protocol_errors": m.protocol_errors,
            "tools_started": m.tools_started, "wasted_calls": m.wasted_calls,
            "unsafe_violations": unsafe_violations(result.events), "model_seconds": m.model_seconds,
            "wall_s": time.perf_counter() - wall0, "cpu_s": time.process_time() - cpu0}


def run_arms(tasks, make_backend, args, label: str, virtual: bool = False) -> dict:
    rows = {arm: [] for arm in ARMS}
    for i, task in enumerate(tasks):
        order = list(ARMS) if i % 2 == 0 else list(ARMS)[::-1]  # interleaved, alternating who goes first
        for arm in order:
            row = run_episode(arm, task, make_backend(task), args, virtual)
            assert row["unsafe_violations"] == [], (label, arm, i, row["unsafe_violations"])
            rows[arm].append(row)
        if not virtual:
            print(f"  [{label}] episode {i + 1}/{len(tasks)}: " + ", ".join(
                f"{r[-1]['arm']} latency {fmt(r[-1]['latency_after_final_s'])} correct {r[-1]['correct']}"
                for r in rows.values()), flush=True)
    return {arm: summarize(r) for arm, r in rows.items()}


def fmt(x) -> str:
    return "-" if x is None else f"{x:.2f}"


def summarize(rows: list[dict]) -> dict:
    lat = sorted(r["latency_after_final_s"] for r in rows if r["latency_after_final_s"] is not None)
    end = sorted(r["end_after_final_s"] for r in rows)
    turns = sum(r["turns"] for r in rows)

    def p90(xs):
        return xs[min(len(xs) - 1, int(0.9 * len(xs)))] if xs else None

    return {"episodes": len(rows), "answered": len(lat), "correct": sum(r["correct"] for r in rows),
            "latency_median_s": statistics.median(lat) if lat else None, "latency_p90_s": p90(lat),
            "end_after_final_median_s": statistics.median(end),
            "valid_turn_rate": sum(r["valid_turns"] for r in rows) / max(1, turns), "turns": turns,
            "tools_started": sum(r["tools_started"] for r in rows),
            "wasted_calls": sum(r["wasted_calls"] for r in rows),
            "unsafe_violations": sum(len(r["unsafe_violations"]) for r in rows),
            "wall_s": sum(r["wall_s"] for r in rows), "cpu_s": sum(r["cpu_s"] for r in rows)}


def arms_table(title: str, summary: dict) -> str:
    lines = [f"{title}", "| arm | accuracy | answered | latency after final, median / p90 (s) | end after final, "
             "median (s) | valid turns | tools run | wasted calls | unsafe before commit | wall / CPU s |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for arm, s in summary.items():
        lines.append(f"| {arm} | {s['correct']}/{s['episodes']} | {s['answered']} | {fmt(s['latency_median_s'])} / "
                     f"{fmt(s['latency_p90_s'])} | {fmt(s['end_after_final_median_s'])} | "
                     f"{100 * s['valid_turn_rate']:.0f}% of {s['turns']} | {s['tools_started']} | "
                     f"{s['wasted_calls']} | {s['unsafe_violations']} | {s['wall_s']:.0f} / {s['cpu_s']:.0f} |")
    react, spec = summary["react"]["latency_median_s"], summary["speculative"]["latency_median_s"]
    if react and spec:
        lines.append(f"\nmedian latency ratio react / speculative: {react / spec:.2f}x")
    return "\n".join(lines)


def grammar_validity(model, tok, episodes, builder, max_new_tokens: int) -> dict:
    """Greedy outputs on held-out decision prompts: share of valid turns (judged up to the first action, where the
    runtime stops generating) and of exact teacher actions; the first outputs are kept as samples."""
    backend = HFLocalBackend(model, tok, temperature=0, max_new_tokens=max_new_tokens)
    valid = match = 0
    samples = []
    for episode in episodes:
        row = builder.prompt_completion(episode)
        text = backend.chat(row["prompt"])[0].text
        turn = parse_turn(text, stop_at_action=True)
        valid += turn.valid
        match += turn.valid and turn.action == parse_turn(row["completion"][0]["content"]).action
        if len(samples) < 3:
            samples.append({"target": row["completion"][0]["content"], "output": text})
    return {"prompts": len(episodes), "valid": valid, "teacher_match": match, "samples": samples}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="a < 3 min smoke run of every part")
    ap.add_argument("--episodes", type=int, default=12)
    ap.add_argument("--teacher-episodes", type=int, default=30)
    ap.add_argument("--words-per-second", type=float, default=3.0)
    ap.add_argument("--words-per-chunk", type=int, default=3, help="user input arrives in chunks of this many words")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--max-turns", type=int, default=6, help="model turns allowed after the final user chunk")
    ap.add_argument("--teacher-seconds-per-word", type=float, default=0.1)
    ap.add_argument("--sft-tasks", type=int, default=300)
    ap.add_argument("--sft-steps", type=int, default=60)
    ap.add_argument("--sft-batch", type=int, default=2)
    ap.add_argument("--sft-lr", type=float, default=1e-3)
    ap.add_argument("--skip-tuned-arms", action="store_true", help="after SFT, measure validity only")
    ap.add_argument("--validity-prompts", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="write the figures as JSON here")
    args = ap.parse_args()
    if args.quick:
        args.episodes, args.teacher_episodes, args.sft_tasks, args.sft_steps, args.sft_batch = 1, 6, 6, 2, 1
        args.validity_prompts, args.words_per_second, args.max_turns, args.max_new_tokens = 2, 6.0, 2, 32
        args.skip_tuned_arms = True
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    report = {"args": vars(args), "machine_before": machine_state()}
    print(f"machine: {report['machine_before']}", flush=True)

    # 1. the runtime with a protocol-following policy (scripted teacher, virtual clock)
    teacher_tasks = make_fact_tasks(args.teacher_episodes, seed=args.seed + 1)
    report["teacher"] = run_arms(
        teacher_tasks, lambda task: InlineStream(ScriptedBackend(teacher_policy(task)), args.teacher_seconds_per_word),
        args, "teacher", virtual=True)
    print(arms_table(f"Scripted teacher, virtual clock ({args.teacher_seconds_per_word} s per word generated, "
                     f"{args.words_per_second} words/s typed, {args.teacher_episodes} episodes):", report["teacher"]))

    # 2. the default model, real time
    model, tok = load_default_model()
    tasks = make_fact_tasks(args.episodes, seed=args.seed)
    report["base"] = run_arms(tasks, lambda task: HFLocalBackend(model, tok), args, "SmolLM2 base")
    print(arms_table("SmolLM2-135M-Instruct, real time:", report["base"]), flush=True)

    # 3. clock SFT: validity before / after on held-out decision prompts
    builder = ClockTraceBuilder(tok)
    train = synthesize_episodes(make_fact_tasks(args.sft_tasks, seed=args.seed + 100), seed=args.seed,
                                words_per_chunk=args.words_per_chunk)
    held_out = synthesize_episodes(make_fact_tasks(max(2, args.validity_prompts // 4), seed=args.seed + 200),
                                   seed=args.seed + 1, words_per_chunk=args.words_per_chunk)
    held_out = random.Random(args.seed).sample(held_out, min(len(held_out), args.validity_prompts))
    report["validity_before"] = grammar_validity(model, tok, held_out, builder, args.max_new_tokens)
    print(f"grammar validity before SFT: {report['validity_before']}", flush=True)
    dataset = make_clock_sft_dataset(train, builder)
    with tempfile.TemporaryDirectory() as out_dir:
        trainer = clock_sft_trainer(model, tok, dataset, output_dir=out_dir, max_steps=args.sft_steps,
                                    learning_rate=args.sft_lr, per_device_train_batch_size=args.sft_batch,
                                    use_cpu=True,
                                    bf16=False, logging_steps=max(1, args.sft_steps // 5), seed=args.seed)
        t0, c0 = time.perf_counter(), time.process_time()
        trainer.train()
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        report["sft"] = {"rows": len(dataset), "steps": args.sft_steps, "losses": losses,
                         "wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    tuned = trainer.model.eval()
    print(f"clock SFT: {report['sft']}", flush=True)
    report["validity_after"] = grammar_validity(tuned, tok, held_out, builder, args.max_new_tokens)
    print(f"grammar validity after SFT: {report['validity_after']}", flush=True)
    if not args.skip_tuned_arms:
        report["tuned"] = run_arms(tasks, lambda task: HFLocalBackend(tuned, tok), args, "SmolLM2 clock-SFT")
        print(arms_table("SmolLM2-135M-Instruct after clock SFT, real time:", report["tuned"]))

    report["machine_after"] = {"load_average": load_average()}
    report["total_wall_s"], report["total_cpu_s"] = time.perf_counter() - t_start, time.process_time()
    print(f"total {report['total_wall_s']:.0f} s wall, {report['total_cpu_s']:.0f} s process CPU, "
          f"load {load_average()}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1, default=str)


if __name__ == "__main__":
    main()
