"""Benchmark: I-DLM introspective strided decoding (ISD) on the default model (SmolLM2-135M-Instruct), CPU, one process.

1. Smoke-scale R-ISD conversion: `IDLMTrainer(lora_gated=True)` trains an activated LoRA (adapter only on the mask
   slots, base weights frozen) with the I-DLM objective on [x_0 | x_t]. Data: `--train-prompts` GSM8K questions
   (rows after the evaluation rows) answered by the base model itself (greedy, `--seq-len` new tokens): R-ISD's drafts
   are judged against the base model, so its own continuations are the targets that raise acceptance fastest.
   The script prints how many tokens it trained on and how long it took.
2. Acceptance before and after: the share of drafted tokens the causal anchor accepts in greedy ISD on the evaluation
   prompts (`isd_generate`'s `acceptance_rate`, accepted / verified drafts): on the base model (mask slots never
   trained: "before") and with the trained adapter ("after"); these are the ISD rows of the next table.
3. Batch-1 decoding of the same prompts, interleaved in one process (`hf_fastslow.evaluation.timing.interleave`):
   plain greedy `generate`, `generate(prompt_lookup_num_tokens=...)` (training-free speculative decoding), and
   `isd_generate` (N = 2, 3) on the base model and as R-ISD (the trained adapter): tokens/s, tokens per forward,
   acceptance; every ISD output compared with plain greedy token for token (fp32; a mismatch is reported with the
   fp32 top-2 logit gap at the first differing position, i.e. whether it is a near tie), and again in float64 on
   `--f64-prompts` prompts.
4. Stationary batch: `StationaryBatchISD` (B slots, fixed [B, 2N-1] rounds) vs the same requests one by one with
   `isd_generate`, and vs one left-padded batched greedy `generate`, interleaved: aggregate tokens/s.
5. The adapter is saved right after training (`save_pretrained`: adapter + block_diffusion_config.json) and every
   measurement runs on it reloaded onto a fresh base model (as a user loads it); the model card with the measured
   figures is written at the end.

    python benchmarks/isd.py                                   # the figures in docs/dlm.md
    python benchmarks/isd.py --train-prompts 4 --prompts 2 --new-tokens 16 --repeats 1 --f64-prompts 1   # smoke
    python benchmarks/isd.py --quick    # smoke scale: 2 training answers, 1 prompt, N=3 only, 2 stationary requests
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time

import torch

from hf_fastslow.evaluation.timing import Spread, interleave

PAPER = 'Yu et al., "Introspective Diffusion Language Models", arXiv 2604.11035'


def chat_ids(tok, questions):
    """Token ids of each question as a one-turn chat prompt (generation prompt added), unpadded."""
    from hf_fastslow.evaluation.prompts import chat_text

    return [tok(chat_text(tok, q), return_tensors="pt", add_special_tokens=False).input_ids for q in questions]


def left_pad(tok, rows):
    """(ids [B, T], attention mask) of 1D/2D id rows, left padded."""
    rows = [r.reshape(-1) for r in rows]
    width = max(r.numel() for r in rows)
    ids = torch.full((len(rows), width), tok.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, width - r.numel():], mask[i, width - r.numel():] = r, 1
    return ids, mask


@torch.no_grad()
def greedy_continuations(model, tok, prompts, new_tokens, batch=8):
    """The base model's greedy continuation of every prompt (list of 1D new-token tensors, EOS kept, padding cut)."""
    out = []
    for i in range(0, len(prompts), batch):
        ids, mask = left_pad(tok, prompts[i:i + batch])
        seq = model.generate(ids, attention_mask=mask, do_sample=False, max_new_tokens=new_tokens,
                             pad_token_id=tok.pad_token_id)
        for row in seq[:, ids.shape[1]:]:
            keep = row.tolist()
            for eos in [tok.eos_token_id, tok.pad_token_id]:
                if eos in keep:
                    keep = keep[: keep.index(eos) + (1 if eos == tok.eos_token_id else 0)]
            out.append(torch.tensor(keep, dtype=torch.long))
    return out


