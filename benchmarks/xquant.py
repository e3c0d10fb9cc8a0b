"""Benchmark: XQuant / XQuant-CL (arXiv 2508.10395) vs DynamicCache and transformers' QuantizedCache on the
embedded default model (SmolLM2-135M-Instruct), all measured in one run.

Perplexity rule (the same for every cache): the bundled public-domain text is fed teacher-forced in chunks of
`--chunk` tokens through the cache; targets from the second chunk on are scored, so attention reads the history back
from the cache. Every quantizing cache keeps its newest < `--residual` tokens in full precision and quantizes whole
blocks of `--residual` tokens with groups of `--group` values (XQuant's first 3 layers at 4 bit as in the paper's
Table 4, unless marked "all layers"). Memory is what each cache object holds after the text (walked tensor by tensor
for transformers' caches, `nbytes()` for ours), reported per token and as "x less than an fp16 K/V cache".

    python benchmarks/xquant.py                  # full table + generate tokens/s (~10 min on 2 CPU cores)
    python benchmarks/xquant.py --skip-generate  # perplexity and memory only
    python benchmarks/xquant.py --only HQQ --skip-generate   # a subset of rows (the fp32 row is always kept)
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024, help="tokens of the bundled text used for perplexity")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--residual", type=int, default=64)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--gen-prompt", type=int, default=512, help="prompt length for the tokens/s measurement")
    p.add_argument("--gen-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-generate", action="store_true")
    p.add_argument("--skip-hqq", action="store_true",
                   help="leave out the HQQ-backed QuantizedCache rows (HQQ's optimizer re-runs over the whole history "
                        "at every flush: ~25 s per row on a quiet 2-core box, but up to 25 min when it is busy)")
    p.add_argument("--only", default=None, help="run only the perplexity rows whose name contains this text")
    p.add_argument("--only-generate", action="store_true", help="skip the perplexity/memory table")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from transformers import DynamicCache, QuantizedCache

    from hf_fastslow import XQuantCache, XQuantConfig, load_default_model
    from hf_fastslow.evaluation.kv_ppl import bundled_text, cache_perplexity
    from hf_fastslow.evaluation.memory import held_tensor_bytes

    model, tok = load_default_model(device=args.device)
    cfg = model.config
    ids = tok(bundled_text(), return_tensors="pt").input_ids[:, : args.tokens].to(args.device)
    n_tokens = ids.shape[1]
    d_kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    fp16_kv_per_token = 2 * cfg.num_hidden_layers * d_kv * 2
    R, G = args.residual, args.group

    def xq(**kw):
        return lambda: XQuantCache(model, XQuantConfig(group_size=G, residual_length=R, **kw))

    def qc(backend, nbits, axis_key, axis_value):
        return lambda: QuantizedCache(backend=backend, config=cfg, nbits=nbits, axis_key=axis_key,
                                      axis_value=axis_value, q_group_size=G, residual_length=R)

    rows = [
        ("DynamicCache (fp32 K/V)", "-", lambda: DynamicCache(config=cfg)),
        ("QuantizedCache quanto, defaults (axis_key=0, axis_value=0)", 4, qc("quanto", 4, 0, 0)),
        ("QuantizedCache quanto, defaults (axis_key=0, axis_value=0)", 2, qc("quanto", 2, 0, 0)),
        ("QuantizedCache quanto, best axes (axis_key=-1, axis_value=0)", 4, qc("quanto", 4, -1, 0)),
        ("QuantizedCache quanto, best axes (axis_key=-1, axis_value=0)", 2, qc("quanto", 2, -1, 0)),
        ("XQuant latent (auto on GQA)", 4, xq(nbits=4, mode="latent")),
        ("XQuant latent (auto on GQA)", 3, xq(nbits=3, mode="latent")),
        ("XQuant latent (auto on GQA)", 2, xq(nbits=2, mode="latent")),
        ("XQuant latent, all layers", 2, xq(nbits=2, mode="latent", high_precision_layers=0)),
        ("XQuant latent + fp16 outlier channel", 2, xq(nbits=2, mode="latent", fp16_outlier_channel=True)),
        ("XQuant-CL (latent deltas, 4-bit base at layer 2)", 4, xq(nbits=4, mode="cl")),
        ("XQuant-CL (latent deltas, 4-bit base at layer 2)", 3, xq(nbits=3, mode="cl")),
        ("XQuant-CL (latent deltas, 4-bit base at layer 2)", 2, xq(nbits=2, mode="cl")),
        ("XQuant plain X (1.5x a K/V cache on this model)", 4, xq(nbits=4, mode="x")),
    ]

    if not args.skip_hqq:
        rows[5:5] = [
            ("QuantizedCache HQQ, defaults (axis 0, 0)", 4, qc("hqq", 4, 0, 0)),
            ("QuantizedCache HQQ, defaults (axis 0, 0)", 2, qc("hqq", 2, 0, 0)),
            ("QuantizedCache HQQ, best axes (axis 1, 1)", 4, qc("hqq", 4, 1, 1)),
            ("QuantizedCache HQQ, best axes (axis 1, 1)", 3, qc("hqq", 3, 1, 1)),
            ("QuantizedCache HQQ, best axes (axis 1, 1)", 2, qc("hqq", 2, 1, 1)),
        ]
    print(f"# XQuant benchmark: {type(model).__name__} SmolLM2-135M-Instruct, {n_tokens} tokens of the bundled text, "
          f"chunks of {args.chunk}, residual window {R}, group {G}, torch {torch.__version__}, "
          f"transformers {__import__('transformers').__version__}, {args.threads} thread(s), device {args.device}")
    print(f"fp16 K/V reference: {fp16_kv_per_token} bytes/token\n")
    print("| cache | bits | PPL | dPPL vs fp | bytes/token | x less than fp16 K/V | s |")
    print("|---|---|---|---|---|---|---|")
    base_ppl = None
    results = {}
    if args.only:
        rows = [rows[0]] + [r for r in rows[1:] if args.only in r[0]]  # keep the fp32 reference row
    for name, bits, factory in ([] if args.only_generate else rows):
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                r = cache_perplexity(model, ids, factory, chunk=args.chunk)
        except Exception as err:  # noqa: BLE001 - a peer backend failing is a result to report, not a crash
            print(f"| {name} | {bits} | failed: {type(err).__name__}: {str(err)[:80]} | | | | |")
            continue
        dt = time.perf_counter() - t0
        cache = r["cache"]
        held = cache.nbytes() if isinstance(cache, XQuantCache) else held_tensor_bytes(cache)
        per_tok = held / n_tokens
        if base_ppl is None:
            base_ppl = r["ppl"]
        results[(name, bits)] = (r["ppl"], per_tok)
        print(f"| {name} | {bits} | {r['ppl']:.3f} | {r['ppl'] - base_ppl:+.3f} | {per_tok:.1f} | "
              f"{fp16_kv_per_token / per_tok:.2f}x | {dt:.1f} |", flush=True)

    if args.skip_generate:
        return results
    results["generate"] = {}

    print(f"\n## greedy generate: prompt {args.gen_prompt} tokens, {args.gen_tokens} new tokens, batch 1, "
          f"median of {args.repeats}")
    prompt = tok(bundled_text(), return_tensors="pt").input_ids[:, : args.gen_prompt].to(args.device)
    gen_rows = [
        ("DynamicCache", {}),
        ("QuantizedCache quanto int4 (axis_key=-1)", dict(cache_implementation="quantized", cache_config=dict(
            backend="quanto", nbits=4, axis_key=-1, axis_value=0, q_group_size=G, residual_length=R))),
        ("XQuant latent int4", dict(cache_implementation="xquant", cache_config=dict(
            nbits=4, mode="latent", group_size=G, residual_length=R))),
        ("XQuant latent int2", dict(cache_implementation="xquant", cache_config=dict(
            nbits=2, mode="latent", group_size=G, residual_length=R))),
        ("XQuant-CL int2", dict(cache_implementation="xquant", cache_config=dict(
            nbits=2, mode="cl", group_size=G, residual_length=R))),
    ]
    print("| cache | tokens/s | x vs DynamicCache | same tokens as DynamicCache |")
    print("|---|---|---|---|")
    ref_seq, ref_speed = None, None
    for name, kw in gen_rows:
        times, seq = [], None
        try:
            for _ in range(args.repeats + 1):  # the first run warms up
                t0 = time.perf_counter()
                with torch.no_grad():
                    seq = model.generate(prompt, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens,
                                         do_sample=False, **kw)
                times.append(time.perf_counter() - t0)
        except Exception as err:  # noqa: BLE001
            print(f"| {name} | failed: {type(err).__name__}: {str(err)[:80]} | | |")
            continue
        speed = args.gen_tokens / statistics.median(times[1:])
        if ref_seq is None:
            ref_seq, ref_speed = seq, speed
        same = (seq[:, prompt.shape[1]:] == ref_seq[:, prompt.shape[1]:]).float().mean().item()
        results["generate"][name] = speed
        print(f"| {name} | {speed:.2f} | {speed / ref_speed:.2f}x | {same:.0%} |", flush=True)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
