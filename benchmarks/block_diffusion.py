"""Benchmark: block-diffusion decoding with a prefix KV cache (`block_diffusion_generate`) vs diffusers'
`LLaDA2Pipeline` + `BlockRefinementScheduler` (diffusers 0.42.1, no cache: every step recomputes the whole window,
driven on our models by `hf_fastslow.integrations.dlm_seam.run_llada2_pipeline`) vs plain greedy `model.generate`.

Same prompts, same process, arms interleaved round by round (`hf_fastslow.evaluation.timing.interleave`, rotated),
batch 1, greedy, `--max-new` tokens per prompt with EOS disabled for every arm (equal lengths; TPF and speed do not
depend on where a row would stop). Per arm: tokens per forward (TPF = generated tokens / model forwards; ours counts
the prefill, every denoising forward and every commit pass; greedy generate is 1.0 on that count; the pipeline's
forwards are counted by the adapter and it has no prefill or commit pass), tokens/s (median over rounds, min-max), and
agreement with AR greedy (fraction of generated positions equal to greedy `generate`'s token).

Models: (1) a tiny random Llama (2 layers, hidden 64, vocab 512) with `--tiny-prompt`-token random prompts; (2) the
default model SmolLM2-135M-Instruct, GSM8K questions in its chat template, mask token from
`ensure_mask_token` (`<empty_output>`, id 16). Neither model is a trained DLM: on these weights the figures measure
speed, TPF and how far parallel commits drift from AR greedy (agreement), not DLM quality. The default model runs
with `attention="causal"` + logit shift (I-DLM layout: the pattern an unconverted AR model was trained with).

    python benchmarks/block_diffusion.py --quick      # ~2 min on 2 busy cores
    python benchmarks/block_diffusion.py              # 4 prompts x 32 tokens, 3 rounds, 4 settings (~20 min)

`--json PATH` also writes every table row (per setting and arm) to PATH.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys

import torch


def agreement(generated: list[list[int]], reference: list[list[int]]) -> float:
    same = total = 0
    for got, want in zip(generated, reference):
        n = min(len(got), len(want))
        same += sum(int(a == b) for a, b in zip(got[:n], want[:n]))
        total += len(want)
    return same / max(total, 1)


def arms_for(model, tok, prompts, args, block, steps, threshold):
    """name -> zero-argument callable decoding every prompt; each returns (new tokens per prompt, forwards)."""
    from hf_fastslow.generation.block_diffusion import block_diffusion_generate
    from hf_fastslow.integrations.dlm_seam import llada2_pipeline_available, run_llada2_pipeline

    def ours(fuse):
        def run():
            rows, forwards = [], 0
            for ids in prompts:
                out = model.generate(ids, attention_mask=torch.ones_like(ids), custom_generate=block_diffusion_generate,
                                     do_sample=False,
                                     max_new_tokens=args.max_new, block_size=block, steps=steps, threshold=threshold,
                                     eos_token_id=None, return_dict_in_generate=True, fuse_commit=fuse)
                rows.append(out.sequences[0, ids.shape[1]:].tolist())
                forwards += int(out.num_forwards[0])
            return rows, forwards
        return run

    def greedy():
        rows = []
        for ids in prompts:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                 max_new_tokens=args.max_new, min_new_tokens=args.max_new, eos_token_id=None)
            rows.append(out[0, ids.shape[1]:].tolist())
        return rows, sum(len(r) for r in rows)  # one forward per token (the prefill gives the first)

    def pipeline():
        rows, forwards = [], 0
        for ids in prompts:
            out = run_llada2_pipeline(model, tok, ids, attention_mask=torch.ones_like(ids), block_size=block,
                                      steps=steps, threshold=threshold if threshold is not None else 1.1,
                                      max_new_tokens=args.max_new)
            rows.append(out.sequences[0, ids.shape[1]:].tolist())
            forwards += out.num_forwards
        return rows, forwards

    arms = {"AR greedy generate": greedy, "ours (cached, fused commit)": ours(True),
            "ours (cached, separate commit)": ours(False)}
    if llada2_pipeline_available():
        arms["diffusers LLaDA2Pipeline (no cache)"] = pipeline
    return arms


def run_setting(title, model, tok, prompts, args, block, steps, threshold) -> dict:
    """Print one setting's table; return it as a record (arm name -> its row; a failed arm has only "failed")."""
    from hf_fastslow.evaluation.timing import interleave

    arms = arms_for(model, tok, prompts, args, block, steps, threshold)
    result = interleave(arms, repeats=args.repeats, warmup=1, rotate=True, record_failures=True)
    reference = result.last["AR greedy generate"][0]
    tokens = sum(len(r) for r in reference)
    th = "none" if threshold is None else threshold
    print(f"\n### {title}: block {block}, steps {steps}, threshold {th}, {len(prompts)} prompts x {args.max_new} "
          f"new tokens, prompt lengths {[p.shape[1] for p in prompts]}")
    print(f"({result.describe_machine()}; {args.repeats} timed rounds after 1 warm-up)\n")
    print("| arm | TPF | tokens/s median (min-max) | x AR greedy (paired median) | agreement with AR greedy |")
    print("|---|---|---|---|---|")
    record = {"model": title, "block": block, "steps": steps, "threshold": threshold, "prompts": len(prompts),
              "new_tokens": args.max_new, "prompt_lengths": [p.shape[1] for p in prompts], "repeats": args.repeats,
              "machine": result.describe_machine(), "arms": {}}
    for name in arms:
        if name in result.failed:
            print(f"| {name} | failed: {result.failed[name]} | | | |")
            record["arms"][name] = {"failed": result.failed[name]}
            continue
        rows, forwards = result.last[name]
        spread = result[name].spread.rate(tokens)
        speedup = statistics.median(result.ratios("AR greedy generate", name))
        tpf, agree = sum(len(r) for r in rows) / forwards, agreement(rows, reference)
        print(f"| {name} | {tpf:.2f} | {spread.format('.1f')} | {speedup:.2f} | {agree:.3f} |")
        record["arms"][name] = {"tpf": tpf, "tokens_per_s": spread.median, "tokens_per_s_min": spread.low,
                                "tokens_per_s_max": spread.high, "speedup_vs_greedy": speedup, "agreement": agree}
    return record