def train_r_isd(model, tok, prompts, targets, mask_id, args):
    """Train the R-ISD activated LoRA; returns (trainer, seconds, clean tokens)."""
    from datasets import Dataset

    from hf_fastslow.trainers.idlm_config import IDLMConfig
    from hf_fastslow.trainers.idlm_trainer import IDLMTrainer

    rows = [{"input_ids": p.reshape(-1).tolist() + t.tolist(), "labels": [-100] * p.numel() + t.tolist()}
            for p, t in zip(prompts, targets)]
    tokens = sum(len(r["input_ids"]) for r in rows) * args.epochs
    config = IDLMConfig(
        output_dir=f"{args.out}/trainer", lora_gated=True, block_length=args.block_length, mask_token_id=mask_id,
        lora_r=args.lora_r, lora_alpha=2 * args.lora_r, per_device_train_batch_size=1, num_train_epochs=args.epochs,
        learning_rate=args.lr, lr_scheduler_type="constant_with_warmup", warmup_steps=2, logging_steps=4,
        save_strategy="no", report_to=[], seed=0, data_seed=0, use_cpu=True, max_length=None, disable_tqdm=True,
        gradient_checkpointing=False, dataset_kwargs={"skip_prepare_dataset": True},
    )
    trainer = IDLMTrainer(model, args=config, train_dataset=Dataset.from_list(rows), processing_class=tok)
    start = time.perf_counter()
    trainer.train()
    return trainer, time.perf_counter() - start, tokens


def first_difference(a, b):
    n = min(a.numel(), b.numel())
    diff = (a[:n] != b[:n]).nonzero()
    if diff.numel():
        return int(diff[0])
    return None if a.numel() == b.numel() else n


@torch.no_grad()
def top2_gap(model, prompt, generated, position):
    """fp32 gap between the two largest logits where the two outputs first differ (small = a near tie)."""
    ids = torch.cat([prompt.reshape(-1), generated[:position]])[None]
    top = model(ids).logits[0, -1].float().topk(2).values
    return float(top[0] - top[1])


def compare(name, outputs, reference, base, prompts, report):
    """Token-for-token equality of each prompt's output with the reference; mismatches with their top-2 gap."""
    same, notes = 0, []
    for i, (got, ref) in enumerate(zip(outputs, reference)):
        where = first_difference(got, ref)
        if where is None:
            same += 1
        else:
            gap = top2_gap(base, prompts[i], ref, where) if where < ref.numel() else float("nan")
            notes.append(f"prompt {i}: first differs at new token {where}, fp32 top-2 gap {gap:.2e}")
    report.append({"arm": name, "identical": same, "prompts": len(reference), "mismatches": notes})
    print(f"  {name}: {same}/{len(reference)} outputs identical to greedy" + "".join(f"\n    {n}" for n in notes))


def timing_section(model, tok, prompts, args, mask_id):
    """Interleaved batch-1 decoding of every prompt by every arm; returns (rows, outputs per arm, run)."""
    from hf_fastslow.generation.isd import isd_generate

    common = dict(do_sample=False, max_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id)
    base_ctx = model.disable_adapter

    def run(kwargs, adapter: bool):
        def call():
            outs, stats = [], []
            with contextlib.nullcontext() if adapter else base_ctx():
                for p in prompts:
                    out = model.generate(p, attention_mask=torch.ones_like(p), return_dict_in_generate=True,
                                         **common, **kwargs)
                    outs.append(out.sequences[0, p.shape[1]:])
                    stats.append((getattr(out, "tokens_per_forward", None), getattr(out, "acceptance_rate", None)))
            return outs, stats
        return call

    arms = {"greedy generate": run({}, False),
            f"prompt lookup ({args.lookup} tokens)": run({"prompt_lookup_num_tokens": args.lookup}, False)}
    for n in args.strides:
        isd = {"custom_generate": isd_generate, "gen_block_size": n, "mask_token_id": mask_id}
        arms[f"ISD N={n}, base model"] = run(isd, False)
        arms[f"R-ISD N={n}, trained adapter"] = run(isd, True)
    timing = interleave(arms, repeats=args.repeats, warmup=1, rotate=True)
    outputs, rows = {}, []
    greedy_time = timing["greedy generate"].wall
    for name, times in timing.arms.items():
        outs, stats = timing.last[name]
        outputs[name] = outs
        new = sum(int(o.numel()) for o in outs)
        rate = Spread.of([new / t for t in times.wall])
        ratio = Spread.of([g / t for g, t in zip(greedy_time, times.wall)])
        tpf = [float(s[0][0]) for s in stats if s[0] is not None]
        acc = [float(s[1][0]) for s in stats if s[1] is not None and not math.isnan(float(s[1][0]))]
        rows.append({"arm": name, "new_tokens": new, "tokens_per_s": rate.median, "tokens_per_s_range": [rate.low,
                     rate.high], "speedup_vs_greedy": ratio.median,
                     "tokens_per_forward": (sum(tpf) / len(tpf) if tpf else
                                            1.0 if name == "greedy generate" else None),  # generate reports none
                     "acceptance": sum(acc) / len(acc) if acc else None})
    return rows, outputs, timing


