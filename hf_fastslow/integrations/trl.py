"""trl: the GRPOTrainer internals the rollout hooks and trainers (FST, PairRL, DAS) rely on, checked once."""

from __future__ import annotations

import contextlib
import functools
import inspect
from typing import Any

import torch


def trl_tokenize_prompts(trainer: Any, prompts: list, who: str = "This feature") -> list[list[int]]:
    """Prompt token ids exactly as GRPOTrainer builds its rollout prompts (chat template, tools); text-only prompts."""
    prompt_ids, images, multimodal_fields = trainer._tokenize_prompts(prompts)
    if images is not None or multimodal_fields:
        raise NotImplementedError(f"{who} supports text-only prompts (these prompts carry images or other media).")
    return [list(map(int, ids)) for ids in prompt_ids]


def trl_generation_context(trainer: Any):
    """The context GRPOTrainer generates under: unwrapped model, no grad, training generation kwargs applied."""
    import contextlib

    from trl.models.utils import unwrap_model_for_generation

    stack = contextlib.ExitStack()
    unwrap_kwargs = {"gather_deepspeed3_params": trainer.args.ds3_gather_for_generation}
    params = inspect.signature(unwrap_model_for_generation).parameters
    if "generation_kwargs" in params:
        unwrap_kwargs["generation_kwargs"] = getattr(trainer, "generation_kwargs", None)
    if "gradient_checkpointing_kwargs" in params:
        unwrap_kwargs["gradient_checkpointing_kwargs"] = trainer.args.gradient_checkpointing_kwargs
    model = stack.enter_context(
        unwrap_model_for_generation(trainer.model_wrapped, trainer.accelerator, **unwrap_kwargs)
    )
    stack.enter_context(torch.no_grad())
    dist = getattr(trainer, "_dist", None)
    if dist is not None and hasattr(dist, "summon_full_params"):
        stack.enter_context(dist.summon_full_params(trainer.model_wrapped, recurse=False))
    return stack, model


def trl_tokenizer(trainer: Any) -> Any:
    """The text tokenizer a GRPOTrainer generates with (its private `_tokenizer`, else the processing class, unwrapped
    from a processor)."""
    tok = getattr(trainer, "_tokenizer", None) or trainer.processing_class
    return getattr(tok, "tokenizer", tok)


def trl_pad_token_id(trainer: Any) -> int | None:
    """Deprecated, kept for one release: `hf_fastslow.generation.padding.pad_token_id(trl_tokenizer(trainer))`."""
    # Imported at call time: generation/ sits above this seam and imports it.
    from hf_fastslow.generation.padding import pad_token_id

    return pad_token_id(trl_tokenizer(trainer))

# [trainers] -- section start
# --- FST (hf_fastslow.trainers.fst_trainer): the trl 1.16 GRPOTrainer internals FSTTrainer relies on -------------
FST_GRPO_HOOKS = {
    # method -> leading parameters FSTTrainer's override expects (checked once, so a trl refactor fails loudly)
    "_generate_and_score_completions": ["self", "inputs"],
    "_load_optimizer_and_scheduler": ["self", "checkpoint"],
    "_tokenize_prompts": ["self", "prompts"],
}


def check_grpo_hooks(hooks: dict[str, list[str]], trainer_name: str) -> None:
    """Raise a clear error if this trl's GRPOTrainer lacks a hook (method and leading parameters) a subclass
    overrides: a trl refactor then fails at construction, not mid-training."""
    import trl
    from trl import GRPOTrainer

    for name, expected in hooks.items():
        fn = getattr(GRPOTrainer, name, None)
        params = list(inspect.signature(fn).parameters)[: len(expected)] if fn is not None else None
        if params != expected:
            raise RuntimeError(
                f"trl {trl.__version__}: GRPOTrainer.{name} is {'missing' if fn is None else params}; {trainer_name} "
                f"needs {name}({', '.join(expected)}, ...). Supported: trl>=1.10,<2."
            )


def trl_metric_buffer(trainer, mode: str) -> dict:
    """A trl trainer's per-logging-step metric lists for `mode` ("train" or "eval"; name -> list of floats), averaged
    and logged at the next logging step (GRPOTrainer, SFTTrainer and their subclasses keep them the same way)."""
    return trainer._metrics[mode]


def grpo_metric_buffer(trainer) -> dict:
    """GRPOTrainer's metric lists for the current mode (logged with `reward`, `kl`, ...)."""
    return trl_metric_buffer(trainer, "train" if trainer.model.training else "eval")


