"""Benchmark: XQuant / XQuant-CL (arXiv 2508.10395) vs DynamicCache and transformers' QuantizedCache (quanto, HQQ) on
the embedded default model (SmolLM2-135M-Instruct), all measured in one run by the same rules.

Perplexity rule (the same for every cache): the bundled public-domain text is fed teacher-forced in chunks of
`--chunk` tokens through the cache; targets from the second chunk on are scored, so attention reads the history back
from the cache. Every cache returns the K/V of the chunk being fed unquantized (the chunk's tokens attend to each
other exactly) and stores it for later chunks. Every quantizing cache keeps a window of its newest tokens in full
precision and quantizes with groups of `--group` values: XQuant keeps the newest < `--residual` tokens and quantizes
each whole block of `--residual` tokens once; transformers' QuantizedCache (5.24) re-quantizes its whole history,
window included, whenever window + new tokens reach `--residual`. With chunk = residual both read every earlier chunk
back quantized. XQuant keeps its first 3 layers at 4 bit (the paper's Table 4) unless marked "all layers".

Memory rule (the same for every cache): `hf_fastslow.evaluation.memory.storage_bytes(cache)` -- every tensor storage
reachable from the cache object, each counted once at its full size -- after every chunk. "bytes/token" is the slope
of a least-squares line through those points, "fixed" its intercept; "fixed, window full" is what the cache holds
after `--residual - 1` more tokens beyond that line. Factors an XQuant cache shares with other caches through the
model are reported apart ("shared factors": attached on first use, only for the mode in use), and "total @ N" adds
them to the cache.

    python benchmarks/xquant.py                    # full table + generate tokens/s (~10 min on 2 quiet CPU cores)
    python benchmarks/xquant.py --skip-generate    # perplexity and memory only
    python benchmarks/xquant.py --only HQQ --skip-generate   # a subset of rows (the fp32 row is always kept)
    python benchmarks/xquant.py --quick --json x.json --plot x.png   # 512 tokens, DynamicCache, quanto best axes,
        # XQuant latent and CL at 4 and 2 bit, no HQQ, no generate (~2 min on 2 CPU cores)

`--json PATH` writes every figure of the tables (rows keyed by arm and bits, e.g. "quanto_best/int2"); `--plot PATH`
draws bytes per token against perplexity.
"""

from __future__ import annotations

import argparse
import sys
import time

import torch

