"""Headline extractors for the decoding benchmarks (see hf_fastslow/bench/headlines/__init__.py).

das, speculative_loop, aurora, v1_infer, pairrl, fst: each reads its script's JSON by key (arm names are the scripts'
stable JSON keys), so a changed shape fails with a KeyError instead of a silently missing row.
"""

from __future__ import annotations

from hf_fastslow.bench.headlines import index_rows, smoke_note
from hf_fastslow.bench.registry import Figure


def _das(report: dict) -> list[Figure]:
    grpo, serve = report["grpo"], report["serve"]
    g, s = grpo["settings"], serve["settings"]
    rollouts = (f"{g['prompts']} prompts x {g['generations']} sample(s), batch {g['batch']}, T={g['temperature']}, "
                f"{g['epochs']} epochs, {g['new_tokens']} tokens, {g['repeats']} interleaved repeats")
    serving = f"{s['prompts']} prompts, batch 1, {s['new_tokens']} tokens, {s['repeats']} interleaved repeats"
    plain, arms = serve["arms"]["plain"], serve["arms"]
    best = serve["prompt_lookup_best"]
    lookup = f"tokens={best['prompt_lookup_num_tokens']}, ngram={best['max_matching_ngram_size']}"
    das, peer = grpo["arms"]["das"], grpo["arms"]["plain"]
    return [
        Figure("GRPO rollouts: median wall s, lower is better", das["median_wall_s"], peer["median_wall_s"],
               note=f"peer: plain generate (sampling); {rollouts}; median per-repeat ratio "
                    f"{das['wall_ratio_to_plain']:.3f} (CPU seconds {das['cpu_ratio_to_plain']:.3f})",
               paper="rollout time -25 % (code RL) to -50 % (math RL), 8xH100, 7-8B models"),
        Figure("greedy serving, warm history: median wall s, lower is better", arms["das_warm"]["median_wall_s"],
               plain["median_wall_s"], note=f"peer: plain greedy generate; {serving}; "
                                            f"{arms['das_warm']['tokens_per_forward']:.2f} tokens per forward"),
        Figure("greedy serving, no history: median wall s, lower is better", arms["das_cold"]["median_wall_s"],
               arms["prompt_lookup"]["median_wall_s"],
               note=f"peer: generate's prompt lookup, best of the sweep ({lookup}); {serving}"),
        Figure("greedy outputs differing from plain generate (DAS warm + cold), lower is better",
               arms["das_warm"]["mismatches_vs_plain"] + arms["das_cold"]["mismatches_vs_plain"], None,
               note=f"of {2 * s['prompts'] * s['repeats']} DAS outputs; lossless means 0"),
    ]


def _speculative_loop(report: dict) -> list[Figure]:
    rows = index_rows(report["rows"], "batch", "mode", "arm")
    args, figures = report["args"], []
    for batch, mode, _ in [key for key in rows if key[2] == "generate"]:
        ours, peer = rows[(batch, mode, "speculative, no drafts")], rows[(batch, mode, "generate")]
        figures.append(Figure(
            f"batch {batch}, {mode}: ms per step, a round without drafts vs a generate step, lower is better",
            ours["ms_per_step"], peer["ms_per_step"],
            note=f"peer: generate; {args['new_tokens']} tokens, {args['repeats']} interleaved repeats; outside the "
                 f"forward {ours['outside_forward_ms_per_step']:.2f} vs {peer['outside_forward_ms_per_step']:.2f} "
                 "ms/step"))
    if not figures:
        raise KeyError("no (batch, mode) row with a 'generate' arm")
    return figures


def _aurora(report: dict) -> list[Figure]:
    result = report["result"]
    totals, windows, args = result["totals"], result["windows"], result["args"]
    size = (f"{args['gsm8k']} GSM8K then {args['humaneval']} HumanEval prompts x {args['epochs']} epoch(s), "
            f"{args['max_new_tokens']} tokens, k={args['k']}")
    # smaller than the recorded run (8 requests x 32 tokens)
    size += smoke_note((args["gsm8k"] + args["humaneval"]) * args["epochs"] < 8,
                       "too few requests for the head to learn much")
    online, frozen, plain = totals["online"], totals["frozen"], totals["plain"]
    last = windows[-1]
    return [
        Figure("acceptance length (tokens per verification round), higher is better", online["acc_len"],
               frozen["acc_len"], note=f"peer: the same day-0 head frozen; {size}",
               paper="3.08 online from scratch vs 2.63 static pretrained (blog; k=5, large GPU models)"),
        Figure(f"acceptance length after the shift (window {last['requests']}, {last['domain']}), higher is better",
               last["online"]["acc_len"], last["frozen"]["acc_len"], note=f"peer: the frozen head; {size}"),
        Figure("tokens/s, online Aurora vs plain greedy generate, higher is better", online["tok_s"], plain["tok_s"],
               note=f"{size}; every arm decodes beside the online trainer thread",
               paper="1.5x day-0 speedup (229B and 80B targets on GPUs)"),
        Figure("greedy outputs differing from plain generate (online arm), lower is better", online["mismatches"],
               None, note=f"of {args['gsm8k'] * args['epochs'] + args['humaneval'] * args['epochs']} requests; "
                          "lossless means 0"),
    ]


