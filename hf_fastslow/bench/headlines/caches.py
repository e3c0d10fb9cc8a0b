"""Headline extractors for the caches benchmarks (see hf_fastslow/bench/headlines/__init__.py): XQuant and QVG as
text-LLM KV caches beside DynamicCache and quanto's QuantizedCache at its best axes (benchmarks/xquant.py,
benchmarks/qvg.py), QVG's video KV cache beside KIVI-style quantization (benchmarks/qvg_video.py), and XQuant's
Triton kernels beside the PyTorch reference and the unfused peer (benchmarks/kernels_quantize.py).

Every figure is read by key from the script's JSON (rows keyed "arm/int<bits>"); a renamed arm raises KeyError.
"""

from __future__ import annotations

from hf_fastslow.bench.registry import Figure

_QUANTO = "quanto QuantizedCache at its best axes (axis_key=-1, axis_value=0)"


def _text_setting(report: dict) -> str:
    return (f"SmolLM2-135M, {report['tokens']} tokens of the bundled text ({report['scored_targets']} scored), chunks "
            f"of {report['chunk']}, window {report['residual']}, group {report['group']}")


def _xquant(report: dict) -> list[Figure]:
    rows, setting = report["rows"], _text_setting(report)
    dyn = rows["dynamic"]
    dyn_dtype = report["model_dtype"].replace("torch.", "")
    figures = []
    for bits, ppl_paper, bytes_paper in (
            (4, "< 0.1 PPL over FP16 (XQuant-4bit, MHA Llama-2-7B, WikiText-2)",
             "7.7x less than fp16 K/V (XQuant-4bit, MHA; on a GQA model the latent is K/V-sized)"),
            (2, "Llama-3.1-8B (GQA) WikiText-2: XQuant-2 7.38, XQuant-CL-2 6.60 vs KIVI*-2 8.72 (FP16 6.24)",
             "KV 0.15 of fp16 (6.7x less) for the 2-bit GQA rows, Llama-3.1-8B")):
        key = f"xquant_latent/int{bits}"
        ours, peer, cl = rows[key], rows[f"quanto_best/int{bits}"], rows[f"xquant_cl/int{bits}"]
        even = report["break_even_tokens"][key]  # None: never below the DynamicCache (the script's "never")
        break_even = (f"with them it holds less than a {dyn_dtype} DynamicCache from {even:.0f} tokens on" if even
                      is not None else f"with them it never holds less than a {dyn_dtype} DynamicCache")
        figures.append(Figure(
            f"{bits} bit: perplexity through the cache, lower is better", ours["ppl"], peer["ppl"],
            note=f"ours XQuant latent (first 3 layers 4-bit); XQuant-CL {cl['ppl']:.2f}; peer {_QUANTO}; "
                 f"DynamicCache {dyn['ppl']:.2f}; {setting}", paper=ppl_paper))
        figures.append(Figure(
            f"{bits} bit: bytes per token (storage walk, slope), lower is better", ours["bytes_per_token"],
            peer["bytes_per_token"],
            note=f"XQuant latent vs {_QUANTO}: {ours['x_less_than_fp16_kv']:.2f}x vs "
                 f"{peer['x_less_than_fp16_kv']:.2f}x less than fp16 K/V; XQuant also keeps "
                 f"{ours['shared_factor_bytes'] / 1e6:.1f} MB of SVD factors once per model ({break_even})",
            paper=bytes_paper))
    return figures


def _qvg(report: dict) -> list[Figure]:
    rows, setting = report["rows"], _text_setting(report)
    dyn = rows["dynamic"]
    figures = []
    for bits, bytes_paper in ((2, "6.94x less than BF16 KV at INT2 (LongCat-Video 480p, ~18.7K-token chunks)"),
                              (4, "3.72x less than BF16 KV at INT4 (LongCat-Video 480p)")):
        ours, peer = rows[f"qvg_s1/int{bits}"], rows[f"quanto_best/int{bits}"]
        more = ", ".join(f"{label} {rows[key]['ppl']:.2f} at {rows[key]['bytes_per_token']:,.0f} B/token"
                         for key, label in ((f"qvg_s2/int{bits}", "S=2"), (f"qvg_s1_asym/int{bits}", "S=1 asym."))
                         if key in rows)  # quick runs these at 2 bit only; the full run at both
        figures.append(Figure(
            f"{bits} bit: perplexity through the cache, lower is better", ours["ppl"], peer["ppl"],
            note=f"ours QVG S=1 (symmetric, 4 sink tokens exact){'; QVG ' + more if more else ''}; peer {_QUANTO}; "
                 f"DynamicCache {dyn['ppl']:.2f}; {setting}"))
        figures.append(Figure(
            f"{bits} bit: bytes per token (storage walk, slope), lower is better", ours["bytes_per_token"],
            peer["bytes_per_token"],
            note=f"QVG S=1 vs {_QUANTO}: {ours['x_less_than_fp16_kv']:.2f}x vs {peer['x_less_than_fp16_kv']:.2f}x less "
                 f"than fp16 K/V (QVG's centroids and ids are amortised over {report['residual']}-token chunks "
                 "here)", paper=bytes_paper))
    return figures


