"""Stationary-batch ISD throughput: many concurrent requests through `StationaryBatchISD` (B slots, fixed [B, 2N-1]
rounds, continuous batching) beside the same requests run one by one with `isd_generate`, in left-padded batches of B
with `isd_generate`, and with HF `generate` (greedy) one by one and in left-padded batches of B. One process, the
arms interleaved round by round (hf_fastslow.evaluation.timing.interleave), greedy, EOS off so every request makes
exactly its own `max_new_tokens`.

Tokens/s = generated tokens of all requests / wall-clock of the arm. Requests have ragged prompt lengths and (unless
`--equal-new`) ragged max_new_tokens (drawn in [new_tokens/4, new_tokens]): a static batch then runs to its longest
member (the peers generate that many tokens for every row and the surplus is cut, as a user would), while the
stationary batch gives a finished slot the next request at once.

The model is a tiny random Llama by default: its mask slots draft noise, so ISD accepts ~no drafts (TPF ~ 1) and the
figure measures the scheduler (batching, masking, refills), not drafting; `--model PATH --mask-id ID` runs a trained
I-DLM instead. Agreement: per arm, requests whose tokens equal greedy `generate`'s one by one (fp32: a near-tie may
flip one; counted, not asserted).

    python benchmarks/isd_batch.py --quick
    python benchmarks/isd_batch.py --requests 32 --batch 8 --new-tokens 32 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import random

import torch

from hf_fastslow.evaluation.timing import interleave
from hf_fastslow.generation.isd import isd_generate
from hf_fastslow.generation.isd_batch import StationaryBatchISD


def tiny_random_llama(hidden: int, layers: int, vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
                         num_attention_heads=max(1, hidden // 32), num_key_value_heads=max(1, hidden // 64),
                         max_position_embeddings=1024, pad_token_id=0, eos_token_id=1, bos_token_id=2)
    return LlamaForCausalLM(config).eval()


def make_requests(count: int, vocab: int, mask_id: int, new_tokens: int, ragged_new: bool, seed: int):
    rng = random.Random(seed)
    ids = [t for t in range(3, vocab) if t != mask_id]
    prompts = [torch.tensor([rng.choice(ids) for _ in range(rng.randint(4, 32))]) for _ in range(count)]
    limits = [rng.randint(max(1, new_tokens // 4), new_tokens) if ragged_new else new_tokens for _ in range(count)]
    return prompts, limits


def left_padded(prompts):
    width = max(p.numel() for p in prompts)
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - p.numel():] = p
        mask[i, width - p.numel():] = 1
    return ids, mask


def arms(model, prompts, limits, batch: int, n: int, mask_id: int):
    """name -> zero-argument callable returning the generated tokens per request (lists of ints)."""
    plain = {"do_sample": False, "eos_token_id": None, "pad_token_id": 0}
    isd = {"custom_generate": isd_generate, "gen_block_size": n, "mask_token_id": mask_id, **plain}
    chunks = [range(i, min(i + batch, len(prompts))) for i in range(0, len(prompts), batch)]

    def one_by_one(**kw):
        out = []
        for p, m in zip(prompts, limits):
            seq = model.generate(p[None], attention_mask=torch.ones(1, p.numel(), dtype=torch.long),
                                 max_new_tokens=m, **kw)[0]
            out.append(seq[p.numel():].tolist())
        return out

    def batched(**kw):
        out = []
        for chunk in chunks:
            ids, mask = left_padded([prompts[i] for i in chunk])
            longest = max(limits[i] for i in chunk)  # a static batch runs to its longest member
            seqs = model.generate(ids, attention_mask=mask, max_new_tokens=longest, **kw)
            out.extend(seqs[j, ids.shape[1]: ids.shape[1] + limits[i]].tolist() for j, i in enumerate(chunk))
        return out

    stationary = StationaryBatchISD(model, batch, gen_block_size=n, mask_token_id=mask_id, eos_token_id=[])
    last = {}

    def stationary_batch():
        out = stationary.generate(prompts, max_new_tokens=limits)
        last["out"] = out
        return [s[p.numel():].tolist() for p, s in zip(prompts, out.sequences)]

    return {
        f"stationary batch ISD (B={batch})": stationary_batch,
        "isd_generate one by one": lambda: one_by_one(**isd),
        f"isd_generate batches of {batch}": lambda: batched(**isd),
        "generate one by one": lambda: one_by_one(**plain),
        f"generate batches of {batch}": lambda: batched(**plain),
    }, last


def run(quick: bool = True, requests: int | None = None, batch: int | None = None, new_tokens: int | None = None,
        n: int = 3, ragged_new: bool = True, repeats: int | None = None, hidden: int = 128, layers: int = 4,
        vocab: int = 512, model_path: str | None = None, mask_id: int | None = None, seed: int = 0) -> dict:
    """Run the comparison; returns {"rows": [...], "machine": ..., "settings": ...} (what `main` prints)."""
    requests = requests or (12 if quick else 32)
    batch = batch or (4 if quick else 8)
    new_tokens = new_tokens or (12 if quick else 32)
    repeats = repeats or (2 if quick else 3)
    if model_path is not None:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(model_path).eval()
        if mask_id is None:
            raise SystemExit("--model needs --mask-id")
    else:
        model = tiny_random_llama(hidden, layers, vocab, seed)
        mask_id = vocab - 1 if mask_id is None else mask_id
    vocab = model.get_input_embeddings().num_embeddings
    prompts, limits = make_requests(requests, vocab, mask_id, new_tokens, ragged_new, seed)
    table, last = arms(model, prompts, limits, batch, n, mask_id)
    with torch.no_grad():
        result = interleave(table, repeats=repeats, warmup=1, rotate=True)
    reference = result.last["generate one by one"]
    total = sum(limits)
    rows = []
    for name in table:
        spread = result[name].spread
        got = result.last[name]
        rows.append({"arm": name, "tokens_per_s": total / spread.median, "tokens_per_s_low": total / spread.high,
                     "tokens_per_s_high": total / spread.low, "seconds": spread.median,
                     "agree_with_generate": sum(a == b for a, b in zip(got, reference)), "requests": requests})
    out = last["out"]
    settings = {"requests": requests, "batch": batch, "new_tokens": new_tokens, "ragged_new": ragged_new, "N": n,
                "repeats": repeats, "tokens": total,
                "model": model_path or f"random Llama h{hidden} l{layers} v{vocab}",
                "stationary_forwards": out.forwards, "stationary_compactions": out.compactions,
                "stationary_tpf": float(out.new_tokens.sum() / out.num_forwards.sum()),
                "stationary_acceptance": float(out.acceptance_rate.nanmean())}
    return {"rows": rows, "machine": result.describe_machine(), "settings": settings}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small smoke profile (~1 minute on an idle box)")
    parser.add_argument("--requests", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--new-tokens", type=int)
    parser.add_argument("--equal-new", action="store_true", help="every request makes --new-tokens (default: drawn "
                        "per request in [new_tokens/4, new_tokens])")
    parser.add_argument("--gen-block-size", type=int, default=3)
    parser.add_argument("--repeats", type=int)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--model", help="a saved (I-DLM) causal LM instead of the random one")
    parser.add_argument("--mask-id", type=int)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    report = run(args.quick, args.requests, args.batch, args.new_tokens, args.gen_block_size, not args.equal_new,
                 args.repeats, args.hidden, args.layers, args.vocab, args.model, args.mask_id)
    if args.json:
        print(json.dumps(report, indent=1))
        return
    s = report["settings"]
    print(f"{s['model']}; {s['requests']} requests (prompts 4-32 tokens), {s['tokens']} new tokens in all "
          f"({'ragged' if s['ragged_new'] else 'equal'} max_new_tokens <= {s['new_tokens']}), N={s['N']}, greedy, "
          f"EOS off; {report['machine']}; medians of {s['repeats']} interleaved repeats (min-max)")
    print(f"stationary batch: {s['stationary_forwards']} forwards, TPF {s['stationary_tpf']:.2f}, acceptance "
          f"{s['stationary_acceptance']:.2f}, {s['stationary_compactions']} compactions")
    print(f"{'arm':34s} {'tokens/s':>22s} {'s':>7s} {'= generate':>10s}")
    for r in report["rows"]:
        spread = f"{r['tokens_per_s']:.1f} ({r['tokens_per_s_low']:.1f}-{r['tokens_per_s_high']:.1f})"
        print(f"{r['arm']:34s} {spread:>22s} {r['seconds']:7.2f} {r['agree_with_generate']:>6d}/{r['requests']}")


if __name__ == "__main__":
    main()
