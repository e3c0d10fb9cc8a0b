"""Headline extractors for the eval_vision benchmarks (see hf_fastslow/bench/headlines/__init__.py): IPW, K-Sort,
MAST, interactive CBM (CooP), structured pruning (slimming) and MetaDOCK. Each reads its script's JSON by key, the
same keys in the quick and the full profile, and raises KeyError when the shape changed.
"""

from __future__ import annotations

from hf_fastslow.bench.headlines import index_rows, smoke_note
from hf_fastslow.bench.registry import Figure

# The kept fractions every slimming profile measures (quick: 1.0 / 0.5 / 0.1 trackers, 0.5 LM; full: both among more).
SLIM_TRACKER_KEPT = 0.1
SLIM_LM_KEPT = 0.5


def ksort(report: dict) -> list[Figure]:
    figures = []
    synthetic = report.get("synthetic")
    if synthetic:
        ours, static = synthetic["pl/k-sort"], synthetic["pl/static-matching"]
        figures.append(Figure("synthetic arena: mean runs to converge (pl judge), lower is better",
                              ours["mean_runs"], static["mean_runs"], note="peer: static matching"))
        figures.append(Figure("synthetic arena: share converged within 90 runs (pl judge)",
                              ours["converged_within_90"], static["converged_within_90"], note="peer: static matching",
                              paper="0.91-0.93"))
    text = report.get("text")
    if text:
        bt = text["static-judge+bradley-terry"]
        ours = text["likelihood-judge/k-sort"]
        figures.append(Figure("text arena: |mu - true skill|, lower is better", ours["abs_err"], bt["abs_err"],
                              note="peer: static judge + Bradley-Terry"))
    return figures


def ipw(report: dict) -> list[Figure]:
    arms, figures = report["reports"], []
    fp32 = arms.get("fp32")
    codecarbon = report.get("other_meters", {}).get("fp32", {}).get("codecarbon_cpu_j_per_query")
    if fp32 and codecarbon is not None:
        energy = fp32["figures"]["energy_per_query_j"]
        figures.append(Figure("fp32 energy per query (J): the IPW meter vs CodeCarbon's CPU share", energy["value"],
                              codecarbon, measured=False, note=energy["label"] + " by IPW; CodeCarbon estimates too"))
    # one figure per simulated router accuracy the script ran (keys are router accuracies, not thresholds): picking
    # the largest saving would pick the noisiest router, whose misroutes send queries the local model gets wrong
    for accuracy, r in sorted(report.get("routing", {}).items(), key=lambda item: -float(item[0])):
        figures.append(Figure(
            f"energy saved by routing local/cloud vs cloud only, router accuracy {float(accuracy):g}",
            r["energy_saving"], None, measured=r.get("energy_label") == "measured", paper="0.60-0.80",
            note=f"simulated from the measured per-query costs: {r['local_share']:.0%} of queries local, accuracy "
                 f"{r['accuracy']:.2f} vs cloud only {r['cloud_accuracy']:.2f}; cloud = the same model over "
                 "transformers serve on this machine"))
    int8 = arms.get("int8")
    if int8 and fp32:
        ours, peer = int8["figures"]["apj_per_j"], fp32["figures"]["apj_per_j"]
        figures.append(Figure("accuracy per joule, int8 dynamic vs fp32 in process", ours["value"], peer["value"],
                              measured=ours["label"] == peer["label"] == "measured"))
        ours, peer = int8["figures"]["accuracy"], fp32["figures"]["accuracy"]
        figures.append(Figure("accuracy, int8 dynamic vs fp32", ours["value"], peer["value"],
                              note=f"{int8['n']} problems"))
    return figures


def concept_bottleneck(report: dict) -> list[Figure]:
    table, best = report["table"], report["best_baseline"]
    seeds = len(report["runs"])
    return [Figure(f"test accuracy AUC over the first {report['args']['queries']} queries (points), higher is better",
                   table["coop"]["auc"], table[best]["auc"], note=f"peer: {best}, the best non-oracle baseline; "
                   f"{seeds} seed(s)"),
            Figure("CooP - best baseline, AUC points", report["coop_margin_points"], None, paper=">= 5")]


