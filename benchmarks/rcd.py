"""Benchmark: the cost of RCD's residual inputs at decode time, `rcd_generate` vs the block-diffusion baseline loop
(`block_diffusion_generate`) on the default model, SmolLM2-135M-Instruct (V = 49152, D = 576).

Same prompts (GSM8K questions in the chat template), same process, arms interleaved round by round
(`hf_fastslow.evaluation.timing.interleave`, rotated), batch 1, greedy, `--max-new` tokens per prompt with EOS off
(equal lengths), `threshold=None, steps=block` so every arm runs the same forwards (one commit per step): the
difference in wall time is the residual work (softmax + entropy over V in fp32, E^T p, the blend, and the
`inputs_embeds` path) and nothing else. Arms: the baseline, RCD zero init with the dense soft token (a [b, V] x [V, D]
matmul per step), RCD zero init with top-64 soft tokens, RCD self init (one extra pass per block).
Per arm: median wall seconds per round (min-max), ms per forward (wall / forwards), tokens/s, forwards, and the
fraction of generated tokens equal to the baseline's. The model is NOT a trained DLM (mask token `<empty_output>`,
causal attention + logit shift, the layout an unconverted AR model was trained with): the agreement column says how
much training-free residuals move the decoding, not whether they help (the paper: only SFT closes that gap).

    python benchmarks/rcd.py --quick       # a few minutes on 2 busy cores
    python benchmarks/rcd.py               # more prompts / rounds
    python benchmarks/rcd.py --components --rounds 30 --blocks 8 32   # the per-step pieces alone

`--json PATH` also writes every table row (per block and arm, or per piece with --components) to PATH.
"""

from __future__ import annotations

import argparse
import statistics

import torch


def arms_for(model, prompts, block: int, max_new: int, with_self: bool = True) -> dict:
    """name -> zero-argument callable decoding every prompt; each returns (new tokens per prompt, forwards)."""
    from hf_fastslow.generation.block_diffusion import block_diffusion_generate
    from hf_fastslow.generation.rcd import rcd_generate

    def run(fn, **kw):
        def call():
            rows, forwards = [], 0
            for ids in prompts:
                out = model.generate(ids, attention_mask=torch.ones_like(ids), custom_generate=fn, do_sample=False,
                                     max_new_tokens=max_new,
                                     block_size=block, steps=block, threshold=None, eos_token_id=None,
                                     return_dict_in_generate=True, **kw)
                rows.append(out.sequences[0, ids.shape[1]:].tolist())
                forwards += int(out.num_forwards[0])
            return rows, forwards
        return call

    arms = {
        "baseline": run(block_diffusion_generate),
        "RCD zero, dense": run(rcd_generate, init="zero"),
        "RCD zero, top-64": run(rcd_generate, init="zero", residual_topk=64),
    }
    if with_self:
        arms["RCD self, dense"] = run(rcd_generate, init="self")
    return arms


def component_arms(model, prompt, block: int, topk: int = 64) -> dict:
    """The per-step pieces alone, on the same shapes as a denoising step: one block forward over a cached prompt
    (peeking: nothing stored, as the loop's denoising passes), the dense residual of the block's logits, the top-k one,
    and the injection. Short calls, many rounds: their medians resist the load bursts a whole decode does not."""
    from hf_fastslow.generation.rcd import entropy_weighted_residual, inject_residual, input_embedding_scale
    from hf_fastslow.integrations.caches import cache_kwargs
    from hf_fastslow.modeling.block_diffusion import (
        BlockDiffusionCache,
        block_attention_mask,
        block_diffusion_config,
        model_attention_mask,
    )

    width = prompt.shape[1]
    cache = BlockDiffusionCache()
    with torch.no_grad():
        model(input_ids=prompt, use_cache=True, **cache_kwargs(model, cache))
    mask_id = block_diffusion_config(model).mask_token_id
    ids = torch.full((1, block), mask_id)
    allowed = block_attention_mask(block, width + block, block, q_offset=width, pattern="causal", block_start=width)
    attn = model_attention_mask(model, allowed, torch.float32)
    positions = torch.arange(width, width + block)[None]
    embedding = model.get_input_embeddings()
    scale = input_embedding_scale(embedding)
    logits = torch.randn(block, model.config.vocab_size) * 3
    masked = torch.ones(1, block, dtype=torch.bool)

    @torch.no_grad()
    def forward():
        with cache.peeking():
            return model(input_ids=ids, attention_mask=attn, position_ids=positions, logits_to_keep=0,
                         use_cache=True, **cache_kwargs(model, cache)).logits

    @torch.no_grad()
    def residual(k):
        def run():
            delta, alpha = entropy_weighted_residual(logits, embedding.weight, 1.0, k, embed_scale=scale)
            return inject_residual(embedding(ids), delta[None], alpha[None], masked)
        return run

    return {"block forward": forward, "residual dense": residual(None), f"residual top-{topk}": residual(topk)}


