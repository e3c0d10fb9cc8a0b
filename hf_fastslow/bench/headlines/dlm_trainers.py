"""Headline extractors for the diffusion-LM and trainer benchmarks (see hf_fastslow/bench/headlines/__init__.py).

Each function reads the JSON its script writes (the same schema in the quick and the full profile) by key and fails
with a KeyError when an arm it reads was renamed or left out, so a stale extractor fails its method's row loudly.
"""

from __future__ import annotations

from hf_fastslow.bench.headlines import index_rows, smoke_note
from hf_fastslow.bench.registry import Figure


def _dlm_synthetic(report: dict) -> list[Figure]:
    rows = index_rows(report["rows"], "method", "model", "setting")
    profile = report["profile"]
    size = f"{profile['digits']}-digit addition, {profile['n_test']} held-out problems, {profile['steps']} steps"
    # the quick profile: a pipeline run, too short to learn
    size += smoke_note(max(r["accuracy"] for r in report["rows"]) == 0, "no arm learned the task at this size")
    ar = rows[("AR greedy", "AR", "generate")]
    bd3 = rows[("block diffusion", "BD3", "b=4 steps=4 thr=0.9")]
    isd = rows[("ISD greedy", "I-DLM", "N=3")]
    seqd = rows[("SeqD (block diffusion)", "SeqD", "b=4 thr=0.9")]
    rcd = rows[("RCD (zero init)", "RCD", "b=4 thr=0.9")]
    return [
        Figure("exact match, block diffusion (BD3, b=4, thr 0.9) vs an AR model trained on the same tokens",
               bd3["accuracy"], ar["accuracy"], note=f"peer: AR greedy generate; {size}"),
        Figure("tokens per forward (prefill counted), ISD N=3 on the I-DLM model vs AR greedy (1.0), higher is better",
               isd["tpf"], ar["tpf"], note=f"{isd['extra']}; {size}", paper="TPF 2.96 at N=4 (I-DLM-8B, MATH-500)"),
        Figure("exact match, RCD (zero init) vs SeqD, same BD3 start and further tokens, thr 0.9",
               rcd["accuracy"], seqd["accuracy"], note=f"peer: SeqD (no residuals); {size}",
               paper="RCD above SeqD by 2-12 points (SDAR-4B/8B, GSM8K/MATH500)"),
    ]


def _isd(report: dict) -> list[Figure]:
    n = max(report["args"]["strides"])
    rows = index_rows(report["decoding"], "arm")
    base, trained = rows[f"ISD N={n}, base model"], rows[f"R-ISD N={n}, trained adapter"]
    greedy = rows["greedy generate"]
    lookup = rows[f"prompt lookup ({report['args']['lookup']} tokens)"]
    training = report["training"]
    size = (f"SmolLM2-135M, R-ISD aLoRA trained on {training['tokens']} clean tokens; {report['args']['prompts']} "
            f"GSM8K prompt(s) x {report['args']['new_tokens']} new tokens")
    fp32 = [e for e in report["equality"] if e["arm"].startswith("fp32 ") and "ISD" in e["arm"]]  # not lookup
    return [
        Figure(f"ISD acceptance (accepted / verified drafts), N={n}: trained R-ISD adapter vs the untrained base",
               trained["acceptance"], base["acceptance"], note=size),
        Figure(f"tokens/s, R-ISD N={n} vs greedy generate (batch 1)", trained["tokens_per_s"], greedy["tokens_per_s"],
               note=size, paper="2.30x AR at concurrency 1 (I-DLM-8B vs Qwen3-8B, H100)"),
        Figure(f"tokens/s, R-ISD N={n} vs generate(prompt_lookup_num_tokens) (batch 1)", trained["tokens_per_s"],
               lookup["tokens_per_s"], note="peer: training-free prompt lookup; " + size),
        Figure("ISD outputs identical to greedy generate (fp32, lossless check), share",
               sum(e["identical"] for e in fp32) / sum(e["prompts"] for e in fp32), None,
               note=f"{len(fp32)} ISD arm(s); lossless means 1.0"),
    ]


_BLOCK_DIFFUSION_HEADLINE = (4, 4, 0.9)  # block, steps, threshold: the setting both profiles run


