"""Benchmark: SVG-EAR (arXiv 2603.08982) vs the SVG2-style peer (score routing, skipped blocks dropped) and score
routing with compensation, at equal density, all through `hf_fastslow.kernels.ear.ear_attention` (PyTorch reference).

1. Default model (SmolLM2-135M-Instruct), the method card's protocol: the bundled public-domain text, first
   `--tokens` tokens, post-RoPE q/k/v of every layer captured by `hf_fastslow.evaluation.attn_error.capture_qkv`;
   queries = the last `--queries` tokens, routed keys = all earlier tokens (fully visible, token 0 included), the
   queries' own chunk computed densely under the causal mask and joined with `lse_merge`; per KV group k-means with
   `--k-clusters` key and `--q-clusters` query clusters. Relative attention-output error ||O - O_dense|| / ||O_dense||
   per layer at densities 0.05 / 0.1 / 0.2 / 0.3, and the issue's target: EAR <= 0.5 x SVG2-style at density 0.2.
2. The LLM form end to end: `enable_ear_attention` on the default model (causal chunk mode, chunk `--chunk`), mean
   next-token loss over `--tokens` tokens vs SDPA.
3. Tiny random Wan transformer (random weights: no cluster structure): per-layer attention error on its captured
   rotated q/k/v, and the transformer's output error with EAR vs SVG2-style processors at equal density.
4. ms per call of the PyTorch reference vs SDPA at N = `--time-n` on the CPU (SmolLM2 head layout, random q/k/v),
   interleaved. The reference validates accuracy and plumbing; it is not a fast path. No GPU timing here.

    python benchmarks/ear.py                         # everything (~10 min on 2 busy CPU cores)
    python benchmarks/ear.py --skip-llm-e2e --skip-timing
    python benchmarks/ear.py --quick --json ear.json --plot ear.png   # parts 1-2 at reduced size (see QUICK)

`--json PATH` writes every figure the tables print (null for a part that was skipped); `--plot PATH` draws the mean
error over layers against density per router (part 1).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from importlib import resources

import torch
import torch.nn.functional as F

from hf_fastslow.evaluation.cli_support import apply_quick

PEERS = [
    ("SVG2-style (score, drop)", "score", False),
    ("score + comp", "score", True),
    ("EAR (error + comp)", "error", True),
]
DENSITIES = (0.05, 0.1, 0.2, 0.3)
# --quick: parts 1 and 2 on the first 512 tokens (part 1: last 128 queries, every layer; part 2: chunk 128); the tiny
# Wan model (diffusers) and the timing are skipped.
QUICK = dict(tokens=512, queries=128, chunk=128, skip_wan=True, skip_timing=True)


def bundled_text() -> str:
    return resources.files("hf_fastslow").joinpath("data", "in_the_year_2889.txt").read_text()


def far_near_attention(q, k, v, n_queries, **ear_kwargs):
    """Card protocol: the last `n_queries` queries; earlier keys routed by EAR, their own chunk dense; merged."""
    from hf_fastslow.kernels.ear import dense_attention_lse, ear_attention
    from hf_fastslow.kernels.lse_merge import lse_merge

    n = k.shape[2]
    far = n - n_queries
    qa = q[:, :, far:]
    scale = q.shape[-1] ** -0.5
    near_mask = torch.ones(n_queries, n_queries, dtype=torch.bool).tril()
    o_near, lse_near = dense_attention_lse(qa, k[:, :, far:], v[:, :, far:], near_mask, scale)
    o_far, info = ear_attention(qa, k[:, :, :far], v[:, :, :far], scale=scale, return_info=True, **ear_kwargs)
    out, _ = lse_merge(o_far, info.lse, o_near, lse_near)
    return out, info.density


def sink_mass(q, k):
    """RMS over heads and queries of the attention probability on token 0 (queries = the last Nq positions)."""
    nq, nk = q.shape[2], k.shape[2]
    logits = (q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2)) * q.shape[-1] ** -0.5
    logits = logits.masked_fill(~torch.ones(nq, nk, dtype=torch.bool).tril(nk - nq), float("-inf"))
    return torch.softmax(logits, -1)[..., 0].pow(2).mean().sqrt().item()


def table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def default_model_layers(args, model, tok):
    from hf_fastslow.evaluation.attn_error import capture_qkv, dense_attention, relative_error

    ids = tok(bundled_text(), return_tensors="pt").input_ids[:, : args.tokens]
    captured = capture_qkv(model, ids)
    per_layer, ratio_rows, holds, layers_json = [], [], 0, []
    mean = {(name, d): [] for name, _, _ in PEERS for d in DENSITIES}
    for layer, t in sorted(captured.items()):
        q, k, v = t["q"].float(), t["k"].float(), t["v"].float()
        ref = dense_attention(q[:, :, -args.queries:], k, v, causal=True)
        errs = {}
        for name, router, compensate in PEERS:
            for d in DENSITIES:
                out, _ = far_near_attention(q, k, v, args.queries, density=d, num_q_clusters=args.q_clusters,
                                            num_k_clusters=args.k_clusters, router=router, compensate=compensate,
                                            kmeans_iters=args.kmeans_iters)
                errs[name, d] = relative_error(out, ref)
                mean[name, d].append(errs[name, d])
        sink = sink_mass(q[:, :, -args.queries:], k)
        layers_json.append({"layer": layer, "sink_mass": sink,
                            "errors": {n: {str(d): errs[n, d] for d in DENSITIES} for n, _, _ in PEERS}})
        per_layer.append([layer, f"{sink:.2f}"] + ["/".join(f"{errs[n, d]:.3f}" for d in DENSITIES)
                                                   for n, _, _ in PEERS])
        ratio = errs[PEERS[2][0], 0.2] / errs[PEERS[0][0], 0.2]
        holds += ratio <= 0.5
        ratio_rows.append([layer, f"{errs[PEERS[0][0], 0.2]:.3f}", f"{errs[PEERS[2][0], 0.2]:.3f}", f"{ratio:.2f}",
                           "yes" if ratio <= 0.5 else "**no**"])
        print(f"  layer {layer}: " + "  ".join(f"{n.split()[0]} {errs[n, 0.2]:.3f}" for n, _, _ in PEERS), flush=True)
    print(f"\n### Default model: relative attention-output error per layer ({args.tokens} tokens, last {args.queries} "
          f"queries, C_q={args.q_clusters}, C_k={args.k_clusters}), densities {' / '.join(map(str, DENSITIES))}\n")
    print(table(["layer", "RMS mass on token 0"] + [n for n, _, _ in PEERS], per_layer))
    print("\n### Mean over layers\n")
    print(table(["density"] + [n for n, _, _ in PEERS],
                [[d] + [f"{statistics.mean(mean[n, d]):.3f}" for n, _, _ in PEERS] for d in DENSITIES]))
    print(f"\n### Target at density 0.2: EAR <= 0.5 x SVG2-style on every layer: holds on {holds} of "
          f"{len(ratio_rows)} layers\n")
    print(table(["layer", "SVG2-style", "EAR", "EAR / SVG2", "<= 0.5"], ratio_rows))
    return {"tokens": int(ids.shape[1]), "queries": args.queries, "q_clusters": args.q_clusters,
            "k_clusters": args.k_clusters, "kmeans_iters": args.kmeans_iters, "densities": list(DENSITIES),
            "per_layer": layers_json,
            "mean": {n: {str(d): statistics.mean(mean[n, d]) for d in DENSITIES} for n, _, _ in PEERS},
            "target_density_0.2": {"holds": int(holds), "layers": len(ratio_rows), "max_ratio": 0.5}}


@torch.no_grad()
def llm_end_to_end(args, model, tok):
    from hf_fastslow.modeling.ear import EARConfig, disable_ear_attention, enable_ear_attention

    ids = tok(bundled_text(), return_tensors="pt").input_ids[:, : args.tokens]
    routed = slice(2 * args.chunk, None)  # positions whose attention has a routed part (chunks 2+)
    dense_out = model(ids, labels=ids)
    dense_logp = torch.log_softmax(dense_out.logits[0, routed].float(), -1)
    rows = [["SDPA (dense)", "-", f"{dense_out.loss.item():.4f}", "0", "0", "1.000"]]
    arms = []
    for d in (0.1, 0.2):
        for name, router, compensate in PEERS:
            cfg = EARConfig(density=d, router=router, compensate=compensate, causal_chunk=args.chunk,
                            min_q_len=args.chunk, num_q_clusters=args.q_clusters, num_k_clusters=args.k_clusters,
                            kmeans_iters=args.kmeans_iters)
            enable_ear_attention(model, cfg)
            out = model(ids, labels=ids)
            disable_ear_attention(model)
            logp = torch.log_softmax(out.logits[0, routed].float(), -1)
            kl = (dense_logp.exp() * (dense_logp - logp)).sum(-1).mean().item()
            agree = (logp.argmax(-1) == dense_logp.argmax(-1)).float().mean().item()
            loss = out.loss.item()
            rows.append([name, d, f"{loss:.4f}", f"{loss - dense_out.loss.item():+.4f}", f"{kl:.5f}", f"{agree:.3f}"])
            arms.append({"attention": name, "density": d, "loss": loss, "delta_loss": loss - dense_out.loss.item(),
                         "kl": kl, "top1_agreement": agree})
            print(f"  {name} density {d}: loss {loss:.4f}, KL {kl:.5f}", flush=True)
    print(f"\n### Default model end to end: `enable_ear_attention`, {args.tokens} tokens of the bundled text (chunk "
          f"{args.chunk}: chunk 0 and each query's own chunk exact, C_q={args.q_clusters}, C_k={args.k_clusters} per "
          f"chunk); loss over all positions, KL(dense || sparse) and top-1 agreement over positions >= "
          f"{2 * args.chunk} (the ones with a routed part)\n")
    print(table(["attention", "density (routed part)", "loss", "delta vs SDPA", "KL vs SDPA", "top-1 agreement"],
                rows))
    return {"tokens": int(ids.shape[1]), "chunk": args.chunk, "dense_loss": dense_out.loss.item(), "arms": arms}


def tiny_wan():
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=32, in_channels=4, out_channels=4,
        text_dim=16, freq_dim=16, ffn_dim=128, num_layers=4, cross_attn_norm=True, rope_max_seq_len=32,
    ).eval()


@torch.no_grad()
def wan(args):
    from hf_fastslow.evaluation.attn_error import dense_attention, relative_error
    from hf_fastslow.integrations.diffusers import (
        WanSelfAttentionProcessor,
        restore_wan_self_attention_processors,
        set_wan_self_attention_processors,
        wan_apply_rotary,
    )
    from hf_fastslow.kernels.ear import ear_attention
    from hf_fastslow.modeling.ear import EARConfig, apply_ear, remove_ear

    model = tiny_wan()
    g = torch.Generator().manual_seed(1)
    inputs = dict(hidden_states=torch.randn(1, 4, args.wan_frames, 16, 16, generator=g), timestep=torch.tensor([500]),
                  encoder_hidden_states=torch.randn(1, 5, 16, generator=g), return_dict=False)
    captured = {}

    class Capture(WanSelfAttentionProcessor):
        def attend(self, attn, query, key, value, rotary_emb, attention_mask):
            captured[self.layer_index] = [t.transpose(1, 2) for t in (wan_apply_rotary(query, rotary_emb),
                                                                       wan_apply_rotary(key, rotary_emb), value)]
            return super().attend(attn, query, key, value, rotary_emb, attention_mask)

    previous = set_wan_self_attention_processors(model, Capture)
    dense_out = model(**inputs)[0]
    restore_wan_self_attention_processors(model, previous)
    n_tokens = captured[0][0].shape[2]
    rows, layers_json = [], []
    for layer, (q, k, v) in sorted(captured.items()):
        ref = dense_attention(q, k, v)
        cells, layer_errs = [], {}
        for name, router, compensate in PEERS:
            errs = [relative_error(ear_attention(q, k, v, density=d, num_q_clusters=args.wan_q_clusters,
                                                 num_k_clusters=args.wan_k_clusters, router=router,
                                                 compensate=compensate, kmeans_iters=args.kmeans_iters), ref)
                    for d in DENSITIES]
            cells.append("/".join(f"{e:.3f}" for e in errs))
            layer_errs[name] = {str(d): e for d, e in zip(DENSITIES, errs)}
        rows.append([layer] + cells)
        layers_json.append({"layer": layer, "errors": layer_errs})
    print(f"\n### Tiny random Wan ({n_tokens} tokens, 4 heads x 32, 4 blocks): relative attention-output error per "
          f"layer, densities {' / '.join(map(str, DENSITIES))} (C_q={args.wan_q_clusters}, "
          f"C_k={args.wan_k_clusters})\n")
    print(table(["layer"] + [n for n, _, _ in PEERS], rows))
    e2e, e2e_json = [], {}
    for d in DENSITIES:
        row = [d]
        for name, router, compensate in PEERS:
            apply_ear(model, EARConfig(density=d, router=router, compensate=compensate,
                                       num_q_clusters=args.wan_q_clusters, num_k_clusters=args.wan_k_clusters,
                                       kmeans_iters=args.kmeans_iters))
            err = relative_error(model(**inputs)[0], dense_out)
            row.append(f"{err:.4f}")
            e2e_json.setdefault(name, {})[str(d)] = err
            remove_ear(model)
        e2e.append(row)
    print("\n### Tiny random Wan end to end: relative error of the output latents vs dense, every block sparse\n")
    print(table(["density"] + [n for n, _, _ in PEERS], e2e))
    return {"tokens": int(n_tokens), "per_layer": layers_json, "end_to_end": e2e_json}


@torch.no_grad()
def timing(args):
    from hf_fastslow.kernels.dispatch import force_backend
    from hf_fastslow.kernels.ear import ear_attention

    g = torch.Generator().manual_seed(0)
    n = args.time_n
    q, k, v = (torch.randn(1, h, n, 64, generator=g) for h in (9, 3, 3))
    arms = {
        "SDPA (dense)": lambda: F.scaled_dot_product_attention(q, k, v, enable_gqa=True),
        "EAR reference, density 0.2": lambda: ear_attention(q, k, v, density=0.2, num_q_clusters=64,
                                                            num_k_clusters=256, kmeans_iters=args.kmeans_iters),
        "SVG2-style reference, density 0.2": lambda: ear_attention(q, k, v, density=0.2, num_q_clusters=64,
                                                                   num_k_clusters=256, router="score",
                                                                   compensate=False, kmeans_iters=args.kmeans_iters),
    }
    times = {name: [] for name in arms}
    with force_backend("torch"):
        for fn in arms.values():
            fn()  # warm-up
        for _ in range(args.repeats):
            for name, fn in arms.items():  # interleaved
                start = time.perf_counter()
                fn()
                times[name].append(1000 * (time.perf_counter() - start))
    base = statistics.median(times["SDPA (dense)"])
    print(f"\n### CPU, {torch.get_num_threads()} thread(s): ms per call at N = {n} (B=1, 9 query / 3 KV heads, D=64, "
          f"non-causal; C_q=64, C_k=256, {args.kmeans_iters} k-means iterations), median of {args.repeats} "
          f"interleaved\n")
    print(table(["attention", "ms / call (median)", "min", "x SDPA"],
                [[name, f"{statistics.median(t):.0f}", f"{min(t):.0f}", f"{statistics.median(t) / base:.1f}"]
                 for name, t in times.items()]))
    print("\nGPU timing (EAR kernels vs SDPA at 32K tokens) was not measured: no GPU in this run.")
    return {"n": n, "threads": torch.get_num_threads(), "repeats": args.repeats,
            "ms_median": {name: statistics.median(t) for name, t in times.items()},
            "ms_min": {name: min(t) for name, t in times.items()}}


def plot_error_vs_density(layers, path):
    from hf_fastslow.evaluation.cli_support import pyplot_or_reason

    plt, reason = pyplot_or_reason()
    if plt is None:
        print(reason)
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, _, _ in PEERS:
        ax.plot(DENSITIES, [layers["mean"][name][str(d)] for d in DENSITIES], marker="o", label=name)
    ax.set_xlabel("density (share of query-key block pairs computed)")
    ax.set_ylabel("relative attention-output error, mean over layers")
    ax.set_title(f"SmolLM2-135M, {layers['tokens']} tokens, last {layers['queries']} queries")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=1024)
    p.add_argument("--queries", type=int, default=256)
    p.add_argument("--q-clusters", type=int, default=16)
    p.add_argument("--k-clusters", type=int, default=48)
    p.add_argument("--chunk", type=int, default=256, help="causal chunk of the end-to-end LLM run")
    p.add_argument("--kmeans-iters", type=int, default=10)
    p.add_argument("--wan-frames", type=int, default=8)
    p.add_argument("--wan-q-clusters", type=int, default=16)
    p.add_argument("--wan-k-clusters", type=int, default=32)
    p.add_argument("--time-n", type=int, default=4096)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--skip-layers", action="store_true")
    p.add_argument("--skip-llm-e2e", action="store_true")
    p.add_argument("--skip-wan", action="store_true")
    p.add_argument("--skip-timing", action="store_true")
    p.add_argument("--quick", action="store_true", help="parts 1 and 2 at reduced size: " +
                   ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    p.add_argument("--json", default=None, help="write every figure of the run to this JSON file")
    p.add_argument("--plot", default=None, help="PNG of the mean error over layers against density (part 1)")
    args = p.parse_args(argv)
    apply_quick(args, QUICK)
    torch.set_num_threads(args.threads)
    started, cpu_started = time.perf_counter(), time.process_time()
    report = {"args": vars(args), "peers": [name for name, _, _ in PEERS], "layers": None, "llm_end_to_end": None,
              "wan": None, "timing": None}
    if not (args.skip_layers and args.skip_llm_e2e):
        from hf_fastslow import load_default_model

        model, tok = load_default_model()
        if not args.skip_layers:
            with torch.no_grad():
                report["layers"] = default_model_layers(args, model, tok)
        if not args.skip_llm_e2e:
            report["llm_end_to_end"] = llm_end_to_end(args, model, tok)
    if not args.skip_wan:
        report["wan"] = wan(args)
    if not args.skip_timing:
        report["timing"] = timing(args)
    report["wall_s"], report["cpu_s"] = time.perf_counter() - started, time.process_time() - cpu_started
    if args.plot and report["layers"] is not None:
        plot_error_vs_density(report["layers"], args.plot)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)
        print(f"JSON: {args.json}")


if __name__ == "__main__":
    main()
