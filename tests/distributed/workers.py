"""Worker entry points run by `torchrun` in tests/distributed and benchmarks/multiprocess_trainers.py (one per method).

`python -m torch.distributed.run --standalone --nproc_per_node 2 tests/distributed/workers.py <method> <out_dir>
[options]`; each rank writes its JSON payload with `write_rank_result`. Tiny random models, CPU, gloo.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import random
import re
import time

import torch

from tests.conftest import byte_tokenizer, tiny_llama
from tests.distributed.launcher import write_rank_result

RULE = "RULE: be brief"
SEED_CONTEXT = "You are a helper."


def weights_digest(model) -> str:
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


# --------------------------------------------------------------------------------------------------------------- FST
def fst_dataset(n=8):
    from datasets import Dataset

    rows = [{"prompt": [{"role": "system", "content": SEED_CONTEXT}, {"role": "user", "content": f"{i}+{i + 3}"}],
             "answer": str(2 * i + 3)} for i in range(n)]
    return Dataset.from_list(rows)


def fst_parts(opts):
    from hf_fastslow.trainers import FunctionReflector, VerifiableTask

    class HouseRuleTask(VerifiableTask):
        """1 iff the rollout's system turn carries RULE (a random model's text carries no signal); counts its calls."""

        calls = 0

        def score(self, prompt, completion, answer=None, **columns):
            HouseRuleTask.calls += 1
            system = prompt[0]["content"] if prompt and prompt[0]["role"] == "system" else ""
            return (1.0, "correct") if RULE in system else (0.0, f"wrong: the system prompt must say '{RULE}'")

    proposals = []
    tag = random.Random(os.getpid()).randrange(10**6)  # differs per process: a rank-local proposal would show

    def propose(context, records):
        proposals.append(context)
        wanted = [m.group(1) for r in records for m in [re.search(r"must say '([^']+)'", r["Feedback"])] if m]
        return f"{context} {wanted[0]} #{tag}" if wanted else f"{context} #{tag}"

    return HouseRuleTask, FunctionReflector(propose), proposals


def fst_args(out_dir, opts, **kw):
    from hf_fastslow.trainers import FSTConfig

    base = dict(output_dir=out_dir, use_cpu=not opts.no_cpu_flag, bf16=False, report_to="none", seed=0,
                per_device_train_batch_size=4 // opts.world, gradient_accumulation_steps=1, num_generations=2,
                max_completion_length=4, max_steps=opts.steps, learning_rate=1e-2, logging_steps=1,
                save_strategy="steps" if opts.save_steps else "no", save_steps=opts.save_steps or 500,
                fast_every_steps=2, pareto_set_size=4, reflection_minibatch_size=2, candidates_per_round=1,
                max_proposals_per_round=2, reflection_max_new_tokens=8, dataloader_num_workers=0)
    base.update(kw)
    return FSTConfig(**base)


def run_fst(opts) -> dict:
    from hf_fastslow.trainers import FSTTrainer

    task_cls, reflector, proposals = fst_parts(opts)
    tok = byte_tokenizer()
    trainer = FSTTrainer(model=tiny_llama(vocab=len(tok)), reward_funcs=task_cls(), args=fst_args(opts.out_dir, opts),
                         train_dataset=fst_dataset(), processing_class=tok, reflector=reflector)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    trainer.save_model(opts.out_dir)
    return {"fast_context": trainer.fast_context, "fast_pool": trainer.fast_pool, "fast_scores": trainer.fast_scores,
            "outcomes": [e["outcome"] for e in trainer.fast_history], "fast_rollouts": trainer.fast_rollouts,
            "reflector_calls": len(proposals), "task_calls": task_cls.calls, "train_seconds": seconds,
            "num_processes": trainer.accelerator.num_processes, "weights": weights_digest(trainer.model),
            "global_step": trainer.state.global_step}


# --------------------------------------------------------------------------------------------------------------- DAS
def run_das(opts) -> dict:
    from datasets import Dataset
    from trl import GRPOConfig, GRPOTrainer

    from hf_fastslow.generation import DASDrafter, SuffixHistory
    from hf_fastslow.trainers import das_rollout_func

    tok = byte_tokenizer()
    model = tiny_llama(vocab=len(tok))
    # A prompt set revisited every epoch (DAS drafts from earlier sightings of the same prompt).
    ds = Dataset.from_list([{"prompt": [{"role": "user", "content": f"say {i}"}]} for i in range(opts.prompts)])
    args = GRPOConfig(output_dir=opts.out_dir, use_cpu=True, bf16=False, report_to="none", seed=0,
                      per_device_train_batch_size=opts.batch // opts.world, num_generations=opts.generations,
                      max_completion_length=opts.tokens, max_steps=opts.steps, logging_steps=1, save_strategy="no",
                      temperature=opts.temperature, learning_rate=1e-3)
    drafter = DASDrafter(history=SuffixHistory(max_depth=16), cost_aware=False, use_local=not opts.no_local)
    rollout = das_rollout_func(drafter, share_across_ranks=not opts.no_share, max_shared_rollouts=opts.max_shared)
    rewards = []

    def reward(completion_ids, **kwargs):
        values = [float(sum(ids) % 7) / 7 for ids in completion_ids]
        rewards.extend(values)
        return values

    trainer = GRPOTrainer(model=model, reward_funcs=reward, args=args, train_dataset=ds, processing_class=tok,
                          rollout_func=rollout)
    start = time.perf_counter()
    trainer.train()
    seconds = time.perf_counter() - start
    hist, stats = drafter.history, drafter.stats
    return {"history": {str(p): sorted(map(list, hist.rollouts(p).values())) for p in hist.problems},
            "problems_order": [str(p) for p in hist.problems], "lengths": hist.known_lengths(),
            "rollouts_in_history": len(hist), "local_rollouts": stats.sequences, "proposed": stats.proposed,
            "accepted": stats.accepted, "target_forwards": stats.target_forwards, "new_tokens": stats.new_tokens,
            "tokens_per_row_forward": stats.tokens_per_forward, "acceptance_length": stats.mean_acceptance_length,
            "train_seconds": seconds, "num_processes": trainer.accelerator.num_processes,
            "rewards_seen": len(rewards), "weights": weights_digest(trainer.model)}


# ------------------------------------------------------------------------------------------------------- KV healing
def heal_dataset(n=8):
    from datasets import Dataset

    g = torch.Generator().manual_seed(1)
    return Dataset.from_list([{"input_ids": torch.randint(3, 250, (12,), generator=g).tolist()} for _ in range(n)])


def run_heal(opts) -> dict:
    """KV healing (CARE): 2 ranks x batch 2 against 1 process x batch 2 x accumulation 2 (the same global batch)."""
    from hf_fastslow.trainers import KVHealingConfig, KVHealingTrainer

    tok = byte_tokenizer()
    teacher = tiny_llama(vocab=len(tok), seed=1)
    student = tiny_llama(vocab=len(tok), seed=2)
    args = KVHealingConfig(output_dir=opts.out_dir, use_cpu=True, bf16=False, report_to="none", seed=0,
                           per_device_train_batch_size=2, gradient_accumulation_steps=4 // (2 * opts.world),
                           max_steps=opts.steps, learning_rate=1e-2, logging_steps=1, save_strategy="no",
                           packing=False, dataset_kwargs={"skip_prepare_dataset": False}, max_length=32)
    trainer = KVHealingTrainer(student, teacher, args=args, train_dataset=heal_dataset(), processing_class=tok)
    trainer.train()
    trainer.save_model(opts.out_dir)
    return {"weights": weights_digest(trainer.model), "num_processes": trainer.accelerator.num_processes,
            "should_save": trainer.args.should_save, "losses": [h["loss"] for h in trainer.state.log_history
                                                                 if "loss" in h]}


# ------------------------------------------------------------------------------------------------------------ PairRL
def run_pairrl(opts) -> dict:
    """PairRL: every rank builds the same global judge rows; each judges its own block (each row judged once, padding
    rows generated but never judged when the rows do not divide evenly)."""
    from datasets import Dataset

    from hf_fastslow.trainers import PairRLConfig, PairRLTrainer, VerifiableTask
    from hf_fastslow.trainers.pairrl_trainer import VERIFY_ROLE

    class ParityTask(VerifiableTask):
        def score(self, prompt, completion, **columns):
            ok = bool(completion) and ord(completion[0]) % 2 == 0
            return float(ok), "even" if ok else "odd"

    judged: list[str] = []
    built: list[int] = []

    class CountingPairRL(PairRLTrainer):
        def _build_judge_rows(self, batch):
            rows = super()._build_judge_rows(batch)
            if opts.judge_groups:  # fewer judge rows than ranks x groups divide evenly (e.g. 3 rows on 2 ranks)
                rows = rows[: opts.judge_groups * self.num_generations]
            built.append(len(rows))
            return rows

    tok = byte_tokenizer()
    args = PairRLConfig(output_dir=opts.out_dir, use_cpu=True, bf16=False, report_to="none", save_strategy="no",
                        per_device_train_batch_size=2 * opts.generations // opts.world,
                        num_generations=opts.generations, max_completion_length=4,
                        max_steps=opts.steps, learning_rate=1e-3, logging_steps=1, seed=0, max_solution_tokens=4)
    trainer = CountingPairRL(model=tiny_llama(vocab=len(tok)), reward_funcs=ParityTask(), args=args,
                             train_dataset=Dataset.from_dict({"prompt": [[{"role": "user", "content": f"task {i}"}]
                                                                         for i in range(8)]}),
                             processing_class=tok)
    verifier = trainer.verification_reward
    score = type(verifier).__call__

    def counting(self, prompts, completions, completion_ids=None, role=None, pair_labels=None, **kw):
        for p, r in zip(prompts, role or [None] * len(prompts)):
            if r == VERIFY_ROLE:
                judged.append(p if isinstance(p, str) else p[-1]["content"])
        return score(self, prompts, completions, completion_ids, role=role, pair_labels=pair_labels, **kw)

    type(verifier).__call__ = counting
    trainer.train()
    return {"judge_rows_built": built, "judged": judged, "num_processes": trainer.accelerator.num_processes,
            "weights": weights_digest(trainer.model)}


METHODS = {"fst": run_fst, "das": run_das, "heal": run_heal, "pairrl": run_pairrl}


def parse(argv=None):
    p = argparse.ArgumentParser()
    p.add_argument("method", choices=sorted(METHODS))
    p.add_argument("out_dir")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--save-steps", type=int, default=0)
    p.add_argument("--no-cpu-flag", action="store_true", help="leave use_cpu unset (the misconfigured launch)")
    p.add_argument("--no-share", action="store_true", help="DAS: keep a history per process")
    p.add_argument("--max-shared", type=int, default=None)
    p.add_argument("--no-local", action="store_true", help="DAS: draft from the history only (not the request itself)")
    p.add_argument("--prompts", type=int, default=2)
    p.add_argument("--batch", type=int, default=4, help="global generation batch (rows)")
    p.add_argument("--generations", type=int, default=4, help="num_generations (DAS, PairRL)")
    p.add_argument("--judge-groups", type=int, default=0, help="PairRL: keep only this many judge groups (0: all)")
    p.add_argument("--tokens", type=int, default=16)
    p.add_argument("--temperature", type=float, default=1.0)
    opts = p.parse_args(argv)
    opts.world = int(os.environ.get("WORLD_SIZE", "1"))
    return opts


def main(argv=None) -> dict:
    torch.set_num_threads(1)
    opts = parse(argv)
    torch.manual_seed(0)
    payload = METHODS[opts.method](opts)
    payload["rank"] = int(os.environ.get("RANK", "0"))
    if "HF_FASTSLOW_RANK_RESULTS" in os.environ:
        write_rank_result(payload)
    return payload


if __name__ == "__main__":
    main()
