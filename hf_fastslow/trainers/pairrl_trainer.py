"""V1-PairRL: one policy trained jointly as solver and pairwise self-verifier (Singh, Li et al., "V1: Unifying
Generation and Self-Verification for Parallel Reasoners", arXiv 2603.04304).

Each training generation batch has two phases run through GRPOTrainer's own machinery:

1. solve: `num_generations` rollouts per problem, rewarded by the verifiable task;
2. verify: from *this step's* solutions, pairs with at least one correct member are rendered into the judge prompt
   (the one `PairwiseTournament` uses at inference) and rolled out `num_generations` times each; a judge rollout is
   rewarded when its 1-10 ratings land within `reward_tolerance` of the two solutions' correctness.

The judge rows' advantages are scaled by `verifier_weight` (λ) and both phases are optimised in one loss on the
same weights. Reward functions follow TRL's contract: they return None for rows they do not apply to, so the task
never scores judge rows and the verification reward never scores solutions.
"""

from __future__ import annotations

import inspect
import math
import random
from collections.abc import Callable
from typing import Any, ClassVar

import torch
from accelerate.utils import gather_object
from trl import GRPOTrainer

from ..generation.padding import pad_token_id
from ..generation.v1_infer import parse_pair_ratings
from ..integrations import PAIRRL_GRPO_HOOKS, check_grpo_hooks, grpo_metric_buffer, pairrl_merge_generation_batches
from .config_checks import trainer_owned_copy
from .distributed import check_distributed_launch, padded_block_shard
from .pairrl_config import PairRLConfig
from .tasks import TRL_REWARD_CONTROL_KWARGS, VerifiableTask, completion_text, prompt_text

VERIFY_ROLE = "verify"
# Filler rows that even the judge rows out across ranks: generated (GRPO needs equal per-rank batches) but scored by
# no reward function and masked out of the loss.
PAD_ROLE = "judge_padding"


def judge_rows_for_rank(rows: list[dict], rank: int, world: int, num_generations: int,
                        steps_per_generation: int = 1) -> tuple[list[dict], int]:
    """This rank's judge rows from the global list every rank built: (rows, how many leading ones are real).

    Each real row is judged on exactly one rank, whatever `len(rows)`. The list is padded at its end with whole
    groups of `PAD_ROLE` rows until it splits into equal contiguous blocks (GRPO all-gathers per-rank tensors, which
    must have one size), the gathered rows regroup into whole `num_generations` groups, and each rank's block
    divides into `steps_per_generation` optimizer batches (GRPO drops a remainder there).
    """
    if not rows:
        return [], 0
    filler = {**rows[-1], "role": PAD_ROLE}
    local, real = padded_block_shard(rows, rank, world, filler, total_multiple=num_generations,
                                     block_multiple=steps_per_generation)
    return [dict(row) for row in local], real


class SolverReward:
    """A task reward restricted to solver rows: None (not applicable) on judge rows, the task's score elsewhere."""

    def __init__(self, func: Callable):
        self.func = func
        self.__name__ = getattr(func, "__name__", type(func).__name__)

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float | None]:
        roles = kwargs.get("role")
        n = len(prompts)
        keep = [i for i in range(n) if roles is None or roles[i] not in (VERIFY_ROLE, PAD_ROLE)]
        if not keep:
            return [None] * n
        if len(keep) == n:
            return list(self.func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs))
        # Mixed batch (a dataset that itself carries judge rows): score only the solver rows.
        def per_row(k, v):
            return k not in TRL_REWARD_CONTROL_KWARGS and isinstance(v, list) and len(v) == n

        sub = {k: ([v[i] for i in keep] if per_row(k, v) else v) for k, v in kwargs.items()}
        scores = self.func(
            prompts=[prompts[i] for i in keep],
            completions=[completions[i] for i in keep],
            completion_ids=None if completion_ids is None else [completion_ids[i] for i in keep],
            **sub,
        )
        out: list[float | None] = [None] * n
        for i, s in zip(keep, scores, strict=True):
            out[i] = s
        return out


