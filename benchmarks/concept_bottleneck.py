"""Interactive concept bottleneck models on scikit-learn's digits: accuracy after 0..K concept-group queries for CooP
(beta tuned on validation), random, static greedy, uncertainty-only and the oracle greedy bound, over seeds.

The data (hf_fastslow.modeling.concept_digits): occluded, noisy 8x8 digits (resampled to 16x16); 7 seven-segment
stroke concepts in 5 row groups, plus (unless --segments-only) 4 pen-style attributes in 2 groups that are
label-independent by construction. X -> C is a small ResNet built from its config, trained with plain
transformers.Trainer; the bottleneck is independent unless --bottleneck says otherwise. Percentile intervention
values, CooP's beta and influence, and the static order all come from the validation split; the table is on test.
"coop" is CooP with its influence chosen on validation among the paper's v1, the official code's v2, and the exact
expectation over a group's joint answers of the confidence change or of the symmetric KL; "coop_v1" is the paper's
v1 with beta tuned the same way.

    python benchmarks/concept_bottleneck.py --quick                # 1 seed, 8 epochs (~1-2 min on 2 cores)
    python benchmarks/concept_bottleneck.py                        # 3 seeds, 30 epochs
    python benchmarks/concept_bottleneck.py --segments-only        # the same without the pen-style concepts
    python benchmarks/concept_bottleneck.py --groups segments      # one query reveals one segment

Writes a JSON report and a PNG plot (accuracy vs queries, mean over seeds) beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import tempfile
import time

import torch


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def train_model(data, seed: int, bottleneck: str, epochs: int, lr: float):
    from transformers import ResNetConfig, Trainer, TrainingArguments

    from hf_fastslow.modeling.concept_bottleneck import ConceptBottleneckConfig, ConceptBottleneckModel

    backbone = ResNetConfig(num_channels=1, embedding_size=16, hidden_sizes=[32, 64], depths=[1, 1],
                            layer_type="basic", downsample_in_first_stage=False)
    config = ConceptBottleneckConfig(backbone_config=backbone, n_concepts=data.n_concepts, n_classes=10,
                                     concept_groups=data.concept_groups, concept_names=data.concept_names,
                                     bottleneck=bottleneck)
    torch.manual_seed(seed)
    model = ConceptBottleneckModel(config)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(
            output_dir=out, num_train_epochs=epochs, per_device_train_batch_size=64, learning_rate=lr,
            weight_decay=1e-4, lr_scheduler_type="cosine", warmup_steps=10, save_strategy="no", report_to=[],
            logging_strategy="no", use_cpu=True, seed=seed, disable_tqdm=True, dataloader_num_workers=0,
        )
        Trainer(model=model, args=args, train_dataset=data.train).train()
    return model.eval()


def run_seed(seed: int, args) -> dict:
    from hf_fastslow.evaluation.interaction import (
        InterventionStats,
        OracleGreedyPolicy,
        RandomPolicy,
        StaticGreedyPolicy,
        UncertaintyPolicy,
        run_interaction,
        tune_coop,
    )
    from hf_fastslow.modeling.concept_digits import load_concept_digits

    data = load_concept_digits(seed=seed, style=not args.segments_only, occlusion=args.occlusion, band=args.band,
                               noise_std=args.noise_std, image_size=args.image_size, groups=args.groups)
    t0, c0 = time.perf_counter(), cpu_seconds()
    model = train_model(data, seed, args.bottleneck, args.epochs, args.lr)
    train_s, train_cpu = time.perf_counter() - t0, cpu_seconds() - c0
    with torch.no_grad():
        val_logits = model(pixel_values=data.validation.pixel_values).concept_logits
        test_logits = model(pixel_values=data.test.pixel_values).concept_logits
    stats = InterventionStats.fit(val_logits, fmt=model.config.intervention_format)
    groups, head = model.config.concept_groups, model.label_head
    val = dict(concept_logits=val_logits, concept_labels=data.validation.concept_labels, labels=data.validation.labels)
    test = dict(concept_logits=test_logits, concept_labels=data.test.concept_labels, labels=data.test.labels)

    t1, c1 = time.perf_counter(), cpu_seconds()
    influences = ("confidence_change_v1", "confidence_change_v2", "expected_confidence_change", "expected_kld")
    coop, coop_areas = tune_coop(head, groups=groups, stats=stats, queries=args.queries, influences=influences, **val)
    coop_v1, _ = tune_coop(head, groups=groups, stats=stats, queries=args.queries, **val)
    static = StaticGreedyPolicy().fit(head, groups=groups, stats=stats, **val)
    policies = {
        "coop": coop, "coop_v1": coop_v1, "uncertainty": UncertaintyPolicy(), "static": static,
        "random": RandomPolicy(seed=seed), "oracle": OracleGreedyPolicy(),
    }
    curves, timings = {}, {}
    for name, policy in policies.items():
        start = time.perf_counter()
        curves[name] = run_interaction(head, policy, groups=groups, stats=stats, **test).accuracy_per_step
        timings[name] = time.perf_counter() - start
    concept_acc = ((test_logits > 0).float() == data.test.concept_labels).float().mean(0)
    return {
        "seed": seed, "coop": {"influence": coop.influence, "beta": coop.beta}, "coop_v1_beta": coop_v1.beta,
        "coop_validation_areas": {f"{i} beta={b}": a for (i, b), a in coop_areas.items()},
        "static_order": static.order,
        "curves": curves, "policy_seconds": timings, "stats": {"low": stats.low, "high": stats.high},
        "concept_accuracy": dict(zip(data.concept_names, concept_acc.tolist())),
        "train_wall_s": train_s, "train_cpu_s": train_cpu,
        "policy_wall_s": time.perf_counter() - t1, "policy_cpu_s": cpu_seconds() - c1,
    }


def summarise(runs: list[dict], queries: int) -> dict:
    from hf_fastslow.evaluation.interaction import area_under_curve

    names = list(runs[0]["curves"])
    table = {}
    for name in names:
        curves = torch.tensor([r["curves"][name] for r in runs]) * 100
        areas = torch.tensor([area_under_curve(r["curves"][name], queries) for r in runs]) * 100
        table[name] = {
            "mean": curves.mean(0).tolist(), "std": curves.std(0, unbiased=False).tolist(),
            "auc": areas.mean().item(), "auc_std": areas.std(unbiased=False).item(), "auc_per_seed": areas.tolist(),
        }
    best_baseline = max(("random", "static", "uncertainty"), key=lambda n: table[n]["auc"])
    margin = table["coop"]["auc"] - table[best_baseline]["auc"]
    per_seed = [table["coop"]["auc_per_seed"][i] - max(table[n]["auc_per_seed"][i]
                                                        for n in ("random", "static", "uncertainty"))
                for i in range(len(runs))]
    return {"table": table, "best_baseline": best_baseline, "coop_margin_points": margin,
            "coop_margin_per_seed": per_seed, "target_met": margin >= 5.0}


def print_table(summary: dict, queries: int) -> None:
    table = summary["table"]
    steps = len(next(iter(table.values()))["mean"])
    head = "policy       " + " ".join(f"{t:>11}" for t in range(steps)) + f"   AUC@0..{queries}"
    print("test accuracy (%) after t queries, mean +- std over seeds")
    print(head)
    for name, row in table.items():
        cells = " ".join(f"{m:5.1f}+-{s:4.1f}" for m, s in zip(row["mean"], row["std"]))
        print(f"{name:12} {cells}   {row['auc']:5.1f}+-{row['auc_std']:.1f}")
    print(f"CooP - best non-oracle baseline ({summary['best_baseline']}) in AUC@0..{queries}: "
          f"{summary['coop_margin_points']:+.1f} points (per seed vs that seed's best: "
          + ", ".join(f"{m:+.1f}" for m in summary["coop_margin_per_seed"])
          + f"); target >= +5: {'met' if summary['target_met'] else 'NOT met'}")


def plot(summary: dict, path: str, title: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:
        print(f"plot skipped: matplotlib is not installed ({err})")
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in summary["table"].items():
        mean, std = torch.tensor(row["mean"]), torch.tensor(row["std"])
        x = range(len(mean))
        ax.plot(x, mean, marker="o", label=f"{name} (AUC@3 {row['auc']:.1f})",
                linestyle="--" if name == "oracle" else "-")
        ax.fill_between(x, mean - std, mean + std, alpha=0.15)
    ax.set_xlabel("concept-group queries")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot written to {path}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--bottleneck", default="independent", choices=("independent", "joint", "joint_sigmoid"))
    parser.add_argument("--queries", type=int, default=3, help="area-under-curve horizon (and beta tuning)")
    parser.add_argument("--segments-only", action="store_true", help="drop the pen-style concepts")
    parser.add_argument("--occlusion", type=float, default=0.9, help="share of images with a blanked band")
    parser.add_argument("--band", type=int, default=4, help="width in pixels (of 8) of the blanked band")
    parser.add_argument("--image-size", type=int, default=16)
    parser.add_argument("--groups", default="rows", choices=("rows", "segments"),
                        help="segment groups: rows of the seven-segment grid, or one group per segment")
    parser.add_argument("--noise-std", type=float, default=0.15)
    parser.add_argument("--quick", action="store_true", help="1 seed, 8 epochs")
    parser.add_argument("--out", default="concept_bottleneck_report.json")
    parser.add_argument("--plot", default=None, help="the PNG (default: beside the JSON report)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seeds, args.epochs = args.seeds[:1], min(args.epochs, 8)
    torch.set_num_threads(1)
    t0, c0 = time.perf_counter(), cpu_seconds()
    runs = []
    for seed in args.seeds:
        run = run_seed(seed, args)
        print(f"seed {seed}: CooP {run['coop']['influence']} beta {run['coop']['beta']} (v1 beta "
              f"{run['coop_v1_beta']}), static order {run['static_order']}, "
              f"train {run['train_wall_s']:.0f} s wall / {run['train_cpu_s']:.0f} s CPU, "
              f"policies {run['policy_wall_s']:.1f} s wall; concept accuracy "
              + " ".join(f"{v:.2f}" for v in run["concept_accuracy"].values()))
        runs.append(run)
    summary = summarise(runs, args.queries)
    print_table(summary, args.queries)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    print(f"total {wall:.0f} s wall, {cpu:.0f} s process CPU (shared box: wall includes waiting)")
    report = {"args": vars(args), "runs": runs, **summary, "wall_s": wall, "cpu_s": cpu}
    with open(args.out, "w") as f:
        json.dump(report, f, indent=1)
    print(f"report written to {args.out}")
    title = (f"digits CBM ({args.bottleneck}, {'segments' if args.segments_only else 'segments + pen style'}), "
             f"{len(args.seeds)} seed(s)")
    plot(summary, args.plot or os.path.splitext(args.out)[0] + ".png", title)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
