"""Benchmark: QVG (arXiv 2602.02958) vs KIVI-style quantization of the video KV cache of an autoregressive Wan
transformer, at equal bits (2 and 4), against the uncompressed cache.

No video weights can be downloaded, so the transformer is a tiny random Wan-shaped `WanTransformer3DModel` built from
a config (4 blocks, 4 heads of dim 64, patch 1x2x2). Errors come from fp32 rollouts (bf16 rounding would put a
floor of ~1e-3 under every latent error); bytes from the same rollout (1 Euler step: sizes do not depend on it) on a
bf16 twin of the model cast as `from_pretrained(torch_dtype=torch.bfloat16)` loads it, so "x" is against a bf16
cache, as in the paper. Two scenarios, both run through
`hf_fastslow.modeling.wan_autoregressive_rollout` (Euler flow matching, `--steps` steps per chunk, Self-Forcing commit
pass at timestep 0):
- "noise": every chunk generated from white noise. With random weights the cached K/V have no more structure than
  random projections of noise;
- "scene": the first `--prefix-chunks` chunks are a synthetic latent video (a few flat regions and two moving
  squares, each a random latent colour, plus 5% noise) committed as a given prefix (video continuation), then
  `--chunks` chunks are generated. Real video latents are highly redundant (the premise of QVG's k-means smoothing);
  this gives the cached tokens that redundancy, which random weights alone cannot.

Columns (every compressed cache runs the same rollout with the same noise as the uncompressed one):
- K err / V err: relative Frobenius error of decode(encode(x)) on the *same* K (pre-RoPE) and V: the spans the
  uncompressed cache holds, grouped as the compressed caches group them, all layers;
- latent err: relative error of the generated latents against the uncompressed cache's rollout (errors compound
  through the chunks: every chunk attends to compressed history and is itself committed from it). For scale, the
  header gives the latent err of denoising every chunk alone (no history at all): random weights make the attention
  branch a small part of each block, so the history moves the output latents little;
- cache bytes: `storage_bytes(cache)` (the storage walk) of the bf16 run after the rollout: exact sink chunk +
  packed spans + exact newest chunk; "x (total)" = uncompressed bytes / these; "x (spans)" = the same for the packed
  spans alone, i.e. the compression of finished chunks, which is what a long video's cache converges to.

    python benchmarks/qvg_video.py            # the table in docs/video.md (~2 min on 2 busy CPU cores)
    python benchmarks/qvg_video.py --quick    # 4 chunks, fewer rows, a smoke run
    python benchmarks/qvg_video.py --timing   # wall-clock of whole rollouts only (CPU, interleaved)

`--json PATH` writes every figure of the tables: per scenario its setting and its rows keyed by codec and bits
("kivi/int2", "qvg_s1_asym/int2", ...; "uncompressed" apart), and the timing table when `--timing` is given.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch


def tiny_wan(args):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(args.seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=args.heads, attention_head_dim=args.head_dim,
        in_channels=args.channels, out_channels=args.channels, text_dim=32, freq_dim=32,
        ffn_dim=2 * args.heads * args.head_dim, num_layers=args.layers, cross_attn_norm=True, rope_max_seq_len=64,
    ).eval()
    from hf_fastslow.integrations.diffusers import wan_to_dtype

    twin = copy.deepcopy(model)
    return model, wan_to_dtype(twin, torch.bfloat16)  # bf16 as from_pretrained(torch_dtype=bfloat16) would load it


def synthetic_scene(args, frames: int, g: torch.Generator) -> torch.Tensor:
    """(1, C, frames, S, S) latents: four flat quadrant-like regions and two squares moving one patch per frame."""
    c, s = args.channels, args.size
    palette = torch.randn(6, c, generator=g)
    ys, xs = torch.meshgrid(torch.arange(s), torch.arange(s), indexing="ij")
    base = (ys >= s // 2).long() * 2 + (xs >= (s // 3 + ys // 4)).long()  # 4 regions with a slanted border
    video = torch.empty(1, c, frames, s, s)
    for f in range(frames):
        label = base.clone()
        for k, (y0, x0, vy, vx) in enumerate([(2, 1, 0, 2), (s // 2, s - 6, 2, -2)]):
            y, x = (y0 + vy * f) % (s - 4), (x0 + vx * f) % (s - 4)
            label[y : y + 4, x : x + 4] = 4 + k
        video[0, :, f] = palette[label].permute(2, 0, 1)
    return video + 0.05 * torch.randn(video.shape, generator=g)


def methods(args):
    from hf_fastslow.modeling.video_kv import VideoKVConfig

    common = dict(sink_chunks=1, keep_recent_chunks=1, span_chunks=args.span_chunks, seed=args.seed)
    qvg = dict(num_centroids=args.centroids, kmeans_iters=args.kmeans_iters, **common)
    rows = []  # (key: codec/int<bits>, stable for the JSON; label as printed; config)
    for bits in (2, 4):
        rows += [
            (f"kivi/int{bits}", f"KIVI-style (K per channel, V per token) int{bits}",
             VideoKVConfig("kivi", bits, **common)),
            (f"qvg_s0_asym/int{bits}", f"plain per-token int{bits} (QVG with S=0, asym.)",
             VideoKVConfig("qvg", bits, num_stages=0, asymmetric=True, **common)),
            (f"qvg_s1/int{bits}", f"QVG S=1 int{bits} (symmetric)", VideoKVConfig("qvg", bits, num_stages=1, **qvg)),
            (f"qvg_s1_asym/int{bits}", f"QVG S=1 int{bits} asym.",
             VideoKVConfig("qvg", bits, num_stages=1, asymmetric=True, **qvg)),
            (f"qvg_s2_asym/int{bits}", f"QVG S=2 int{bits} asym. (Pro-like)",
             VideoKVConfig("qvg", bits, num_stages=2, asymmetric=True, **qvg)),
        ]
    # KIVI at 3 bits holds as many bytes as QVG S=1 at 2 bits with the default span and centroids (3.375 bits per
    # value each at head dim 64): the equal-bytes comparison.
    rows.insert(5, ("kivi/int3", "KIVI-style int3 (~ the bytes of QVG S=1 int2)", VideoKVConfig("kivi", 3, **common)))
    if args.quick:
        rows = [r for r in rows if not r[0].startswith(("qvg_s2", "qvg_s0"))]
    return rows


def kv_errors(exact_cache, config, head_dim: int, below_chunk: int | None) -> tuple[float, float]:
    """Relative error of the codec on the exact cache's own K/V, span by span (same grouping), all layers; only the
    spans made of chunks < `below_chunk` when given."""
    from hf_fastslow.modeling.video_kv import make_codec

    codec = make_codec(config, head_dim)
    num = {"key": 0.0, "value": 0.0}
    den = {"key": 0.0, "value": 0.0}
    for layer_index, layer in exact_cache.layers.items():
        for s, span in enumerate(layer.spans):
            if below_chunk is not None and span.chunks[-1].index >= below_chunk:
                continue
            for role, x in (("key", span.key), ("value", span.value)):
                decoded = codec.decode(codec.encode(x, role, 2 * (layer_index * 1000 + s) + (role == "value")),
                                       torch.float32)
                num[role] += float((decoded - x.float()).pow(2).sum())
                den[role] += float(x.float().pow(2).sum())
    if not den["key"]:
        raise ValueError("the rollout left no packed span: use more chunks than sink + recent + span_chunks.")
    return (num["key"] / den["key"]) ** 0.5, (num["value"] / den["value"]) ** 0.5


def run_scenario(name, models, args, noise, text, prefix):
    """models: (fp32 model for the errors, bf16 twin for the bytes)."""
    from hf_fastslow.modeling.video_kv import VideoKVCache, VideoKVConfig
    from hf_fastslow.modeling.wan_autoregressive import wan_autoregressive_rollout

    given = 0 if prefix is None else prefix.shape[2]

    def rollout(config, bytes_run=False):
        model, dtype = models[1] if bytes_run else models[0], torch.bfloat16 if bytes_run else torch.float32
        cache = VideoKVCache(config)
        out = wan_autoregressive_rollout(model, cache, noise.to(dtype), text.to(dtype), chunk_frames=args.chunk_frames,
                                         num_steps=1 if bytes_run else args.steps,
                                         prefix_latents=None if prefix is None else prefix.to(dtype))
        return out[:, :, given:].float(), cache

    t0 = time.perf_counter()
    exact_config = VideoKVConfig("none", sink_chunks=1, keep_recent_chunks=1, span_chunks=args.span_chunks)
    exact_out, exact = rollout(exact_config)
    seconds = time.perf_counter() - t0
    # Calibration: every generated chunk denoised alone (a fresh cache each, no prefix): what losing the history costs.
    alone = torch.cat([
        wan_autoregressive_rollout(models[0], VideoKVCache(compression="none"), noise[:, :, f : f + args.chunk_frames],
                                   text, chunk_frames=args.chunk_frames, num_steps=args.steps)
        for f in range(0, noise.shape[2], args.chunk_frames)
    ], dim=2).float()
    forget = float((alone - exact_out).norm() / exact_out.norm())
    _, exact_bf16 = rollout(exact_config, bytes_run=True)
    exact_bytes, exact_spans = exact_bf16.nbytes(), exact_bf16.nbytes_by_part()["spans"]
    held = exact.num_tokens_held()
    given_chunks = given // args.chunk_frames
    kv_scope = "all spans" if prefix is None else f"the spans of the given scene chunks 1-{given_chunks - 1}"
    print(f"\n**Scenario {name}**: {given_chunks} given + {noise.shape[2] // args.chunk_frames} generated chunks of "
          f"{args.chunk_frames} latent frames ({exact.layers[0].sink[0].info.num_tokens} tokens each); tokens held "
          f"after the rollout, over {len(exact.layers)} layers: {held}; exact fp32 rollout {seconds:.1f} s. K/V err "
          f"over {kv_scope}; latent err over the generated chunks. Denoising every generated chunk alone (no "
          f"history) gives latent err {forget:.4f}.\n")
    print("| cache | K err | V err | latent err | cache bytes (bf16 model) | x (total) | x (spans) |")
    print("|---|---|---|---|---|---|---|")
    print(f"| uncompressed | 0 | 0 | 0 | {exact_bytes:,} | 1.00 | 1.00 |")
    record = dict(given_chunks=given_chunks, generated_chunks=noise.shape[2] // args.chunk_frames,
                  tokens_per_chunk=exact.layers[0].sink[0].info.num_tokens, tokens_held=held,
                  exact_rollout_s=seconds, no_history_latent_err=forget, kv_err_scope=kv_scope,
                  uncompressed=dict(bytes=exact_bytes, span_bytes=exact_spans), rows={})
    for key, label, config in methods(args):
        k_err, v_err = kv_errors(exact, config, args.head_dim, None if prefix is None else given_chunks)
        out, _ = rollout(config)
        latent_err = float((out - exact_out).norm() / exact_out.norm())
        _, cache = rollout(config, bytes_run=True)
        nbytes, spans = cache.nbytes(), cache.nbytes_by_part()["spans"]
        print(f"| {label} | {k_err:.4f} | {v_err:.4f} | {latent_err:.5f} | {nbytes:,} | {exact_bytes / nbytes:.2f} "
              f"| {exact_spans / spans:.2f} |", flush=True)
        record["rows"][key] = dict(label=label, k_err=k_err, v_err=v_err, latent_err=latent_err, bytes=nbytes,
                                   span_bytes=spans, x_total=exact_bytes / nbytes, x_spans=exact_spans / spans)
    return record


def timing(models, args, noise, text):
    """Wall-clock of whole fp32 rollouts, interleaved (exact, KIVI-style int2, QVG S=1 int2 asym.), median of
    `--repeats`; compress and decode included (a span is compressed at its commit, every span decoded at every read)."""
    import statistics

    from hf_fastslow.modeling.video_kv import VideoKVCache, VideoKVConfig
    from hf_fastslow.modeling.wan_autoregressive import wan_autoregressive_rollout

    common = dict(sink_chunks=1, keep_recent_chunks=1, span_chunks=args.span_chunks, seed=args.seed)
    configs = [("uncompressed", VideoKVConfig("none", **common)),
               ("KIVI-style int2", VideoKVConfig("kivi", 2, **common)),
               ("QVG S=1 int2 asym.", VideoKVConfig("qvg", 2, num_centroids=args.centroids, asymmetric=True,
                                                     kmeans_iters=args.kmeans_iters, **common))]
    seconds = {name: [] for name, _ in configs}
    for _ in range(args.repeats):
        for name, config in configs:
            t0 = time.perf_counter()
            wan_autoregressive_rollout(models[0], VideoKVCache(config), noise, text, chunk_frames=args.chunk_frames,
                                       num_steps=args.steps)
            seconds[name].append(time.perf_counter() - t0)
    chunks = noise.shape[2] // args.chunk_frames
    print(f"\n**Timing** (noise scenario, {chunks} chunks x ({args.steps} steps + 1 commit), fp32, "
          f"{args.threads} thread(s), median of {args.repeats} interleaved runs)\n")
    print("| cache | s / rollout | vs uncompressed |")
    print("|---|---|---|")
    base = statistics.median(seconds["uncompressed"])
    for name, _ in configs:
        med = statistics.median(seconds[name])
        print(f"| {name} | {med:.2f} | {med / base:.2f}x |", flush=True)
    return {name: dict(median_s=statistics.median(ts), all_s=ts, vs_uncompressed=statistics.median(ts) / base)
            for name, ts in seconds.items()}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunks", type=int, default=6, help="generated chunks per scenario")
    p.add_argument("--prefix-chunks", type=int, default=5, help="given chunks of the 'scene' scenario")
    p.add_argument("--chunk-frames", type=int, default=2)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--size", type=int, default=16, help="latent height = width (patch 2: size^2/4 tokens a frame)")
    p.add_argument("--channels", type=int, default=16)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--span-chunks", type=int, default=2, help="finished chunks packed together (shared centroids)")
    p.add_argument("--centroids", type=int, default=16, help="QVG k-means centroids per span, head and stage")
    p.add_argument("--kmeans-iters", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--timing", action="store_true", help="only the wall-clock table (interleaved rollouts)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--json", default=None, help="write every figure of the tables to this JSON file")
    args = p.parse_args(argv)
    if args.quick:
        args.chunks, args.prefix_chunks = 4, 3
    torch.set_num_threads(args.threads)
    import diffusers

    print(f"QVG vs KIVI-style video KV cache (torch {torch.__version__}, diffusers {diffusers.__version__}); "
          f"tiny random Wan: {args.layers} blocks, {args.heads} heads x {args.head_dim}, latents "
          f"{args.channels}x{args.size}x{args.size}, span {args.span_chunks} chunks, QVG C={args.centroids}, "
          f"{args.kmeans_iters} k-means iterations, {args.steps} Euler steps per chunk")
    models = tiny_wan(args)
    g = torch.Generator().manual_seed(args.seed + 1)
    text = torch.randn(1, 8, 32, generator=g)
    frames = args.chunks * args.chunk_frames
    noise = torch.randn(1, args.channels, frames, args.size, args.size, generator=g)
    report = {"benchmark": "qvg_video", "quick": args.quick, "args": vars(args), "torch": torch.__version__,
              "diffusers": diffusers.__version__, "scenarios": {}, "timing": None}
    if args.timing:
        report["timing"] = timing(models, args, noise, text)
    else:
        report["scenarios"]["noise"] = run_scenario("noise", models, args, noise, text, None)
        prefix = synthetic_scene(args, args.prefix_chunks * args.chunk_frames, g)
        report["scenarios"]["scene"] = run_scenario("scene", models, args, noise, text, prefix)
    from hf_fastslow.evaluation.cli_support import write_report_json

    write_report_json(args.json, report)


if __name__ == "__main__":
    main()