@functools.lru_cache(maxsize=1)
def grpo_loss_types() -> tuple[str, ...]:
    """The `loss_type` values this trl's GRPOConfig documents (trl only rejects unknown ones at the first loss)."""
    import dataclasses
    import re

    from trl import GRPOConfig

    field = {f.name: f for f in dataclasses.fields(GRPOConfig)}["loss_type"]
    help_text = field.metadata.get("help", "")
    match = re.search(r"Supported values are (.*?)\.\s", help_text)
    names = tuple(re.findall(r"'([a-z_]+)'", match.group(1))) if match else ()
    return names or ("grpo", "dr_grpo", "dapo", "bnpo", "cispo")


@contextlib.contextmanager
def fst_generation_model(trainer):
    """The trainer's policy unwrapped for `generate` (DeepSpeed/FSDP aware), in eval mode, without gradients.

    FST's fast rounds roll out outside GRPO's own generation path, which would count the tokens as training input
    and log them as training completions.
    """
    from trl.models import unwrap_model_for_generation

    with unwrap_model_for_generation(
        trainer.model_wrapped,
        trainer.accelerator,
        gather_deepspeed3_params=getattr(trainer.args, "ds3_gather_for_generation", True),
        gradient_checkpointing_kwargs=getattr(trainer.args, "gradient_checkpointing_kwargs", None),
    ) as model, torch.no_grad():
        was_training = model.training
        model.eval()
        try:
            yield model
        finally:
            model.train(was_training)


def fst_log_metric(trainer, name: str, value: float) -> None:
    """Add a scalar to the GRPOTrainer's per-logging-step metric buffer (averaged and logged with `reward`, `kl`...)."""
    grpo_metric_buffer(trainer)[name].append(float(value))


# --- PairRL (hf_fastslow.trainers.pairrl_trainer): two GRPO generation phases merged into one batch -------------
PAIRRL_GRPO_HOOKS = {
    "_generate_and_score_completions": ["self", "inputs"],
    "_calculate_rewards": ["self", "inputs", "prompts", "completions", "completion_ids_list"],
}
# Per-row tensors of GRPO's generation batch (trl 1.16) and how each pads when two batches are stacked:
# (side, pad value; None = the tokenizer's pad id). Anything else in the batch is refused (e.g. images).
_PAIRRL_PADDED_KEYS = {
    "prompt_ids": ("left", None),
    "prompt_mask": ("left", 0),
    "completion_ids": ("right", None),
    "completion_mask": ("right", 0),
    "tool_mask": ("right", 1),
    "old_per_token_logps": ("right", 0.0),
    "ref_per_token_logps": ("right", 0.0),
    "sampling_per_token_logps": ("right", 0.0),
    "importance_sampling_ratio": ("right", 1.0),
}


def pairrl_merge_generation_batches(first: dict, second: dict, pad_token_id: int) -> dict:
    """Stack two outputs of `GRPOTrainer._generate_and_score_completions` into one generation batch.

    Prompts are left-padded and completions right-padded to common widths (the layout GRPO's loss expects);
    `num_items_in_batch` (loss tokens over all processes, the DAPO/CISPO normaliser) is summed.
    """
    if set(first) != set(second):
        raise ValueError(f"PairRL: the two phases produced different batch keys: {sorted(set(first) ^ set(second))}.")
    merged = {}
    for key, a in first.items():
        b = second[key]
        if key == "num_items_in_batch":
            merged[key] = a + b
        elif key == "advantages":
            merged[key] = torch.cat([a, b], dim=0)
        elif key in _PAIRRL_PADDED_KEYS:
            side, value = _PAIRRL_PADDED_KEYS[key]
            value = pad_token_id if value is None else value
            if a.dim() == 1 or a.shape[1:] == b.shape[1:]:
                merged[key] = torch.cat([a, b], dim=0)
                continue
            width = max(a.shape[1], b.shape[1])
            parts = []
            for t in (a, b):
                extra = width - t.shape[1]
                filler = torch.full((t.shape[0], extra), value, dtype=t.dtype, device=t.device)
                parts.append(torch.cat([filler, t] if side == "left" else [t, filler], dim=1))
            merged[key] = torch.cat(parts, dim=0)
        else:
            raise NotImplementedError(
                f"PairRL: cannot merge generation-batch entry {key!r} (multimodal/tool inputs are not supported)."
            )
    return merged


# [trainers] -- section end
