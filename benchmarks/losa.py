"""Benchmark: LOSA (arXiv 2604.12056) on the default model: loaded prefix-KV density, fidelity of the block logits vs
dense attention, and attention time per denoising step, beside QUEST-style naive page selection at the same budget.

Setting (the method card's protocol): SmolLM2-135M-Instruct (`hf_fastslow.load_default_model()`), an AR model used in
block mode. That is enough here: density and fidelity measure how well LOSA approximates dense attention on the same
inputs, not the quality of a diffusion LM (no DLM weights can be downloaded; SmolLM2 was never trained to denoise).
The mask token is H1's `ensure_mask_token` choice. The document is the bundled public-domain text followed by GSM8K
questions and answers (real text, no repetition) cut to the prefix length; the prefix (4,096 and 7,168 tokens; the
model has 8,192 positions) is prefilled once into a `BlockDiffusionCache` and reused. Then `--blocks` blocks of 16
slots, 4 denoising steps each, bidirectional inside the block, 4 slots committed per step by the dense model's
confidence; the block's final tokens are committed densely (the next block's prefix grows by 16, LOSA's page summaries
are extended). Every step runs the dense model and every sparse configuration on the same block input (the dense
trajectory), so the comparison is per step and like for like:

- dense: SDPA (transformers' function) over prefix + block;
- QUEST-naive, budget B: every block query selects its top ceil(B/16) pages at every step (no dense first step) and
  all queries attend over the union (at least as accurate as per-query QUEST, same loaded set);
- LOSA, budget B: dense first step, then the active tokens (`--active`: k5 = the 5 whose query moved most since
  their last refresh, f0.5 = the top half) select pages and attend over their union; the others reuse their cached
  prefix output + LSE;
- LOSA reuse only: the first rule with every page selected: the error of reusing stale prefix outputs alone.

Reported per prefix and budget: loaded-KV density (fraction of prefix key/value positions read, over layers, KV heads
and steps; LOSA over all steps incl. the dense first one and over steps 2-4 only; QUEST-naive on the very same LOSA
queries, as `kv_density` counts it), top-1 agreement and KL(dense || sparse) of the 16 block logits over steps 2-4
(step 1 of LOSA is dense and exact; also over the positions where the dense top-1 probability is >= 0.5, since an
AR model's logits at masked slots are often flat and their top-1 flips on small changes), and attention ms per step
(30 layers, host wall-clock inside the attention function) of the PyTorch path vs SDPA dense, interleaved step by
step. Density only turns into time in a kernel that loads just the selected pages (GPU, kernels/losa_triton.py, not
measured here); on the CPU the PyTorch path is a reference, and its times beside transformers' SDPA function (called
with a 4D boolean mask and GQA) are host timings, not a kernel comparison.

    nice -n 15 python benchmarks/losa.py                 # 4K and 7K prefix, budgets 128/256/512 (~30 min, loaded box)
    python benchmarks/losa.py --quick                    # 1.5K prefix, 2 blocks, budgets 128/256 (~2 min)

`--plot PATH` draws top-1 agreement with dense against the loaded KV of the sparse steps, per method and prefix.
"""

from __future__ import annotations

import argparse
import json
import math
import time

import torch

BLOCK = 16
STEPS = 4


def long_document_ids(tokenizer, n_tokens: int) -> torch.Tensor:
    """(1, n_tokens): the bundled text, then GSM8K questions and answers, tokenized whole and cut."""
    from hf_fastslow.evaluation.kv_ppl import bundled_text
    from hf_fastslow.evaluation.prompts import gsm8k_rows

    parts, rows = [bundled_text()], gsm8k_rows()
    ids = tokenizer("".join(parts), return_tensors="pt").input_ids
    cursor = 0
    while ids.shape[1] < n_tokens:
        if cursor >= len(rows):
            raise ValueError(f"not enough text for {n_tokens} tokens")
        parts.extend(f"\n\nQuestion: {r['question']}\nAnswer: {r['answer']}" for r in rows[cursor:cursor + 50])
        cursor += 50
        ids = tokenizer("".join(parts), return_tensors="pt").input_ids
    return ids[:, :n_tokens]


def forward(model, ids, cache, state, mask=None):
    from hf_fastslow.integrations.caches import cache_kwargs

    with torch.no_grad():
        return model(input_ids=ids, attention_mask=mask, use_cache=True, losa_state=state,
                     **cache_kwargs(model, cache)).logits[0].double()


def attention_seconds(state) -> float:
    s = state.seconds
    return s["dense_first"] + s["sparse"] + s["fallback"] - s["naive_bookkeeping"]