class PairwiseVerificationReward:
    """Reward of a judge rollout: ratings (r_a, r_b) parsed strictly, normalised s = (r - 1)/9, credited when
    |s - y| <= tolerance for the solution's correctness y. Malformed replies earn 0 (and are counted). None on solver
    rows. Logs `pair_accuracy` (the correct member of a mixed pair rated strictly higher) and `parse_failure_rate`.
    """

    __name__ = "pairwise_verification"

    def __init__(self, tolerance: float = 0.2, require_both: bool = False):
        self.tolerance = tolerance
        self.require_both = require_both

    def __call__(self, prompts, completions, completion_ids=None, role=None, pair_labels=None, log_metric=None,
                 **kwargs) -> list[float | None]:
        n = len(prompts)
        if role is None or pair_labels is None:
            return [None] * n
        out: list[float | None] = []
        failures = judged = mixed = mixed_right = 0
        for completion, r, labels in zip(completions, role, pair_labels, strict=True):
            if r != VERIFY_ROLE:
                out.append(None)
                continue
            judged += 1
            y_a, y_b = float(labels[0]), float(labels[1])
            ratings = parse_pair_ratings(completion_text(completion))
            if ratings is None:
                failures += 1
                out.append(0.0)
                continue
            hits = [abs((rating - 1.0) / 9.0 - y) <= self.tolerance + 1e-9 for rating, y in zip(ratings, (y_a, y_b))]
            out.append(float(all(hits)) if self.require_both else sum(hits) / 2.0)
            if y_a != y_b:
                mixed += 1
                mixed_right += int((ratings[0] > ratings[1]) == (y_a > y_b) and ratings[0] != ratings[1])
        if log_metric is not None and judged:
            log_metric("parse_failure_rate", failures / judged)
            if mixed:
                log_metric("pair_accuracy", mixed_right / mixed)
        return out


def _drop_nan_metrics(metrics: dict) -> None:
    # A reward function that is "not applicable" to a whole phase logs a NaN mean; averaged in, it would turn the
    # logged value into NaN. Emptied lists are removed: GRPOTrainer.log divides by their length.
    for key in list(metrics):
        kept = [v for v in metrics[key] if not (isinstance(v, float) and math.isnan(v))]
        if kept:
            metrics[key][:] = kept
        else:
            del metrics[key]