def _v1_infer(report: dict) -> list[Figure]:
    summary = report["summary"]
    sel = summary["selectors"]
    v1, pointwise, vote = sel["v1_budget_1N"], sel["pointwise"], sel["majority_vote"]
    size = f"{summary['task']}, {summary['questions']} questions, N={summary['candidates_per_question']} candidates"
    return [
        Figure("accuracy of the picked answer, V1-Infer (budget 1N) vs pointwise self-verification, higher is better",
               v1["accuracy"], pointwise["accuracy"], note=f"peer: pointwise self-verification, same candidates and "
                                                           f"judge model; {size}",
               paper="up to +10 points Pass@1 over pointwise (e.g. 73.33 vs 66.06, CodeContests GPT-OSS-20B)"),
        Figure("accuracy of the picked answer, V1-Infer (budget 1N) vs majority vote, higher is better",
               v1["accuracy"], vote["accuracy"], note=f"peer: self-consistency (majority vote); {size}"),
        Figure("judge tokens per question, V1-Infer (budget 1N) vs pointwise, lower is better",
               v1["judge_tokens_per_question"], pointwise["judge_tokens_per_question"],
               note=f"{v1['judge_calls_per_question']:.3g} vs {pointwise['judge_calls_per_question']:.3g} judge calls "
                    f"per question; {size}"),
        Figure("pass@N (some candidate correct): every selector's ceiling", summary["pass_at_n"], None, note=size),
    ]


def _pairrl(report: dict) -> list[Figure]:
    results, args = report["results"], report["command_args"]
    grpo, pairrl = results["grpo"], results["pairrl"]
    size = (f"{args['steps']} steps x {args['problems_per_step']} problems, {args['rollouts']} rollouts per problem, "
            f"{report['heldout_problems']} held-out problems")
    # fewer steps than the recorded run (docs/benchmarks/v1.md: 5)
    size += smoke_note(args["steps"] < 5, "too few steps to move the weights measurably")
    return [
        Figure("held-out pass@1 after training, higher is better", pairrl["pass_at_1"], grpo["pass_at_1"],
               note=f"peer: GRPO at the same rollouts per problem; {size}; base {results['base']['pass_at_1']:.3f}",
               paper="base Pass@1 up to +8.7 over standard RL (Qwen3-4B, code)"),
        Figure("verifier accuracy on held-out mixed pairs, higher is better", pairrl["verifier"]["accuracy"],
               grpo["verifier"]["accuracy"], note=f"peer: GRPO; {report['heldout_pairs']} pairs; base "
                                                  f"{results['base']['verifier']['accuracy']:.3f}"),
    ]


def _fst(report: dict) -> list[Figure]:
    config, fst, grpo = report["config"], report["fst"], report["grpo"]
    size = (f"{config['steps']} steps x {config['problems']} problems x G={config['G']}, {config['heldout']} held-out "
            f"items, seed {config['seed']}")
    # fewer steps than the recorded run (docs/benchmarks/fst.md: 6)
    size += smoke_note(config["steps"] < 6, "a pipeline run, not a quality figure")
    kl = report["kl_to_base"]["seed_context"]
    figures = [Figure("held-out accuracy after training, higher is better", fst["heldout_A_acc"], grpo["heldout_A_acc"],
                      note=f"peer: GRPO, same steps and rollouts; FST with the rule-based reflector; {size}",
                      paper="FST reaches RL's peak in 1.4-3x fewer steps; peak 47.4 vs 43.0 (CodeIO, Qwen3-8B)"),
               Figure("KL to the base model (seed context), lower is less drift", kl["fst"], kl["grpo"],
                      note=f"peer: GRPO; {size}", paper="up to ~70 % lower KL than RL at matched reward")]
    if "fst_frozen" in report:  # the arm with the frozen-copy reflector runs unless --arms leaves it out
        figures.append(Figure("held-out accuracy after training, FST with a frozen-copy reflector, higher is better",
                              report["fst_frozen"]["heldout_A_acc"], grpo["heldout_A_acc"],
                              note=f"peer: GRPO; reflector = a frozen copy of the 135M policy; {size}"))
    return figures


EXTRACTORS = {"das": _das, "speculative_loop": _speculative_loop, "aurora": _aurora, "v1_infer": _v1_infer,
              "pairrl": _pairrl, "fst": _fst}