def float64_section(model, tok, prompts, args, mask_id, report):
    """Greedy vs ISD (base and R-ISD) in float64: the equality check free of fp32 near-tie flips."""
    from hf_fastslow.generation.isd import isd_generate

    m64 = model.to(torch.float64)  # the last section: converted in place
    common = dict(do_sample=False, max_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id)
    with torch.no_grad():
        with m64.disable_adapter():
            ref = [m64.generate(p, attention_mask=torch.ones_like(p), **common)[0, p.shape[1]:] for p in prompts]
        for n in args.strides:
            for label, adapter in (("base model", False), ("R-ISD", True)):
                with contextlib.nullcontext() if adapter else m64.disable_adapter():
                    outs = [m64.generate(p, attention_mask=torch.ones_like(p), custom_generate=isd_generate,
                                         gen_block_size=n, mask_token_id=mask_id, **common)[0, p.shape[1]:]
                            for p in prompts]
                compare(f"float64 ISD N={n} ({label})", outs, ref, m64, prompts, report)


def stationary_section(model, tok, requests, args, mask_id):
    """StationaryBatchISD vs one-by-one isd_generate vs one batched greedy generate, interleaved."""
    from hf_fastslow.generation.isd import isd_generate
    from hf_fastslow.generation.isd_batch import StationaryBatchISD

    n = max(args.strides)
    common = dict(do_sample=False, max_new_tokens=args.new_tokens, pad_token_id=tok.pad_token_id)
    engine = StationaryBatchISD(model, batch_size=args.slots, gen_block_size=n, mask_token_id=mask_id,
                                max_new_tokens=args.new_tokens, eos_token_id=tok.eos_token_id)

    def stationary():
        out = engine.generate([r.reshape(-1) for r in requests])
        return [s[r.numel():] for s, r in zip(out.sequences, requests)], out

    def one_by_one():
        return [model.generate(r, attention_mask=torch.ones_like(r), custom_generate=isd_generate, gen_block_size=n,
                               mask_token_id=mask_id, **common)[0, r.shape[1]:] for r in requests], None

    def batched_greedy():
        ids, mask = left_pad(tok, requests)
        with model.disable_adapter():
            seq = model.generate(ids, attention_mask=mask, **common)
        return [row for row in seq[:, ids.shape[1]:]], None

    arms = {f"StationaryBatchISD (R-ISD N={n}, {args.slots} slots)": stationary,
            f"isd_generate one by one (R-ISD N={n})": one_by_one,
            f"greedy generate, one left-padded batch of {len(requests)}": batched_greedy}
    timing = interleave(arms, repeats=args.repeats, warmup=1, rotate=True)
    rows = []
    for name, times in timing.arms.items():
        outs, _ = timing.last[name]
        new = sum(int((o != tok.pad_token_id).sum()) for o in outs)
        rate = Spread.of([new / t for t in times.wall])
        rows.append({"arm": name, "new_tokens": new, "tokens_per_s": rate.median,
                     "tokens_per_s_range": [rate.low, rate.high]})
    ref, _ = timing.last[f"isd_generate one by one (R-ISD N={n})"]
    got, _ = timing.last[f"StationaryBatchISD (R-ISD N={n}, {args.slots} slots)"]
    same = sum(torch.equal(a, b) for a, b in zip(got, ref))
    return rows, same, timing


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prompts", type=int, default=6, help="GSM8K evaluation prompts (rows 0..n-1)")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--train-prompts", type=int, default=48, help="GSM8K training prompts (rows 200..)")
    p.add_argument("--seq-len", type=int, default=64, help="new tokens of each self-distilled training answer")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--block-length", type=int, default=2, help="I-DLM mask slots per block (serves N <= b + 1)")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--strides", type=int, nargs="+", default=[2, 3])
    p.add_argument("--lookup", type=int, default=3, help="prompt_lookup_num_tokens of the peer")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--f64-prompts", type=int, default=2)
    p.add_argument("--requests", type=int, default=8, help="stationary-batch requests")
    p.add_argument("--slots", type=int, default=4, help="stationary-batch slots")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default="outputs/isd-smollm2", help="adapter, model card and results.json go here")
    p.add_argument("--quick", action="store_true",
                   help="smoke scale (overrides the sizes): 2 training answers of 16 tokens, lr 1e-3, 1 prompt x 12 "
                        "new tokens, N=3 only, 1 timed round, 2 stationary requests on 2 slots, 1 thread")
    args = p.parse_args(argv)
    if args.quick:
        args.train_prompts, args.seq_len, args.lr, args.prompts, args.new_tokens = 2, 16, 1e-3, 1, 12
        args.strides, args.repeats, args.f64_prompts, args.requests, args.slots, args.threads = [3], 1, 1, 2, 2, 1
    if max(args.strides) > args.block_length + 1:
        p.error("--strides needs N <= block_length + 1")
    torch.set_num_threads(args.threads)
    from peft import PeftModel

    from hf_fastslow import load_default_model
    from hf_fastslow.evaluation.prompts import gsm8k_prompts
    from hf_fastslow.model_card import save_model_card
    from hf_fastslow.modeling.block_diffusion import ensure_mask_token

    model, tok = load_default_model()
    model.eval()
    mask_id = ensure_mask_token(model, tok)
    results = {"args": vars(args), "mask_token_id": mask_id, "mask_token": tok.convert_ids_to_tokens(mask_id)}
    eval_prompts = chat_ids(tok, gsm8k_prompts(args.prompts))
    train_prompts = chat_ids(tok, gsm8k_prompts(args.train_prompts, offset=200))
    print(f"SmolLM2-135M-Instruct fp32, torch threads {args.threads}; mask token {results['mask_token']!r} "
          f"(id {mask_id}, reused: no resize)", flush=True)

    start = time.perf_counter()
    targets = greedy_continuations(model, tok, train_prompts, args.seq_len)
    print(f"self-distillation data: {len(targets)} greedy answers ({sum(t.numel() for t in targets)} tokens) in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    trainer, seconds, tokens = train_r_isd(model, tok, train_prompts, targets, mask_id, args)
    results["training"] = {"tokens": tokens, "sequences": len(targets) * args.epochs, "seconds": seconds,
                           "tokens_per_s": tokens / seconds, "lora_r": args.lora_r, "block_length": args.block_length,
                           "lr": args.lr}
    print(f"R-ISD training: {tokens} clean tokens ({len(targets) * args.epochs} sequences, each fed as [x_0 | x_t]) "
          f"in {seconds:.0f} s = {tokens / seconds:.1f} tokens/s", flush=True)
    trainer.save_model(args.out)  # the adapter + block_diffusion_config.json
    tok.save_pretrained(args.out)
    del trainer, model
    # Every measurement below runs on the saved adapter loaded onto a fresh base model, as a user would load it (the
    # trained object's forward is wrapped by trl).
    base, _ = load_default_model()
    model = PeftModel.from_pretrained(base, args.out).eval()

    rows, outputs, timing = timing_section(model, tok, eval_prompts, args, mask_id)
    results["decoding"] = rows
    print(f"\n## Batch-1 decoding, {len(eval_prompts)} GSM8K prompts x {args.new_tokens} new tokens, greedy, medians "
          f"of {args.repeats} interleaved rounds ({timing.describe_machine()})")
    print("| arm | tokens/s (min-max) | x greedy | tokens/forward | ISD acceptance (accepted / verified drafts) |\n"
          "|---|---|---|---|---|")
    for r in rows:
        acc = "" if r["acceptance"] is None else f"{r['acceptance']:.3f}"
        print(f"| {r['arm']} | {r['tokens_per_s']:.1f} ({r['tokens_per_s_range'][0]:.1f}-"
              f"{r['tokens_per_s_range'][1]:.1f}) | {r['speedup_vs_greedy']:.2f} | "
              f"{'n/a' if r['tokens_per_forward'] is None else format(r['tokens_per_forward'], '.2f')} | {acc} |")
    equality: list[dict] = []
    with model.disable_adapter():
        for name, outs in outputs.items():
            if name != "greedy generate":
                compare(f"fp32 {name}", outs, outputs["greedy generate"], model, eval_prompts, equality)

    requests = chat_ids(tok, gsm8k_prompts(args.requests, offset=50))
    srows, same, stiming = stationary_section(model, tok, requests, args, mask_id)
    results["stationary"] = {"rows": srows, "identical_to_one_by_one": same, "requests": len(requests)}
    print(f"\n## Stationary batch: {len(requests)} requests x {args.new_tokens} new tokens, aggregate tokens/s "
          f"({stiming.describe_machine()}); {same}/{len(requests)} outputs identical to one-by-one isd_generate")
    print("| arm | tokens/s (min-max) |\n|---|---|")
    for r in srows:
        print(f"| {r['arm']} | {r['tokens_per_s']:.1f} ({r['tokens_per_s_range'][0]:.1f}-"
              f"{r['tokens_per_s_range'][1]:.1f}) |")

    n = max(args.strides)
    figures = {"training tokens (clean)": tokens, "training seconds (CPU)": round(seconds),
               **{f"{r['arm']}: ISD acceptance": r["acceptance"] for r in rows if r["acceptance"] is not None},
               **{f"{r['arm']}: tokens/forward": r["tokens_per_forward"] for r in rows if "ISD" in r["arm"]}}
    save_model_card(args.out, base_model="HuggingFaceTB/SmolLM2-135M-Instruct", method="i-dlm", paper=PAPER,
                    tags=["diffusion-lm", "r-isd", "activated-lora"], figures=figures,
                    description=("R-ISD activated LoRA for SmolLM2-135M-Instruct (smoke-scale CPU conversion with "
                                 "hf_fastslow's IDLMTrainer(lora_gated=True)): the adapter runs only on the mask "
                                 "slots, so every verified token comes from the base model bit for bit. ISD "
                                 "acceptance = accepted / verified drafts in greedy ISD on GSM8K prompts."),
                    usage=("from peft import PeftModel\nfrom hf_fastslow import load_default_model\n"
                           "from hf_fastslow.generation.isd import isd_generate\n\n"
                           "base, tok = load_default_model()\nmodel = PeftModel.from_pretrained(base, "
                           "'<this folder>')\nids = tok('Hello', return_tensors='pt').input_ids\n"
                           f"out = model.generate(ids, custom_generate=isd_generate, gen_block_size={n}, "
                           f"mask_token_id={mask_id}, max_new_tokens=64, return_dict_in_generate=True)"))
    print(f"\nsaved the adapter, block_diffusion_config.json and a model card to {args.out}", flush=True)
    float64_section(model, tok, eval_prompts[: args.f64_prompts], args, mask_id, equality)
    results["equality"] = equality
    with open(f"{args.out}/results.json", "w") as fh:
        json.dump(results, fh, indent=1, default=str)


if __name__ == "__main__":
    main()