class PairRLTrainer(GRPOTrainer):
    """GRPOTrainer whose policy also learns to judge pairs of its own current solutions (V1-PairRL).

    Args:
        model: as for `GRPOTrainer` (model id or `PreTrainedModel`).
        reward_funcs: the verifiable task: a `VerifiableTask` and/or plain TRL reward callables. The function at
            `args.correctness_reward_index` decides which solutions are correct (score >= `correct_threshold`).
            Reward models (str / nn.Module) are not supported: pair labels need verifiable correctness.
        args: a `PairRLConfig`.
        train_dataset: map-style dataset with a `prompt` column (plus whatever columns the task reads).
        Other arguments are passed to `GRPOTrainer`.

    The pairwise verification reward is appended as the last reward function (`pairwise_verification`), with weight
    1; λ scales the judge rows' advantages instead, so it acts even when advantages are group-normalised.
    """

    _tag_names: ClassVar[list[str]] = ["trl", "grpo", "pairrl", "hf_fastslow"]
    _name = "PairRL"

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: PairRLConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        **kwargs,
    ):
        check_grpo_hooks(PAIRRL_GRPO_HOOKS, "PairRLTrainer")
        if args is None:
            name = model if isinstance(model, str) else (getattr(model.config, "name_or_path", None) or "model")
            args = PairRLConfig(output_dir=f"{str(name).split('/')[-1] or 'model'}-PairRL")
        elif not isinstance(args, PairRLConfig):
            raise TypeError(f"PairRLTrainer needs a PairRLConfig, got {type(args).__name__} (PairRLConfig accepts "
                            "every GRPOConfig option).")
        args = trainer_owned_copy(args)  # reward_weights gains an entry below; the caller's config stays as passed
        if reward_funcs is None or (isinstance(reward_funcs, (list, tuple)) and not reward_funcs):
            raise ValueError("PairRLTrainer needs reward_funcs: the verifiable task (a VerifiableTask or reward "
                             "callables) that decides which solutions are correct.")
        funcs = list(reward_funcs) if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        for func in funcs:
            if isinstance(func, (str, torch.nn.Module)) or not callable(func):
                raise TypeError("PairRLTrainer builds judge labels from verifiable rewards; reward models "
                                f"({func if isinstance(func, str) else type(func).__name__}) are not supported.")
            call = func if inspect.isfunction(func) or inspect.ismethod(func) else type(func).__call__
            if inspect.iscoroutinefunction(call):
                raise TypeError(f"PairRLTrainer: async reward function {getattr(func, '__name__', func)!r} is not "
                                "supported; pass a synchronous one.")
        if args.correctness_reward_index >= len(funcs):
            raise ValueError(f"PairRLConfig.correctness_reward_index={args.correctness_reward_index} but only "
                             f"{len(funcs)} reward function(s) were given.")
        if train_dataset is None or not hasattr(train_dataset, "__len__"):
            raise ValueError("PairRLTrainer needs a map-style train_dataset (datasets.Dataset) with a 'prompt' "
                             f"column, got {type(train_dataset).__name__}.")
        if len(train_dataset) == 0:
            raise ValueError("PairRLTrainer: train_dataset is empty.")
        if "prompt" not in train_dataset[0]:
            raise ValueError(
                f"PairRLTrainer: train_dataset rows need a 'prompt' column (got {sorted(train_dataset[0])})."
            )
        if args.reward_weights is not None:
            if len(args.reward_weights) != len(funcs):
                raise ValueError(f"PairRLConfig.reward_weights has {len(args.reward_weights)} entries for "
                                 f"{len(funcs)} task reward function(s).")
            args.reward_weights = list(args.reward_weights) + [1.0]

        correctness = funcs[args.correctness_reward_index]
        if args.correct_threshold is not None:
            self.correct_threshold = float(args.correct_threshold)
        elif isinstance(correctness, VerifiableTask):
            self.correct_threshold = float(correctness.perfect_score)
        else:
            self.correct_threshold = 1.0
        self.task_reward_funcs = funcs
        self.verification_reward = PairwiseVerificationReward(args.reward_tolerance, args.require_both)
        super().__init__(
            model=model,
            reward_funcs=[SolverReward(f) for f in funcs] + [self.verification_reward],
            args=args,
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            reward_processing_classes=reward_processing_classes,
            callbacks=callbacks,
            optimizers=optimizers,
            peft_config=peft_config,
            **kwargs,
        )
        check_distributed_launch(self.accelerator, "PairRLTrainer (judge rows split over the ranks)")
        self._pairrl_rng = random.Random(args.seed)
        self._pairrl_solver_batch: dict[str, Any] | None = None
        self._pairrl_judging = False

    # -------------------------------------------------------------------------------------------------------------
    def _calculate_rewards(self, inputs, prompts, completions, completion_ids_list):
        rewards_per_func = super()._calculate_rewards(inputs, prompts, completions, completion_ids_list)
        if not self._pairrl_judging:
            # Judge rows are built from the whole group, which may span processes: keep the gathered view. Decided by
            # the phase, not by the rows: every rank must join these gathers (a rank holding only padding too).
            self._pairrl_solver_batch = {
                "inputs": gather_object(list(inputs)),
                "prompts": gather_object(list(prompts)),
                "completions": gather_object(list(completions)),
                "rewards_per_func": rewards_per_func.detach().cpu(),
            }
        return rewards_per_func

    def _generate_and_score_completions(self, inputs):
        self._pairrl_solver_batch = None
        solver_out = super()._generate_and_score_completions(inputs)
        metrics = grpo_metric_buffer(self)
        _drop_nan_metrics(metrics)
        if not self.model.training or self.args.verifier_weight == 0 or self._pairrl_solver_batch is None:
            return solver_out

        judge_rows = self._build_judge_rows(self._pairrl_solver_batch)
        self._pairrl_solver_batch = None
        if not judge_rows:
            metrics["verifier/judge_rows"].append(0.0)
            return solver_out
        # Every process built the same global list (same RNG, gathered inputs); each judges its own block once.
        world = self.accelerator.num_processes
        local_rows, real = judge_rows_for_rank(judge_rows, self.accelerator.process_index, world,
                                               self.num_generations, self.args.steps_per_generation)

        before = {k: len(v) for k, v in metrics.items()}
        self._pairrl_judging = True
        try:
            judge_out = super()._generate_and_score_completions(local_rows)
        finally:
            self._pairrl_judging = False
        if len(local_rows) * world > len(judge_rows):  # the same on every rank: all of them join the gather below
            self._mask_padding_rows(judge_out, real)
        # Both phases append to the same metric lists; move the judge phase's entries under "verifier/".
        for key in list(metrics):
            start = before.get(key, 0)
            new = metrics[key][start:]
            if new and not key.startswith("verifier/"):
                del metrics[key][start:]
                metrics[f"verifier/{key}"].extend(new)
        _drop_nan_metrics(metrics)
        metrics["verifier/judge_rows"].append(float(real))

        judge_out["advantages"] = judge_out["advantages"] * self.args.verifier_weight
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        return pairrl_merge_generation_batches(solver_out, judge_out, pad_token_id(tok))

    def _mask_padding_rows(self, judge_out: dict, real: int) -> None:
        """Take the judge batch's rows from `real` on (padding) out of the loss: no loss tokens, no advantage, and
        their tokens removed from `num_items_in_batch` (the DAPO normaliser, counted over every rank)."""
        mask = judge_out["completion_mask"]
        tool_mask = judge_out.get("tool_mask")
        loss_mask = mask if tool_mask is None else mask * tool_mask
        padding_tokens = loss_mask[real:].sum()
        mask[real:] = 0
        judge_out["advantages"][real:] = 0.0
        if "num_items_in_batch" in judge_out:
            judge_out["num_items_in_batch"] = judge_out["num_items_in_batch"] - self.accelerator.gather(
                padding_tokens.reshape(1)).sum()

    # -------------------------------------------------------------------------------------------------------------
    def _truncate_solution(self, text: str) -> tuple[str, bool]:
        limit = self.args.max_solution_tokens
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        if limit is None:
            return text, False
        ids = tok(text, add_special_tokens=False)["input_ids"]
        if len(ids) <= limit:
            return text, False
        return tok.decode(ids[:limit], skip_special_tokens=True), True

    def _judge_prompt(self, source_prompt, problem: str, solution_a: str, solution_b: str):
        text = self.args.judge_template.format(problem=problem, solution_a=solution_a, solution_b=solution_b)
        if isinstance(source_prompt, str):
            return text
        # Same system turn as the solver role, so both roles see one chat format (the card's SmolLM2 pitfall).
        system = [dict(m) for m in source_prompt if isinstance(m, dict) and m.get("role") == "system"]
        return system + [{"role": "user", "content": text}]

    def _build_judge_rows(self, batch: dict) -> list[dict]:
        """Judge rows for the whole (gathered) generation batch: each pair repeated `num_generations` times."""
        g = self.num_generations
        inputs, prompts, completions = batch["inputs"], batch["prompts"], batch["completions"]
        scores = batch["rewards_per_func"][:, self.args.correctness_reward_index].tolist()
        n_groups = len(inputs) // g
        rng = self._pairrl_rng
        pools: list[tuple[int, list[tuple[int, int]]]] = []
        for group in range(n_groups):
            idx = list(range(group * g, (group + 1) * g))
            correct = {i: (not math.isnan(scores[i])) and scores[i] >= self.correct_threshold for i in idx}
            known = [i for i in idx if not math.isnan(scores[i])]
            pairs = [
                (a, b)
                for k, a in enumerate(known)
                for b in known[k + 1 :]
                if correct[a] or correct[b] or not self.args.require_correct_in_pair
            ]
            if pairs:
                rng.shuffle(pairs)
                pools.append((group, pairs))
        metrics = grpo_metric_buffer(self)
        metrics["verifier/eligible_problem_frac"].append(len(pools) / max(n_groups, 1))
        if not pools:
            return []
        slots = n_groups * self.args.pairs_per_problem
        chosen: list[tuple[int, int]] = []
        order = list(range(len(pools)))
        rng.shuffle(order)
        cursor = [0] * len(pools)
        while len(chosen) < slots:
            for p in order:
                if len(chosen) == slots:
                    break
                pairs = pools[p][1]
                # Cycle through a problem's pairs; repeats only when every eligible pair is already in the batch.
                chosen.append(pairs[cursor[p] % len(pairs)])
                cursor[p] += 1
        rows: list[dict] = []
        truncated = 0
        for a, b in chosen:
            if self.args.swap_positions and rng.random() < 0.5:
                a, b = b, a
            sol_a, cut_a = self._truncate_solution(completion_text(completions[a]))
            sol_b, cut_b = self._truncate_solution(completion_text(completions[b]))
            truncated += int(cut_a) + int(cut_b)
            labels = [float(scores[a] >= self.correct_threshold), float(scores[b] >= self.correct_threshold)]
            source = inputs[a]
            row = {k: v for k, v in source.items() if k not in ("prompt", "image", "images")}
            row.update(
                prompt=self._judge_prompt(source["prompt"], prompt_text(prompts[a]), sol_a, sol_b),
                role=VERIFY_ROLE,
                pair_labels=labels,
            )
            rows.extend(dict(row) for _ in range(g))
        metrics["verifier/truncated_solutions"].append(float(truncated))
        metrics["verifier/mixed_pair_frac"].append(sum(1 for a, b in chosen if
                                                        (scores[a] >= self.correct_threshold)
                                                        != (scores[b] >= self.correct_threshold)) / len(chosen))
        return rows
