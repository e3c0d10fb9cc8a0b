"""Benchmark: QVG (k-means smoothing + progressive residual quantization, arXiv 2602.02958) as a text-LLM KV cache on
the embedded default model (SmolLM2-135M-Instruct), beside DynamicCache, XQuant-CL and transformers' QuantizedCache
(quanto and HQQ at their best axes), all measured in one run by the rules of benchmarks/xquant.py.

Perplexity rule (the same for every cache): the bundled public-domain text is fed teacher-forced in chunks of
`--chunk` tokens; targets from the second chunk on are scored, so attention reads the history back from the cache.
Every cache returns the chunk being fed unquantized and keeps a window of its newest tokens in full precision:
QVG and XQuant keep the newest < `--residual` tokens and compress each whole block of `--residual` tokens once
(QVG's `chunk_tokens`); QuantizedCache re-quantizes its whole history when window + new tokens reach `--residual`.
QVG rows keep the first 4 tokens exact (attention sinks) unless marked "no sinks"; their residual blocks are
`--group` channels (= one bf16 scale per head and token at head dim 64); centroids per stage = chunk / 16 unless
marked. The 256-token-chunk rows hold a window of up to 255 exact tokens (see "fixed MB, window full").

Memory rule (the same for every cache): `hf_fastslow.evaluation.memory.storage_bytes(cache)` after every chunk;
"bytes/token" is the least-squares slope, "fixed" its intercept, "fixed, window full" the bytes held after
`--residual - 1` more tokens beyond that line (`hf_fastslow.evaluation.kv_bench.cache_table_row`).

Overheads (CPU, torch path, `--threads` threads): compress = `prq_compress` of one chunk's K and V in every layer;
read = rebuilding the whole history of every layer (decompress + RoPE), what each decode step does; decode step =
one token's forward with the cache at the end of the text, QVG and DynamicCache interleaved step by step.

    python benchmarks/qvg.py                     # everything (~20-30 min on a busy 2-core box)
    python benchmarks/qvg.py --skip-hqq          # without the slow HQQ rows
    python benchmarks/qvg.py --only QVG --skip-timing   # a subset of rows (the DynamicCache row is always kept)
    python benchmarks/qvg.py --skip-table        # the overheads only
    python benchmarks/qvg.py --quick --json q.json --plot q.png   # 512 tokens; DynamicCache, quanto best axes and
        # QVG S=1 at 4 and 2 bit, QVG S=2 and asymmetric S=1 at 2 bit; no HQQ, no overheads (~2 min on 2 CPU cores)

`--json PATH` writes every figure of the tables (rows keyed by arm and bits, e.g. "qvg_s1/int2"); `--plot PATH`
draws bytes per token against perplexity.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time

import torch


def _median_ms(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


QUICK_TOKENS = 512
QUICK_ROWS = ("dynamic", "quanto_best/int4", "quanto_best/int2", "qvg_s1/int4", "qvg_s1/int2", "qvg_s2/int2",
              "qvg_s1_asym/int2")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024, help="tokens of the bundled text used for perplexity")
    p.add_argument("--chunk", type=int, default=64)
    p.add_argument("--residual", type=int, default=64)
    p.add_argument("--group", type=int, default=64)
    p.add_argument("--kmeans-iters", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--decode-steps", type=int, default=16)
    p.add_argument("--skip-hqq", action="store_true", help="leave out the (slow) HQQ QuantizedCache rows")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--skip-table", action="store_true", help="only the overheads")
    p.add_argument("--only", default=None, help="run only the rows whose name contains this text")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_TOKENS} tokens, only the rows {', '.join(QUICK_ROWS)}, no HQQ, no overheads: the "
                        "headline at reduced size (bench quick profile)")
    p.add_argument("--json", default=None, help="write every figure of the tables to this JSON file")
    p.add_argument("--plot", default=None, help="write a bytes/token vs perplexity plot (PNG) to this path")
    args = p.parse_args(argv)
    if args.quick:
        args.tokens, args.skip_hqq, args.skip_timing = QUICK_TOKENS, True, True
    torch.set_num_threads(args.threads)

    from transformers import DynamicCache, QuantizedCache

    from hf_fastslow import QVGCache, QVGConfig, XQuantCache, XQuantConfig, load_default_model
    from hf_fastslow.evaluation.kv_bench import cache_table_row
    from hf_fastslow.evaluation.kv_ppl import bundled_text
    from hf_fastslow.evaluation.kv_report import plot_memory_vs_ppl, row_key, write_report_json
    from hf_fastslow.evaluation.memory import storage_bytes
    from hf_fastslow.integrations import cache_kwargs
    from hf_fastslow.quantizers.qvg_codec import prq_compress
    from hf_fastslow.quantizers.xquant import release_xquant_factors, xquant_factor_nbytes

    model, tok = load_default_model()
    cfg = model.config
    text_ids = tok(bundled_text(), return_tensors="pt").input_ids
    ids = text_ids[:, : args.tokens]
    n_tokens = ids.shape[1]
    R, G = args.residual, args.group
    extra = text_ids[:, n_tokens : n_tokens + R - 1]
    head_dim = cfg.hidden_size // cfg.num_attention_heads
    fp16_kv_per_token = 2 * cfg.num_hidden_layers * cfg.num_key_value_heads * head_dim * 2
    model_dtype = next(model.parameters()).dtype

    def qvg(**kw):
        base = dict(chunk_tokens=R, block_size=G, kmeans_iters=args.kmeans_iters)
        base.update(kw)
        return lambda: QVGCache(model, QVGConfig(**base))

    def xq(**kw):
        return lambda: XQuantCache(model, XQuantConfig(group_size=G, residual_length=R, **kw))

    def qc(backend, nbits, axis_key, axis_value):
        return lambda: QuantizedCache(backend=backend, config=cfg, nbits=nbits, axis_key=axis_key,
                                      axis_value=axis_value, q_group_size=G, residual_length=R)

    rows = [("dynamic", f"DynamicCache ({str(model_dtype).replace('torch.', '')} K/V)", "-",
             lambda: DynamicCache(config=cfg))]  # (arm: a stable key for the JSON, name as printed, bits, factory)
    for bits in (4, 2):
        rows += [
            ("quanto_best", "QuantizedCache quanto, best axes (axis_key=-1, axis_value=0)", bits,
             qc("quanto", bits, -1, 0)),
            *([("hqq_best", "QuantizedCache HQQ, best axes (axis 1, 1)", bits, qc("hqq", bits, 1, 1))]
              if not args.skip_hqq else []),
            ("xquant_cl", "XQuant-CL (latent deltas, first 3 layers 4-bit)", bits, xq(nbits=bits, mode="cl")),
            ("qvg_s0", "QVG S=0 (no smoothing: block RTN, bf16 scales, sinks exact)", bits,
             qvg(nbits=bits, num_stages=0)),
            ("qvg_s1", "QVG S=1", bits, qvg(nbits=bits, num_stages=1)),
            ("qvg_s2", "QVG S=2", bits, qvg(nbits=bits, num_stages=2)),
            ("qvg_s3", "QVG S=3", bits, qvg(nbits=bits, num_stages=3)),
        ]
    rows += [
        ("xquant_latent", "XQuant latent (first 3 layers 4-bit)", 3, xq(nbits=3, mode="latent")),
        ("xquant_cl", "XQuant-CL (latent deltas, first 3 layers 4-bit)", 3, xq(nbits=3, mode="cl")),
        ("qvg_s1_no_sinks", "QVG S=1, no sinks", 2, qvg(nbits=2, num_stages=1, sink_tokens=0)),
        ("qvg_s1_asym", "QVG S=1, asymmetric", 2, qvg(nbits=2, num_stages=1, asymmetric=True)),
        ("qvg_s2_asym", "QVG S=2, asymmetric", 2, qvg(nbits=2, num_stages=2, asymmetric=True)),
        ("qvg_s1_c16", "QVG S=1, 16 centroids", 2, qvg(nbits=2, num_stages=1, num_centroids=16)),
        ("qvg_s1_chunk256", "QVG S=1, chunk 256 (C 16; window up to 255)", 2,
         qvg(nbits=2, num_stages=1, chunk_tokens=256)),
        ("qvg_s2_chunk256", "QVG S=2, chunk 256 (C 16; window up to 255)", 2,
         qvg(nbits=2, num_stages=2, chunk_tokens=256)),
    ]
    if args.only:
        rows = [rows[0]] + [r for r in rows[1:] if args.only in r[1]]
    if args.quick:
        rows = [r for r in rows if row_key(r[0], r[2]) in QUICK_ROWS]
    if args.skip_table:
        rows = []

    print(f"# QVG benchmark: SmolLM2-135M-Instruct ({model_dtype}), {n_tokens} tokens of the bundled text, chunks of "
          f"{args.chunk}, window {R}, group {G}, k-means iters {args.kmeans_iters}, torch {torch.__version__}, "
          f"transformers {__import__('transformers').__version__}, {args.threads} thread(s), cpu")
    print(f"fp16 K/V reference: {fp16_kv_per_token} bytes/token\n")
    print("| cache | bits | PPL | dPPL vs ref | bytes/token | x less than fp16 K/V | fixed MB, window full "
          f"| shared factors MB | total MB @ {n_tokens} | s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    results, base_ppl = {}, None
    report = {"benchmark": "qvg", "model": "SmolLM2-135M-Instruct", "model_dtype": str(model_dtype),
              "tokens": n_tokens, "scored_targets": n_tokens - min(args.chunk, n_tokens), "chunk": args.chunk,
              "residual": R, "group": G, "kmeans_iters": args.kmeans_iters, "quick": args.quick, "args": vars(args),
              "threads": args.threads, "device": "cpu", "torch": torch.__version__,
              "transformers": __import__("transformers").__version__, "fp16_kv_bytes_per_token": fp16_kv_per_token,
              "rows": {}, "timing": {}}
    cpu0 = time.process_time()
    for arm, name, bits, factory in rows:
        release_xquant_factors(model)
        try:
            r = cache_table_row(model, ids, factory, chunk=args.chunk, extra_ids=extra)
        except Exception as err:  # noqa: BLE001 - a peer failing is a result to report
            print(f"| {name} | {bits} | failed: {type(err).__name__}: {str(err)[:80]} | | | | | | | |", flush=True)
            report["rows"][row_key(arm, bits)] = dict(arm=arm, name=name, bits=None if bits == "-" else bits,
                                                      failed=f"{type(err).__name__}: {err}")
            continue
        cache = r.pop("cache")
        if isinstance(cache, QVGCache) and cache.nbytes() != storage_bytes(cache):
            raise AssertionError("QVGCache.nbytes() disagrees with the storage walk")
        shared = xquant_factor_nbytes(model)
        base_ppl = r["ppl"] if base_ppl is None else base_ppl
        results[(name, bits)] = dict(r, shared=shared)
        report["rows"][row_key(arm, bits)] = dict(
            arm=arm, name=name, bits=None if bits == "-" else bits, ppl=r["ppl"], dppl=r["ppl"] - base_ppl,
            bytes_per_token=r["bytes_per_token"], x_less_than_fp16_kv=fp16_kv_per_token / r["bytes_per_token"],
            fixed_bytes=r["fixed"], fixed_window_full_bytes=r["fixed_window_full"], shared_factor_bytes=shared,
            total_bytes_at_end=r["at_end"] + shared, seconds=r["seconds"])
        print(f"| {name} | {bits} | {r['ppl']:.3f} | {r['ppl'] - base_ppl:+.3f} | {r['bytes_per_token']:.1f} | "
              f"{fp16_kv_per_token / r['bytes_per_token']:.2f}x | {r['fixed_window_full'] / 1e6:.2f} | "
              f"{shared / 1e6:.2f} | {(r['at_end'] + shared) / 1e6:.2f} | {r['seconds']:.1f} |", flush=True)
    release_xquant_factors(model)
    report["table_cpu_s"] = time.process_time() - cpu0
    if args.plot and report["rows"]:
        reason = plot_memory_vs_ppl(report["rows"], args.plot, f"QVG vs peer caches, SmolLM2-135M, {n_tokens} tokens "
                                    f"of the bundled text, chunks of {args.chunk}, window {R}, group {G}")
        print(f"\nplot: {reason or args.plot}")
    if args.skip_timing:
        write_report_json(args.json, report)
        return results

    # -- overheads -----------------------------------------------------------------------------------------------
    print(f"\n## Overheads at {n_tokens} tokens of context (CPU, torch path, {args.threads} thread(s), median of "
          f"{args.repeats})")
    dyn = DynamicCache(config=cfg)
    with torch.no_grad():
        model(ids, use_cache=True, **cache_kwargs(model, dyn))
    layers_kv = [(layer.keys, layer.values) for layer in dyn.layers]
    chunk_kv = [(k[..., :R, :].clone(), v[..., :R, :].clone()) for k, v in layers_kv]
    settings = [(bits, s) for bits in (2, 4) for s in (1, 2, 3)]
    print("| QVG | compress ms per chunk (K+V, all 30 layers) | per layer | read ms per step (rebuild the history, all "
          "layers) | decode step ms QVG | decode step ms DynamicCache | step ratio |")
    print("|---|---|---|---|---|---|---|")
    timing = {}
    for bits, stages in settings:
        kw = dict(nbits=bits, block_size=G, num_stages=stages, num_centroids=max(1, R // 16),
                  kmeans_iters=args.kmeans_iters)

        def compress_all(kw=kw):
            for k, v in chunk_kv:
                prq_compress(k, **kw)
                prq_compress(v, **kw)

        compress_ms = _median_ms(compress_all, args.repeats)
        cache = QVGCache(model, QVGConfig(nbits=bits, num_stages=stages, chunk_tokens=R, block_size=G,
                                          kmeans_iters=args.kmeans_iters))
        with torch.no_grad():
            for start in range(0, n_tokens, args.chunk):
                model(ids[:, start : start + args.chunk], use_cache=True, **cache_kwargs(model, cache))

        def read_all(cache=cache):
            for layer in cache.layers:
                layer._rebuild(layer.get_seq_length())
            cache._shared.rope_memo.clear()

        read_ms = _median_ms(read_all, args.repeats)
        # decode steps, interleaved: each step one token on a copy of each cache, alternating which goes first
        q_steps, d_steps = [], []
        q_cache, d_cache = copy.deepcopy(cache), copy.deepcopy(dyn)
        for i in range(args.decode_steps):
            token = text_ids[:, n_tokens + i : n_tokens + i + 1]
            order = [(q_cache, q_steps), (d_cache, d_steps)]
            for c, out in order if i % 2 == 0 else order[::-1]:
                t0 = time.perf_counter()
                with torch.no_grad():
                    model(token, use_cache=True, **cache_kwargs(model, c))
                out.append((time.perf_counter() - t0) * 1e3)
        q_ms, d_ms = statistics.median(q_steps), statistics.median(d_steps)
        timing[(bits, stages)] = dict(compress_ms=compress_ms, read_ms=read_ms, step_ms=q_ms, dynamic_step_ms=d_ms)
        report["timing"][f"int{bits}_s{stages}"] = dict(timing[(bits, stages)], step_ratio=q_ms / d_ms)
        print(f"| int{bits} S={stages} | {compress_ms:.1f} | {compress_ms / cfg.num_hidden_layers:.2f} | "
              f"{read_ms:.1f} | {q_ms:.1f} | {d_ms:.1f} | {q_ms / d_ms:.2f}x |", flush=True)
    results["timing"] = timing
    try:
        load = open("/proc/loadavg").read().split()[:3]
        print(f"\nload average at the end: {' '.join(load)}")
    except OSError:
        pass
    write_report_json(args.json, report)
    return results


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
