"""V1-PairRL vs GRPO on generated two-digit arithmetic with the default model (V1, arXiv 2603.04304).

Both start from SmolLM2-135M-Instruct, see the same training problems in the same order (same seed) and spend the
same number of rollouts per problem: GRPO 8 solver rollouts, PairRL 4 solver + 4 judge rollouts (the paper's
compute match). Afterwards each model (and the untrained base) is evaluated on fresh held-out problems:

* Pass@1: greedy answer accuracy;
* verifier accuracy on held-out pairs: mixed pairs (one correct, one wrong solution, sampled once from the base
  model, random A/B order) judged greedily with the V1 judge prompt; a pair counts when the correct solution gets
  the strictly higher rating. Parse failures and ties count as wrong (reported separately).

    python benchmarks/pairrl.py --steps 8 --out pairrl.json
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import time

import torch
from datasets import Dataset

from hf_fastslow import load_default_model
from hf_fastslow.evaluation.answers import answers_match, extract_answer
from hf_fastslow.evaluation.prompts import arithmetic_problems, chat_messages, encode_chat
from hf_fastslow.generation.v1_infer import MATH_JUDGE_TEMPLATE, HFJudge, parse_pair_ratings, v1_generate
from hf_fastslow.trainers import PairRLConfig, PairRLTrainer, VerifiableTask


def make_problems(n: int, seed: int) -> list[dict]:
    return [{"question": f"{p['question']} Reply with just the number.", "answer": str(p["answer"])}
            for p in arithmetic_problems(n, seed)]


class ArithmeticTask(VerifiableTask):
    """1.0 when the last number in the completion equals the answer."""

    def score(self, prompt, completion, answer=None, **columns):
        got = extract_answer(completion)
        if got is None:
            return 0.0, "no number in the answer"
        return (1.0, "correct") if answers_match(completion, answer) else (0.0, f"answered {got}, expected {answer}")


TASK = ArithmeticTask()


def is_correct(text: str, answer: str) -> bool:
    return TASK.score(None, text, answer=answer)[0] == 1.0


@torch.no_grad()
def pass_at_1(model, tok, problems, max_new_tokens, batch_size=16) -> float:
    model.eval()
    right = 0
    for s in range(0, len(problems), batch_size):
        chunk = problems[s:s + batch_size]
        enc = encode_chat(tok, [p["question"] for p in chunk])
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id)
        for p, text in zip(chunk, tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)):
            right += is_correct(text, p["answer"])
    return right / len(problems)


def build_heldout_pairs(model, tok, problems, samples, max_new_tokens, max_pairs, seed):
    rng = random.Random(seed)
    pairs = []
    for p in problems:
        cands = v1_generate(model, tok, p["question"], n=samples, max_new_tokens=max_new_tokens, temperature=1.0)
        good = [c for c in cands if is_correct(c, p["answer"])]
        bad = [c for c in cands if not is_correct(c, p["answer"])]
        if good and bad:
            g, b = rng.choice(good), rng.choice(bad)
            pairs.append({"question": p["question"], "a": g, "b": b, "label_a": 1} if rng.random() < 0.5 else
                         {"question": p["question"], "a": b, "b": g, "label_a": 0})
        if len(pairs) >= max_pairs:
            break
    return pairs


def verifier_accuracy(model, tok, pairs, max_new_tokens) -> dict:
    model.eval()
    judge = HFJudge(model, tok, max_new_tokens=max_new_tokens, batch_size=16)
    replies = judge.complete([MATH_JUDGE_TEMPLATE.format(problem=p["question"], solution_a=p["a"], solution_b=p["b"])
                              for p in pairs])
    right = parse_fail = ties = 0
    for p, reply in zip(pairs, replies):
        r = parse_pair_ratings(reply)
        if r is None:
            parse_fail += 1
        elif r[0] == r[1]:
            ties += 1
        else:
            right += int((r[0] > r[1]) == (p["label_a"] == 1))
    n = max(len(pairs), 1)
    return {"accuracy": right / n, "parse_failure_rate": parse_fail / n, "tie_rate": ties / n,
            "example_replies": replies[:3]}


def train(kind: str, train_rows, args) -> tuple[torch.nn.Module, dict]:
    model, tok = load_default_model()
    model.train()
    ds = Dataset.from_dict({
        "prompt": [chat_messages(r["question"]) for r in train_rows],
        "answer": [r["answer"] for r in train_rows],
    })
    common = {
        "output_dir": f"{args.workdir}/{kind}", "use_cpu": True, "bf16": False, "report_to": "none",
        "save_strategy": "no",
        "max_steps": args.steps, "learning_rate": args.lr, "logging_steps": 1, "seed": args.seed,
        "per_device_train_batch_size": args.problems_per_step * args.rollouts // (2 if kind == "pairrl" else 1),
        "max_completion_length": args.judge_max_new_tokens or args.max_new_tokens,
        "loss_type": "dapo", "epsilon_high": 0.28, "scale_rewards": "none",
        "beta": 0.0, "temperature": args.temperature, "top_p": 0.95, "shuffle_dataset": True,
    }
    if kind == "pairrl":
        cfg = PairRLConfig(num_generations=args.rollouts // 2, verifier_weight=1.0, max_solution_tokens=64, **common)
    else:
        # Same class with λ = 0 is exactly GRPOTrainer (tested), here with all 8 rollouts on solving.
        cfg = PairRLConfig(num_generations=args.rollouts, verifier_weight=0.0, **common)
    trainer = PairRLTrainer(model=model, reward_funcs=TASK, args=cfg, train_dataset=ds, processing_class=tok)
    t = time.time()
    torch.manual_seed(args.seed)
    trainer.train()
    logs = [h for h in trainer.state.log_history if "loss" in h]
    curve = {
        "solver_reward": [h.get("rewards/ArithmeticTask/mean") for h in logs],
        "judge_reward": [h.get("verifier/rewards/pairwise_verification/mean") for h in logs],
        "judge_pair_accuracy_train": [h.get("verifier/pair_accuracy") for h in logs],
        "judge_parse_failure_rate_train": [h.get("verifier/parse_failure_rate") for h in logs],
    }
    info = {"train_seconds": time.time() - t, "steps": len(logs), "curves": curve}
    model = trainer.model
    del trainer
    gc.collect()
    return model, info


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--problems-per-step", type=int, default=4)
    ap.add_argument("--rollouts", type=int, default=8,
                    help="per problem: GRPO all solver; PairRL half solver, half judge")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-5)
    ap.add_argument("--temperature", type=float, default=1.0, help="training rollout sampling temperature")
    ap.add_argument("--judge-max-new-tokens", type=int, default=None,
                    help="training completion cap; default --max-new-tokens (judge rollouts share it)")
    ap.add_argument("--heldout", type=int, default=48)
    ap.add_argument("--heldout-pairs", type=int, default=24)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--workdir", default="/tmp/pairrl_bench")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()

    train_rows = make_problems(args.steps * args.problems_per_step * 2, seed=args.seed)
    heldout = make_problems(args.heldout, seed=args.seed + 10_000)
    base, tok = load_default_model()
    torch.manual_seed(args.seed)
    pairs = build_heldout_pairs(base, tok, heldout, samples=4, max_new_tokens=args.max_new_tokens,
                                max_pairs=args.heldout_pairs, seed=args.seed)
    results = {"base": {"pass_at_1": pass_at_1(base, tok, heldout, args.max_new_tokens),
                        "verifier": verifier_accuracy(base, tok, pairs, args.judge_max_new_tokens or 16)}}
    print(f"[{time.time() - t0:.0f}s] base {results['base']}", flush=True)
    del base
    gc.collect()
    for kind in ("grpo", "pairrl"):
        model, info = train(kind, train_rows, args)
        info["pass_at_1"] = pass_at_1(model, tok, heldout, args.max_new_tokens)
        info["verifier"] = verifier_accuracy(model, tok, pairs, args.judge_max_new_tokens or 16)
        results[kind] = info
        print(f"[{time.time() - t0:.0f}s] {kind} {json.dumps(info)}", flush=True)
        del model
        gc.collect()
    summary = {
        "model": "SmolLM2-135M-Instruct", "task": "two-digit addition (generated; train/held-out disjoint seeds)",
        "heldout_problems": len(heldout), "heldout_pairs": len(pairs), "results": results,
        "wall_seconds": time.time() - t0, "command_args": vars(args),
    }
    print(json.dumps(summary, indent=2))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
