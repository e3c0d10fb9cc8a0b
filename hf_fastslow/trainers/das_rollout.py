"""TRL glue of DAS (`hf_fastslow.generation.das`): a `GRPOTrainer(rollout_func=...)` that generates rollouts with
`speculative_generate` and a `DASDrafter`, and a `TrainerCallback` that moves a `SuffixHistory` to every training
step. Moved here from `hf_fastslow.generation.das`, which re-exports both names for one release."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

from ..generation.das import DASDrafter, SuffixHistory
from ..generation.padding import cut_at_eos, left_pad, pad_token_id

__all__ = ["DASWindowCallback", "das_rollout_func"]


def das_rollout_func(
    drafter: DASDrafter, batch_size: int | None = None, *, share_across_ranks: bool = True,
    max_shared_rollouts: int | None = None,
) -> Callable[[list, Any], dict]:
    """A TRL `GRPOTrainer(rollout_func=...)` that generates rollouts with `speculative_generate` + `drafter`.

    Prompts are tokenized exactly as GRPOTrainer does (chat template, tools) and generated in left-padded batches of
    `batch_size` rows (default: all prompts at once) with the trainer's generation config, so sampling settings are
    unchanged and the result is distributed as plain GRPO rollouts. GRPO siblings share a problem id (hash of the
    prompt ids): a sibling that finishes early is indexed before the others finish. One call is one round
    of the history window (one sighting of each of its prompts, however many generate calls `batch_size` splits it
    into), so a prompt drafts from its rollouts of the last `window_sightings` times it was sampled (earlier epochs).
    The history also follows `trainer.state.global_step` (`begin_step`; evicts by age only with `window_steps`).
    Returns `prompt_ids`, `completion_ids` (up to and including the first EOS) and `logprobs=None`, like TRL's
    transformers path.

    Several processes (`torchrun` / `accelerate launch`): with `share_across_ranks` (default) a rank's finished
    rollouts are staged during the call (its own siblings still draft from them at once) and, after generation, every
    rank's rollouts are all-gathered and added to the history in rank order on every rank, so all ranks hold the same
    history (same tries, same length estimates) and draft from every rank's rollouts: drafting quality does not fall
    with the number of ranks. `max_shared_rollouts` bounds what one rank sends per call (its first finished rollouts;
    default: all, i.e. its generation batch). `share_across_ranks=False` keeps a history per process (the comparison
    in docs/scaling.md). Needs an all-gather of Python objects (gloo / NCCL; not XLA).

    Set `TRL_EXPERIMENTAL_SILENCE=1` to silence TRL's experimental-API warning for `rollout_func`.
    """
    from ..generation.speculative import speculative_generate
    from ..integrations import trl_generation_context, trl_tokenize_prompts, trl_tokenizer

    if not isinstance(drafter, DASDrafter):
        raise TypeError(f"`drafter` must be a DASDrafter, got {type(drafter).__name__}.")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"`batch_size` must be >= 1, got {batch_size}.")
    if max_shared_rollouts is not None and max_shared_rollouts < 1:
        raise ValueError(f"`max_shared_rollouts` must be >= 1 or None, got {max_shared_rollouts}.")
    checked: set[int] = set()

    def rollout_func(prompts: list, trainer: Any) -> dict:
        from .distributed import all_gather_objects, check_distributed_launch

        if id(trainer) not in checked:
            check_distributed_launch(trainer.accelerator, "das_rollout_func", needs_object_gather=share_across_ranks)
            checked.add(id(trainer))
        sharing = share_across_ranks and trainer.accelerator.num_processes > 1
        step = int(trainer.state.global_step)
        if step > drafter.history.step:
            drafter.history.begin_step(step)
        prompt_ids = trl_tokenize_prompts(trainer, prompts, "The DAS rollout function")
        pad_id = pad_token_id(trl_tokenizer(trainer))
        eos_ids = trainer.generation_config.eos_token_id
        completions: list[list[int]] = []
        stack, model = trl_generation_context(trainer)
        staging = drafter.staged_recording() if sharing else contextlib.nullcontext()
        with stack, drafter.same_round(), staging as staged:
            device = next(model.parameters()).device
            size = batch_size or len(prompt_ids)
            for start in range(0, len(prompt_ids), size):
                chunk = prompt_ids[start : start + size]
                ids, mask = left_pad(chunk, pad_id, device=device)
                width = ids.shape[1]
                out = model.generate(
                    input_ids=ids, attention_mask=mask,
                    generation_config=trainer.generation_config,
                    custom_generate=speculative_generate, drafter=drafter,
                )
                completions.extend(cut_at_eos(row, eos_ids) for row in out[:, width:].tolist())
        if sharing:
            mine = staged.finished if max_shared_rollouts is None else staged.finished[:max_shared_rollouts]
            for rank_rollouts in all_gather_objects(mine):  # rank order: the same history on every rank
                drafter.publish_rollouts(rank_rollouts)
        return {"prompt_ids": prompt_ids, "completion_ids": completions, "logprobs": None}

    return rollout_func


def _trainer_callback_base():
    from transformers import TrainerCallback

    return TrainerCallback


class DASWindowCallback(_trainer_callback_base()):
    """A `TrainerCallback` that moves a `SuffixHistory` to every new training step (`begin_step`: a new round, and
    with `window_steps` the step-age eviction).

    Only needed when rollouts are produced outside `das_rollout_func` (which follows the step itself)."""

    def __init__(self, history: SuffixHistory):
        self.history = history

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step > self.history.step:
            self.history.begin_step(state.global_step)
