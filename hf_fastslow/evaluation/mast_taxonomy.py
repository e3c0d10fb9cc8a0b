"""The MAST failure taxonomy (arXiv 2503.13657, v3 numbering) as data: 14 failure modes in 3 categories.

Codes are written "1.1" .. "3.3" (the judge's answer format); `mode("FM-1.3")` and `mode("1.3")` both work. The
shares are the v3 prevalences over the 1,642 MAD traces (percent of all failure annotations). The v3 names are used
for 3.2 / 3.3 ("No or incomplete verification" / "Incorrect verification"): the reference notebook's prompt and
its definitions file disagree on these two (MAST issue #12), so the package fixes one wording and uses it in the
prompt, the definitions and the few-shot example alike. Codes of the older 16-code scheme (1.6, 2.7) are listed in
`LEGACY_CODES` so the answer parser can name them when a judge copies them.

Definitions are the package's own one-paragraph paraphrases of the paper's descriptions (not the reference rubric
file), short enough to fit a small judge's context next to a trace.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["END_OF_TRACE_MODES", "FailureCategory", "FailureMode", "LEGACY_CODES", "MAST_CATEGORIES", "MAST_CODES",
           "MAST_MODES", "category_of", "definitions_text", "mode"]


@dataclass(frozen=True)
class FailureCategory:
    code: str  # "FC1"
    name: str
    share_v3: float  # percent of failure annotations in MAD (v3)


@dataclass(frozen=True)
class FailureMode:
    code: str  # "1.1"
    name: str
    category: str  # "FC1"
    stage: str  # the conversation stage where the mode mostly shows: "pre", "exec" or "post" execution
    share_v3: float  # percent of failure annotations in MAD (v3)
    definition: str

    @property
    def label(self) -> str:
        """ "FM-1.1 Disobey task specification" """
        return f"FM-{self.code} {self.name}"


MAST_CATEGORIES: tuple[FailureCategory, ...] = (
    FailureCategory("FC1", "Specification issues (system design)", 44.2),
    FailureCategory("FC2", "Inter-agent misalignment", 32.3),
    FailureCategory("FC3", "Task verification", 23.5),
)

MAST_MODES: tuple[FailureMode, ...] = (
    FailureMode("1.1", "Disobey task specification", "FC1", "pre", 11.8,
                "An agent ignores a stated constraint or requirement of the task (format, limits, what to produce), "
                "so the result does not satisfy the task as specified."),
    FailureMode("1.2", "Disobey role specification", "FC1", "pre", 1.5,
                "An agent acts outside the role it was given, e.g. a reviewer writes the solution itself or a "
                "helper takes decisions reserved for another agent."),
    FailureMode("1.3", "Step repetition", "FC1", "exec", 15.7,
                "A step, message or action that was already completed is repeated without new information, so the "
                "conversation loops instead of progressing."),
    FailureMode("1.4", "Loss of conversation history", "FC1", "exec", 2.8,
                "An agent forgets or contradicts information established earlier in the conversation, reverting to "
                "an older state of the work."),
    FailureMode("1.5", "Unaware of termination conditions", "FC1", "post", 12.4,
                "The agents do not recognise that the task is finished (or cannot finish) and keep going until an "
                "external limit such as a maximum number of turns stops them."),
    FailureMode("2.1", "Conversation reset", "FC2", "exec", 2.2,
                "The dialogue restarts from scratch without reason, discarding the progress made so far."),
    FailureMode("2.2", "Fail to ask for clarification", "FC2", "exec", 6.8,
                "An agent proceeds on a guess although the task or another agent's message is ambiguous or lacks "
                "needed information, instead of asking."),
    FailureMode("2.3", "Task derailment", "FC2", "exec", 7.4,
                "The conversation drifts away from the task's objective to unrelated or irrelevant work."),
    FailureMode("2.4", "Information withholding", "FC2", "exec", 0.85,
                "An agent has information that another agent needs (a result, an error, a constraint) and does not "
                "share it."),
    FailureMode("2.5", "Ignored other agent's input", "FC2", "exec", 1.9,
                "An agent disregards a correction, suggestion or result given by another agent and carries on as "
                "before."),
    FailureMode("2.6", "Reasoning-action mismatch", "FC2", "exec", 13.2,
                "What an agent says it will do (or concludes) differs from the action it then takes."),
    FailureMode("3.1", "Premature termination", "FC3", "post", 6.2,
                "The conversation ends before the task is done or before the needed information was exchanged."),
    FailureMode("3.2", "No or incomplete verification", "FC3", "post", 8.2,
                "The result is delivered without checking it, or the check covers only part of what must hold."),
    FailureMode("3.3", "Incorrect verification", "FC3", "post", 9.1,
                "A verification step is performed but reaches the wrong verdict, e.g. approves a wrong result."),
)

MAST_CODES: tuple[str, ...] = tuple(m.code for m in MAST_MODES)
# Modes a judge can only decide from the end of a trace: a windowed annotation takes them from the last window.
END_OF_TRACE_MODES: frozenset[str] = frozenset({"1.5", "3.1", "3.2", "3.3"})
# Codes of the older 16-code scheme that judges copy from the reference notebook's example answer (MAST issue #12).
LEGACY_CODES: frozenset[str] = frozenset({"1.6", "2.7"})

_BY_CODE = {m.code: m for m in MAST_MODES}


def _normalize(code: str) -> str:
    code = code.strip().upper()
    return code[3:] if code.startswith("FM-") else code


def mode(code: str) -> FailureMode:
    """The mode with this code ("1.3" or "FM-1.3"); KeyError naming the valid codes otherwise."""
    key = _normalize(code)
    if key not in _BY_CODE:
        raise KeyError(f"Unknown MAST code {code!r}; the 14 codes are {', '.join(MAST_CODES)}.")
    return _BY_CODE[key]


def category_of(code: str) -> FailureCategory:
    cat = mode(code).category
    return next(c for c in MAST_CATEGORIES if c.code == cat)


def definitions_text(codes: tuple[str, ...] | None = None) -> str:
    """The definitions block the judge prompts carry, one line per mode."""
    return "\n".join(f"{m.code} {m.name}: {m.definition}" for m in MAST_MODES if codes is None or m.code in codes)
