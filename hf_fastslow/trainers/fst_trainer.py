"""Fast-Slow Training (Tiwari et al., "Learning, Fast and Slow: Towards LLMs That Adapt Continually", arXiv 2605.12484).

Slow weights: the model parameters, trained by trl's GRPOTrainer (CISPO loss by default). Fast weights: a pool of
system contexts improved by reflective prompt optimization (GEPA-style: Pareto-frontier parent selection, minibatch
evaluation, reflection on the evaluator's feedback text, strict-improvement acceptance). A fast round runs before the
first optimizer step and then every `fast_every_steps` steps; in between, every RL rollout is generated under a
context from the frontier (several contexts mixed inside each group of `num_generations`, so one group-relative
advantage covers them, and the loss conditions on the context: the weights learn *with* the prompt).
"""

from __future__ import annotations

import json
import math
import os
import random
import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from trl import GRPOTrainer

from ..generation.padding import cut_at_eos, left_pad, pad_token_id
from ..integrations import FST_GRPO_HOOKS, check_grpo_hooks, fst_generation_model, fst_log_metric, trl_tokenize_prompts
from ..model_card import save_model_card
from .config_checks import trainer_owned_copy
from .distributed import all_gather_objects, check_distributed_launch, rank_shard, unshard
from .fst_config import FSTConfig
from .reflection import Reflector, make_reflector
from .tasks import VerifiableTask, completion_text, feedback_for_reward_funcs, prompt_text

FST_STATE_FILE = "fst_state.json"
FST_PAPER = 'Tiwari et al., "Learning, Fast and Slow: Towards LLMs That Adapt Continually", arXiv 2605.12484'
_STATE_VERSION = 1


def apply_context(prompt: Any, context: str) -> Any:
    """`prompt` with `context` as its system instruction.

    Conversational prompts get (or have replaced) a leading system turn; an empty context removes it, so the chat
    template's own default applies. Plain-text prompts get the context prepended.
    """
    if isinstance(prompt, str):
        return f"{context}\n\n{prompt}" if context else prompt
    turns = list(prompt)
    if turns and isinstance(turns[0], dict) and turns[0].get("role") == "system":
        turns = turns[1:]
    return ([{"role": "system", "content": context}] if context else []) + turns


def load_fast_context(directory: str | os.PathLike) -> str:
    """The learned context saved by `FSTTrainer` (checkpoint or `save_model` folder), to prepend at inference."""
    with open(os.path.join(directory, FST_STATE_FILE)) as f:
        return json.load(f)["fast_context"]


def _json_rng_state(state: tuple) -> list:
    version, internal, gauss = state
    return [version, list(internal), gauss]


def _rng_state_from_json(state: list) -> tuple:
    version, internal, gauss = state
    return (version, tuple(internal), gauss)


