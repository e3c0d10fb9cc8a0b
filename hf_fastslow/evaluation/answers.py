"""The one numeric answer extractor every scorer in the package uses (V1-Infer, CREST, PairRL, FST, qTTT, DTS, ...)."""

from __future__ import annotations

import re

__all__ = ["answers_match", "extract_answer", "normalize_number"]

_NUM_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
_FINAL_PATTERNS = (r"####\s*([^\n]+)", r"\\boxed\{([^}]*)\}", r"answer\s*(?:is|:)\s*\$?\s*(-?[\d,]+(?:\.\d+)?)")


def normalize_number(s: str) -> str:
    """"1,234." -> "1234", "42.0" -> "42", "0.5" -> "0.5"; anything that is not a number comes back stripped."""
    s = s.replace(",", "").replace("$", "").strip().rstrip(".")
    try:
        value = float(s)
    except ValueError:
        return s
    return str(int(value)) if value == int(value) else repr(value)


def extract_answer(text: str) -> str | None:
    """Final numeric answer of a reply: `#### x`, `\\boxed{x}`, "answer is x", else the last number (None if none)."""
    if not isinstance(text, str):
        return None
    for pattern in _FINAL_PATTERNS:
        found = re.findall(pattern, text, flags=re.IGNORECASE)
        if found:
            nums = _NUM_RE.findall(found[-1])
            if nums:
                return normalize_number(nums[-1])
    nums = _NUM_RE.findall(text)
    return normalize_number(nums[-1]) if nums else None


def answers_match(reply: str, gold) -> bool:
    """True when the reply's extracted answer equals the gold answer (a number, or text holding one)."""
    got = extract_answer(reply)
    want = extract_answer(str(gold))
    return got is not None and got == want