def _block_diffusion(report: dict) -> list[Figure]:
    settings = [s for s in report["settings"] if (s["block"], s["steps"], s["threshold"]) == _BLOCK_DIFFUSION_HEADLINE]
    setting = next((s for s in settings if s["model"].startswith("SmolLM2")), settings[-1])
    arms = setting["arms"]
    ours, pipeline, greedy = (arms["ours (cached, fused commit)"], arms["diffusers LLaDA2Pipeline (no cache)"],
                              arms["AR greedy generate"])
    note = (f"{setting['model']}, block {setting['block']}, steps {setting['steps']}, threshold "
            f"{setting['threshold']}; {setting['prompts']} prompts x {setting['new_tokens']} new tokens, "
            f"{setting['repeats']} timed round(s)")
    return [
        Figure("tokens/s, cached block diffusion vs diffusers LLaDA2Pipeline (no cache), batch 1",
               ours["tokens_per_s"], pipeline["tokens_per_s"], note=note),
        Figure("tokens/s, cached block diffusion vs AR greedy generate, batch 1", ours["tokens_per_s"],
               greedy["tokens_per_s"], note=note + "; unconverted weights: agreement with greedy "
               f"{ours['agreement']:.3f}"),
        Figure("tokens per forward, cached block diffusion vs diffusers LLaDA2Pipeline", ours["tpf"], pipeline["tpf"],
               note=note),
    ]


def _losa(rows: list[dict]) -> list[Figure]:
    prefix = max(r["prefix"] for r in rows)
    budget = min(r["budget"] for r in rows if r["method"] == "QUEST-naive")
    at = index_rows((r for r in rows if r["prefix"] == prefix and r["budget"] in (budget, 0)), "method")
    losa = next(r for name, r in at.items() if name.startswith("LOSA ") and "reuse" not in name)
    quest, dense = at["QUEST-naive"], at["dense"]
    note = f"SmolLM2-135M in block mode, prefix {prefix}, budget {budget}, {losa['method']}"
    return [
        Figure("loaded prefix KV on the sparse steps (2-4), LOSA vs QUEST-naive on the same queries, lower is better",
               losa["density_steps_2_4"], losa["naive_same_steps"], note=note,
               paper="2.58 % vs QUEST's 4.24 % at B=128 (Trado-8B)"),
        Figure("top-1 agreement of the block logits with dense attention, LOSA (steps 2-4; step 1 is dense) vs "
               "QUEST-naive (every step)", losa["top1_agreement"], quest["top1_agreement"], note=note),
        Figure("attention ms per step (host wall-clock, PyTorch path), LOSA vs SDPA dense, lower is better",
               losa["attention_ms_per_step"], dense["sdpa_ms_per_step"], note=note + "; CPU, not a kernel timing",
               paper="4.14x faster attention than dense (RTX A6000)"),
    ]


def _rcd(report: dict) -> list[Figure]:
    if not report["blocks"] or "arms" not in report["blocks"][-1]:
        raise KeyError("arms")  # a --components run: no decode to read
    block = report["blocks"][-1]
    arms = block["arms"]
    base, dense, topk = arms["baseline"], arms["RCD zero, dense"], arms["RCD zero, top-64"]
    args, agree = report["args"], dense["agreement_with_baseline"]
    note = (f"SmolLM2-135M (unconverted), block {block['block']}, {args['prompts']} GSM8K prompt(s) x "
            f"{args['max_new']} new tokens, {args['rounds']} rounds; tokens == baseline {agree:.3f}")
    return [
        Figure("tokens/s, RCD (zero init, dense residual) vs the block-diffusion loop", dense["tokens_per_s"],
               base["tokens_per_s"], note=note, paper="110.4 vs 117.8 tok/s (LLaDA in Fast-dLLM, 8xH100)"),
        Figure("ms per forward, RCD dense residual vs the block-diffusion loop, lower is better",
               dense["ms_per_forward"], base["ms_per_forward"], note=note),
        Figure("ms per forward, RCD top-64 residual vs the block-diffusion loop, lower is better",
               topk["ms_per_forward"], base["ms_per_forward"], note=note),
        Figure("process CPU s per round, RCD dense / the loop (median of paired rounds; steadier than wall under load)",
               dense["cpu_vs_baseline"], None, note=note),
    ]


def _isd_batch_arm(row: dict) -> str:
    """The arm's name without its batch size ("stationary batch ISD (B=4)", "generate batches of 4")."""
    return row["arm"].split(" (")[0].rsplit(" batches of", 1)[0]


