"""What a round without drafts costs in `speculative_generate`, beside a plain `generate` step.

A drafter that often proposes nothing (DAS at temperature 1, cost-aware drafting) only pays off if those rounds cost
what a plain decoding step costs. This runs plain `generate` and `speculative_generate` with a drafter that never
drafts on the default model, interleaved, in one process, and reports wall-clock medians (and spread) per generated
step, plus the time spent outside the model's forward (the loop's own work).

    python benchmarks/speculative_loop.py --batch 1 8 --new-tokens 64 --repeats 5
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from hf_fastslow import load_default_model
from hf_fastslow.generation import Drafter, speculative_generate

QUESTIONS = [
    "What is 17 * 23?", "Name three sorting algorithms.", "Reverse a list in Python.", "Tell me a joke.",
    "What is the capital of France?", "Explain recursion.", "Write a haiku about rain.", "List the primes below 20.",
]


class NoDrafts(Drafter):
    def propose(self, context):
        return [ids[:0] for ids in context.input_ids]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_default_model()
    tok.padding_side = "left"

    forward_time = [0.0, 0.0]  # total, start of the current forward
    model.register_forward_pre_hook(lambda *a: forward_time.__setitem__(1, time.perf_counter()))
    model.register_forward_hook(lambda *a: forward_time.__setitem__(0, forward_time[0] + time.perf_counter()
                                                                     - forward_time[1]))
    modes = {"greedy": {"do_sample": False}, "sample T=1": {"do_sample": True, "temperature": 1.0, "top_k": None,
                                                             "top_p": None}}
    print(f"torch threads {args.threads}; {args.new_tokens} new tokens (EOS ignored); medians over {args.repeats} "
          "interleaved repeats (min-max); per step = per generated token of a row")
    for batch in args.batch:
        texts = [tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
                 for q in (QUESTIONS * (batch // len(QUESTIONS) + 1))[:batch]]
        enc = tok(texts, return_tensors="pt", padding=True)
        for mode, extra in modes.items():
            kwargs = {**enc, "max_new_tokens": args.new_tokens, "eos_token_id": None, **extra}
            arms = {
                "generate": lambda kw=kwargs: model.generate(**kw),
                "speculative, no drafts": lambda kw=kwargs: model.generate(
                    **kw, custom_generate=speculative_generate, drafter=NoDrafts(4)),
            }
            results = {name: [] for name in arms}
            for run in arms.values():  # warm-up
                run()
            for _ in range(args.repeats):
                for name, run in arms.items():
                    forward_time[0] = 0.0
                    start = time.perf_counter()
                    out = run()
                    total = time.perf_counter() - start
                    assert out.shape[1] == enc["input_ids"].shape[1] + args.new_tokens
                    results[name].append((total / args.new_tokens, (total - forward_time[0]) / args.new_tokens))
            base = statistics.median(t for t, _ in results["generate"])
            for name, rows in results.items():
                step = [t * 1e3 for t, _ in rows]
                loop = [o * 1e3 for _, o in rows]
                print(f"batch {batch:2d} {mode:10s} {name:22s} {statistics.median(step):7.2f} ms/step "
                      f"({min(step):.2f}-{max(step):.2f}), outside forward {statistics.median(loop):5.2f} ms/step, "
                      f"x{statistics.median(t for t, _ in rows) / base:.3f} of generate")


if __name__ == "__main__":
    main()
