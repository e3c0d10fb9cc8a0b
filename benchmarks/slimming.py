"""Benchmark: structured pruning (ViT-Slim / network slimming) of two small trackers and of the default LM's MLP.

Trackers (the miniature of Aggarwal et al., arXiv 2211.13769): a one-stream ViT tracker and a Siamese ResNet tracker,
built from configs and trained from scratch on synthetic sequences (hf_fastslow.modeling.trackers). Per tracker:
dense training -> sparsity-regularised search with SlimSearchTrainer (L1 on the masks / BatchNorm gammas) -> for
each kept fraction: binarize, slice, fine-tune the child, then success AUC / precision@10px on held-out sequences,
parameters, FLOPs and measured CPU latency (batch 1, one thread, children timed interleaved). The 100 % row gets
the same fine-tuning as every child, so rows differ only by the cut.

LM: SmolLM2-135M's MLP channels, the same width in every layer (layerwise threshold), ViT-Slim scores from a
mask-only search (PEFT IA3 as the mask, `SlimSearchTrainer(train_weights=False)`) vs `torch.nn.utils.prune`
L1-structured on down_proj's columns (what a user would otherwise run; it only zeroes weights). Held-out perplexity
on the bundled text (calibration and held-out spans disjoint), no healing.

CPU budget per arm is the process CPU time, printed beside wall time (the box is shared):
    python benchmarks/slimming.py --quick            # ~2 CPU-min (trackers ~25 / ~45 s, LM ~30 s); minutes of wall
    python benchmarks/slimming.py                    # the docs' figures: ~10 CPU-min per tracker, ~10 for the LM
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import tempfile
import time

import torch  # noqa: E402

BUDGETS = (1.0, 0.75, 0.5, 0.25, 0.1, 0.01)


def cpu_clock():
    return time.perf_counter(), time.process_time()


def since(t):
    return {"wall_s": round(time.perf_counter() - t[0], 1), "cpu_s": round(time.process_time() - t[1], 1)}


# ------------------------------------------------------------------------------------------------------- trackers
def build_tracker(kind: str):
    from transformers import ResNetConfig, ViTConfig

    from hf_fastslow.modeling.trackers import OneStreamViTTracker, SiameseCNNTracker

    if kind == "vit":
        return OneStreamViTTracker(ViTConfig(image_size=64, patch_size=8, hidden_size=64, num_hidden_layers=4,
                                             num_attention_heads=4, intermediate_size=256, hidden_dropout_prob=0.0,
                                             attention_probs_dropout_prob=0.0), template_size=32)
    return SiameseCNNTracker(ResNetConfig(embedding_size=32, hidden_sizes=[48, 96], depths=[2, 2], layer_type="basic"),
                             template_size=32, search_size=64)


def train_loop(model, data, steps, lr, batch, seed):
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * s / max(1, steps))))
    model.train()
    for _ in range(steps):
        idx = torch.randint(len(data), (batch,), generator=g)
        loss = model(data.templates[idx], data.searches[idx], data.labels[idx])["loss"]
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return float(loss.detach())


def search(model, masks, data, steps, batch, lr, out_dir, mask_lr=None, train_weights=True):
    from hf_fastslow.trainers.slim_config import SlimSearchConfig
    from hf_fastslow.trainers.slim_trainer import SlimSearchTrainer

    args = SlimSearchConfig(output_dir=out_dir, max_steps=steps, per_device_train_batch_size=batch, learning_rate=lr,
                            mask_lr=mask_lr, train_weights=train_weights, weight_decay=1e-4, max_grad_norm=1.0,
                            use_cpu=True, report_to=[],
                            save_strategy="no", logging_steps=max(1, steps // 4), dataloader_num_workers=0, seed=0,
                            disable_tqdm=True)
    trainer = SlimSearchTrainer(model=model, masks=masks, args=args, train_dataset=data)
    trainer.train()
    model.eval()
    return [h for h in trainer.state.log_history if "loss" in h]


def latency(models: dict, example, repeats: int) -> dict:
    """Median forward seconds (batch 1) per model, measured round-robin so load drifts hit every model alike."""
    times = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m(*example)
        for _ in range(repeats):
            for k, m in models.items():
                t = time.perf_counter()
                m(*example)
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def tracker_arm(kind: str, a) -> dict:
    from hf_fastslow.modeling.slimming import SlimConfig, attach_slim_masks, count_params_flops, slice_model
    from hf_fastslow.modeling.trackers import TrackingPairs, evaluate_tracker, make_sequence

    t0 = cpu_clock()
    torch.manual_seed(0)
    data = TrackingPairs(num_sequences=a.train_sequences, length=16, seed=0, size=a.train_pairs)
    test = [make_sequence(10**6 + i, a.test_length) for i in range(a.test_sequences)]
    data_cost = since(t0)
    t = cpu_clock()
    model = build_tracker(kind)
    dense_loss = train_loop(model, data, a.dense_steps, 1e-3, a.batch, seed=1)
    dense_cost = since(t)
    cfg = SlimConfig(attn_granularity="dim", w_attn=a.w_attn, w_mlp=a.w_mlp, w_channel=a.w_channel,
                     threshold=a.threshold)
    t = cpu_clock()
    masks = attach_slim_masks(model, cfg)
    log = search(model, masks, data, a.search_steps, a.batch, 5e-4, f"{a.scratch}/{kind}-search", a.mask_lr)
    search_cost = since(t)
    searched_state = copy.deepcopy(model.state_dict())
    zetas = [None if g.param is None else g.param.detach().clone() for g in masks.groups]
    template, search_img = data.templates[:1], data.searches[:1]
    rows, children = [], {}
    for budget in a.budgets:
        t = cpu_clock()
        torch.manual_seed(0)
        child = build_tracker(kind)
        child.load_state_dict(searched_state)
        m = attach_slim_masks(child, cfg)
        with torch.no_grad():
            for g, z in zip(m.groups, zetas):
                if z is not None:
                    g.param.copy_(z)
        kept = m.binarize(budget=budget)
        child = slice_model(child, m)
        child_loss = train_loop(child, data, a.child_steps, 5e-4, a.batch, seed=2)
        metrics = evaluate_tracker(child, test, pixels=10.0)
        pf = count_params_flops(child, template, search_img)
        children[budget] = child
        rows.append({"kept": budget, "kept_units": {k: round(v, 4) for k, v in kept.items()}, **metrics, **pf,
                     "child_loss": round(child_loss, 4), **{f"child_{k}": v for k, v in since(t).items()}})
        print(f"  {kind} {budget:>5.0%}: AUC {metrics['success_auc']:.3f} P@10 {metrics['precision@10px']:.3f} "
              f"params {pf['params']:,} MFLOPs {pf['flops'] / 1e6:.1f}", flush=True)
    lat = latency(children, (template, search_img), a.latency_repeats)
    for r in rows:
        r["latency_ms"] = round(1000 * lat[r["kept"]], 3)
    return {"tracker": kind, "dense_final_loss": round(dense_loss, 4), "search_log": log, "rows": rows,
            "cost": {"data": data_cost, "dense": dense_cost, "search": search_cost, "total": since(t0)}}


# ------------------------------------------------------------------------------------------------------------- LM
def perplexity(model, chunks) -> float:
    nll, n = 0.0, 0
    with torch.no_grad():
        for c in chunks:
            out = model(c[None], labels=c[None])
            nll += float(out.loss) * (len(c) - 1)
            n += len(c) - 1
    return math.exp(nll / n)


class _Chunks(torch.utils.data.Dataset):
    def __init__(self, chunks):
        self.chunks = chunks

    def __len__(self):
        return len(self.chunks)

    def __getitem__(self, i):
        return {"input_ids": self.chunks[i], "labels": self.chunks[i]}


def lm_arm(a) -> dict:
    from torch.nn.utils import prune

    from hf_fastslow import load_default_model
    from hf_fastslow.evaluation.prompts import bundled_text_ids
    from hf_fastslow.modeling.slimming import SlimConfig, attach_slim_masks, slice_model

    t0 = cpu_clock()
    base, tok = load_default_model()
    ids = bundled_text_ids(tok)[0]
    L, n_eval = a.lm_seq, a.lm_eval_chunks
    n_cal = len(ids) // L - n_eval  # every chunk before the held-out tail calibrates (the search cycles over them)
    if n_cal < 1:
        raise SystemExit(f"bundled text has {len(ids)} tokens: too few for {n_eval} held-out chunks of {L}.")
    cal = [ids[i * L:(i + 1) * L] for i in range(n_cal)]
    held = [ids[len(ids) - (i + 1) * L:len(ids) - i * L] for i in range(n_eval)]  # from the far end: disjoint
    pristine = copy.deepcopy(base.state_dict())
    dense_params = sum(p.numel() for p in base.parameters())
    t = cpu_clock()
    dense_ppl = perplexity(base, held)
    eval_cost = since(t)
    cfg = SlimConfig(attn_granularity=None, mlp_backend="ia3", w_mlp=a.lm_w_mlp, threshold="layerwise")
    t = cpu_clock()
    masks = attach_slim_masks(base, cfg)
    search(base, masks, _Chunks(cal), a.lm_search_steps, a.lm_batch, a.lm_mask_lr, f"{a.scratch}/lm-search",
           a.lm_mask_lr, train_weights=False)  # mask-only: the weights stay the pretrained ones
    zetas = [g.param.detach().clone() for g in masks.groups]
    search_cost = since(t)
    rows = []
    for b in a.lm_budgets:
        model, _ = load_default_model()
        model.load_state_dict(pristine)
        m = attach_slim_masks(model, cfg)
        with torch.no_grad():
            for g, z in zip(m.groups, zetas):
                g.param.copy_(z)
        m.binarize(mlp_budget=b)
        child = slice_model(model, m)
        slim_ppl = perplexity(child, held)
        slim_params = sum(p.numel() for p in child.parameters())
        peer, _ = load_default_model()
        peer.load_state_dict(pristine)
        for layer in peer.model.layers:
            prune.ln_structured(layer.mlp.down_proj, "weight", amount=1 - b, n=1, dim=1)
        peer_ppl = perplexity(peer, held)
        widths = sorted({layer.mlp.down_proj.in_features for layer in child.model.layers})
        rows.append({"kept": b, "slim_ppl": round(slim_ppl, 3), "torch_prune_l1_ppl": round(peer_ppl, 3),
                     "slim_params": slim_params, "dense_params": dense_params, "mlp_widths": widths})
        print(f"  LM MLP {b:.0%}: ViT-Slim/IA3 ppl {slim_ppl:.2f}  torch L1-structured ppl {peer_ppl:.2f} "
              f"(dense {dense_ppl:.2f}); params {slim_params:,} of {dense_params:,}", flush=True)
    return {"dense_ppl": round(dense_ppl, 3), "rows": rows, "calibration_tokens": n_cal * L,
            "heldout_tokens": n_eval * L,
            "cost": {"dense_eval": eval_cost, "search": search_cost, "total": since(t0)}}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="small sizes (300 dense, 20 search / child steps, 4 test sequences): a rough direction only")
    p.add_argument("--trackers", nargs="*", default=["vit", "cnn"], choices=["vit", "cnn"])
    p.add_argument("--budgets", type=float, nargs="+", default=list(BUDGETS))
    p.add_argument("--threshold", default="global", choices=["global", "layerwise", "floor"])
    p.add_argument("--dense-steps", type=int, default=3000)
    p.add_argument("--search-steps", type=int, default=600)
    p.add_argument("--child-steps", type=int, default=600)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--mask-lr", type=float, default=1e-2, help="mask learning rate of the tracker search")
    p.add_argument("--w-attn", type=float, default=1e-3)
    p.add_argument("--w-mlp", type=float, default=5e-4)
    p.add_argument("--w-channel", type=float, default=1e-4)
    p.add_argument("--train-sequences", type=int, default=96)
    p.add_argument("--train-pairs", type=int, default=8192)
    p.add_argument("--test-sequences", type=int, default=24)
    p.add_argument("--test-length", type=int, default=40)
    p.add_argument("--latency-repeats", type=int, default=50)
    p.add_argument("--skip-lm", action="store_true")
    p.add_argument("--lm-budgets", type=float, nargs="+", default=[0.75, 0.5, 0.25])
    p.add_argument("--lm-search-steps", type=int, default=40)
    p.add_argument("--lm-batch", type=int, default=2)
    p.add_argument("--lm-seq", type=int, default=128)
    p.add_argument("--lm-eval-chunks", type=int, default=12, help="held-out chunks from the end of the bundled text")
    p.add_argument("--lm-mask-lr", type=float, default=0.02)
    p.add_argument("--lm-w-mlp", type=float, default=1e-5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--scratch", default=None, help="Trainer output dirs (default: a fresh temporary folder)")
    p.add_argument("--out", default="slimming_report.json")
    p.add_argument("--plot", default=None, help="PNG: tracker success AUC and LM perplexity vs kept fraction")
    a = p.parse_args(argv)
    if a.quick:
        a.budgets = [1.0, 0.5, 0.1]
        a.dense_steps, a.search_steps, a.child_steps, a.batch = 300, 20, 20, 16
        a.train_sequences, a.train_pairs, a.test_sequences, a.test_length, a.latency_repeats = 12, 512, 4, 20, 10
        a.lm_budgets, a.lm_search_steps, a.lm_batch, a.lm_seq, a.lm_eval_chunks = [0.5], 3, 1, 128, 4
    torch.set_num_threads(a.threads)
    a.scratch = a.scratch or tempfile.mkdtemp(prefix="slimming-bench-")
    report = {"args": vars(a), "trackers": {}}
    for kind in a.trackers:
        print(f"tracker {kind}", flush=True)
        report["trackers"][kind] = res = tracker_arm(kind, a)
        print(f"  cost {res['cost']}", flush=True)
    if not a.skip_lm:
        print("default LM, MLP channels", flush=True)
        report["lm"] = lm_arm(a)
        print(f"  cost {report['lm']['cost']}", flush=True)
    with open(a.out, "w") as f:
        json.dump(report, f, indent=1)
    print_tables(report)
    print(f"wrote {a.out}")
    if a.plot:
        plot(report, a.plot)
    return 0


def print_tables(report):
    for kind, res in report["trackers"].items():
        print(f"\n{kind} tracker | kept | success AUC | precision@10px | params | MFLOPs | CPU latency ms (batch 1)")
        for r in res["rows"]:
            print(f"| {r['kept']:.0%} | {r['success_auc']:.3f} | {r['precision@10px']:.3f} | {r['params']:,} | "
                  f"{r['flops'] / 1e6:.1f} | {r['latency_ms']:.2f} |")
    if "lm" in report:
        lm = report["lm"]
        print(f"\nLM MLP | kept | ViT-Slim (IA3 mask search) ppl | torch.nn.utils.prune L1-structured ppl | "
              f"params (sliced) | dense ppl {lm['dense_ppl']}")
        for r in lm["rows"]:
            print(f"| {r['kept']:.0%} | {r['slim_ppl']:.2f} | {r['torch_prune_l1_ppl']:.2f} | {r['slim_params']:,} |")



def plot(report, path):
    """Success AUC vs kept fraction per tracker; the LM's held-out perplexity vs kept MLP channels for both scorers."""
    from hf_fastslow.evaluation.cli_support import pyplot_or_reason

    plt, reason = pyplot_or_reason()
    if plt is None:
        print(reason)
        return
    panels = 1 + ("lm" in report)
    fig, axes = plt.subplots(1, panels, figsize=(5.5 * panels, 4), squeeze=False)
    ax = axes[0][0]
    for kind, res in report["trackers"].items():
        rows = sorted(res["rows"], key=lambda r: r["kept"])
        ax.plot([r["kept"] for r in rows], [r["success_auc"] for r in rows], marker="o", label=f"{kind} tracker")
    ax.set_xscale("log")
    ax.set_xlabel("kept fraction (attention dims / MLP / channels)")
    ax.set_ylabel("success AUC (held-out sequences)")
    ax.set_title("trackers: pruned and fine-tuned children")
    ax.legend()
    if "lm" in report:
        lm, ax = report["lm"], axes[0][1]
        rows = sorted(lm["rows"], key=lambda r: r["kept"])
        kept = [r["kept"] for r in rows]
        ax.plot(kept, [r["slim_ppl"] for r in rows], marker="o", label="ViT-Slim (IA3 mask search)")
        ax.plot(kept, [r["torch_prune_l1_ppl"] for r in rows], marker="s", label="torch.nn.utils.prune L1-structured")
        ax.axhline(lm["dense_ppl"], color="gray", linestyle="--", label=f"dense ({lm['dense_ppl']:.1f})")
        ax.set_yscale("log")
        ax.set_xlabel("kept fraction of MLP channels")
        ax.set_ylabel("held-out perplexity (no healing)")
        ax.set_title("default LM")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot: {path}")


if __name__ == "__main__":
    raise SystemExit(main())