QUICK_TOKENS = 512
QUICK_ARMS = ("dynamic", "quanto_best", "xquant_latent", "xquant_cl")


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
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_TOKENS} tokens, only the rows {', '.join(QUICK_ARMS)} at 4 and 2 bit, no HQQ, no "
                        "generate: the headline at reduced size (bench quick profile)")
    p.add_argument("--json", default=None, help="write every figure of the tables to this JSON file")
    p.add_argument("--plot", default=None, help="write a bytes/token vs perplexity plot (PNG) to this path")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.skip_hqq, args.skip_generate = QUICK_TOKENS, True, True
    torch.set_num_threads(args.threads)

    from transformers import DynamicCache, QuantizedCache

    from hf_fastslow import XQuantCache, XQuantConfig, load_default_model
    from hf_fastslow.evaluation.kv_bench import fit_line
    from hf_fastslow.evaluation.kv_ppl import cache_perplexity
    from hf_fastslow.evaluation.kv_report import plot_memory_vs_ppl, row_key, write_report_json
    from hf_fastslow.evaluation.memory import storage_bytes
    from hf_fastslow.evaluation.prompts import bundled_text_ids
    from hf_fastslow.evaluation.timing import interleave
    from hf_fastslow.integrations import cache_kwargs
    from hf_fastslow.quantizers.xquant import release_xquant_factors, xquant_factor_nbytes

    model, tok = load_default_model(device=args.device)
    cfg = model.config
    text_ids = bundled_text_ids(tok).to(args.device)
    ids = text_ids[:, : args.tokens]
    n_tokens = ids.shape[1]
    R, G = args.residual, args.group
    extra = text_ids[:, n_tokens : n_tokens + R - 1]
    d_kv = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    fp16_kv_per_token = 2 * cfg.num_hidden_layers * d_kv * 2
    model_dtype = next(model.parameters()).dtype

    def xq(**kw):
        return lambda: XQuantCache(model, XQuantConfig(group_size=G, residual_length=R, **kw))

    def qc(backend, nbits, axis_key, axis_value):
        return lambda: QuantizedCache(backend=backend, config=cfg, nbits=nbits, axis_key=axis_key,
                                      axis_value=axis_value, q_group_size=G, residual_length=R)

    rows = [  # (arm: a stable key for the JSON, name as printed, bits, factory)
        ("dynamic", f"DynamicCache ({str(model_dtype).replace('torch.', '')} K/V, the model's dtype)", "-",
         lambda: DynamicCache(config=cfg)),
        ("quanto_default", "QuantizedCache quanto, defaults (axis_key=0, axis_value=0)", 4, qc("quanto", 4, 0, 0)),
        ("quanto_default", "QuantizedCache quanto, defaults (axis_key=0, axis_value=0)", 2, qc("quanto", 2, 0, 0)),
        ("quanto_best", "QuantizedCache quanto, best axes (axis_key=-1, axis_value=0)", 4, qc("quanto", 4, -1, 0)),
        ("quanto_best", "QuantizedCache quanto, best axes (axis_key=-1, axis_value=0)", 2, qc("quanto", 2, -1, 0)),
        ("xquant_latent", "XQuant latent (auto on GQA)", 4, xq(nbits=4, mode="latent")),
        ("xquant_latent", "XQuant latent (auto on GQA)", 3, xq(nbits=3, mode="latent")),
        ("xquant_latent", "XQuant latent (auto on GQA)", 2, xq(nbits=2, mode="latent")),
        ("xquant_latent_all_layers", "XQuant latent, all layers", 2, xq(nbits=2, mode="latent",
                                                                         high_precision_layers=0)),
        ("xquant_latent_outlier", "XQuant latent + fp16 outlier channel", 2, xq(nbits=2, mode="latent",
                                                                                 fp16_outlier_channel=True)),
        ("xquant_cl", "XQuant-CL (latent deltas, 4-bit base at layer 2)", 4, xq(nbits=4, mode="cl")),
        ("xquant_cl", "XQuant-CL (latent deltas, 4-bit base at layer 2)", 3, xq(nbits=3, mode="cl")),
        ("xquant_cl", "XQuant-CL (latent deltas, 4-bit base at layer 2)", 2, xq(nbits=2, mode="cl")),
        ("xquant_x", "XQuant plain X (1.5x a K/V cache on this model)", 4, xq(nbits=4, mode="x")),
    ]
    if not args.skip_hqq:
        rows[5:5] = [
            ("hqq_default", "QuantizedCache HQQ, defaults (axis 0, 0)", 4, qc("hqq", 4, 0, 0)),
            ("hqq_default", "QuantizedCache HQQ, defaults (axis 0, 0)", 2, qc("hqq", 2, 0, 0)),
            ("hqq_best", "QuantizedCache HQQ, best axes (axis 1, 1)", 4, qc("hqq", 4, 1, 1)),
            ("hqq_best", "QuantizedCache HQQ, best axes (axis 1, 1)", 3, qc("hqq", 3, 1, 1)),
            ("hqq_best", "QuantizedCache HQQ, best axes (axis 1, 1)", 2, qc("hqq", 2, 1, 1)),
        ]
    if args.only:
        rows = [rows[0]] + [r for r in rows[1:] if args.only in r[1]]  # keep the reference row
    if args.quick:
        rows = [r for r in rows if r[0] in QUICK_ARMS and r[2] in ("-", 4, 2)]

    print(f"# XQuant benchmark: {type(model).__name__} SmolLM2-135M-Instruct ({model_dtype}), {n_tokens} tokens of the "
          f"bundled text, chunks of {args.chunk}, window {R}, group {G}, torch {torch.__version__}, transformers "
          f"{__import__('transformers').__version__}, {args.threads} thread(s), device {args.device}")
    print("Same rules for every cache: memory by the same storage walk after every chunk; each chunk attends to itself "
          "unquantized and to every earlier chunk as the cache stores it (XQuant quantizes each full block of its "
          "window once, QuantizedCache re-quantizes its whole history when its window fills; see the docstring).")
    print(f"fp16 K/V reference: {fp16_kv_per_token} bytes/token\n")
    print(f"| cache | bits | PPL | dPPL vs ref | bytes/token | x less than fp16 K/V | fixed MB | fixed MB, window full "
          f"| shared factors MB | total MB @ {n_tokens} | s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    base_ppl = None
    results = {}
    report = {"benchmark": "xquant", "model": "SmolLM2-135M-Instruct", "model_dtype": str(model_dtype),
              "tokens": n_tokens, "scored_targets": n_tokens - min(args.chunk, n_tokens), "chunk": args.chunk,
              "residual": R, "group": G, "quick": args.quick, "args": vars(args), "threads": args.threads,
              "device": args.device, "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "fp16_kv_bytes_per_token": fp16_kv_per_token,
              "rows": {}, "break_even_tokens": {}, "generate": {}}
    cpu0 = time.process_time()
    for arm, name, bits, factory in ([] if args.only_generate else rows):
        release_xquant_factors(model)  # factors of earlier rows must not count for this one
        points: list[tuple[int, int]] = []
        t0 = time.perf_counter()
        try:
            with torch.no_grad():
                r = cache_perplexity(model, ids, factory, chunk=args.chunk,
                                     on_chunk=lambda n, c, pts=points: pts.append((n, storage_bytes(c))))
                cache = r["cache"]
                at_end = points[-1][1]
                model(extra, use_cache=True, **cache_kwargs(model, cache))
                window_full = storage_bytes(cache)
        except Exception as err:  # noqa: BLE001 - a peer backend failing is a result to report, not a crash
            print(f"| {name} | {bits} | failed: {type(err).__name__}: {str(err)[:80]} | | | | | | | | |")
            report["rows"][row_key(arm, bits)] = dict(arm=arm, name=name, bits=None if bits == "-" else bits,
                                                      failed=f"{type(err).__name__}: {err}")
            continue
        dt = time.perf_counter() - t0
        if isinstance(cache, XQuantCache) and cache.nbytes() != window_full:
            raise AssertionError("XQuantCache.nbytes() disagrees with the storage walk")
        slope, fixed = fit_line(points)
        fixed_full = window_full - slope * (n_tokens + extra.shape[1])
        shared = xquant_factor_nbytes(model)
        total = at_end + shared
        if base_ppl is None:
            base_ppl = r["ppl"]
        results[(name, bits)] = dict(ppl=r["ppl"], bytes_per_token=slope, fixed=fixed, fixed_window_full=fixed_full,
                                     shared=shared, total=total)
        report["rows"][row_key(arm, bits)] = dict(
            arm=arm, name=name, bits=None if bits == "-" else bits, ppl=r["ppl"], dppl=r["ppl"] - base_ppl,
            bytes_per_token=slope, x_less_than_fp16_kv=fp16_kv_per_token / slope, fixed_bytes=fixed,
            fixed_window_full_bytes=fixed_full, shared_factor_bytes=shared, total_bytes_at_end=total, seconds=dt)
        print(f"| {name} | {bits} | {r['ppl']:.3f} | {r['ppl'] - base_ppl:+.3f} | {slope:.1f} | "
              f"{fp16_kv_per_token / slope:.2f}x | {fixed / 1e6:.2f} | {fixed_full / 1e6:.2f} | {shared / 1e6:.2f} | "
              f"{total / 1e6:.2f} | {dt:.1f} |", flush=True)

    if results:
        ref_slope = next(iter(results.values()))["bytes_per_token"]
        print(f"\nBreak-even against the reference row ({ref_slope:.0f} bytes/token): the context length from which "
              "the cache plus its shared factors (window full) holds less than the reference.")
        for (name, bits), res in list(results.items())[1:]:
            overhead = res["fixed_window_full"] + res["shared"]
            gain = ref_slope - res["bytes_per_token"]
            where = f"{max(0.0, overhead / gain):.0f} tokens" if gain > 0 else "never"
            print(f"- {name}, {bits} bit: {where}")
        for key, row in list(report["rows"].items())[1:]:
            if "ppl" in row:
                gain = ref_slope - row["bytes_per_token"]
                overhead = row["fixed_window_full_bytes"] + row["shared_factor_bytes"]
                report["break_even_tokens"][key] = max(0.0, overhead / gain) if gain > 0 else None
    report["table_cpu_s"] = time.process_time() - cpu0
    if args.plot and report["rows"]:
        reason = plot_memory_vs_ppl(report["rows"], args.plot, f"XQuant vs peer caches, SmolLM2-135M, {n_tokens} "
                                    f"tokens of the bundled text, chunks of {args.chunk}, window {R}, group {G}")
        print(f"\nplot: {reason or args.plot}")

    if args.skip_generate:
        write_report_json(args.json, report)
        return results
    results["generate"] = {}

    print(f"\n## greedy generate: prompt {args.gen_prompt} tokens, {args.gen_tokens} new tokens, batch 1, "
          f"median of {args.repeats} interleaved rounds after a warm-up round")
    prompt = text_ids[:, : args.gen_prompt]
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
    print("| cache | tokens/s, median (min-max) | x vs DynamicCache | same tokens as DynamicCache |")
    print("|---|---|---|---|")

    def generate(kw):
        with torch.no_grad():
            return model.generate(prompt, max_new_tokens=args.gen_tokens, min_new_tokens=args.gen_tokens,
                                  do_sample=False, **kw)

    # Arms interleaved (one run of each per round, after one warm-up round), so that a change of load on a shared
    # box hits every arm alike. A peer that fails is a result to report.
    timing = interleave({name: (lambda kw=kw: generate(kw)) for name, kw in gen_rows}, repeats=args.repeats,
                        warmup=1, record_failures=True)
    ref_name = gen_rows[0][0]
    ref_speed = timing[ref_name].spread.rate(args.gen_tokens).median
    for name, _ in gen_rows:
        if name in timing.failed:
            print(f"| {name} | failed: {timing.failed[name]} | | |")
            continue
        speed = timing[name].spread.rate(args.gen_tokens)
        new_tokens = slice(prompt.shape[1], None)
        same = (timing.last[name][:, new_tokens] == timing.last[ref_name][:, new_tokens]).float().mean().item()
        results["generate"][name] = speed.median
        report["generate"][name] = dict(tokens_per_s_median=speed.median, tokens_per_s_min=speed.low,
                                        tokens_per_s_max=speed.high, x_vs_dynamic=speed.median / ref_speed,
                                        same_tokens_as_dynamic=same)
        print(f"| {name} | {speed.format()} | {speed.median / ref_speed:.2f}x | {same:.0%} |", flush=True)
    print(f"\n{timing.describe_machine()}")
    report["generate_failed"] = dict(timing.failed)
    write_report_json(args.json, report)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