def _qvg_video(report: dict) -> list[Figure]:
    scene = report["scenarios"]["scene"]
    rows = scene["rows"]
    ours, kivi = rows["qvg_s1_asym/int2"], rows["kivi/int2"]
    size = (f"tiny random Wan, synthetic scene: {scene['given_chunks']} given + {scene['generated_chunks']} generated "
            f"chunks of {scene['tokens_per_chunk']} tokens")
    return [
        Figure("scene, int2: generated-latent relative error vs the uncompressed cache, lower is better",
               ours["latent_err"], kivi["latent_err"],
               note=f"QVG S=1 asym. vs KIVI-style (K per channel, V per token); no history at all gives "
                    f"{scene['no_history_latent_err']:.4f}; {size}",
               paper="PSNR vs the BF16-KV video 28.72 (QVG) vs 20.32 (KIVI), LongCat-Video INT2"),
        Figure("scene, int2: key relative error (pre-RoPE), lower is better", ours["k_err"], kivi["k_err"],
               note=f"QVG S=1 asym. vs KIVI-style; value error {ours['v_err']:.3f} vs {kivi['v_err']:.3f}; {size}",
               paper="smoothing cuts key MSE ~6.9x (values ~2.6x)"),
        Figure("scene, equal bytes: generated-latent relative error, lower is better",
               rows["qvg_s1/int2"]["latent_err"], rows["kivi/int3"]["latent_err"],
               note=f"QVG S=1 int2 (symmetric) vs KIVI-style int3, both {rows['kivi/int3']['x_spans']:.2f}x on the "
                    f"spans; {size}"),
        Figure("int2: compression of finished chunks vs a bf16 cache (x), higher is better", ours["x_spans"],
               kivi["x_spans"],
               note=f"QVG S=1 asym. (16 centroids per {2 * scene['tokens_per_chunk']}-token span) vs KIVI-style; "
                    f"whole cache incl. exact sink and newest chunk {ours['x_total']:.2f}x vs {kivi['x_total']:.2f}x",
               paper="6.94x (QVG) vs 6.40x (KIVI), LongCat-Video INT2, ~18.7K-token chunks"),
    ]


def _kernels_quantize(report: dict) -> list[Figure]:
    bits = min(report["bits"])
    rows = report["rows"]
    on_gpu = report["device"] == "cuda"
    where = (f"{report['device_name']}, {report['tokens']} tokens x {report['latent']} -> {report['out']}, group "
             f"{report['group']}, {report['dtype']}, median of {report['repeats']}")
    if report["interpret"]:
        where += "; Triton interpreter on CPU: a harness check, the times are not speed"
    elif not on_gpu:
        where += "; CPU: the reference path only (Triton is timed on CUDA)"
    measured = on_gpu and not report["interpret"]
    q = rows[f"quantize_pack/per-token/int{bits}"]
    figures = [Figure(f"int{bits} quantize_pack (per-token): ms, lower is better", q["triton_ms"], q["reference_ms"],
                      measured=measured, note=f"Triton kernel vs the PyTorch reference; {where}")]
    for layout in ("per-token", "per-channel"):
        d = rows[f"dequant_matmul/{layout}/int{bits}"]
        figures.append(Figure(f"int{bits} dequant_matmul ({layout}): ms, lower is better", d["triton_ms"],
                              d["unfused_ms"], measured=measured,
                              note=f"fused Triton kernel vs unfused (Triton dequantize, then torch.matmul); PyTorch "
                                   f"reference {d['reference_ms']:.3f} ms; {where}"))
    return figures


EXTRACTORS: dict = {"xquant": _xquant, "qvg": _qvg, "qvg_video": _qvg_video, "kernels_quantize": _kernels_quantize}
