"""Headline extractors for the attention benchmarks (see hf_fastslow/bench/headlines/__init__.py): SVG-EAR (ear), IHA
(iha), CARE (care) and CREST (crest). Each reads its script's JSON by key, so a changed schema fails with a KeyError,
and works on the quick and the full profile alike (a part the profile skipped is null in the JSON and gives no
figure)."""

from __future__ import annotations

from hf_fastslow.bench.headlines import index_rows, smoke_note
from hf_fastslow.bench.registry import Figure

EAR, SVG2, SCORE_COMP = "EAR (error + comp)", "SVG2-style (score, drop)", "score + comp"


def _smoke(report: dict) -> str:
    return smoke_note(report["args"]["quick"], "quick profile, too few examples to separate the arms")


def _ear(report: dict) -> list[Figure]:
    figures = []
    layers = report["layers"]
    if layers is not None:
        size = (f"SmolLM2-135M, {layers['tokens']} tokens, last {layers['queries']} queries, "
                f"{len(layers['per_layer'])} layers, C_q={layers['q_clusters']}, C_k={layers['k_clusters']}")
        mean = layers["mean"]
        figures.append(Figure("relative attention-output error at density 0.2, mean over layers, lower is better",
                              mean[EAR]["0.2"], mean[SVG2]["0.2"],
                              note=f"peer: SVG2-style routing (score, skipped blocks dropped); {size}"))
        figures.append(Figure("relative attention-output error at density 0.2, EAR vs score routing + compensation "
                              "(routing alone), lower is better", mean[EAR]["0.2"], mean[SCORE_COMP]["0.2"],
                              note=f"peer: score routing with the same centroid compensation; {size}"))
        target = layers["target_density_0.2"]
        figures.append(Figure(f"share of layers where EAR's error <= {target['max_ratio']} x SVG2-style's at density "
                              "0.2 (issue target: every layer)", target["holds"] / target["layers"], None,
                              note=f"{target['holds']} of {target['layers']} layers; {size}"))
    e2e = report["llm_end_to_end"]
    if e2e is not None:
        # KL, not the loss delta: the sparse arms' losses sit within noise of dense (docs/ear.md, section 2)
        arms = index_rows(e2e["arms"], "attention", "density")
        figures.append(Figure("end to end: KL(dense || sparse) of next-token distributions at density 0.2 on the "
                              "routed part, lower is better", arms[EAR, 0.2]["kl"], arms[SVG2, 0.2]["kl"],
                              note=f"peer: SVG2-style; enable_ear_attention on SmolLM2-135M, {e2e['tokens']} tokens, "
                                   f"chunk {e2e['chunk']} (chunk 0 exact), positions with a routed part"))
    return figures


def _iha(report: dict) -> list[Figure]:
    figures = []
    exact = report["exactness"]
    if exact is not None:
        rows = index_rows(exact["rows"], "P")
        p = 3 if 3 in rows else max(rows)
        row = rows[p]
        figures.append(Figure(f"max |delta logit| of the identity IHA conversion (P={p}) vs the stock model's own "
                              "eager-vs-SDPA difference, lower is better", row["max_dlogit"],
                              exact["fp32_floor_eager_vs_sdpa"],
                              note=f"peer: the fp32 noise floor; left-padded batch of 2, width {exact['width']}; "
                                   f"greedy {exact['new_tokens']} tokens identical: "
                                   f"{'yes' if row['greedy_match'] else 'NO'}"))
        ms = exact["prefill_ms_median"]
        figures.append(Figure(f"prefill ms of that batch, IHA P={p} vs stock (CPU fp32), lower is better",
                              ms[f"P={p}"], ms["stock"],
                              note=f"median of {report['args']['repeats']} interleaved round(s); CPU-time ratio "
                                   f"{exact['prefill_cpu_ratio_to_stock_median'][f'P={p}']:.2f} (wall is noisy on a "
                                   "loaded box)"))
    tune = report["finetune"]
    if tune is not None:
        arms = tune["arms"]
        size = (f"{tune['pairs']}-pair retrieval, {tune['train']} train / {tune['eval']} held-out, top "
                f"{tune['layers']} layers, {arms['stock']['steps']} steps; untrained exact match "
                f"{tune['untrained']['exact_match']:.3f}")
        figures.append(Figure("held-out exact match after the same fine-tune, higher is better",
                              arms["IHA"]["acc"], arms["stock"]["acc"],
                              note=f"peer: stock attention; {size}{_smoke(report)}",
                              paper="+10-20 points on RULER multi-key retrieval at 4k-16k (pretrained, FLOP-matched)"))
        figures.append(Figure("held-out answer-token NLL after the same fine-tune, lower is better",
                              arms["IHA"]["nll"], arms["stock"]["nll"],
                              note=f"peer: stock attention; {size}{_smoke(report)}"))
    return figures