def agreement(rows, reference) -> float:
    same = sum(int(a == b) for got, want in zip(rows, reference) for a, b in zip(got, want))
    return same / max(1, sum(len(want) for want in reference))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true",
                   help="1 prompt, 3 rounds, block 8, 16 new tokens, no self-init arm (minutes on a loaded box)")
    p.add_argument("--prompts", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-new", type=int, default=64)
    p.add_argument("--blocks", type=int, nargs="*", default=[8, 32])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--components", action="store_true",
                   help="time the per-step pieces alone (block forward, dense / top-64 residual) instead of decodes")
    p.add_argument("--json", default=None, help="also write every table row to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.prompts, args.rounds, args.max_new, args.blocks = 1, 3, 16, [8]
    torch.set_num_threads(args.threads)

    from hf_fastslow import load_default_model
    from hf_fastslow.evaluation.cli_support import write_report_json
    from hf_fastslow.evaluation.prompts import chat_text, gsm8k_prompts
    from hf_fastslow.evaluation.timing import Spread, interleave
    from hf_fastslow.modeling.block_diffusion import BlockDiffusionConfig, attach_block_diffusion, ensure_mask_token

    model, tok = load_default_model()
    mask_id = ensure_mask_token(model, tok)
    prompts = [tok(chat_text(tok, q), return_tensors="pt").input_ids for q in gsm8k_prompts(args.prompts)]
    new_tokens = args.max_new * len(prompts)
    print(f"SmolLM2-135M-Instruct, mask id {mask_id}, {len(prompts)} GSM8K prompts "
          f"({[p.shape[1] for p in prompts]} tokens), {args.max_new} new tokens each, greedy, batch 1, "
          f"{args.rounds} rounds + 1 warm-up, torch threads {args.threads}")
    report = {"args": vars(args), "prompt_lengths": [p.shape[1] for p in prompts], "blocks": []}
    if args.components:
        for block in args.blocks:
            attach_block_diffusion(model, BlockDiffusionConfig(mask_id, block, logit_shift=True, attention="causal"))
            result = interleave(component_arms(model, prompts[0], block), repeats=args.rounds, warmup=2, rotate=True,
                                keep_values=False)
            base = result.arms["block forward"]
            print(f"\n### per-step pieces, block {block}, prompt {prompts[0].shape[1]} tokens, {args.rounds} rounds\n")
            print("| piece | ms, median (min-max) | / block forward, median (min-max) of rounds |")
            print("|---|---|---|")
            pieces = {}
            for name, times in result.arms.items():
                ratio = Spread.of([t / b for t, b in zip(times.wall, base.wall)])
                print(f"| {name} | {times.spread.scaled(1e3).format('.1f')} | {ratio.format('.3f')} |")
                pieces[name] = {"ms": times.spread.median * 1e3, "per_block_forward": ratio.median}
            print(f"\n{result.describe_machine()}")
            report["blocks"].append({"block": block, "machine": result.describe_machine(), "pieces": pieces})
        write_report_json(args.json, report)
        return
    for block in args.blocks:
        attach_block_diffusion(model, BlockDiffusionConfig(mask_id, block, logit_shift=True, attention="causal"))
        arms = arms_for(model, prompts, block, args.max_new, with_self=not args.quick)
        result = interleave(arms, repeats=args.rounds, warmup=1, rotate=True)
        base_rows, _ = result.last["baseline"]
        print(f"\n### block {block}, steps {block} (one commit per step)\n")
        print("| arm | wall s per round, median (min-max) | ms / forward | tokens/s | forwards | wall / baseline, "
              "median (min-max) of rounds | CPU s / baseline | tokens == baseline |")
        print("|---|---|---|---|---|---|---|---|")
        rows_out = {}
        for name, times in result.arms.items():
            rows, forwards = result.last[name]
            wall = times.spread
            ratio = Spread.of(result.ratios(name, "baseline"))
            cpu_ratio = Spread.of([c / b for c, b in zip(times.cpu, result.arms["baseline"].cpu)])
            per_forward = statistics.median(times.wall) / forwards * 1e3
            print(f"| {name} | {wall.format('.2f')} | {per_forward:.1f} | {wall.rate(new_tokens).format('.1f')} | "
                  f"{forwards} | {ratio.format('.3f')} | {cpu_ratio.format('.3f')} | "
                  f"{agreement(rows, base_rows):.3f} |")
            agree = agreement(rows, base_rows)
            rows_out[name] = {"wall_s": wall.median, "wall_s_min": wall.low, "wall_s_max": wall.high,
                              "ms_per_forward": per_forward, "tokens_per_s": new_tokens / wall.median,
                              "forwards": forwards, "wall_vs_baseline": ratio.median,
                              "cpu_vs_baseline": cpu_ratio.median, "agreement_with_baseline": agree}
        print(f"\n{result.describe_machine()}")
        report["blocks"].append({"block": block, "steps": block, "machine": result.describe_machine(),
                                 "arms": rows_out})
    write_report_json(args.json, report)


if __name__ == "__main__":
    main()
