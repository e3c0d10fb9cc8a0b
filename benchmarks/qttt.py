"""Benchmark: qTTT (query-only test-time training, arXiv 2512.13898) on the default model (SmolLM2-135M-Instruct).

Task (generated here, seeded): key-value retrieval with look-alike distractors. The context is a list of lines
"Record 4821-KX: access code 73915." of about `--lengths` tokens; for the asked record, three look-alike records
(one character changed or swapped) hold other codes; the question asks for the asked record's code. Exact match =
the package's numeric answer extractor on the reply equals the code.

Arms on the same examples, in one process:
  in-context   greedy answer over the context (what a user gets without adaptation);
  thinking     the same prompt + "Think step by step", greedy, with a generation budget FLOP-matched to qTTT's
               adaptation (forward+backward of `steps` spans of `span` tokens, counted with the same per-token FLOP
               formula as the thinking tokens: 2 x non-embedding params + LM head + attention over the context);
  qTTT         `steps` query-only steps, AdamW, learning rate picked on a separate dev split;
  full TTT     every parameter, same steps/spans, its own learning rate picked on the dev split.
Also: seconds per example and the last layer's attention mass on the gold line (mean over heads, from the last
prompt token) before and after qTTT.

    python benchmarks/qttt.py                            # 1K and 2K contexts, the sizes in docs/trainers.md
    python benchmarks/qttt.py --quick                    # a few examples at 512 tokens (~2 min)
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time

import torch

from hf_fastslow.evaluation.answers import answers_match
from hf_fastslow.generation.qttt import QTTTConfig, QueryOnlyTTT, encode_context_question
from hf_fastslow.integrations import cache_kwargs, capture_attention_inputs
from hf_fastslow.modeling.frozen_cache import dynamic_cache_from_layers

QUESTION = "What is the access code of record {key}? Reply with the code only."
THINK = " Think step by step: find the record's line first, then reply with its code."
ANSWER_TOKENS = 24  # the model tends to restate the record before the code
_LETTERS = "ABCDEFGHJKLMNPQRSTUVWXYZ"


def _key(rng):
    return f"{rng.randint(1000, 9999)}-{rng.choice(_LETTERS)}{rng.choice(_LETTERS)}"


def _look_alikes(key, rng):
    digits, letters = key.split("-")
    swapped = digits[:1] + digits[2] + digits[1] + digits[3:]
    out = {f"{digits}-{letters[::-1]}", f"{swapped}-{letters}", f"{digits}-{letters[0]}{rng.choice(_LETTERS)}"}
    out.discard(key)
    return sorted(out)


def make_example(tokenizer, n_tokens: int, rng: random.Random) -> dict:
    """One retrieval example whose context is about `n_tokens` tokens long."""
    key = _key(rng)
    used = {key, *_look_alikes(key, rng)}
    records = [(k, rng.randint(10000, 99999)) for k in [key, *_look_alikes(key, rng)]]
    line_tokens = len(tokenizer(f"Record {key}: access code 12345.\n")["input_ids"])
    while len(records) < max(4, n_tokens // line_tokens):
        k = _key(rng)
        if k not in used:
            used.add(k)
            records.append((k, rng.randint(10000, 99999)))
    rng.shuffle(records)
    code = dict(records)[key]
    lines = [f"Record {k}: access code {c}.\n" for k, c in records]
    context = "".join(lines)
    gold_line = f"Record {key}: access code {code}.\n"
    start_char = context.index(gold_line)
    return {"context": context, "key": key, "code": str(code), "gold_chars": (start_char, start_char + len(gold_line))}


def forward_flops_per_token(model, context_len: int) -> float:
    """Forward FLOPs of one token: 2 x non-embedding parameters, the LM head, attention scores + values over the
    context (4 x layers x heads x head_dim x context)."""
    cfg = model.config
    embed = model.get_input_embeddings().weight.numel()
    body = sum(p.numel() for p in model.parameters()) - embed
    if getattr(cfg, "tie_word_embeddings", False):
        head = embed
    else:
        head = model.get_output_embeddings().weight.numel()
        body -= head
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attn = 4 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * context_len
    return 2 * body + 2 * head + attn


def thinking_budget(model, context_len: int, steps: int, span: int) -> int:
    """Thinking tokens with the FLOPs of `steps` adaptation steps: forward + backward ~ 3 forwards per span token, a
    span token attending over half the context on average (spans are uniform in it), a thinking token over all of it."""
    adapt = 3 * steps * span * forward_flops_per_token(model, context_len // 2)
    return max(1, round(adapt / forward_flops_per_token(model, context_len)))


def gold_token_range(tokenizer, example, context_start: int) -> tuple[int, int]:
    enc = tokenizer(example["context"], add_special_tokens=False, return_offsets_mapping=True)
    lo, hi = example["gold_chars"]
    inside = [i for i, (a, b) in enumerate(enc["offset_mapping"]) if a < hi and b > lo]
    return context_start + inside[0], context_start + inside[-1] + 1


@torch.no_grad()
def gold_attention_mass(model, ids, context_len, cache, gold) -> float:
    """Last layer, last prompt token: attention probability on the gold line's tokens, mean over heads."""
    last = model.config.num_hidden_layers - 1
    fresh = dynamic_cache_from_layers(cache.layer_tensors())
    with capture_attention_inputs(model, layers=[last]) as captured:
        model(input_ids=ids[:, context_len:], **cache_kwargs(model, fresh))
    q, k, scaling = captured[last]["q"][0, :, -1], captured[last]["k"][0], captured[last]["scaling"]
    k = k.repeat_interleave(q.shape[0] // k.shape[0], dim=0)
    probs = torch.softmax((q[:, None, :] * k).sum(-1).float() * scaling, dim=-1)  # causal: last query sees all keys
    return float(probs[:, gold[0]:gold[1]].sum(-1).mean())


def answer(model, tokenizer, example, config, max_new_tokens, think=False, measure_mass=False):
    question = QUESTION.format(key=example["key"]) + (THINK if think else "")
    ids, start, end = encode_context_question(tokenizer, example["context"], question)
    out = {}
    with QueryOnlyTTT(model, config) as ttt:
        t0 = time.perf_counter()
        state = ttt.adapt(ids[:, :end], span_start=start)
        out["adapt_s"] = time.perf_counter() - t0
        if measure_mass:
            out["mass"] = gold_attention_mass(model, ids, end, state.cache, gold_token_range(tokenizer, example, start))
        gen = ttt.generate(ids, state, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                           do_sample=False, pad_token_id=tokenizer.pad_token_id or tokenizer.eos_token_id)
        out["total_s"] = time.perf_counter() - t0
    out["reply"] = tokenizer.decode(gen[0, ids.shape[1]:], skip_special_tokens=True)
    out["correct"] = answers_match(out["reply"], example["code"])
    out["context_tokens"] = end - start
    return out


def pick_lr(model, tokenizer, dev, target, lrs, steps, span) -> tuple[float, dict]:
    scores = {}
    for lr in lrs:
        cfg = QTTTConfig(steps=steps, span_len=span, lr=lr, target=target)
        scores[lr] = sum(answer(model, tokenizer, ex, cfg, ANSWER_TOKENS)["correct"] for ex in dev) / len(dev)
    return max(scores, key=lambda lr: (scores[lr], -lr)), scores


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048])
    p.add_argument("--examples", type=int, default=50)
    p.add_argument("--dev", type=int, default=10)
    p.add_argument("--steps", type=int, default=16)
    p.add_argument("--span", type=int, default=64)
    p.add_argument("--lrs", type=float, nargs="+", default=[1e-5, 1e-4, 1e-3])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", default=None, help="also write every figure to this JSON file")
    p.add_argument("--quick", action="store_true", help="3 examples, 1 dev, 512 tokens, 2 steps")
    args = p.parse_args(argv)
    if args.quick:
        args.lengths, args.examples, args.dev, args.steps, args.lrs = [512], 3, 1, 2, [1e-4, 1e-3]
    torch.set_num_threads(args.threads)
    from hf_fastslow import load_default_model

    model, tokenizer = load_default_model()
    model.eval()
    results = {"args": vars(args), "lengths": {}}
    for length in args.lengths:
        rng = random.Random(args.seed * 1000 + length)
        dev = [make_example(tokenizer, length, rng) for _ in range(args.dev)]
        test = [make_example(tokenizer, length, rng) for _ in range(args.examples)]
        lr_q, dev_q = pick_lr(model, tokenizer, dev, "q_proj", args.lrs, args.steps, args.span)
        lr_full, dev_full = pick_lr(model, tokenizer, dev, "all", args.lrs, args.steps, args.span)
        print(f"  [{length}] dev split: qTTT {dev_q}, full TTT {dev_full}", flush=True)
        ctx = statistics.mean(len(tokenizer(ex["context"])["input_ids"]) for ex in test)
        budget = thinking_budget(model, int(ctx), args.steps, args.span)
        arms = {
            "in-context": (QTTTConfig(steps=0), ANSWER_TOKENS, False, True),
            "thinking (FLOP-matched)": (QTTTConfig(steps=0), budget, True, False),
            "qTTT": (QTTTConfig(steps=args.steps, span_len=args.span, lr=lr_q), ANSWER_TOKENS, False, True),
            "full TTT": (QTTTConfig(steps=args.steps, span_len=args.span, lr=lr_full, target="all"), ANSWER_TOKENS,
                         False, False),
        }
        rows = {name: [] for name in arms}
        for i, ex in enumerate(test):
            order = list(arms)[i % len(arms):] + list(arms)[:i % len(arms)]  # interleaved, rotated per example
            for name in order:
                cfg, max_new, think, mass = arms[name]
                rows[name].append(answer(model, tokenizer, ex, cfg, max_new, think=think, measure_mass=mass))
            if (i + 1) % 5 == 0:  # progress: a full run takes hours of CPU on 2 cores
                done = {name: sum(r["correct"] for r in got) for name, got in rows.items()}
                print(f"  [{length}] {i + 1}/{len(test)} examples, correct so far {done}", flush=True)
        summary = {}
        for name, got in rows.items():
            summary[name] = {
                "exact_match": sum(r["correct"] for r in got) / len(got),
                "seconds_per_example": statistics.median(r["total_s"] for r in got),
                "gold_attention_mass": statistics.mean(r["mass"] for r in got) if "mass" in got[0] else None,
            }
        results["lengths"][length] = {"context_tokens": ctx, "thinking_budget": budget, "lr_qttt": lr_q,
                                      "lr_full": lr_full, "dev_qttt": dev_q, "dev_full": dev_full, "arms": summary}
        print(f"\ncontext ~{ctx:.0f} tokens, {len(test)} examples (dev {len(dev)}): qTTT lr {lr_q:g} {dev_q}, "
              f"full-TTT lr {lr_full:g} {dev_full}, thinking budget {budget} tokens "
              f"({args.steps} steps x {args.span} tokens)")
        print(f"{'arm':<26}{'exact match':>12}{'s/example':>11}{'gold attn mass':>16}")
        for name, s in summary.items():
            mass = "-" if s["gold_attention_mass"] is None else f"{s['gold_attention_mass']:.4f}"
            print(f"{name:<26}{s['exact_match']:>12.2f}{s['seconds_per_example']:>11.1f}{mass:>16}")
        if args.json:  # after every length: a long run keeps what it finished
            with open(args.json, "w") as fh:
                json.dump(results, fh, indent=1)
    return results


if __name__ == "__main__":
    main()