def parse_setting(text: str) -> tuple[int, int, float | None]:
    block, steps, threshold = text.split(":")
    return int(block), int(steps), None if threshold.lower() == "none" else float(threshold)


def tiny_model(seed=0):
    from transformers import LlamaConfig, LlamaForCausalLM

    from hf_fastslow.modeling.block_diffusion import BlockDiffusionConfig, attach_block_diffusion

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=0,
                      eos_token_id=1, bos_token_id=2)
    model = LlamaForCausalLM(cfg).eval()
    return attach_block_diffusion(model, BlockDiffusionConfig(mask_token_id=511, block_size=4, attention="causal"))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="2 prompts, 16 new tokens, 1 timed round, one setting per model (~2 min on 2 busy cores)")
    p.add_argument("--max-new", type=int, default=32)
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--tiny-prompt", type=int, default=256)
    p.add_argument("--skip-tiny", action="store_true")
    p.add_argument("--skip-default", action="store_true")
    p.add_argument("--settings", default=None,
                   help="comma-separated block:steps:threshold triples (threshold 'none'), e.g. 4:4:none,4:2:0.9")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None, help="also write every table row to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.repeats, args.max_new = 2, 1, 16
    torch.set_num_threads(args.threads)
    print(f"# block diffusion: {' '.join(['python', 'benchmarks/block_diffusion.py', *sys.argv[1:]])}")
    settings = [(4, 4, 0.9)] if args.quick else [(4, 4, None), (4, 4, 0.9), (8, 8, 0.9), (4, 2, 0.9)]
    if args.settings:
        settings = [parse_setting(item) for item in args.settings.split(",")]
    records = []

    if not args.skip_tiny:
        model = tiny_model()
        gen = torch.Generator().manual_seed(1)
        prompts = [torch.randint(3, 500, (1, args.tiny_prompt), generator=gen) for _ in range(args.prompts)]
        for block, steps, threshold in settings:
            records.append(run_setting("tiny random Llama (2 layers, hidden 64)", model, None, prompts, args, block,
                                       steps, threshold))

    if not args.skip_default:
        from hf_fastslow import load_default_model
        from hf_fastslow.evaluation.prompts import encode_chat, gsm8k_prompts
        from hf_fastslow.modeling.block_diffusion import BlockDiffusionConfig, attach_block_diffusion, ensure_mask_token

        model, tok = load_default_model()
        mask_id = ensure_mask_token(model, tok)
        attach_block_diffusion(model, BlockDiffusionConfig(mask_token_id=mask_id, block_size=4, attention="causal"))
        prompts = [encode_chat(tok, [q])["input_ids"] for q in gsm8k_prompts(args.prompts)]
        print(f"\ndefault model: mask token {tok.mask_token!r} (id {mask_id}), unconverted AR weights")
        for block, steps, threshold in settings:
            records.append(run_setting("SmolLM2-135M-Instruct (unconverted)", model, tok, prompts, args, block, steps,
                                       threshold))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump({"args": vars(args), "settings": records}, fh, indent=1)


if __name__ == "__main__":
    main()
