"""Verifiable tasks for the RL trainers: a reward *and* a textual feedback per completion.

A `VerifiableTask` is also a plain TRL reward function (`task(prompts, completions, **columns) -> list[float | None]`),
so it can be passed to any `GRPOTrainer`; trainers that learn from text (FST's reflective prompt optimization) call
`task.score_with_feedback(...)` instead to get the feedback string as well. Plain TRL reward functions keep working:
`feedback_for_reward_funcs` turns their scores into feedback ("score: 0.5").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

# Keyword arguments TRL adds for every reward function call; they are not dataset columns.
TRL_REWARD_CONTROL_KWARGS = ("trainer_state", "log_extra", "log_metric", "environments")


def completion_text(completion: Any) -> str:
    """The generated text of one completion, conversational (`[{"role": "assistant", ...}]`) or plain."""
    if isinstance(completion, str):
        return completion
    if isinstance(completion, (list, tuple)):
        parts = []
        for message in completion:
            content = message.get("content", "") if isinstance(message, dict) else message
            if isinstance(content, list):  # content blocks
                content = "".join(b.get("text", "") for b in content if isinstance(b, dict))
            parts.append(str(content))
        return "".join(parts)
    return str(completion)


def prompt_text(prompt: Any) -> str:
    """The user-visible text of a prompt (the last user turn of a conversation, or the string itself)."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, (list, tuple)):
        users = [m for m in prompt if isinstance(m, dict) and m.get("role") == "user"]
        return completion_text(users[-1:] if users else prompt)
    return str(prompt)


class VerifiableTask:
    """A task whose evaluator returns `(score, feedback_text)` for each completion.

    Subclasses implement `score(prompt, completion, **columns)`; `completion` is the generated text, `columns` are the
    dataset columns of that row (e.g. `answer`). Return `(None, feedback)` when the task does not apply to a row
    (TRL's "not applicable": the reward becomes NaN and is ignored by the trainer).
    """

    #: Score at or above which a completion counts as solved (reflection skips minibatches with no failure).
    perfect_score: float = 1.0

    def score(self, prompt: Any, completion: str, **columns: Any) -> tuple[float | None, str]:
        raise NotImplementedError

    @property
    def __name__(self) -> str:  # TRL names reward functions by `__name__` in its logs
        return type(self).__name__

    def score_with_feedback(
        self, prompts: Sequence[Any], completions: Sequence[Any], **kwargs: Any
    ) -> list[tuple[float | None, str]]:
        """`(score, feedback)` per completion; `kwargs` maps each dataset column to one value per completion."""
        columns = {k: v for k, v in kwargs.items() if k not in TRL_REWARD_CONTROL_KWARGS and k != "completion_ids"}
        out = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            row = {k: v[i] for k, v in columns.items()}
            score, feedback = self.score(prompt, completion_text(completion), **row)
            out.append((None if score is None else float(score), str(feedback)))
        return out

    def __call__(self, prompts, completions, completion_ids=None, **kwargs) -> list[float | None]:
        return [s for s, _ in self.score_with_feedback(prompts, completions, **kwargs)]


def feedback_for_reward_funcs(
    reward_funcs: Sequence[Callable],
    reward_weights: Sequence[float] | None,
    prompts: Sequence[Any],
    completions: Sequence[Any],
    completion_ids: Sequence[Any] | None = None,
    **kwargs: Any,
) -> list[tuple[float | None, str]]:
    """Weighted score and feedback per completion for a mix of `VerifiableTask`s and plain reward functions.

    Follows TRL's aggregation (weighted sum over functions, `None` ignored; `None` overall if every function said
    "not applicable"). Feedback is the tasks' feedback text; for plain functions it defaults to the score.
    """
    weights = list(reward_weights) if reward_weights is not None else [1.0] * len(reward_funcs)
    n = len(completions)
    per_func: list[list[tuple[float | None, str | None]]] = []
    for func in reward_funcs:
        if isinstance(func, VerifiableTask):
            per_func.append(func.score_with_feedback(prompts, completions, **kwargs))
        else:
            scores = func(prompts=prompts, completions=completions, completion_ids=completion_ids, **kwargs)
            if len(scores) != n:
                raise ValueError(f"Reward function {getattr(func, '__name__', func)!r} returned {len(scores)} rewards "
                                 f"for {n} completions.")
            per_func.append([(s, None) for s in scores])
    out = []
    for i in range(n):
        total, applicable, texts = 0.0, False, []
        for w, results in zip(weights, per_func, strict=True):
            s, text = results[i]
            if s is not None and not (isinstance(s, float) and math.isnan(s)):
                total += w * float(s)
                applicable = True
            if text:
                texts.append(text)
        score = total if applicable else None
        if not texts:
            texts.append("not applicable" if score is None else f"score: {score:.3g}")
        out.append((score, " | ".join(texts)))
    return out