def mast(report: dict) -> list[Figure]:
    """Agreement with the fixtures' hand labels: the package's score-mode judge and the heuristics beside agentdash
    (the MAST authors' annotator on the same judge model); then score mode's prefix-cache speed-up."""
    fixtures = report["fixtures"]
    arms = fixtures["annotators"]
    score, heuristics = arms["score"]["agreement"], arms["heuristics"]["agreement"]
    size = f"{len(fixtures['traces'])} fixture traces x 14 modes, judge SmolLM2-135M-Instruct"
    if report["args"]["no_agentdash"] or report["agentdash_setup_error"]:  # the arm was not run: no peer, say why
        peer = {"pooled_kappa": None, "macro_f1": None}
        peer_note = f"agentdash not run ({report['agentdash_setup_error'] or '--no-agentdash'})"
    else:
        peer, peer_note = arms["agentdash"]["agreement"], "peer: agentdash on the same judge via transformers serve"
    figures = [
        Figure("pooled Cohen's kappa vs the fixtures' labels, score mode vs agentdash, higher is better",
               score["pooled_kappa"], peer["pooled_kappa"], note=f"{peer_note}; {size}",
               paper="0.77 (o1 judge, few-shot, vs experts)"),
        Figure("macro F1 over the 14 modes, score mode vs agentdash, higher is better", score["macro_f1"],
               peer["macro_f1"], note=f"{peer_note}; {size}", paper="F1 0.80 (o1 judge)"),
        Figure("pooled Cohen's kappa vs the fixtures' labels, heuristics (no model) vs agentdash",
               heuristics["pooled_kappa"], peer["pooled_kappa"], note=f"{peer_note}; {size}"),
    ]
    speed = report["score_cache_speedup"]
    figures.append(Figure("score mode seconds: cached shared prefix vs one full forward per question, lower is better",
                          speed["cached"]["seconds"], speed["full"]["seconds"],
                          note=f"{report['args']['speedup_traces']} fixture traces, 15 questions each, wall-clock"))
    return figures


def slimming(report: dict) -> list[Figure]:
    """Per tracker: success AUC of the child at 10 % kept beside the dense child (100 %, same fine-tuning); the LM:
    held-out perplexity at 50 % of the MLP channels, ViT-Slim/IA3 masks vs torch.nn.utils.prune L1-structured."""
    figures = []
    args = report["args"]
    smoke = smoke_note(args["quick"], "--quick, a few test sequences and short training, not a ranking")
    for kind, arm in report["trackers"].items():
        rows = index_rows(arm["rows"], "kept")
        dense, cut = rows[1.0], rows[SLIM_TRACKER_KEPT]
        figures.append(Figure(
            f"{kind} tracker: success AUC at {SLIM_TRACKER_KEPT:.0%} kept vs the dense tracker, higher is better",
            cut["success_auc"], dense["success_auc"],
            note=f"params {cut['params']:,} of {dense['params']:,}; {args['dense_steps']} dense / "
                 f"{args['search_steps']} search / {args['child_steps']} child steps, {args['test_sequences']} test "
                 f"sequences of {args['test_length']} frames, 1 seed{smoke}"))
    if "lm" in report:
        lm = report["lm"]
        row = index_rows(lm["rows"], "kept")[SLIM_LM_KEPT]
        figures.append(Figure(
            f"default LM: held-out perplexity at {SLIM_LM_KEPT:.0%} of the MLP channels, lower is better",
            row["slim_ppl"], row["torch_prune_l1_ppl"],
            note=f"ViT-Slim (IA3 mask search, {args['lm_search_steps']} steps) vs torch.nn.utils.prune L1-structured; "
                 f"no healing; dense ppl {lm['dense_ppl']}; {lm['heldout_tokens']} held-out tokens"
                 + smoke_note(args["quick"], "--quick, a short mask search")))
    return figures


def metadock(report: dict) -> list[Figure]:
    """Per shots and budget: meta-test accuracy of the gated Conv4 beside the narrow dense Conv4 with the same conv
    parameters (the paper's equal-budget comparison). Arms are found by the suffix the script names them with (a
    merged report's `settings` keep the merge call's width, not the runs')."""
    figures, table = [], report["table"]
    for shots in sorted({t["shots"] for t in table}):
        for budget in report["settings"]["budgets"]:
            rows = [t for t in table if t["shots"] == shots]
            gated = next((t for t in rows if t["arm"].endswith(f"@ {budget:.0%}")), None)
            narrow = next((t for t in rows if t["arm"].endswith(f"(= {budget:.0%} params)")), None)
            if gated is None or narrow is None:
                raise KeyError(f"{shots}-shot, budget {budget}: gated or narrow arm missing")
            note = (f"{gated['arm']} ({gated['active_conv_params']:.0f} active conv params, "
                    f"{gated['active_fraction']:.0%} of kernels) vs {narrow['arm']} "
                    f"({narrow['active_conv_params']:.0f}); {gated['seeds']} seed(s), mean 95 % CI "
                    f"+-{gated['ci95_mean']:.3f}")
            if gated["active_conv_params"] > 1.1 * narrow["active_conv_params"]:
                note += "; budget not reached: not an equal-parameter comparison"
            note += smoke_note(report["settings"]["quick"], "--quick, few meta-steps, too short to rank the arms")
            figures.append(Figure(f"5-way {shots}-shot meta-test accuracy, gated at {budget:.0%} vs narrow dense, "
                                  "higher is better", gated["accuracy_mean"], narrow["accuracy_mean"], note=note,
                                  paper="up to +2 % accuracy with > 75 % fewer active parameters (CIFAR-FS, "
                                        "mini-ImageNet)"))
    return figures


EXTRACTORS = {"ipw": ipw, "ksort": ksort, "mast": mast, "concept_bottleneck": concept_bottleneck,
              "slimming": slimming, "metadock": metadock}
