"""CREST vs its peers on arithmetic word problems with the default model (SmolLM2-135M-Instruct).

1. Calibration: the model samples answers to the first `--calib` GSM8K test questions under an instruction that asks
   it to check its steps; `CRESTCalibrator` labels the "\\n\\n"-separated steps by keyword (non-linear: "Wait",
   "verify", "let me check", ...) and fits per-head probes. The same calibrator's boundary activations give the
   SEAL-style vector. Probe accuracies are reported beside a shuffled-label control.
2. Evaluation on fresh GSM-Symbolic items (`reasoning-gym`, never seen in calibration), same prompts, same seed,
   greedy: no steering, CREST, SEAL-style steering, and the token-ban logits processor. Per arm: exact-match
   accuracy (the package's `extract_answer`), generated tokens (to the first EOS), non-linear steps per answer,
   steered boundary tokens, seconds (arms interleaved batch by batch on the same process).

    python benchmarks/crest.py --calib 16 --items 16 --max-new-tokens 96 --batch 16 --out crest.json
    python benchmarks/crest.py --calib 16 --items 16 --max-new-tokens 96 --batch 16 --crest-extra 1:0.38,1:0.1,4:0.1
    python benchmarks/crest.py --quick --out crest.json     # the same calibration, 4 evaluation items (see QUICK)

SmolLM2-135M is not a reasoning model: it rarely verifies or backtracks, so the table measures the plumbing and the
cost, and reports whatever behaviour change there is; it cannot test the paper's accuracy/token claims.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
from transformers import LogitsProcessorList

from hf_fastslow import load_default_model
from hf_fastslow.evaluation.answers import extract_answer
from hf_fastslow.evaluation.cli_support import apply_quick
from hf_fastslow.evaluation.prompts import chat_text, encode_chat, gsm8k_rows
from hf_fastslow.evaluation.timing import load_average
from hf_fastslow.generation.crest import CRESTCalibrator, CRESTSteerer
from hf_fastslow.generation.crest_baselines import SEALSteerer, TokenBanLogitsProcessor, fit_seal_vector
from hf_fastslow.generation.padding import cut_at_eos

# --quick: the recorded calibration (16 traces, 96 tokens, one batch of 16: the same seeded samples), evaluated on the
# first 4 GSM-Symbolic items only.
QUICK = dict(calib=16, items=4, max_new_tokens=96, batch=16)
INSTRUCTION = ("Solve the problem step by step, one step per line. Then verify your answer: write \"Let me verify:\" "
               "and check each step again; if a step is wrong, write \"Wait,\" and fix it. End with the line: The "
               "answer is <number>.\n\n{question}")


def gsm_symbolic_items(n: int, seed: int) -> list[dict]:
    import reasoning_gym

    return [{"question": x["question"], "answer": str(x["answer"])}
            for x in reasoning_gym.create_dataset("gsm_symbolic", size=n, seed=seed)]


@torch.no_grad()
def generate(model, tok, questions, max_new_tokens, seed, sample=False, processors=None):
    enc = encode_chat(tok, [INSTRUCTION.format(question=q) for q in questions])
    torch.manual_seed(seed)
    kw = dict(do_sample=True, temperature=0.8, top_p=0.95) if sample else dict(do_sample=False)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id,
                         logits_processor=processors, **kw)
    new = out[:, enc["input_ids"].shape[1]:].tolist()
    ids = [cut_at_eos(row, tok.eos_token_id) for row in new]
    return [tok.decode(r, skip_special_tokens=True) for r in ids], [len(r) for r in ids]


def _settings(text: str) -> list[tuple[float, float]]:
    return [(float(a), float(b)) for a, b in (pair.split(":") for pair in text.split(",") if pair)]


def probe_summary(acc: torch.Tensor, ratio: float) -> dict:
    flat = acc.flatten().sort(descending=True).values
    k = max(1, round(ratio * flat.numel()))
    return {"mean": flat.mean().item(), "top_mean": flat[:k].mean().item(), "max": flat[0].item()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--calib", type=int, default=24, help="GSM8K test questions sampled for calibration traces")
    ap.add_argument("--items", type=int, default=32, help="GSM-Symbolic evaluation items")
    ap.add_argument("--max-new-tokens", type=int, default=160)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--strength", type=float, default=4.0)
    ap.add_argument("--top-ratio", type=float, default=0.38)
    ap.add_argument("--crest-extra", type=_settings, default=[],
                    help="more CREST arms as strength:top_ratio pairs, e.g. 1:0.1,4:0.1")
    ap.add_argument("--seal-strength", type=float, default=1.0)
    ap.add_argument("--delimiter", default="\n", help="step delimiter (SmolLM2 writes one step per line)")
    ap.add_argument("--out", default=None, help="write the calibration summary and every arm's figures (JSON)")
    ap.add_argument("--quick", action="store_true", help="reduced sizes: " +
                    ", ".join(f"{k}={v}" for k, v in QUICK.items()))
    args = ap.parse_args()
    apply_quick(args, QUICK)
    torch.set_num_threads(1)
    t0, load_before, cpu_started = time.time(), load_average(), time.process_time()
    model, tok = load_default_model()

    # 1. calibration traces: sampled answers to GSM8K questions (disjoint from the GSM-Symbolic evaluation items)
    calib_q = [r["question"] for r in gsm8k_rows(args.calib)]
    traces = []
    for i in range(0, len(calib_q), args.batch):
        texts, _ = generate(model, tok, calib_q[i:i + args.batch], args.max_new_tokens, args.seed + i, sample=True)
        prompts = [chat_text(tok, INSTRUCTION.format(question=q)) for q in calib_q[i:i + args.batch]]
        traces += list(zip(prompts, texts, strict=True))
    cal = CRESTCalibrator(model, tok, delimiter=args.delimiter).collect(traces)
    vectors = cal.fit(seed=args.seed)
    control = cal.fit(seed=args.seed, shuffle_labels=True)
    seal = fit_seal_vector(cal)
    calib = {"traces": len(traces), "steps": cal.num_steps, "nonlinear_steps": cal.num_nonlinear,
             "probe_accuracy": probe_summary(vectors.accuracy, args.top_ratio),
             "control_accuracy": probe_summary(control.accuracy, args.top_ratio),
             "seal_layer": seal.layer, "seconds": time.time() - t0}
    print(json.dumps({"calibration": calib}, indent=1), flush=True)

    # 2. evaluation arms, interleaved batch by batch
    items = gsm_symbolic_items(args.items, args.seed)
    ban = TokenBanLogitsProcessor(tok)
    arms = {
        "plain": lambda: None,
        "CREST": lambda: CRESTSteerer(model, vectors, strength=args.strength, top_ratio=args.top_ratio),
        **{f"CREST strength {s:g}, top {r:.0%}":
           (lambda s=s, r=r: CRESTSteerer(model, vectors, strength=s, top_ratio=r)) for s, r in args.crest_extra},
        "SEAL-style": lambda: SEALSteerer(model, seal, strength=args.seal_strength),
        "ban Wait tokens": lambda: "ban",
    }
    rows = {name: {"correct": 0, "tokens": [], "nonlinear": [], "steered": 0, "seconds": 0.0, "samples": []}
            for name in arms}
    for b in range(0, len(items), args.batch):
        batch = items[b:b + args.batch]
        for name, make in arms.items():
            ctx = make()
            start = time.perf_counter()
            if ctx is None or ctx == "ban":
                procs = LogitsProcessorList([ban]) if ctx == "ban" else None
                texts, lens = generate(model, tok, [x["question"] for x in batch], args.max_new_tokens, args.seed,
                                       processors=procs)
            else:
                with ctx:
                    texts, lens = generate(model, tok, [x["question"] for x in batch], args.max_new_tokens,
                                           args.seed)
                rows[name]["steered"] += getattr(ctx, "boundary_steps", 0)
            rows[name]["seconds"] += time.perf_counter() - start
            for x, text, n in zip(batch, texts, lens, strict=True):
                rows[name]["correct"] += int(extract_answer(text) == extract_answer(x["answer"]))
                rows[name]["tokens"].append(n)
                rows[name]["nonlinear"].append(sum(cal.is_nonlinear(s) for s in text.split(args.delimiter)))
                if len(rows[name]["samples"]) < 3:
                    rows[name]["samples"].append(text)
        print(f"items {b + len(batch)}/{len(items)} done, {time.time() - t0:.0f} s", flush=True)

    summary = {name: {"accuracy": r["correct"] / len(items), "correct": r["correct"],
                      "mean_tokens": statistics.mean(r["tokens"]),
                      "nonlinear_steps_per_answer": statistics.mean(r["nonlinear"]),
                      "at_token_cap": sum(n >= args.max_new_tokens for n in r["tokens"]),
                      "steered_boundaries": r["steered"], "seconds": r["seconds"], "samples": r["samples"]}
               for name, r in rows.items()}
    print("\n| arm | accuracy | mean new tokens | answers at the token cap | non-linear steps / answer "
          "| steered boundary tokens | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, s in summary.items():
        print(f"| {name} | {s['correct']}/{len(items)} | {s['mean_tokens']:.1f} | {s['at_token_cap']} | "
              f"{s['nonlinear_steps_per_answer']:.2f} | {s['steered_boundaries']} | {s['seconds']:.0f} |")
    p, c = calib["probe_accuracy"], calib["control_accuracy"]
    print(f"\ncalibration: {calib['traces']} traces, {calib['steps']} steps, {calib['nonlinear_steps']} non-linear; "
          f"balanced probe accuracy mean/top-{args.top_ratio:.0%}/max {p['mean']:.3f}/{p['top_mean']:.3f}/"
          f"{p['max']:.3f} vs shuffled-label control {c['mean']:.3f}/{c['top_mean']:.3f}/{c['max']:.3f}")
    print(f"total {time.time() - t0:.0f} s; load average before {load_before}, after {load_average()}")
    if args.out:
        with open(args.out, "w") as fh:
            json.dump({"args": vars(args), "items": len(items), "calibration": calib, "arms": summary,
                       "wall_s": time.time() - t0, "cpu_s": time.process_time() - cpu_started,
                       "load_average": [load_before, load_average()]}, fh, indent=1)


if __name__ == "__main__":
    main()