def parse_rule(rule: str) -> dict:
    """"k5" -> top-5 tokens by query change; "f0.5" -> the top half of the block."""
    if rule.startswith("k"):
        return {"active_k": int(rule[1:])}
    if rule.startswith("f"):
        return {"active_frac": float(rule[1:])}
    raise ValueError(f"active rule {rule!r}: use k<int> or f<fraction>")


def run_prefix(model, doc, prefix, budgets, rules, blocks, mask_id, reuse_only=True, causal_block=False):
    from hf_fastslow.modeling.block_diffusion import BlockDiffusionCache
    from hf_fastslow.modeling.losa import LosaConfig, LosaState, kv_density

    dense_state = LosaState(LosaConfig(min_prefix=1 << 30, budget=16), model)  # in a block: always the SDPA fallback
    configs = {("dense", 0): dense_state}
    for budget in budgets:
        configs[("QUEST-naive", budget)] = LosaState(LosaConfig(
            budget=budget, page_size=16, active_frac=1.0, dense_first_step=False, min_prefix=0, track_naive=False),
            model)
        for rule in rules:
            configs[(f"LOSA {rule}", budget)] = LosaState(LosaConfig(budget=budget, page_size=16, min_prefix=1024,
                                                                     **parse_rule(rule)), model)
    if reuse_only:  # every page selected: what reusing stale prefix outputs alone costs, without page selection
        whole = 16 * math.ceil((prefix + blocks * BLOCK) / 16)
        configs[(f"LOSA {rules[0]} reuse only", whole)] = LosaState(LosaConfig(
            budget=whole, page_size=16, min_prefix=1024, **parse_rule(rules[0])), model)
    cache = BlockDiffusionCache()
    t0 = time.perf_counter()
    with cache.committing():
        for start in range(0, prefix, 1024):  # chunked prefill bounds the attention memory
            last = forward(model, doc[:, start:min(prefix, start + 1024)], cache, dense_state)[-1]
    print(f"  prefill {prefix} tokens: {time.perf_counter() - t0:.1f} s", flush=True)
    agree = {key: [] for key in configs}
    agree_confident = {key: [] for key in configs}  # positions where the dense top-1 probability is >= 0.5
    kl = {key: [] for key in configs}
    for _ in range(blocks):
        length = cache.get_seq_length()
        mask = torch.ones(1, 1, BLOCK, length + BLOCK, dtype=torch.bool)  # bidirectional block, whole prefix
        if causal_block:  # I-DLM's pattern: causal inside the block
            mask[..., length:] = torch.ones(BLOCK, BLOCK, dtype=torch.bool).tril()
        block_ids = torch.full((1, BLOCK), mask_id)
        masked = torch.ones(BLOCK, dtype=torch.bool)
        for state in configs.values():
            state.start_block()
        for step in range(STEPS):
            outputs = {}
            for key, state in configs.items():  # interleaved: every configuration on the same input, in turn
                with cache.peeking():
                    outputs[key] = forward(model, block_ids, cache, state, mask)
            dense = outputs[("dense", 0)]
            logp = torch.log_softmax(dense, -1)
            for key, logits in outputs.items():
                if step == 0 and key[0].startswith("LOSA"):
                    continue  # LOSA's first step is dense: exact by construction, left out of its fidelity
                same = logits.argmax(-1) == dense.argmax(-1)
                agree[key].append(same.double().mean().item())
                agree_confident[key].extend(same[logp.exp().amax(-1) >= 0.5].tolist())
                kl[key].append((logp.exp() * (logp - torch.log_softmax(logits, -1))).sum(-1).mean().item())
            # commit 4 slots by the dense model's confidence (AR model: slot j reads position j-1's logits)
            aligned = torch.cat([last[None], dense[:-1]])
            conf, picked = torch.softmax(aligned, -1).max(-1)
            conf = conf.masked_fill(~masked, -math.inf)
            chosen = conf.topk(BLOCK // STEPS).indices
            block_ids[0, chosen] = picked[chosen]
            masked[chosen] = False
        for state in configs.values():
            state.end_block()
        with cache.committing():
            last = forward(model, block_ids, cache, dense_state, mask)[-1]
    n_steps = blocks * STEPS
    dense_ms = 1000 * attention_seconds(dense_state) / n_steps
    rows = []
    for (method, budget), state in configs.items():
        density = kv_density(state)
        rows.append({
            "prefix": prefix, "method": method, "budget": budget,
            "density": density["losa"] if method != "dense" else 1.0,
            "density_steps_2_4": density["losa_sparse_steps"] if method.startswith("LOSA") else None,
            "naive_same_steps": density["naive"] if method.startswith("LOSA") else None,
            "top1_agreement": sum(agree[(method, budget)]) / max(1, len(agree[(method, budget)])),
            "top1_agreement_confident": (sum(agree_confident[(method, budget)]) / len(agree_confident[(method, budget)])
                                         if agree_confident[(method, budget)] else float("nan")),
            "confident_positions": len(agree_confident[(method, budget)]),
            "kl": sum(kl[(method, budget)]) / max(1, len(kl[(method, budget)])),
            "attention_ms_per_step": 1000 * attention_seconds(state) / n_steps,
            "sdpa_ms_per_step": dense_ms,
        })
    return rows


def print_table(rows):
    print("| prefix | method | budget | loaded KV (all steps) | steps 2-4 | QUEST-naive, same steps | top-1 agree "
          "(steps 2-4) | top-1 agree where dense p >= 0.5 | KL (steps 2-4) | attn ms/step | SDPA ms/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")

    def pct(x):
        return "-" if x is None else f"{100 * x:.1f}%"

    for r in rows:
        print(f"| {r['prefix']} | {r['method']} | {r['budget'] or '-'} | {pct(r['density'])} | "
              f"{pct(r['density_steps_2_4'])} | {pct(r['naive_same_steps'])} | {100 * r['top1_agreement']:.2f}% | "
              f"{100 * r['top1_agreement_confident']:.1f}% of {r['confident_positions']} | "
              f"{r['kl']:.2e} | {r['attention_ms_per_step']:.1f} | {r['sdpa_ms_per_step']:.1f} |")


def plot_rows(rows, path):
    """Top-1 agreement vs loaded prefix KV on steps 2-4 (LOSA) / every step (QUEST-naive): one curve per method and
    prefix, one point per budget."""
    from hf_fastslow.evaluation.cli_support import pyplot_or_reason

    plt, reason = pyplot_or_reason()
    if plt is None:
        print(reason)
        return
    series = {}
    for r in rows:
        if r["method"] == "dense" or "reuse" in r["method"]:
            continue
        density = r["density_steps_2_4"] if r["density_steps_2_4"] is not None else r["density"]
        series.setdefault(f"{r['method']}, prefix {r['prefix']}", []).append((100 * density, 100 * r["top1_agreement"]))
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for label, points in series.items():
        points.sort()
        ax.plot(*zip(*points), marker="o", label=label)
    ax.set_xlabel("loaded prefix KV on the sparse steps, %")
    ax.set_ylabel("top-1 agreement with dense, %")
    ax.set_title("LOSA vs QUEST-naive: fidelity vs loaded KV (one point per budget)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    print(f"plot written to {path}")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--prefixes", default="4096,7168")
    p.add_argument("--budgets", default="128,256,512")
    p.add_argument("--active", default="k5,f0.5",
                   help="LOSA active-set rules: k<int> = top-k tokens by query change, f<x> = top fraction x")
    p.add_argument("--blocks", type=int, default=4)
    p.add_argument("--causal-block", action="store_true",
                   help="causal attention inside the block (the AR model's own pattern) instead of bidirectional")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="1.5K prefix, 2 blocks, budgets 128/256, rule k5")
    p.add_argument("--json", default=None, help="also write the rows here")
    p.add_argument("--plot", default=None, help="write top-1 agreement vs loaded KV to this PNG")
    args = p.parse_args(argv)
    if args.quick:
        args.prefixes, args.budgets, args.blocks, args.active = "1536", "128,256", 2, "k5"
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    from hf_fastslow import load_default_model
    from hf_fastslow.modeling.block_diffusion import ensure_mask_token
    from hf_fastslow.modeling.losa import register_losa

    model, tokenizer = load_default_model()
    mask_id = ensure_mask_token(model, tokenizer)
    model.set_attn_implementation(register_losa())
    prefixes = [int(x) for x in args.prefixes.split(",")]
    budgets = [int(x) for x in args.budgets.split(",")]
    if max(prefixes) + args.blocks * BLOCK > model.config.max_position_embeddings:
        raise ValueError("prefix + blocks exceed the model's positions")
    doc = long_document_ids(tokenizer, max(prefixes))
    print(f"SmolLM2-135M (AR, block mode), mask id {mask_id}; block {BLOCK}, {STEPS} steps/block, {args.blocks} "
          f"blocks, {'causal' if args.causal_block else 'bidirectional'} in block, page 16, LOSA active rules "
          f"{args.active}, threads {args.threads}", flush=True)
    rows = []
    for prefix in prefixes:
        print(f"prefix {prefix}:", flush=True)
        rows += run_prefix(model, doc, prefix, budgets, args.active.split(","), args.blocks, mask_id,
                           causal_block=args.causal_block)
    print_table(rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
    if args.plot:
        plot_rows(rows, args.plot)


if __name__ == "__main__":
    main()
