"""Benchmark: Fast-Slow Training (arXiv 2605.12484) vs GRPO alone on SmolLM2-135M-Instruct, two-digit arithmetic.

Task A: fresh two-digit additions, 16-token completions; reward 1 iff the reply's last number is the sum (see
`ArithmeticTask`). Task B (plasticity): fresh two-digit subtractions, same reward.

Arms, same seed, same training items in the same order, same number of RL rollouts and the same slow optimizer
(trl CISPO, epsilon_high=5): `grpo` - `trl.GRPOTrainer`; `fst` - `FSTTrainer` with a rule-based reflector that turns
the expected reply stated in the feedback into a worked example (it measures the fast/slow machinery - Pareto pool,
minibatch acceptance, context-conditioned RL - not the quality of an LLM reflector); `fst_frozen` - `FSTTrainer` with
its default reflector, a frozen copy of the initial policy (the paper's frozen reflection LM, here a weak one). All
start from SmolLM2's default system prompt. Then plain GRPO on task B from each arm's final weights (plasticity).

Run:  python benchmarks/fst.py --out docs/benchmarks/fst_results.json --plot docs/fst_reward_vs_rollouts.png
      (--arms grpo,fst,fst_frozen by default; --seed N for each seed)
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time

import torch

torch.set_num_threads(1)  # the box is shared; one thread per process avoids oversubscription

from datasets import Dataset  # noqa: E402
from trl import GRPOConfig, GRPOTrainer  # noqa: E402

from hf_fastslow import load_default_model  # noqa: E402
from hf_fastslow.evaluation.answers import answers_match, extract_answer  # noqa: E402
from hf_fastslow.evaluation.memory import storage_bytes  # noqa: E402
from hf_fastslow.evaluation.prompts import arithmetic_problems, chat_messages, encode_chat  # noqa: E402
from hf_fastslow.trainers import FSTConfig, FSTTrainer, FunctionReflector, VerifiableTask  # noqa: E402
from hf_fastslow.trainers.fst_trainer import apply_context  # noqa: E402

SMOL_DEFAULT_SYSTEM = "You are a helpful AI assistant named SmolLM, trained by Hugging Face"
ARMS = ("grpo", "fst", "fst_frozen")
ARM_LABELS = {"grpo": "GRPO", "fst": "FST, rule-based reflector", "fst_frozen": "FST, frozen-copy reflector"}


class ArithmeticTask(VerifiableTask):
    """Two-digit arithmetic where only a direct answer fits the completion budget.

    Reward 1 iff the reply's last number is the result. SmolLM2-135M usually starts a long explanation ("To add 40
    and 85, you simply add ...") that the 16-token budget cuts off: answering directly is a declarative convention a
    context can carry (a demonstration), while getting the sums right is a skill. The feedback states what was
    expected, as a task's evaluator would (expected reply and the reply's last number).
    """

    def __init__(self, op: str):
        self.op = op

    def items(self, n: int, seed: int) -> list[dict]:
        return [{"prompt": chat_messages(p["question"], system=SMOL_DEFAULT_SYSTEM), "answer": str(p["answer"]),
                 "expected_reply": f"{p['a']} {p['op']} {p['b']} = {p['answer']}."}
                for p in arithmetic_problems(n, seed, op=self.op)]

    def score(self, prompt, completion, answer=None, expected_reply=None, **columns):
        if answer is None:
            return None, "not applicable"
        found = extract_answer(completion)
        if answers_match(completion, answer):
            return 1.0, f"Correct: {answer}."
        got = f"ended with the number {found}" if found is not None else "gave no number"
        return 0.0, (f"Wrong: expected {answer}; the reply {got} (replies are cut after 16 tokens). "
                     f"Expected reply: '{expected_reply}'")


def demonstration_reflector(context: str, records) -> str:
    """Rule-based reflection: turn the first failure's feedback (its expected reply) into a worked example.

    A 135M policy follows demonstrations far better than instructions, and an LLM reflector has not been run here
    (see docs/benchmarks/fst.md). The minibatch / Pareto checks decide whether the edit is kept.
    """
    for rec in records:
        m = re.search(r"Expected reply: '([^']+)'", rec["Feedback"])
        if (rec["Score"] or 0.0) < 1.0 and m:
            example = f"User: {rec['Inputs']}\nAssistant: {m.group(1)}"
            head = context.split("\nAnswer directly, like this example.")[0]
            return f"{head}\nAnswer directly, like this example.\n{example}"
    return context


@torch.no_grad()
def generate(model, tok, rows, context, max_new_tokens, sample=False, batch=16):
    outs = []
    for s in range(0, len(rows), batch):
        enc = encode_chat(tok, [apply_context(r["prompt"], context) for r in rows[s:s + batch]])
        kw = dict(do_sample=True, temperature=1.0, top_p=1.0, top_k=0) if sample else dict(
            do_sample=False, temperature=None, top_p=None, top_k=None)
        out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **kw)
        for i in range(out.shape[0]):
            comp = out[i, enc["input_ids"].shape[1]:].tolist()
            if tok.eos_token_id in comp:
                comp = comp[: comp.index(tok.eos_token_id) + 1]
            outs.append((enc["input_ids"][i][enc["attention_mask"][i].bool()].tolist(), comp))
    return outs


def accuracy(model, tok, task, rows, context, max_new_tokens):
    model.eval()
    outs = generate(model, tok, rows, context, max_new_tokens)
    scores = [task.score(None, tok.decode(c, skip_special_tokens=True), answer=r["answer"],
                         expected_reply=r["expected_reply"])[0]
              for r, (_, c) in zip(rows, outs)]
    return sum(s == 1.0 for s in scores) / len(scores), sum(scores) / len(scores)


@torch.no_grad()
def kl_to_base(model, base, tok, rows, context, max_new_tokens, seed=0):
    """Monte-Carlo token KL(pi_theta || pi_base) on completions sampled from pi_theta; both models see `context`."""
    model.eval()
    torch.manual_seed(seed)
    outs = generate(model, tok, rows, context, max_new_tokens, sample=True)
    per_seq = []
    for prompt_ids, comp in outs:
        if not comp:
            continue
        ids = torch.tensor([prompt_ids + comp])
        lp = [torch.log_softmax(m(ids).logits[0, len(prompt_ids) - 1:-1].float(), -1) for m in (model, base)]
        tgt = torch.tensor(comp)
        diff = lp[0].gather(-1, tgt[:, None]) - lp[1].gather(-1, tgt[:, None])
        per_seq.append(diff.mean().item())
    return sum(per_seq) / max(1, len(per_seq))


def common_args(a, out_dir, steps):
    return dict(
        output_dir=out_dir, use_cpu=True, bf16=False, report_to="none", seed=a.seed, data_seed=a.seed,
        per_device_train_batch_size=a.problems * a.G, num_generations=a.G, max_completion_length=a.max_new_tokens,
        max_steps=steps, learning_rate=a.lr, logging_steps=1, save_strategy="no", gradient_checkpointing=False,
        loss_type="cispo", epsilon_high=5.0, dataloader_num_workers=0, disable_tqdm=True,
    )


def module_tensors(module):
    return list(module.parameters()) + list(module.buffers())


def rewards_from(trainer):
    return [e["reward"] for e in trainer.state.log_history if "reward" in e]


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--problems", type=int, default=4, help="problems per RL step")
    p.add_argument("--G", type=int, default=4, help="rollouts per problem")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--fast-every", type=int, default=3)
    p.add_argument("--pareto", type=int, default=6)
    p.add_argument("--heldout", type=int, default=12)
    p.add_argument("--plasticity-steps", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated subset of {ARMS}")
    p.add_argument("--reflection-max-new-tokens", type=int, default=64, help="fst_frozen arm's reflection length")
    p.add_argument("--out", default="docs/benchmarks/fst_results.json")
    p.add_argument("--plot", default="docs/fst_reward_vs_rollouts.png")
    p.add_argument("--workdir", default="/tmp/fst_bench")
    a = p.parse_args()
    arms = [x for x in a.arms.split(",") if x]
    if not arms or set(arms) - set(ARMS):
        p.error(f"--arms must be a comma-separated subset of {ARMS} (got {a.arms!r})")
    t_start = time.time()
    task_a, task_b = ArithmeticTask("+"), ArithmeticTask("-")
    train_a = Dataset.from_list(task_a.items(a.steps * a.problems, seed=a.seed + 1))
    pareto_a = Dataset.from_list(task_a.items(a.pareto, seed=a.seed + 2))
    held_a = task_a.items(a.heldout, seed=a.seed + 3)
    train_b = Dataset.from_list(task_b.items(a.plasticity_steps * a.problems, seed=a.seed + 4))
    held_b = task_b.items(a.heldout, seed=a.seed + 5)
    rollouts_per_step = a.problems * a.G
    settings = {k: v for k, v in vars(a).items() if k not in ("out", "plot", "workdir")}  # no local paths
    res: dict = {"config": settings, "rollouts_per_step": rollouts_per_step, "torch_threads": 1}

    def log(msg):
        print(f"[{time.time() - t_start:7.1f}s] {msg}", flush=True)

    base, tok = load_default_model()
    base.eval()
    acc = accuracy(base, tok, task_a, held_a, SMOL_DEFAULT_SYSTEM, a.max_new_tokens)
    res["base"] = {"heldout_A_acc": acc[0], "heldout_A_mean_reward": acc[1]}
    log(f"base model, seed context: held-out A acc {acc[0]:.3f} (mean reward {acc[1]:.3f})")

    trainers = {}
    if "grpo" in arms:
        model, _ = load_default_model()
        t0 = time.time()
        grpo_args = GRPOConfig(**common_args(a, f"{a.workdir}/grpo", a.steps))
        grpo = GRPOTrainer(model=model, reward_funcs=task_a, args=grpo_args,
                           train_dataset=train_a, processing_class=tok)
        grpo.train()
        g = {"train_seconds": time.time() - t0, "reward_curve": rewards_from(grpo)}
        g["heldout_A_acc"], g["heldout_A_mean_reward"] = accuracy(grpo.model, tok, task_a, held_a,
                                                                  SMOL_DEFAULT_SYSTEM, a.max_new_tokens)
        res["grpo"], trainers["grpo"] = g, grpo
        log(f"GRPO: rewards {[f'{r:.3f}' for r in g['reward_curve']]} acc {g['heldout_A_acc']:.3f}")

    # --- FST arms: same schedule, different reflector ------------------------------------------------------------
    for name in [x for x in arms if x != "grpo"]:
        model, _ = load_default_model()
        t0 = time.time()
        fst_args = FSTConfig(**common_args(a, f"{a.workdir}/{name}", a.steps), fast_every_steps=a.fast_every,
                             candidates_per_round=1, max_proposals_per_round=2, reflection_minibatch_size=3,
                             seed_context=SMOL_DEFAULT_SYSTEM, fast_eval_batch_size=16,
                             reflection_max_new_tokens=a.reflection_max_new_tokens)
        # fst_frozen names no reflector: FSTTrainer's default, a frozen copy of the initial policy.
        reflector = FunctionReflector(demonstration_reflector) if name == "fst" else None
        fst = FSTTrainer(model=model, reward_funcs=task_a, args=fst_args, train_dataset=train_a, processing_class=tok,
                         reflector=reflector, pareto_dataset=pareto_a)
        fst.train()
        f = {"train_seconds": time.time() - t0, "reward_curve": rewards_from(fst), "fast_context": fst.fast_context,
             "reflector": type(fst.reflector).__name__, "pool_size": len(fst.fast_pool), "history": fst.fast_history,
             "fast_round_seconds": [e["fast/round_seconds"] for e in fst.state.log_history
                                    if "fast/round_seconds" in e]}
        reflector_model = getattr(fst.reflector, "model", None)
        # Memory the reflector adds beyond the policy: every storage of its model not shared with the policy.
        f["reflector_extra_bytes"] = storage_bytes(module_tensors(reflector_model), exclude=module_tensors(
            fst.model)) if reflector_model is not None else 0
        # Fast-round generations (Pareto scoring + minibatch evaluations) are extra rollouts, reported separately.
        f["fast_round_generations"] = fst.fast_rollouts
        f["heldout_A_acc"], f["heldout_A_mean_reward"] = accuracy(fst.model, tok, task_a, held_a, fst.fast_context,
                                                                  a.max_new_tokens)
        f["heldout_A_acc_seed_context"], _ = accuracy(fst.model, tok, task_a, held_a, SMOL_DEFAULT_SYSTEM,
                                                      a.max_new_tokens)
        f["base_with_fast_context_acc"], _ = accuracy(base, tok, task_a, held_a, fst.fast_context, a.max_new_tokens)
        res[name], trainers[name] = f, fst
        fst.reflector = None  # free the frozen copy before the next arm (its figures are recorded)
        log(f"{ARM_LABELS[name]}: rewards {[f'{r:.3f}' for r in f['reward_curve']]} acc {f['heldout_A_acc']:.3f}"
            f" context {f['fast_context']!r} reflector extra bytes {f['reflector_extra_bytes']:,}")

    # --- drift from the base model: both arms measured under the same context, for each of the two contexts -------
    # (the seed context, which GRPO trained under, and FST's learned context); same held-out prompts, same sampling
    # seed. Comparing each arm under its own context would mix a context effect into the weight drift.
    res["kl_to_base"] = {}
    contexts = [("seed_context", SMOL_DEFAULT_SYSTEM)] + [
        (f"{name}_context", res[name]["fast_context"]) for name in trainers if name != "grpo"]
    for ctx_name, ctx in contexts:
        res["kl_to_base"][ctx_name] = {
            arm: kl_to_base(trainer.model, base, tok, held_a, ctx, a.max_new_tokens)
            for arm, trainer in trainers.items()
        }
        log(f"KL to base under the {ctx_name.replace('_', ' ')}: " + ", ".join(
            f"{arm} {v:.5f}" for arm, v in res["kl_to_base"][ctx_name].items()))

    # --- plasticity: plain GRPO on task B from each arm's weights -----------------------------------------------
    res["plasticity"] = {}
    for name, trainer in trainers.items() if a.plasticity_steps > 0 else ():  # --plasticity-steps 0 skips it
        t0 = time.time()
        model = trainer.model
        tb = GRPOTrainer(model=model, reward_funcs=task_b,
                         args=GRPOConfig(**common_args(a, f"{a.workdir}/{name}_B", a.plasticity_steps)),
                         train_dataset=train_b, processing_class=tok)
        tb.train()
        b_acc1 = accuracy(tb.model, tok, task_b, held_b, SMOL_DEFAULT_SYSTEM, a.max_new_tokens)
        curve = rewards_from(tb)
        res["plasticity"][name] = {"reward_curve_B": curve, "heldout_B_acc_after": b_acc1[0],
                                   "seconds": time.time() - t0}
        log(f"plasticity from {name}: B rewards {[f'{r:.3f}' for r in curve]} held-out B acc after {b_acc1[0]:.3f}")

    res["total_seconds"] = time.time() - t_start
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(res, fh, indent=1)
    if a.plot:
        plot(res, a.plot)
    log(f"done; results in {a.out}, plot in {a.plot}")
    return res


def plot(res, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rps = res["rollouts_per_step"]
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, label in ARM_LABELS.items():
        if name not in res:
            continue
        curve = res[name]["reward_curve"]
        axes[0].plot([rps * (i + 1) for i in range(len(curve))], curve, marker="o", label=label)
        curve_b = res["plasticity"].get(name, {}).get("reward_curve_B", [])
        axes[1].plot([rps * (i + 1) for i in range(len(curve_b))], curve_b, marker="o", label=f"GRPO on B from {label}")
    axes[0].set(title="Task A (addition): training reward", xlabel="RL rollouts", ylabel="mean reward")
    axes[1].set(title="Plasticity: plain GRPO on task B", xlabel="RL rollouts on B", ylabel="mean reward")
    for ax in axes:
        ax.legend(fontsize=7)
        ax.grid(alpha=0.3)
    fig.suptitle(f"SmolLM2-135M-Instruct, CPU, seed {res['config']['seed']}", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