def _care(report: dict) -> list[Figure]:
    rows = index_rows(report["rows"], "arm", "fraction")
    original = rows["original", 1.0]
    care, svd = rows["care_uniform", 0.5], rows["svd_uniform", 0.5]
    size = (f"SmolLM2-135M, 50% of the KV width, {report['tokens']} tokens of the bundled text, calibration "
            f"{report['args']['calib']} GSM8K questions x {report['args']['calib_len']} tokens, no healing")
    figures = [
        Figure("perplexity at 50% KV width, one-shot CARE (uniform ranks) vs plain SVD, lower is better",
               care["ppl"], svd["ppl"], note=f"peer: uniform SVD of the K/V weights (Palu-style); {size}",
               paper="Qwen3-4B rank 128: CARE-E 102.4 vs Palu 22048.8 (215x better)"),
        Figure("perplexity at 50% KV width, one-shot CARE vs the original model, lower is better (issue: <= 1.35x)",
               care["ppl"], original["ppl"], note=f"peer: the unconverted model; {size}"),
        Figure("KV cache bytes per token (storage walk), CARE 50% vs the original, lower is better",
               care["bytes_per_token"], original["bytes_per_token"], note="fp32 model; fixed overhead "
               f"{care['fixed']:.0f} vs {original['fixed']:.0f} bytes",
               paper="-53 % KV at 32K context (Llama-3.1-8B, rank 512)"),
    ]
    healed = rows.get(("care_uniform_healed", 0.5))
    if healed is not None:
        steps = next(h["steps"] for h in report["healing"] if h["fraction"] == 0.5)
        figures.append(Figure("perplexity at 50% KV width after KVHealingTrainer vs one-shot CARE, lower is better",
                              healed["ppl"], care["ppl"], note=f"peer: CARE before healing; {steps} healing steps"))
    return figures


def _crest(report: dict) -> list[Figure]:
    arms, calib, items = report["arms"], report["calibration"], report["items"]
    cap = report["args"]["max_new_tokens"]
    size = (f"SmolLM2-135M, {items} GSM-Symbolic items, greedy, <= {cap} new tokens; calibration {calib['traces']} "
            f"traces, {calib['nonlinear_steps']} non-linear of {calib['steps']} steps")
    crest, seal, plain = arms["CREST"], arms["SEAL-style"], arms["plain"]
    return [
        Figure("GSM-Symbolic exact-match accuracy, CREST vs SEAL-style steering, higher is better",
               crest["accuracy"], seal["accuracy"],
               note=f"peer: SEAL-style vector; no steering {plain['accuracy']:.2f}; {size}{_smoke(report)}",
               paper="up to +17.5 points vs no steering (reasoning models)"),
        Figure("mean new tokens per answer, CREST vs SEAL-style steering, lower is better", crest["mean_tokens"],
               seal["mean_tokens"], note=f"peer: SEAL-style vector; no steering {plain['mean_tokens']:.1f}; answers "
               f"at the {cap}-token cap: CREST {crest['at_token_cap']}, SEAL {seal['at_token_cap']} of {items}"
               f"{_smoke(report)}", paper="up to -37.6 % tokens vs no steering (reasoning models)"),
        Figure("non-linear steps per answer, CREST vs no steering (what CREST suppresses), lower means more "
               "suppression", crest["nonlinear_steps_per_answer"], plain["nonlinear_steps_per_answer"],
               note=f"peer: the same model unsteered; {size}{_smoke(report)}"),
        Figure("balanced probe accuracy of the top heads (mean), real vs shuffled labels, higher is better",
               calib["probe_accuracy"]["top_mean"], calib["control_accuracy"]["top_mean"],
               note=f"peer: shuffled-label control; top {report['args']['top_ratio']:.0%} of heads; {size}"),
    ]


EXTRACTORS = {"ear": _ear, "iha": _iha, "care": _care, "crest": _crest}
