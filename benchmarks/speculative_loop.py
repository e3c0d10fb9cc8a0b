"""What a round without drafts costs in `speculative_generate`, beside a plain `generate` step.

A drafter that often proposes nothing (DAS at temperature 1, cost-aware drafting) only pays off if those rounds cost
what a plain decoding step costs. This runs plain `generate` and `speculative_generate` with a drafter that never
drafts on the default model, interleaved, in one process, and reports wall-clock medians (and spread) per generated
step, plus the time spent outside the model's forward (the loop's own work).

    python benchmarks/speculative_loop.py --batch 1 8 --new-tokens 64 --repeats 5
    python benchmarks/speculative_loop.py --batch 1 8 --new-tokens 16 --repeats 3 --json loop.json   (quick profile)

`--json PATH` also writes every printed figure (per batch size, mode and arm) and the machine state to PATH.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from hf_fastslow import load_default_model
from hf_fastslow.evaluation.prompts import encode_chat
from hf_fastslow.evaluation.timing import Spread, interleave
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
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_default_model()

    forward_time = [0.0, 0.0]  # total, start of the current forward
    model.register_forward_pre_hook(lambda *a: forward_time.__setitem__(1, time.perf_counter()))
    model.register_forward_hook(lambda *a: forward_time.__setitem__(0, forward_time[0] + time.perf_counter()
                                                                     - forward_time[1]))
    modes = {"greedy": {"do_sample": False}, "sample T=1": {"do_sample": True, "temperature": 1.0, "top_k": None,
                                                             "top_p": None}}
    print(f"torch threads {args.threads}; {args.new_tokens} new tokens (EOS ignored); medians over {args.repeats} "
          "interleaved repeats (min-max); per step = per generated token of a row")
    report = {"args": vars(args), "rows": []}
    for batch in args.batch:
        enc = encode_chat(tok, (QUESTIONS * (batch // len(QUESTIONS) + 1))[:batch])
        for mode, extra in modes.items():
            kwargs = {**enc, "max_new_tokens": args.new_tokens, "eos_token_id": None, **extra}
            generators = {
                "generate": lambda kw=kwargs: model.generate(**kw),
                "speculative, no drafts": lambda kw=kwargs: model.generate(
                    **kw, custom_generate=speculative_generate, drafter=NoDrafts(4)),
            }
            # Each arm returns its output and the seconds its forwards took (reset before every run, untimed).
            arms = {name: lambda run=run: (run(), forward_time[0]) for name, run in generators.items()}
            timing = interleave(arms, repeats=args.repeats, warmup=1,
                                before_each=lambda name: forward_time.__setitem__(0, 0.0))
            for name in arms:
                for out, _ in timing[name].values:
                    assert out.shape[1] == enc["input_ids"].shape[1] + args.new_tokens
            base = timing["generate"].spread.median
            for name, times in timing.arms.items():
                step = Spread.of(times.wall).scaled(1e3 / args.new_tokens)
                loop = [(total - forward) * 1e3 / args.new_tokens
                        for total, (_, forward) in zip(times.wall, times.values)]
                print(f"batch {batch:2d} {mode:10s} {name:22s} {step.median:7.2f} ms/step "
                      f"({step.low:.2f}-{step.high:.2f}), outside forward {statistics.median(loop):5.2f} ms/step, "
                      f"x{times.spread.median / base:.3f} of generate")
                report["rows"].append({"batch": batch, "mode": mode, "arm": name, "ms_per_step": step.median,
                                       "ms_per_step_min": step.low, "ms_per_step_max": step.high,
                                       "outside_forward_ms_per_step": statistics.median(loop),
                                       "ratio_to_generate": times.spread.median / base,
                                       "paired_ratios_to_generate": timing.ratios(name, "generate")})
            print(f"  ({timing.describe_machine()})")
            report["machine"] = {"before": timing.before, "after": timing.after}
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(report, fh, indent=1)


if __name__ == "__main__":
    main()
