"""V1-Infer verdicts: the prompts a judge is given, how its reply is read, and what a comparison is worth.

Replies are parsed strictly (a rating must be labelled and given once); `pair_outcome` turns two ratings into the
tournament's outcome and confidence weight.
"""

from __future__ import annotations

import re

MATH_JUDGE_TEMPLATE = (
    "You are grading two solutions to the same math problem. Check each solution's reasoning and final answer.\n\n"
    "Problem:\n{problem}\n\n"
    "Solution A:\n{solution_a}\n\n"
    "Solution B:\n{solution_b}\n\n"
    "Give each solution an integer score from 1 (certainly wrong) to 10 (certainly correct). Answer in exactly "
    "this format, replacing X and Y by the two scores, and write nothing else:\n"
    "Rating A: X\n"
    "Rating B: Y"
)

MATH_POINTWISE_TEMPLATE = (
    "You are grading a solution to a math problem. Check its reasoning and final answer.\n\n"
    "Problem:\n{problem}\n\n"
    "Solution:\n{solution}\n\n"
    "Give the solution an integer score from 1 (certainly wrong) to 10 (certainly correct). Answer in exactly "
    "this format, replacing X by the score, and write nothing else:\n"
    "Rating: X"
)

# Strict: a rating must be labelled; free numbers elsewhere in the reply (e.g. quoted arithmetic) never count.
_PAIR_RE = {
    "a": re.compile(r"rating\s*(?:for\s*)?(?:solution\s*)?a\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE),
    "b": re.compile(r"rating\s*(?:for\s*)?(?:solution\s*)?b\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE),
}
_POINT_RE = re.compile(r"rating\s*[:=]\s*\**\s*(-?\d+(?:\.\d+)?)", re.IGNORECASE)


def _clamp_rating(value: str) -> float:
    return min(10.0, max(1.0, float(value)))


def parse_pair_ratings(text: str) -> tuple[float, float] | None:
    """`(r_a, r_b)` from a judge reply, each clamped to [1, 10]; None when a rating is missing or given twice.

    A reply that rates A (or B) more than once is ambiguous, so it is rejected rather than guessed at.
    """
    if not isinstance(text, str):
        return None
    found_a = _PAIR_RE["a"].findall(text)
    found_b = _PAIR_RE["b"].findall(text)
    if len(found_a) != 1 or len(found_b) != 1:
        return None
    return _clamp_rating(found_a[0]), _clamp_rating(found_b[0])


def parse_rating(text: str) -> float | None:
    """The single 1-10 rating of a pointwise reply (clamped); None when absent or given more than once."""
    if not isinstance(text, str):
        return None
    found = _POINT_RE.findall(text)
    if len(found) != 1:
        return None
    return _clamp_rating(found[0])


def pair_outcome(r_a: float, r_b: float, tau: float = 0.1) -> tuple[float, float]:
    """`(v, w)`: A's outcome (1 win, 0.5 tie, 0 loss) and the comparison's confidence weight max(|r_a-r_b|/9, tau).

    The paper's main text states the outcome mapping reversed; this is the mapping of its appendix and code.
    """
    v = 1.0 if r_a > r_b else (0.5 if r_a == r_b else 0.0)
    return v, max(abs(r_a - r_b) / 9.0, tau)
