"""Benchmark: DTS preference pairs (Diversified-ThinkSolve, arXiv 2507.02173) vs temperature-sampled pairs, each
trained with an unchanged trl DPOTrainer, on the default model (SmolLM2-135M-Instruct); the base model is the floor.

Problems (generated here, seeded): two-step word problems with one-digit operands (`--problems easy`, default), or
the 2-3 step ones with a multiplication (`--problems multistep`, on which the 135M model scores 0). Both builders
use K solutions per problem, the same mixed-correctness pair rule and the package's numeric extractor. Reported:
pairs kept, generated tokens (DTS / sampling ratio), diversity of the K solutions (distinct final answers, token
Jaccard), and greedy exact-match test accuracy after one epoch of DPO on each pair set (beta 0.1). A 135M model
yields few usable pairs; the yield is part of the result.

DPO on CPU: trl's DPOConfig defaults to bf16 and gradient checkpointing; this script passes `bf16=False,
use_cpu=True, gradient_checkpointing=False`, and a reference model (a copy of the policy: the GGUF-loaded model has
no Hub name trl could reload it from).

    # the figures in docs/trainers.md (~40 min on a loaded 2-core box)
    python benchmarks/dts.py --threads 1 --lr 2e-5 --train 24 --test 48 --max-solve-tokens 96 --max-think-tokens 48
    python benchmarks/dts.py --quick                 # 6 train / 6 test problems, K=2 (~2 min)
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import time

import torch

# Two-step problems with one-digit operands: SmolLM2-135M answered 2 of 8 right (greedy) in a probe of each of the
# first two templates, so K samples of a problem are often mixed and pairs form. The "multistep" templates have
# larger numbers and a multiplication: the 135M model answered none of 40 right and 2-3 of 24 problems gave a pair.
EASY_TEMPLATES = [
    ("{n} had {a} coins. {n} spent {b} coins on bread and {c} coins on milk. How many coins are left?",
     lambda a, b, c: a - b - c),
    ("{n} has {a} apples. {n} buys {b} more apples. Then {n} gives {c} apples to a friend. How many apples does {n} "
     "have now?", lambda a, b, c: a + b - c),
    ("{n} has {a} pens. {n} gives {b} pens to a friend and then buys {c} new pens. How many pens does {n} have now?",
     lambda a, b, c: a - b + c),
]
MULTISTEP_TEMPLATES = [
    ("{n} has {a} marbles. {n} buys {b} bags with {c} marbles in each bag, then gives away {d} marbles. "
     "How many marbles does {n} have now?", lambda a, b, c, d: a + b * c - d),
    ("A shop had {a} apples. It sold {d} apples in the morning and received {b} boxes of {c} apples in the "
     "afternoon. How many apples does the shop have at the end of the day?", lambda a, b, c, d: a - d + b * c),
    ("{n} reads {c} pages every day for {b} days and then {a} more pages. How many pages did {n} read in total?",
     lambda a, b, c, d: b * c + a),
]
NAMES = ["Sam", "Ana", "Li", "Omar", "Eva", "Raj"]


def word_problems(n: int, seed: int, kind: str = "easy") -> list[dict]:
    """`n` generated problems with integer answers, templates in turn; `kind` "easy" (2 steps, one-digit operands,
    answers >= 1) or "multistep" (2-3 steps with a multiplication, operands up to 40)."""
    rng = random.Random(seed)
    out = []
    for i in range(n):
        if kind == "easy":
            text, fn = EASY_TEMPLATES[i % len(EASY_TEMPLATES)]
            b, c = rng.randint(2, 6), rng.randint(1, 4)
            a = b + c + rng.randint(1, 5) if i % len(EASY_TEMPLATES) == 0 else rng.randint(b + 1, 9)
            question, answer = text.format(n=rng.choice(NAMES), a=a, b=b, c=c), fn(a, b, c)
        elif kind == "multistep":
            text, fn = MULTISTEP_TEMPLATES[i % len(MULTISTEP_TEMPLATES)]
            a, b, c = rng.randint(5, 40), rng.randint(2, 6), rng.randint(2, 9)
            d = rng.randint(1, a)
            question, answer = text.format(n=rng.choice(NAMES), a=a, b=b, c=c, d=d), fn(a, b, c, d)
        else:
            raise ValueError(f"unknown problem kind {kind!r} (easy, multistep)")
        out.append({"question": question, "answer": str(answer)})
    return out


@torch.no_grad()
def accuracy(model, tok, problems, max_new_tokens, batch_size, system) -> float:
    from hf_fastslow.evaluation.answers import answers_match
    from hf_fastslow.evaluation.prompts import encode_chat
    from hf_fastslow.trainers.dts import SAMPLE_PROMPT

    model.eval()
    right = 0
    for s in range(0, len(problems), batch_size):
        chunk = problems[s:s + batch_size]
        enc = encode_chat(tok, [SAMPLE_PROMPT.format(question=p["question"]) for p in chunk], system=system)
        out = model.generate(**enc, do_sample=False, max_new_tokens=max_new_tokens,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
        texts = tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
        right += sum(answers_match(t, p["answer"]) for t, p in zip(texts, chunk))
    return right / len(problems)


def dpo_epoch(base, tok, pairs, args):
    from trl import DPOConfig, DPOTrainer

    if len(pairs) == 0:
        return None
    model = copy.deepcopy(base)
    cfg = DPOConfig(output_dir="outputs/dts_dpo", use_cpu=True, bf16=False, gradient_checkpointing=False,
                    num_train_epochs=1, per_device_train_batch_size=2, learning_rate=args.lr, beta=0.1,
                    max_length=512, report_to=[], save_strategy="no", logging_steps=1000, seed=args.seed,
                    disable_tqdm=True)
    DPOTrainer(model, ref_model=copy.deepcopy(base), args=cfg, train_dataset=pairs.remove_columns(["answer"]),
               processing_class=tok).train()
    return model


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--problems", choices=["easy", "multistep"], default="easy")
    p.add_argument("--train", type=int, default=32)
    p.add_argument("--test", type=int, default=64)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--max-solve-tokens", type=int, default=128)
    p.add_argument("--max-think-tokens", type=int, default=64)
    p.add_argument("--lr", type=float, default=5e-6)
    p.add_argument("--batch-size", type=int, default=128)  # rows per generate call; big batches are cheap on CPU
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", default=None)
    p.add_argument("--quick", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.train, args.test, args.k, args.max_solve_tokens, args.max_think_tokens = 6, 6, 2, 48, 32
    torch.set_num_threads(args.threads)
    from hf_fastslow import load_default_model
    from hf_fastslow.trainers.dts import DTSConfig, build_dts_pairs, build_sampling_pairs

    model, tok = load_default_model()
    system = "You are a helpful assistant."  # the same system message in every arm
    train = word_problems(args.train, args.seed, args.problems)
    test = word_problems(args.test, args.seed + 1000, args.problems)
    cfg = DTSConfig(num_strategies=args.k, max_think_tokens=args.max_think_tokens,
                    max_solve_tokens=args.max_solve_tokens, batch_size=args.batch_size, seed=args.seed, system=system)
    results = {}
    for name, builder in (("DTS", build_dts_pairs), ("sampling", build_sampling_pairs)):
        t0 = time.perf_counter()
        pairs, report = builder(model, tok, train, cfg)
        report["build_seconds"] = time.perf_counter() - t0
        results[name] = {"report": report, "pairs": pairs}
        print(f"{name}: {report}", flush=True)
    base_acc = accuracy(model, tok, test, args.max_solve_tokens, args.batch_size, system)
    table = {"base model": {"accuracy": base_acc}}
    for name, r in results.items():
        trained = dpo_epoch(model, tok, r["pairs"], args)
        acc = None if trained is None else accuracy(trained, tok, test, args.max_solve_tokens, args.batch_size, system)
        rep = r["report"]
        table[name] = {"pairs": rep["pairs"], "generated_tokens": rep["generated_tokens"],
                       "distinct_answers": rep["mean_distinct_answers"], "jaccard": rep["mean_jaccard"],
                       "correct_solutions": rep["correct_solutions"], "accuracy": acc}
    ratio = results["DTS"]["report"]["generated_tokens"] / max(results["sampling"]["report"]["generated_tokens"], 1)
    print(f"\n{len(train)} train / {len(test)} test {args.problems} problems, K={args.k}, DPO 1 epoch lr {args.lr:g}; "
          f"generated tokens DTS / sampling = {ratio:.2f}")
    print(f"{'arm':<12}{'pairs':>7}{'tokens':>9}{'distinct ans':>14}{'jaccard':>9}{'test acc':>10}")
    for name, row in table.items():
        acc = "no pairs" if row["accuracy"] is None else f"{row['accuracy']:.3f}"
        if name == "base model":
            print(f"{name:<12}{'':>7}{'':>9}{'':>14}{'':>9}{acc:>10}")
        else:
            print(f"{name:<12}{row['pairs']:>7}{row['generated_tokens']:>9}{row['distinct_answers']:>14.2f}"
                  f"{row['jaccard']:>9.3f}{acc:>10}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "table": table, "token_ratio": ratio}, fh, indent=1)
    return table


if __name__ == "__main__":
    main()