class FSTTrainer(GRPOTrainer):
    """`GRPOTrainer` whose rollouts run under a learned system context (the fast weights).

    Args (beyond `GRPOTrainer`'s):
        reward_funcs: `VerifiableTask`s (score + feedback text) and/or plain TRL reward functions (their feedback is
            the score). Reward *models* are not supported: the fast rounds need callable evaluators.
        reflector (`Reflector`, `nn.Module`, callable or `str`, *optional*): overrides `args.reflection_model`
            (default `"frozen"`: a frozen copy of `model` as passed in, made here, so reflection does not drift with
            RL; `"policy"` reflects with the trained weights). A model object is used frozen with this trainer's
            tokenizer; a callable is `fn(current_context, records) -> new_context`.
        pareto_dataset (`Dataset`, *optional*): problems that score the candidates; default `args.pareto_set_size`
            rows drawn from `train_dataset`.

    After training, `trainer.fast_context` is the best context on the Pareto set; `trainer.fast_pool` and
    `trainer.fast_scores` hold all candidates and their per-item scores, `trainer.fast_history` every proposal.

    Overridable hooks: `rollout_contexts` (which candidate each rollout uses), `select_parent`,
    `build_reflective_records`, `fast_round`.

    Several processes (`torchrun` / `accelerate launch`): one pool for all ranks. Fast-round rows are split over the
    ranks and the results all-gathered (`evaluate_context_across_ranks`), the reflector runs on the main process and
    its proposal is broadcast, and every rank adopts rank 0's state after a round; the state is saved once and read
    by every rank on resume (a 2-rank checkpoint resumes on 1 process). A launch where the processes do not see each
    other (e.g. `torchrun` on CPU without `use_cpu=True`) is refused (`MisconfiguredLaunchError`).
    """

    _tag_names = ["trl", "grpo", "fst", "hf_fastslow"]
    _name = "FST"

    def __init__(
        self,
        model,
        reward_funcs=None,
        args: FSTConfig | None = None,
        train_dataset=None,
        eval_dataset=None,
        processing_class=None,
        reward_processing_classes=None,
        callbacks=None,
        optimizers=(None, None),
        peft_config=None,
        reflector: Reflector | torch.nn.Module | Callable | str | None = None,
        pareto_dataset=None,
        **kwargs,
    ):
        check_grpo_hooks(FST_GRPO_HOOKS, "FSTTrainer")
        if args is None:
            name = model if isinstance(model, str) else (getattr(model.config, "name_or_path", None) or "model")
            args = FSTConfig(output_dir=f"{str(name).split('/')[-1] or 'model'}-FST")
        elif not isinstance(args, FSTConfig):
            raise TypeError(f"FSTTrainer needs an FSTConfig, got {type(args).__name__} (FSTConfig accepts every "
                            "GRPOConfig option).")
        args = trainer_owned_copy(args)  # GRPOTrainer adjusts some options in place; the caller's config stays intact
        if reward_funcs is None or (isinstance(reward_funcs, (list, tuple)) and not reward_funcs):
            raise ValueError("FSTTrainer needs reward_funcs: a VerifiableTask or TRL reward functions.")
        funcs = reward_funcs if isinstance(reward_funcs, (list, tuple)) else [reward_funcs]
        for func in funcs:
            if isinstance(func, (str, torch.nn.Module)):
                raise TypeError("FSTTrainer's fast rounds score candidates with callable evaluators; reward models "
                                f"({func if isinstance(func, str) else type(func).__name__}) are not supported.")
        for name, ds in (("train_dataset", train_dataset), ("pareto_dataset", pareto_dataset)):
            if ds is None and name == "pareto_dataset":
                continue
            if ds is None or not hasattr(ds, "__len__"):
                raise ValueError(f"FSTTrainer needs a map-style {name} (a datasets.Dataset or list of rows), got "
                                 f"{type(ds).__name__}.")
            if len(ds) == 0:
                raise ValueError(f"FSTTrainer: {name} is empty.")
            if "prompt" not in ds[0]:
                raise ValueError(f"FSTTrainer: {name} rows need a 'prompt' column (got {sorted(ds[0])}).")

        super().__init__(
            model=model, reward_funcs=reward_funcs, args=args, train_dataset=train_dataset, eval_dataset=eval_dataset,
            processing_class=processing_class, reward_processing_classes=reward_processing_classes,
            callbacks=callbacks, optimizers=optimizers, peft_config=peft_config, **kwargs,
        )
        check_distributed_launch(self.accelerator, "FSTTrainer (one fast-context pool for all ranks)")
        if isinstance(reflector, torch.nn.Module) and (reflector is model or reflector is self.model):
            # Freezing the trained model itself would stop RL; the live policy as reflector is spelled "policy".
            raise ValueError("FSTTrainer: reflector= is the model being trained; pass reflector='policy' to reflect "
                             "with the trained weights, or a separate model to reflect with a frozen one.")
        # Built after GRPOTrainer has loaded / PEFT-wrapped the model, so "frozen" copies the policy RL starts from.
        self.reflector = make_reflector(
            reflector if reflector is not None else args.reflection_model,
            policy=self.model, tokenizer=getattr(self.processing_class, "tokenizer", self.processing_class),
            endpoint_model=args.reflection_endpoint_model, api_key_env=args.reflection_api_key_env,
            max_new_tokens=args.reflection_max_new_tokens, temperature=args.reflection_temperature,
        )
        self._fst_rng = random.Random(args.seed)
        self._fst_train_rows = train_dataset
        if pareto_dataset is not None:
            self._pareto_source, self._pareto_rows = "pareto_dataset", pareto_dataset
            self._pareto_indices = list(range(len(pareto_dataset)))
        else:
            self._pareto_source, self._pareto_rows = "train_dataset", train_dataset
            k = min(args.pareto_set_size, len(train_dataset))
            self._pareto_indices = sorted(self._fst_rng.sample(range(len(train_dataset)), k))
        seed = args.seed_context
        if seed is None:
            first = train_dataset[0]["prompt"]
            has_system = not isinstance(first, str) and first and first[0].get("role") == "system"
            seed = first[0]["content"] if has_system else ""
        self.fast_pool: list[str] = [seed]
        self.fast_scores: list[list[float]] = []  # [candidate][pareto item]; filled by the first fast round
        self.fast_history: list[dict[str, Any]] = []
        self._fast_rounds_done = 0
        self.fast_rollouts = 0  # generations spent by fast rounds (not RL rollouts); reported for fair budgets
        tasks = [f for f in funcs if isinstance(f, VerifiableTask)]
        self._perfect_score = tasks[0].perfect_score if len(tasks) == len(funcs) and len(funcs) == 1 else None

    # ---------------------------------------------------------------------------------------------------------------
    # The fast weights
    # ---------------------------------------------------------------------------------------------------------------
    @property
    def fast_context(self) -> str:
        """The best context: highest mean Pareto-set score (the oldest wins ties, so unproven edits never take over)."""
        if not self.fast_scores:
            return self.fast_pool[0]
        return self.fast_pool[self._ranked_candidates()[0]]

    def _mean_score(self, m: int) -> float:
        row = self.fast_scores[m]
        return sum(row) / len(row) if row else 0.0

    def _ranked_candidates(self) -> list[int]:
        return sorted(range(len(self.fast_pool)), key=lambda m: (-self._mean_score(m), m))

    def pareto_frontier(self) -> dict[int, int]:
        """Candidate index -> number of Pareto items on which it is (jointly) best; dominated candidates omitted."""
        if not self.fast_scores:
            return {0: 1}
        n_items = len(self.fast_scores[0])
        wins = {m: 0 for m in range(len(self.fast_pool))}
        for i in range(n_items):
            best = max(row[i] for row in self.fast_scores)
            for m, row in enumerate(self.fast_scores):
                if row[i] == best:
                    wins[m] += 1
        front = {m: w for m, w in wins.items() if w > 0}

        def dominated(a: int) -> bool:
            ra = self.fast_scores[a]
            for b in front:
                rb = self.fast_scores[b]
                if b != a and all(x >= y for x, y in zip(rb, ra)) and any(x > y for x, y in zip(rb, ra)):
                    return True
            return False

        kept = {m: w for m, w in front.items() if not dominated(m)}
        return kept or {self._ranked_candidates()[0]: 1}

    def select_parent(self) -> int:
        """GEPA's Pareto sampling: a frontier candidate, with probability proportional to the items it is best on."""
        front = self.pareto_frontier()
        ids = sorted(front)
        return self._fst_rng.choices(ids, weights=[front[m] for m in ids], k=1)[0]

    def rollout_contexts(self, num_rows: int) -> list[int]:
        """Candidate index for each of the `num_rows` local rollout rows (rows come in groups of `num_generations`)."""
        if self.args.prompt_sampling == "best" or not self.fast_scores:
            best = self._ranked_candidates()[0] if self.fast_scores else 0
            return [best] * num_rows
        front = self.pareto_frontier()
        ranked = [m for m in self._ranked_candidates() if m in front]
        k = min(len(ranked), self.args.prompts_per_problem or self.num_generations)
        ranked = ranked[:k]
        offset = self.accelerator.process_index * num_rows  # global row index -> slot inside its group
        return [ranked[((offset + i) % self.num_generations) % k] for i in range(num_rows)]

    # ---------------------------------------------------------------------------------------------------------------
    # Rollouts for the fast rounds
    # ---------------------------------------------------------------------------------------------------------------
    def _generate_under_context(self, model, context: str, rows: Sequence[dict]) -> tuple[list, list, list]:
        prompts = [apply_context(r["prompt"], context) for r in rows]
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        pad_id = pad_token_id(tok)
        eos_ids = set(self.eos_token_ids) if getattr(self, "eos_token_ids", None) else {tok.eos_token_id}
        device = next(model.parameters()).device
        gen_kwargs: dict[str, Any] = {
            "max_new_tokens": self.args.max_completion_length, "do_sample": self.args.fast_eval_do_sample,
            "pad_token_id": pad_id, "eos_token_id": sorted(eos_ids),
        }
        if self.args.fast_eval_do_sample:
            gen_kwargs.update(temperature=self.args.temperature, top_p=self.args.top_p)
        else:  # the model's own sampling defaults would only raise "flag ignored" warnings under greedy decoding
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        completion_ids: list[list[int]] = []
        bs = self.args.fast_eval_batch_size
        for start in range(0, len(prompts), bs):
            ids = trl_tokenize_prompts(self, prompts[start:start + bs], "FSTTrainer's fast rounds")
            input_ids, attention = left_pad(ids, pad_id, device=device)
            width = input_ids.shape[1]
            out = model.generate(input_ids=input_ids, attention_mask=attention, **gen_kwargs)[:, width:].tolist()
            completion_ids.extend(cut_at_eos(seq, eos_ids) for seq in out)
        self.fast_rollouts += len(prompts)
        texts = [tok.decode(ids, skip_special_tokens=True) for ids in completion_ids]
        conversational = not isinstance(prompts[0], str)
        completions = [[{"role": "assistant", "content": t}] for t in texts] if conversational else texts
        return prompts, completions, completion_ids

    def evaluate_context(self, model, context: str, rows: Sequence[dict]) -> list[dict[str, Any]]:
        """Roll out `context` on `rows`: per row the input, output text, score (None = not applicable), feedback."""
        prompts, completions, completion_ids = self._generate_under_context(model, context, rows)
        columns = {k: [r[k] for r in rows] for k in rows[0] if k != "prompt"}
        # Same columns as RL rollouts get; -1 marks a proposal that is not (yet) in the pool.
        columns["fast_context_id"] = [self.fast_pool.index(context) if context in self.fast_pool else -1] * len(rows)
        weights = self.args.reward_weights
        results = feedback_for_reward_funcs(
            self.reward_funcs, weights, prompts, completions, completion_ids,
            trainer_state=self.state, log_extra=lambda *a, **k: None, log_metric=lambda *a, **k: None, **columns,
        )
        return [
            {"Inputs": prompt_text(r["prompt"]), "Generated Outputs": completion_text(c), "Score": s, "Feedback": f}
            for r, c, (s, f) in zip(rows, completions, results, strict=True)
        ]

    def evaluate_context_across_ranks(self, model, context: str, rows: Sequence[dict]) -> list[dict[str, Any]]:
        """`evaluate_context` with the rows split over the ranks and the results all-gathered: every rank gets the
        same results (each row rolled out once, on one rank), so every fast-round decision is the same everywhere.
        Every rank must call it (it is a collective)."""
        world = self.accelerator.num_processes
        if world == 1:
            return self.evaluate_context(model, context, rows)
        local = rank_shard(list(rows), self.accelerator.process_index, world)
        mine = self.evaluate_context(model, context, local) if local else []
        self.fast_rollouts += len(rows) - len(local)  # count every rank's generations on every rank
        return unshard(all_gather_objects(mine), len(rows))

    def _propose_on_main(self, parent: str, records: list[dict]) -> str:
        """The reflector runs on the main process only; the other ranks receive its proposal."""
        if self.accelerator.num_processes == 1:
            return self.reflector.propose(parent, records)
        box = [self.reflector.propose(parent, records) if self.accelerator.is_main_process else None]
        broadcast_object_list(box, from_process=0)
        return box[0]

    @staticmethod
    def _total(results: Sequence[dict]) -> float:
        return sum(r["Score"] for r in results if r["Score"] is not None and not math.isnan(r["Score"]))

    def _score_on_pareto(self, model, context: str) -> list[float]:
        rows = [self._pareto_rows[i] for i in self._pareto_indices]
        results = self.evaluate_context_across_ranks(model, context, rows)
        return [0.0 if r["Score"] is None else float(r["Score"]) for r in results]

    def build_reflective_records(self, results: Sequence[dict]) -> list[dict]:
        """What the reflector sees: every minibatch item (failures carry the information, successes the contrast)."""
        return list(results)

    def _reject_reason(self, child: str, parent: str) -> str | None:
        if not child.strip():
            return "empty proposal"
        if child.strip() == parent.strip() or child in self.fast_pool:
            return "no change"
        tok = getattr(self.processing_class, "tokenizer", self.processing_class)
        if len(tok(child, add_special_tokens=False)["input_ids"]) > self.args.max_context_tokens:
            return "over max_context_tokens"
        return None

    def _prune_pool(self) -> None:
        while len(self.fast_pool) > self.args.max_pool_size:
            front, best = self.pareto_frontier(), self._ranked_candidates()[0]
            victim = min((m for m in range(len(self.fast_pool)) if m != best),
                         key=lambda m: (front.get(m, 0), self._mean_score(m), -m))
            del self.fast_pool[victim], self.fast_scores[victim]

    def fast_round(self) -> dict[str, Any]:
        """One reflective prompt-optimization round under the current slow weights; returns its summary."""
        args, start = self.args, time.perf_counter()
        accepted = proposals = 0
        with fst_generation_model(self) as model:
            self.reflector.bind_policy(model, getattr(self.processing_class, "tokenizer", self.processing_class))
            if not self.fast_scores or args.rescore_frontier_each_round:
                self.fast_scores = [self._score_on_pareto(model, c) for c in self.fast_pool]
            while accepted < args.candidates_per_round and proposals < args.max_proposals_per_round:
                proposals += 1
                parent = self.select_parent()
                n = min(args.reflection_minibatch_size, len(self._fst_train_rows))
                batch = [self._fst_train_rows[i] for i in self._fst_rng.sample(range(len(self._fst_train_rows)), n)]
                parent_results = self.evaluate_context_across_ranks(model, self.fast_pool[parent], batch)
                event = {"step": self.state.global_step, "parent": parent, "parent_score": self._total(parent_results)}
                scores = [r["Score"] for r in parent_results]
                if self._perfect_score is not None and all(s is not None and s >= self._perfect_score for s in scores):
                    self.fast_history.append({**event, "outcome": "skipped: minibatch already solved"})
                    continue
                child = self._propose_on_main(self.fast_pool[parent], self.build_reflective_records(parent_results))
                reason = self._reject_reason(child, self.fast_pool[parent])
                if reason is not None:
                    self.fast_history.append({**event, "outcome": f"rejected: {reason}"})
                    continue
                child_total = self._total(self.evaluate_context_across_ranks(model, child, batch))
                event.update(child=child, child_score=child_total)
                # Strict improvement on the same minibatch (GEPA): ties keep the pool unchanged.
                if child_total > event["parent_score"]:
                    self.fast_pool.append(child)
                    self.fast_scores.append(self._score_on_pareto(model, child))
                    accepted += 1
                    self.fast_history.append({**event, "outcome": "accepted"})
                    self._prune_pool()
                else:
                    self.fast_history.append({**event, "outcome": "rejected: not better on minibatch"})
        if self.accelerator.num_processes > 1:
            # Every decision above already used gathered results and rank 0's proposals; adopting rank 0's state also
            # covers subclasses whose hooks (select_parent, build_reflective_records) draw per-rank randomness.
            state = [self._fst_state()]
            broadcast_object_list(state, from_process=0)
            self._load_fst_state(state[0])
        summary = {"fast/proposals": proposals, "fast/rollouts_total": self.fast_rollouts, "fast/accepted": accepted,
                   "fast/pool_size": len(self.fast_pool),
                   "fast/frontier_size": len(self.pareto_frontier()),
                   "fast/best_pareto_score": self._mean_score(self._ranked_candidates()[0]),
                   "fast/round_seconds": time.perf_counter() - start}
        for key, value in summary.items():
            fst_log_metric(self, key, value)
        return summary

    # ---------------------------------------------------------------------------------------------------------------
    # GRPOTrainer hooks
    # ---------------------------------------------------------------------------------------------------------------
    def _generate_and_score_completions(self, inputs):
        if self.model.training:
            # Round k runs before optimizer step k*T + 1 (the first before any RL), as in the paper's schedule.
            if self.state.global_step >= self._fast_rounds_done * self.args.fast_every_steps:
                self.fast_round()
                self._fast_rounds_done = self.state.global_step // self.args.fast_every_steps + 1
            ids = self.rollout_contexts(len(inputs))
            fst_log_metric(self, "fast/contexts_per_batch", len(set(ids)))
        else:
            best = self._ranked_candidates()[0] if self.fast_scores else 0
            ids = [best] * len(inputs)
        inputs = [
            {**row, "prompt": apply_context(row["prompt"], self.fast_pool[m]), "fast_context_id": m}
            for row, m in zip(inputs, ids, strict=True)
        ]
        return super()._generate_and_score_completions(inputs)

    def _fst_state(self) -> dict[str, Any]:
        return {
            "version": _STATE_VERSION,
            "fast_context": self.fast_context,
            "pool": list(self.fast_pool),
            "scores": [list(r) for r in self.fast_scores],
            "pareto_source": self._pareto_source,
            "pareto_indices": list(self._pareto_indices),
            "rounds_done": self._fast_rounds_done,
            "fast_rollouts": self.fast_rollouts,
            "global_step": self.state.global_step,
            "history": self.fast_history,
            "rng_state": _json_rng_state(self._fst_rng.getstate()),
        }

    def _load_fst_state(self, state: dict[str, Any]) -> None:
        if state.get("version") != _STATE_VERSION:
            raise ValueError(f"{FST_STATE_FILE} has version {state.get('version')}; this hf_fastslow reads "
                             f"{_STATE_VERSION}.")
        if state["pareto_source"] != self._pareto_source or (
            state["pareto_source"] == "pareto_dataset" and len(state["pareto_indices"]) != len(self._pareto_rows)
        ):
            raise ValueError("The checkpoint's Pareto set does not match this trainer's (pass the same "
                             "pareto_dataset, or none, when resuming).")
        self.fast_pool = list(state["pool"])
        self.fast_scores = [list(r) for r in state["scores"]]
        self._pareto_indices = list(state["pareto_indices"])
        self._fast_rounds_done = int(state["rounds_done"])
        self.fast_rollouts = int(state.get("fast_rollouts", 0))
        self.fast_history = list(state["history"])
        self._fst_rng.setstate(_rng_state_from_json(state["rng_state"]))

    def _load_optimizer_and_scheduler(self, checkpoint):
        super()._load_optimizer_and_scheduler(checkpoint)
        if checkpoint is not None:
            path = os.path.join(checkpoint, FST_STATE_FILE)
            if not os.path.isfile(path):
                raise FileNotFoundError(f"{path} is missing: {checkpoint} was not written by FSTTrainer, so the fast "
                                        "context cannot be restored.")
            with open(path) as f:
                self._load_fst_state(json.load(f))

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False):
        # Trainer checkpoints go through save_model too, so this covers both checkpoints and final saves.
        super().save_model(output_dir, _internal_call=_internal_call)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if self.args.should_save:
            os.makedirs(output_dir, exist_ok=True)
            with open(os.path.join(output_dir, FST_STATE_FILE), "w") as f:
                json.dump(self._fst_state(), f, indent=1)
            self._write_card(output_dir)

    def create_model_card(self, model_name: str | None = None, dataset_name: str | None = None, tags=None, **kwargs):
        if self.args.should_save:
            self._write_card(self.args.output_dir)

    def _write_card(self, directory: str) -> None:
        base = getattr(getattr(self.model, "config", None), "name_or_path", None) or None
        if base and os.path.isdir(base):
            # A local folder is not a Hub id; the converted default model is known by its Hub name.
            from ..default_model import DEFAULT_MODEL_ID

            base = DEFAULT_MODEL_ID if os.path.isfile(os.path.join(base, "hf_fastslow_stamp.txt")) else None
        best = self._ranked_candidates()[0] if self.fast_scores else 0
        figures = {"global_step": self.state.global_step, "fast_rounds": self._fast_rounds_done,
                   "contexts_in_pool": len(self.fast_pool)}
        if self.fast_scores:
            figures["fast_context_pareto_score"] = self._mean_score(best)
            figures["seed_context_pareto_score"] = self._mean_score(0)
        context = self.fast_context or "(empty: the chat template's default system prompt)"
        save_model_card(
            directory, base_model=base, method="FST", paper=FST_PAPER, tags=["trl", "grpo", "fst"], figures=figures,
            description="Trained with hf_fastslow's FSTTrainer: RL on the weights (slow) interleaved with reflective "
                        "optimization of a system context (fast). Use the model *with* the learned context below.",
            usage=(
                "from hf_fastslow.trainers import load_fast_context\n"
                "context = load_fast_context('<this folder>')\n"
                "messages = [{'role': 'system', 'content': context}, {'role': 'user', 'content': question}]"
            ),
            extra_sections={"Fast context (learned system prompt)": "```text\n" + context + "\n```"},
        )
