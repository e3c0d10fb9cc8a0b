"""The deterministic baseline a user builds today: trace heuristics for the MAST modes that have a surface signal.

| code | rule |
|---|---|
| 1.3 | two turns of 40+ characters whose texts are >= 90 % alike (difflib ratio, case and spaces folded) |
| 1.5 | the run hit its limit (`meta["hit_limit"]` from an adapter, else turns >= `Trace.max_turns`) or says so |
| 2.1 | a turn after the first two says the conversation restarts ("start over", "from scratch", ...) |
| 2.2 | a turn says information is missing / it will assume or guess, and that agent never asks a question |
| 3.1 | no final answer and no limit hit: the conversation just stopped |
| 3.2 | a final answer and no turn (after the task) that checks, verifies, tests or validates anything |

The other eight modes (1.1, 1.2, 1.4, 2.3, 2.4, 2.5, 2.6, 3.3) need to understand the content; the baseline says "no"
for them, which is what a regex-only pipeline reports. `task_completed` is "a final answer was given and no limit was
hit".
"""

from __future__ import annotations

import difflib
import re

from .mast import MASTAnnotation
from .mast_taxonomy import MAST_CODES
from .mast_traces import Trace

__all__ = ["HEURISTIC_CODES", "HeuristicAnnotator", "heuristic_modes"]

HEURISTIC_CODES = ("1.3", "1.5", "2.1", "2.2", "3.1", "3.2")

_FINAL = re.compile(r"final answer|\\boxed\{|####|^answer\s*:", re.IGNORECASE | re.MULTILINE)
_LIMIT = re.compile(r"max(?:imum)?[ _](?:number of )?(?:turns|steps|rounds)|turn limit|step limit|"
                    r"no end within \d+ steps|max_turns", re.IGNORECASE)
_RESET = re.compile(r"start (?:over|again|afresh)|from (?:the )?(?:beginning|scratch)|what is our task|"
                    r"let'?s begin again|reset the conversation", re.IGNORECASE)
_GAP = re.compile(r"does not (?:say|specify)|not specified|unclear|ambiguous|missing information|"
                  r"\bI(?:'ll| will) (?:assume|guess|pick)|without asking", re.IGNORECASE)
_VERIFY = re.compile(r"\b(?:verif\w*|check\w*|test\w*|validat\w*|confirm\w*|double-check\w*)\b", re.IGNORECASE)


def _fold(text: str) -> str:
    return " ".join(text.lower().split())


def heuristic_modes(trace: Trace) -> dict[str, bool]:
    """The six detectors above on one trace (the other eight codes are False)."""
    turns = trace.turns
    texts = [_fold(t.content) for t in turns]
    out = dict.fromkeys(MAST_CODES, False)

    long_ = [t for t in texts if len(t) >= 40]
    out["1.3"] = any(difflib.SequenceMatcher(None, a, b).ratio() >= 0.9
                     for i, a in enumerate(long_) for b in long_[i + 1:])
    if "hit_limit" in trace.meta:  # adapters know whether the run was stopped by its limit
        limit_hit = bool(trace.meta["hit_limit"])
    else:
        limit_hit = trace.max_turns is not None and len(turns) >= trace.max_turns
    limit_hit = limit_hit or any(
        _LIMIT.search(t.content) for t in turns)
    out["1.5"] = limit_hit
    out["2.1"] = any(_RESET.search(t.content) for t in turns[2:])
    askers = {t.speaker for t in turns if "?" in t.content}
    out["2.2"] = any(_GAP.search(t.content) and t.speaker not in askers for t in turns)
    final = any(_FINAL.search(t.content) for t in turns)
    out["3.1"] = not final and not limit_hit
    out["3.2"] = final and not any(_VERIFY.search(t.content) for t in turns[1:])
    return out


class HeuristicAnnotator:
    """`HeuristicAnnotator().annotate(trace) -> MASTAnnotation` (method "heuristics"), same interface as
    `MASTAnnotator` for the benchmark and the CLI."""

    method = "heuristics"
    garbage = 0

    def annotate(self, trace: Trace) -> MASTAnnotation:
        modes = heuristic_modes(trace)
        final = any(_FINAL.search(t.content) for t in trace.turns)
        fired = [c for c in HEURISTIC_CODES if modes[c]]
        return MASTAnnotation(dict(modes), task_completed=final and not modes["1.5"],
                              summary=("heuristics fired: " + ", ".join(fired)) if fired else "no heuristic fired",
                              method=self.method, key=trace.key)

    def annotate_many(self, traces) -> list[MASTAnnotation]:
        return [self.annotate(t) for t in traces]
