"""The selectors V1-Infer is measured against, taking the same candidates: `PointwiseSelector` (one 1-10
self-rating per candidate), `majority_vote` (self-consistency over `extract_answer`) and `random_pick`."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Callable, Sequence

from ..evaluation.answers import extract_answer
from .v1_judges import Judge
from .v1_tournament import Selection, _check_candidates
from .v1_verdicts import MATH_POINTWISE_TEMPLATE, parse_rating


class PointwiseSelector:
    """Pointwise self-verification: one 1-10 rating per candidate, argmax (first index on ties, as in the paper).

    A reply without a parseable rating scores 0, below any valid rating.
    """

    def __init__(self, judge: Judge, template: str = MATH_POINTWISE_TEMPLATE):
        if not hasattr(judge, "complete"):
            raise TypeError("judge must have a complete(prompts) -> list[str] method.")
        for key in ("{problem}", "{solution}"):
            if key not in template:
                raise ValueError(f"pointwise template must contain {key}.")
        self.judge = judge
        self.template = template

    def select(self, problem: str, candidates: Sequence[str]) -> Selection:
        candidates = _check_candidates(candidates)
        tokens_before = getattr(self.judge, "tokens", 0)
        replies = self.judge.complete([self.template.format(problem=problem, solution=c) for c in candidates])
        if len(replies) != len(candidates):
            raise RuntimeError(f"judge returned {len(replies)} replies for {len(candidates)} prompts.")
        ratings = [parse_rating(r) for r in replies]
        scores = [r if r is not None else 0.0 for r in ratings]
        best = max(range(len(scores)), key=lambda i: (scores[i], -i))
        return Selection(
            index=best,
            method="pointwise",
            scores=scores,
            mean_ratings=scores,
            calls=len(candidates),
            judge_tokens=getattr(self.judge, "tokens", 0) - tokens_before,
            parse_failures=sum(r is None for r in ratings),
        )


def majority_vote(
    candidates: Sequence[str], extract: Callable[[str], str | None] = extract_answer
) -> Selection:
    """Self-consistency: the first candidate whose extracted answer is the most frequent one (no model calls).

    Candidates without an extractable answer do not vote; if none has one, the first candidate is returned.
    """
    candidates = _check_candidates(candidates)
    answers = [extract(c) for c in candidates]
    counts = Counter(a for a in answers if a is not None)
    scores = [float(counts[a]) if a is not None else 0.0 for a in answers]
    if not counts:
        return Selection(index=0, method="majority_vote", scores=scores)
    top = max(counts.values())
    index = next(i for i, a in enumerate(answers) if a is not None and counts[a] == top)
    return Selection(index=index, method="majority_vote", scores=scores)


def random_pick(candidates: Sequence[str], seed: int = 0) -> Selection:
    """Uniformly random candidate: the floor every selector must beat."""
    candidates = _check_candidates(candidates)
    return Selection(index=random.Random(seed).randrange(len(candidates)), method="random")