def _isd_batch(report: dict) -> list[Figure]:
    rows = index_rows(report["rows"], _isd_batch_arm)
    ours, settings = rows["stationary batch ISD"], report["settings"]
    note = f"{settings['model']}, {settings['requests']} requests, {settings['tokens']} new tokens"
    figures = [Figure("tokens/s, stationary batch vs the same requests one by one (isd_generate)",
                      ours["tokens_per_s"], rows["isd_generate one by one"]["tokens_per_s"], note=note)]
    if "generate" in rows:
        figures.append(Figure("tokens/s, stationary batch vs batched generate", ours["tokens_per_s"],
                              rows["generate"]["tokens_per_s"], note=note))
    figures.append(Figure("requests identical to greedy generate (lossless check), share",
                          ours["agree_with_generate"] / ours["requests"], None,
                          note=f"{ours['requests']} requests; lossless means 1.0"))
    return figures


def _spurious_features(report: dict) -> list[Figure]:
    figures = []
    for n_train, arms in report["results"].items():  # one training-set size per key
        worst_group = {arm: sum(r["worst_group"] for r in rows) / len(rows) for arm, rows in arms.items()}
        note = f"{n_train} training rows, {len(arms['ERM'])} seed(s)"
        figures.append(Figure("worst-group test accuracy, early-readout KD vs plain KD",
                              worst_group["early-readout KD"], worst_group["KD"], note=note))
        figures.append(Figure("worst-group test accuracy, Feature Sieve vs ERM", worst_group["Feature Sieve"],
                              worst_group["ERM"], note=note))
        flags = [r["flag_precision_minority"] for r in arms["early-readout KD"]]
        figures.append(Figure("early readout: share of its flagged rows in the minority groups",
                              sum(flags) / len(flags), None,
                              note=note + "; base rate ~0.05 (the marker disagrees in 5 % of training rows)"))
    return figures


def _qttt(report: dict) -> list[Figure]:
    length = max(report["lengths"], key=int)  # JSON keys are strings
    run = report["lengths"][length]
    arms = run["arms"]
    note = (f"SmolLM2-135M, key-value retrieval at ~{run['context_tokens']:.0f} tokens, "
            f"{report['args']['examples']} examples, {report['args']['steps']} steps, qTTT lr {run['lr_qttt']:g}")
    return [
        Figure("exact match, qTTT vs in-context greedy", arms["qTTT"]["exact_match"], arms["in-context"]["exact_match"],
               note=note, paper="+12.6 points over in-context (Qwen3-4B, LongBench-v2 average)"),
        Figure("exact match, qTTT vs FLOP-matched thinking tokens", arms["qTTT"]["exact_match"],
               arms["thinking (FLOP-matched)"]["exact_match"],
               note=note + f"; thinking budget {run['thinking_budget']} tokens",
               paper="qTTT ahead on every LongBench-v2 subset"),
        Figure("exact match, qTTT vs full-parameter TTT (same steps)", arms["qTTT"]["exact_match"],
               arms["full TTT"]["exact_match"], note=note + f"; full-TTT lr {run['lr_full']:g}"),
    ]


def _dts(report: dict) -> list[Figure]:
    table, args = report["table"], report["args"]
    dts, sampling = table["DTS"], table["sampling"]
    note = f"SmolLM2-135M, {args['train']} train / {args['test']} test {args['problems']} problems, K={args['k']}"
    figures = [
        Figure("preference pairs kept (mixed correctness), DTS vs temperature sampling", dts["pairs"],
               sampling["pairs"], note=note + f"; generated tokens DTS / sampling {report['token_ratio']:.2f}",
               paper="~1.03x the sampling baseline's compute"),
        Figure("token Jaccard between a problem's solutions, lower is more diverse", dts["jaccard"],
               sampling["jaccard"], note=note),
    ]
    if dts["accuracy"] is not None:  # None: the arm kept no pair, so no DPO ran
        figures.append(Figure("held-out accuracy after one DPO epoch, DTS pairs vs sampled pairs", dts["accuracy"],
                              sampling["accuracy"], note=note + f"; base model {table['base model']['accuracy']:.3f}",
                              paper="+7.1 % GSM8K over the base model (~8B)"))
    return figures


EXTRACTORS = {
    "dlm_synthetic": _dlm_synthetic,
    "isd": _isd,
    "block_diffusion": _block_diffusion,
    "isd_batch": _isd_batch,
    "rcd": _rcd,
    "losa": _losa,
    "spurious_features": _spurious_features,
    "qttt": _qttt,
    "dts": _dts,
}
