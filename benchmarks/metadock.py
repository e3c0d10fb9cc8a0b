"""MetaDOCK on few-shot digits: iMAML dense Conv4 vs iMAML with kernel gates at 25 / 50 % active kernels vs narrow
dense Conv4s with the same active conv parameters, 5-way 1-shot and 5-shot, several seeds.

Data: scikit-learn's digits, (digit, rotation) pairs as classes, split by base digit (meta-train 0-4, meta-val 5 and 7,
meta-test 6, 8, 9; `hf_fastslow.evaluation.few_shot`). Per (shots, seed), as in the paper's pipeline:
  1. dense iMAML pre-training of Conv4-W (`--pretrain-steps`), checkpoint chosen on meta-validation;
  2. from it, `--finetune-steps` more meta-steps of (a) dense iMAML and (b) MetaDOCK gates at each budget;
  3. narrow dense Conv4s (the width whose conv weights equal budget * Conv4-W's) trained from scratch for
     pretrain + finetune steps.
Every arm keeps its best meta-validation checkpoint (never meta-test) and is then scored on the same fixed meta-test
episodes: accuracy with the 1.96 std / sqrt(N) interval, active conv parameters per task (gated: kernels switched on
after each task's inner loop), wall and process-CPU seconds, seconds per meta-step (meta-validation included,
pre-training counted in the arms that start from it). Every arm is measured in this one process, one after another
(the box is shared: compare CPU seconds too).

    python benchmarks/metadock.py --quick                 # about 3 min: 1 seed, few steps (a smoke run, not a result)
    python benchmarks/metadock.py                         # the issue's size: 3 seeds, 1- and 5-shot (see --help)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import warnings

import torch

from hf_fastslow.evaluation.few_shot import EpisodeDataset, digit_rotation_classes  # noqa: E402
from hf_fastslow.modeling.conv4 import (  # noqa: E402
    Conv4Config,
    Conv4ForImageClassification,
    conv_parameter_count,
    narrow_width_for_budget,
)
from hf_fastslow.modeling.kernel_gates import attach_kernel_gates  # noqa: E402
from hf_fastslow.trainers.imaml_config import IMAMLConfig  # noqa: E402
from hf_fastslow.trainers.imaml_trainer import IMAMLTrainer  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny run (1 seed, few steps): checks the pipeline")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--shots", type=int, nargs="+", default=[1, 5])
    p.add_argument("--ways", type=int, default=5)
    p.add_argument("--queries", type=int, default=10, help="query images per class and episode")
    p.add_argument("--width", type=int, default=32, help="Conv4 width of the dense and gated models")
    p.add_argument("--budgets", type=float, nargs="+", default=[0.5, 0.25])
    p.add_argument("--pretrain-steps", type=int, default=150)
    p.add_argument("--finetune-steps", type=int, default=100)
    p.add_argument("--meta-batch", type=int, default=4)
    p.add_argument("--inner-steps", type=int, default=8)
    p.add_argument("--inner-lr", type=float, default=0.1)
    p.add_argument("--meta-lr", type=float, default=1e-3)
    p.add_argument("--budget-weight", type=float, default=50.0)
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--val-episodes", type=int, default=100)
    p.add_argument("--test-episodes", type=int, default=600)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="metadock_report.json")
    p.add_argument("--plot", default=None, help="the PNG (default: beside the JSON report)")
    p.add_argument("--merge", nargs="+", metavar="REPORT",
                   help="build the table from these reports' rows (runs split over processes) instead of running")
    args = p.parse_args(argv)
    if args.quick:
        args.seeds, args.width, args.budgets = args.seeds[:1], 32, [0.25]
        args.pretrain_steps, args.finetune_steps, args.eval_every = 12, 8, 4
        args.inner_steps, args.meta_batch, args.val_episodes, args.test_episodes = 4, 2, 12, 30
    return args


def meta_config(args, steps: int, output_dir: str, budget: float | None = None) -> IMAMLConfig:
    return IMAMLConfig(
        output_dir=output_dir, max_steps=steps, per_device_train_batch_size=args.meta_batch,
        learning_rate=args.meta_lr, lr_scheduler_type="constant", inner_steps=args.inner_steps,
        inner_lr=args.inner_lr, budget=budget, budget_weight=args.budget_weight,
        budget_warmup_steps=max(1, steps // 2), eval_strategy="steps", eval_steps=args.eval_every,
        save_strategy="no", logging_strategy="no", report_to="none", use_cpu=True, disable_tqdm=True,
        seed=0, data_seed=0,
    )


def train_arm(args, model, gates, steps, train, val, budget=None):
    config = meta_config(args, steps, os.path.join("metadock_runs", "tmp"), budget)
    trainer = IMAMLTrainer(model=model, args=config, gates=gates, train_dataset=train, eval_dataset=val)
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.train()
    return trainer, time.perf_counter() - wall, time.process_time() - cpu


def score_arm(trainer, test, conv_params: int) -> dict:
    wall = time.perf_counter()
    metrics = trainer.meta_test(test, metric_key_prefix="test")
    fraction = metrics.get("test_active_fraction", 1.0)
    return {
        "accuracy": metrics["test_accuracy"],
        "ci95": metrics["test_accuracy_ci95"],
        "active_fraction": fraction,
        "active_fraction_std": metrics.get("test_active_fraction_std", 0.0),
        "gates_flipped_per_task": metrics.get("test_gates_flipped", 0.0),
        "active_conv_params": fraction * conv_params,
        "best_val_accuracy": trainer.best_metric,
        "test_seconds": time.perf_counter() - wall,
    }


def conv4(width, ways, seed):
    torch.manual_seed(seed)
    return Conv4ForImageClassification(Conv4Config(num_labels=ways, hidden_sizes=[width] * 4))


def run_setting(args, shots: int, seed: int, classes: dict) -> list[dict]:
    train = EpisodeDataset(classes["train"], args.ways, shots, args.queries, seed=1000 + seed)
    val = EpisodeDataset(classes["val"], args.ways, shots, args.queries, length=args.val_episodes, seed=7)
    test = EpisodeDataset(classes["test"], args.ways, shots, args.queries, length=args.test_episodes, seed=11)
    rows = []

    def record(arm, width, trainer, wall, cpu, steps, extra_steps=0):
        row = {"shots": shots, "seed": seed, "arm": arm, "width": width, "meta_steps": steps + extra_steps,
               "train_wall_s": wall, "train_cpu_s": cpu, "s_per_meta_step": wall / (steps + extra_steps)}
        row.update(score_arm(trainer, test, conv_parameter_count([width] * 4)))
        rows.append(row)
        print(json.dumps({k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}), flush=True)

    pre_model = conv4(args.width, args.ways, seed)
    pre, pre_wall, pre_cpu = train_arm(args, pre_model, None, args.pretrain_steps, train, val)
    pretrained = {k: v.clone() for k, v in pre_model.state_dict().items()}
    print(f"# {shots}-shot seed {seed}: pre-training {pre_wall:.0f} s wall, best val {pre.best_metric:.3f}", flush=True)

    dense = conv4(args.width, args.ways, seed)
    dense.load_state_dict(pretrained)
    trainer, wall, cpu = train_arm(args, dense, None, args.finetune_steps, train, val)
    record(f"iMAML dense Conv4-{args.width}", args.width, trainer, wall + pre_wall, cpu + pre_cpu,
           args.finetune_steps, args.pretrain_steps)
    for budget in args.budgets:
        gated = conv4(args.width, args.ways, seed)
        gated.load_state_dict(pretrained)
        gates = attach_kernel_gates(gated, budget=budget)
        trainer, wall, cpu = train_arm(args, gated, gates, args.finetune_steps, train, val, budget)
        record(f"MetaDOCK Conv4-{args.width} @ {budget:.0%}", args.width, trainer, wall + pre_wall, cpu + pre_cpu,
               args.finetune_steps, args.pretrain_steps)
    for budget in args.budgets:
        width = narrow_width_for_budget(args.width, budget)
        narrow = conv4(width, args.ways, seed)
        steps = args.pretrain_steps + args.finetune_steps
        trainer, wall, cpu = train_arm(args, narrow, None, steps, train, val)
        record(f"iMAML dense Conv4-{width} (= {budget:.0%} params)", width, trainer, wall, cpu, steps)
    return rows


def summarise(rows: list[dict]) -> list[dict]:
    table = []
    for shots in sorted({r["shots"] for r in rows}):
        arms = list(dict.fromkeys(r["arm"] for r in rows if r["shots"] == shots))
        for arm in arms:
            sel = [r for r in rows if r["shots"] == shots and r["arm"] == arm]
            accs = [r["accuracy"] for r in sel]
            table.append({
                "shots": shots, "arm": arm, "seeds": len(sel),
                "accuracy_mean": statistics.fmean(accs),
                "accuracy_seed_std": statistics.stdev(accs) if len(accs) > 1 else 0.0,
                "ci95_mean": statistics.fmean(r["ci95"] for r in sel),
                "active_conv_params": statistics.fmean(r["active_conv_params"] for r in sel),
                "active_fraction": statistics.fmean(r["active_fraction"] for r in sel),
                "active_fraction_task_std": statistics.fmean(r["active_fraction_std"] for r in sel),
                "gates_flipped_per_task": statistics.fmean(r.get("gates_flipped_per_task", 0.0) for r in sel),
                "s_per_meta_step": statistics.fmean(r["s_per_meta_step"] for r in sel),
                "train_cpu_s": statistics.fmean(r["train_cpu_s"] for r in sel),
            })
    return table


def verdicts(table: list[dict], args) -> list[str]:
    lines = []
    for shots in sorted({t["shots"] for t in table}):
        for budget in args.budgets:
            gated = next(t for t in table if t["shots"] == shots and t["arm"].endswith(f"@ {budget:.0%}"))
            narrow = next(t for t in table if t["shots"] == shots and t["arm"].endswith(f"(= {budget:.0%} params)"))
            if gated["active_conv_params"] > 1.1 * narrow["active_conv_params"]:
                verdict = (f"not an equal-parameter comparison: the gates kept {gated['active_fraction']:.0%} active "
                           "(budget not reached)")
            else:
                met = gated["accuracy_mean"] >= narrow["accuracy_mean"]
                verdict = f"target gated >= narrow {'met' if met else 'NOT met'}"
            lines.append(
                f"{shots}-shot, {budget:.0%}: gated {gated['accuracy_mean']:.3f} ({gated['active_conv_params']:.0f} "
                f"active conv params) vs narrow {narrow['accuracy_mean']:.3f} ({narrow['active_conv_params']:.0f}): "
                + verdict
            )
    return lines


def plot(table, path):
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as error:
        print(f"plot skipped: matplotlib is not importable ({error})")
        return
    fig, axes = plt.subplots(1, len({t["shots"] for t in table}), figsize=(11, 4), squeeze=False)
    for ax, shots in zip(axes[0], sorted({t["shots"] for t in table})):
        for t in (t for t in table if t["shots"] == shots):
            marker = "s" if "MetaDOCK" in t["arm"] else "o"
            ax.errorbar(t["active_conv_params"], t["accuracy_mean"], yerr=t["accuracy_seed_std"], fmt=marker,
                        label=t["arm"], capsize=3)
        ax.set_xscale("log")
        ax.set_xlabel("active conv parameters (per task)")
        ax.set_ylabel("meta-test accuracy")
        ax.set_title(f"5-way {shots}-shot digits (rotations as classes)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"plot: {path}")


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    wall, cpu = time.perf_counter(), time.process_time()
    if args.merge:
        reports = [json.load(open(path)) for path in args.merge]
        rows = [row for report in reports for row in report["rows"]]
        args.budgets = reports[0]["settings"]["budgets"]
    else:
        classes = {split: digit_rotation_classes(split) for split in ("train", "val", "test")}
        print(f"classes per split: { {k: len(v) for k, v in classes.items()} }; settings: {vars(args)}", flush=True)
        rows = [row for shots in args.shots for seed in args.seeds for row in run_setting(args, shots, seed, classes)]
    table = summarise(rows)
    print("\n| shots | arm | seeds | meta-test acc (mean ± seed std) | mean 95% CI | active conv params | "
          "active frac (task std) | gates flipped per task | s / meta-step |")
    print("|---|---|---|---|---|---|---|---|---|")
    for t in table:
        print(f"| {t['shots']} | {t['arm']} | {t['seeds']} | {t['accuracy_mean']:.3f} ± {t['accuracy_seed_std']:.3f} "
              f"| ± {t['ci95_mean']:.3f} | {t['active_conv_params']:.0f} | {t['active_fraction']:.3f} "
              f"({t['active_fraction_task_std']:.3f}) | {t['gates_flipped_per_task']:.4f} "
              f"| {t['s_per_meta_step']:.2f} |")
    lines = verdicts(table, args)
    print("\n".join(lines))
    total = {"wall_s": time.perf_counter() - wall, "process_cpu_s": time.process_time() - cpu}
    if args.merge:  # the runs' own totals, added up (they may have run side by side)
        total = {key: sum(report["total"][key] for report in reports) for key in total}
    print(f"total: {total['wall_s']:.0f} s wall, {total['process_cpu_s']:.0f} s process CPU"
          + (" (--quick: a smoke run, too short to rank the arms)" if args.quick else ""))
    with open(args.out, "w") as f:
        json.dump({"settings": vars(args), "rows": rows, "table": table, "verdicts": lines, "total": total}, f,
                  indent=1)
    plot(table, args.plot or os.path.splitext(args.out)[0] + ".png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
