"""MAST failure annotation with an LLM judge on any backend: generate mode (the reference's A/B/C answer) or score
mode (P(yes) per failure mode from the label logits over a cached shared prefix).

    judge = MASTAnnotator(HFLocalBackend(model, tok), method="score")
    ann = judge.annotate(trace)                # a Trace (mast_traces) or plain text
    ann.modes, ann.p_yes, ann.task_completed
    mast_agreement(judge.annotate_many(traces), traces)

Generate mode asks for the reference answer format (A. summary, B. task completed, C. one "code yes|no" line per
mode) with the reference's prompt order (instructions, template, example, trace, definitions, few-shot examples)
and parses it with `parse_mast_answer`. The example answer carries only the 14 current codes (the reference's carries
1.6 and 2.7, which weak judges copy: MAST issue #12). An answer that cannot be parsed is kept: its modes are None,
`ann.parse_error` says why, and `MASTAnnotator.garbage` counts it.

Score mode renders one conversation per question (14 modes + task completion) that share the prefix "instructions
+ definitions + trace"; the judge prefills the shared token prefix once (`DynamicCache`), then all questions as one
right-padded batch on the repeated cache, and P(yes) = p(yes) / (p(yes) + p(no)) over the first tokens of the label
spellings ("yes", "Yes", " yes", " Yes" / the same for no). It needs the judge's logits: an in-process model
(`HFLocalBackend`), or any backend that scores continuations (`Backend.score`, two scoring calls per question,
no shared cache). Servers that return only sampled-token log-probs (`transformers serve`'s chat route, OpenAI) cannot
give P(yes); the annotator says so up front (`BackendFeatureError`).

Windowing: a trace whose prompt would exceed `window_tokens` (default: the judge's context, else 8,192) is split at
turn boundaries (a single over-long turn by tokens) into windows that each fit with the whole prompt around them;
the task line is repeated in every window. Per mode, windows are OR-ed (max P(yes)), except the end-of-trace modes
(1.5, 3.1, 3.2, 3.3) and task completion, which are read from the last window only (it always exists).
"""

from __future__ import annotations

import copy
import inspect
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .agreement import cohen_kappa, multilabel_agreement
from .mast_taxonomy import (
    END_OF_TRACE_MODES,
    LEGACY_CODES,
    MAST_CATEGORIES,
    MAST_CODES,
    MAST_MODES,
    definitions_text,
)
from .mast_traces import Trace, Turn

__all__ = ["MASTAnnotation", "MASTAnnotator", "MASTParseError", "ParsedAnswer", "generate_prompt",
           "label_probabilities", "label_token_ids", "mast_agreement", "parse_mast_answer", "score_questions",
           "window_trace"]

TASK_KEY = "task"

_INSTRUCTIONS = (
    "You will read the trace of a multi-agent system working on a task and check it for the failure modes defined "
    "below. Mark a failure mode only if you can point to an example of it in the trace. Also say whether the task "
    "was completed successfully."
)
_TEMPLATE = "\n".join(
    ["Answer between the two @@ markers, in exactly this form:", "@@",
     "A. <one sentence summary of the problems in the trace>", "B. <task completed: yes or no>", "C."]
    + [f"{m.code} {m.name}: <yes or no>" for m in MAST_MODES] + ["@@"])
_EXAMPLE_YES = {"1.3", "2.3", "3.2"}
_EXAMPLE = "\n".join(
    ["An example answer:", "A. The agents repeat the same step, drift off the task and deliver without checking.",
     "B. no", "C."] + [f"{c} {'yes' if c in _EXAMPLE_YES else 'no'}" for c in MAST_CODES])


def generate_prompt(trace_text: str, *, few_shot: str | None = None) -> str:
    """The generate-mode prompt, in the reference's order: instructions, answer template, example, trace,
    definitions, few-shot examples."""
    parts = [_INSTRUCTIONS, _TEMPLATE, _EXAMPLE, "Here is the trace:\n" + trace_text,
             "Definitions of the failure modes:\n" + definitions_text()]
    if few_shot:
        parts.append("Examples of the failure modes:\n" + few_shot)
    return "\n\n".join(parts)


def _score_prefix(trace_text: str) -> str:
    return "\n\n".join([_INSTRUCTIONS, "Definitions of the failure modes:\n" + definitions_text(),
                        "Here is the trace:\n" + trace_text])


def score_questions() -> dict[str, str]:
    """The score-mode question per key (the 14 codes and "task")."""
    qs = {m.code: f"Question: does failure mode {m.code} ({m.name}) occur in the trace? Answer yes or no."
          for m in MAST_MODES}
    qs[TASK_KEY] = "Question: was the task completed successfully? Answer yes or no."
    return qs


def _score_conversations(trace_text: str) -> dict[str, list[dict[str, str]]]:
    prefix = _score_prefix(trace_text)
    return {k: [{"role": "user", "content": f"{prefix}\n\n{q}"}] for k, q in score_questions().items()}


# ----------------------------------------------------------------------------------------------------------------------
# Parsing the generate-mode answer
# ----------------------------------------------------------------------------------------------------------------------
class MASTParseError(ValueError):
    """The judge's answer is not a MAST answer (strict parsing)."""


@dataclass
class ParsedAnswer:
    modes: dict[str, bool | None]
    task_completed: bool | None
    summary: str
    unknown_codes: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)  # duplicates, contradictory lines, ...


_CODE_LINE = re.compile(r"^\s*(?:C\.\s*)?(?:FM[-\s]?)?(\d+\.\d+)\b(.*)$", re.IGNORECASE)
_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)
_B_LINE = re.compile(r"^\s*B[.):]\s*(.*)$", re.IGNORECASE)
MODE_NAMES = {m.code: m.name for m in MAST_MODES}
_A_LINE = re.compile(r"^\s*A[.):]\s*(.*)$", re.IGNORECASE)


def _verdict(rest: str) -> bool | None:
    """"yes"/"no" (any casing, trailing punctuation) -> bool; none or both ("<yes or no>") -> None."""
    words = {w.lower() for w in _YES_NO.findall(rest)}
    return (words == {"yes"}) if len(words) == 1 else None


def parse_mast_answer(text: str, strict: bool = True) -> ParsedAnswer:
    """Parse a judge's A/B/C answer. Each known code maps to True/False; a code given twice takes the last value
    (flagged); a code line with no verdict or both verdicts is None (flagged); a missing code is None. Codes outside
    the 14 (e.g. the legacy 1.6 / 2.7) raise `MASTParseError` when `strict`, else are listed in `unknown_codes`
    with a warning. `strict` also rejects an answer with no code line at all."""
    if not isinstance(text, str):
        raise MASTParseError(f"the judge's answer is {type(text).__name__}, not text")
    body = text
    if body.count("@@") >= 2:  # keep what lies between the first pair of markers
        body = body.split("@@")[1]
    modes: dict[str, bool | None] = dict.fromkeys(MAST_CODES)
    parsed = ParsedAnswer(modes, None, "")
    seen: set[str] = set()
    for line in body.splitlines():
        if m := _A_LINE.match(line):
            parsed.summary = parsed.summary or m.group(1).strip()
            continue
        if m := _B_LINE.match(line):
            parsed.task_completed = _verdict(m.group(1))
            continue
        m = _CODE_LINE.match(line)
        if not m:
            continue
        code, rest = m.group(1), m.group(2)
        if code not in modes:
            parsed.unknown_codes.append(code)
            continue
        # "3.2 No or incomplete verification: yes": the verdict follows the last colon, never the mode's name
        rest = rest.rsplit(":", 1)[-1]
        rest = re.sub(re.escape(MODE_NAMES[code]), " ", rest, flags=re.IGNORECASE)
        value = _verdict(rest)
        if value is None:
            parsed.flags.append(f"{code}: no single yes/no in {line.strip()!r}")
        if code in seen:
            parsed.flags.append(f"{code}: given more than once, the last value is kept")
        seen.add(code)
        modes[code] = value
    if parsed.unknown_codes:
        legacy = sorted(set(parsed.unknown_codes) & LEGACY_CODES)
        msg = (f"the answer uses codes outside the 14 MAST modes: {sorted(set(parsed.unknown_codes))}"
               + (f" ({legacy} are from the older 16-code scheme)" if legacy else ""))
        if strict:
            raise MASTParseError(msg)
        warnings.warn(msg + "; ignored", RuntimeWarning, stacklevel=2)
    if strict and not seen:
        raise MASTParseError(f"no 'code: yes|no' line in the answer: {text[:200]!r}")
    return parsed


# ----------------------------------------------------------------------------------------------------------------------
# Score mode: label probabilities over a cached shared prefix
# ----------------------------------------------------------------------------------------------------------------------
def label_token_ids(tokenizer, word: str) -> list[int]:
    """First token ids of the spellings a judge may start its answer with: word, Word, " word", " Word"."""
    ids: list[int] = []
    for spelling in (word, word.capitalize(), " " + word, " " + word.capitalize()):
        toks = tokenizer(spelling, add_special_tokens=False)["input_ids"]
        if toks and toks[0] not in ids:
            ids.append(toks[0])
    return ids


def _render(tokenizer, conversation) -> list[int]:
    text = tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    n = min(len(r) for r in rows) - 1  # leave at least one token per row to run after the prefix
    first = rows[0]
    i = 0
    while i < n and all(r[i] == first[i] for r in rows):
        i += 1
    return i


def _keep_last_kwargs(model) -> dict[str, Any]:
    # The prefix forward needs no logits: asking for the last position only avoids a [prefix x vocab] tensor.
    return {"logits_to_keep": 1} if "logits_to_keep" in inspect.signature(model.forward).parameters else {}


def label_probabilities(model, tokenizer, conversations: Sequence[Sequence[dict[str, str]]], *,
                        labels: tuple[str, str] = ("yes", "no"), path: str = "cached") -> tuple[list[float], dict]:
    """P(labels[0]) / (P(labels[0]) + P(labels[1])) for the first answer token of each conversation.

    path: "cached" (one prefill of the shared token prefix, then all suffixes as one right-padded batch on the
    repeated cache), "cached_sequential" (the suffixes one by one on copies of the cache) or "full" (one forward per
    conversation, no cache: the reference the other two must equal). Returns (probabilities, counters) with the
    prefilled token counts."""
    import torch
    from transformers import DynamicCache

    from ..integrations.caches import cache_kwargs, output_cache

    yes_ids, no_ids = label_token_ids(tokenizer, labels[0]), label_token_ids(tokenizer, labels[1])
    shared = set(yes_ids) & set(no_ids)  # e.g. a byte-level space token both " yes" and " no" start with
    yes_ids, no_ids = [i for i in yes_ids if i not in shared], [i for i in no_ids if i not in shared]
    if not yes_ids or not no_ids:
        raise ValueError(f"the tokenizer cannot tell {labels[0]!r} from {labels[1]!r} by their first token.")
    rows = [_render(tokenizer, c) for c in conversations]
    device = next(model.parameters()).device

    def probs_of(logits: torch.Tensor) -> list[float]:
        logp = torch.log_softmax(logits.float(), dim=-1)
        y = torch.logsumexp(logp[:, yes_ids], dim=-1)
        n = torch.logsumexp(logp[:, no_ids], dim=-1)
        return torch.sigmoid(y - n).tolist()

    with torch.no_grad():
        if path == "full" or len(rows) == 1:
            out = []
            for r in rows:
                logits = model(input_ids=torch.tensor([r], device=device), **_keep_last_kwargs(model)).logits
                out += probs_of(logits[:, -1])
            return out, {"prefix_tokens": 0, "prefilled_tokens": sum(map(len, rows))}
        cut = _common_prefix(rows)
        prefix = torch.tensor([rows[0][:cut]], device=device)
        pre = model(input_ids=prefix, use_cache=True, **cache_kwargs(model, DynamicCache()),
                    **_keep_last_kwargs(model))
        cache = output_cache(pre)
        suffixes = [r[cut:] for r in rows]
        counters = {"prefix_tokens": cut, "prefilled_tokens": cut + sum(map(len, suffixes))}
        if path == "cached_sequential":
            out = []
            for s in suffixes:
                c = copy.deepcopy(cache)
                logits = model(input_ids=torch.tensor([s], device=device), **cache_kwargs(model, c)).logits
                out += probs_of(logits[:, -1])
            return out, counters
        if path != "cached":
            raise ValueError(f"path must be 'cached', 'cached_sequential' or 'full', got {path!r}.")
        width = max(map(len, suffixes))
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in suffixes], device=device)
        mask = torch.tensor([[1] * (cut + len(s)) + [0] * (width - len(s)) for s in suffixes], device=device)
        cache.batch_repeat_interleave(len(suffixes))
        positions = torch.arange(cut, cut + width, device=device)[None].expand(len(suffixes), -1)
        logits = model(input_ids=ids, attention_mask=mask, position_ids=positions, **cache_kwargs(model, cache)).logits
        last = torch.tensor([len(s) - 1 for s in suffixes], device=device)
        return probs_of(logits[torch.arange(len(suffixes), device=device), last]), counters


# ----------------------------------------------------------------------------------------------------------------------
# Windowing
# ----------------------------------------------------------------------------------------------------------------------
def window_trace(trace: Trace, budget_tokens: int, count_tokens, split_text=None) -> list[str]:
    """Render `trace` as texts of at most `budget_tokens` (by `count_tokens`), cut at turn boundaries; a turn that
    alone exceeds the budget is cut into pieces with `split_text(text, budget) -> list[str]` (default: by characters
    in proportion to its token count). Every window repeats the task line and says which turns it holds."""
    if budget_tokens < 1:
        raise ValueError(f"the window budget is {budget_tokens} tokens: the prompt alone fills the judge's context.")
    whole = trace.render()
    if count_tokens(whole) <= budget_tokens:
        return [whole]
    header = f"TASK: {trace.task.strip()}\n(part {{i}} of {{n}} of a longer trace, turns {{a}}-{{b}})\n"
    room = budget_tokens - count_tokens(header.format(i=999, n=999, a=99999, b=99999))
    if room < 8:
        raise ValueError(f"window budget of {budget_tokens} tokens leaves no room for the trace after its task line.")

    def default_split(text: str, budget: int) -> list[str]:
        n_tok = max(1, count_tokens(text))
        step = max(1, int(len(text) * budget / n_tok * 0.9))
        return [text[i:i + step] for i in range(0, len(text), step)]

    split = split_text or default_split
    pieces: list[tuple[int, str]] = []  # (turn index, rendered piece)
    for i, turn in enumerate(trace.turns):
        line = turn.render()
        if count_tokens(line) <= room:
            pieces.append((i, line))
        else:
            pieces += [(i, f"[{turn.speaker}] (continued) {p}" if k else p) for k, p in
                       enumerate(split(line, room - 8))]
    groups: list[list[tuple[int, str]]] = [[]]
    used = 0
    for idx, piece in pieces:
        cost = count_tokens(piece) + 1
        if groups[-1] and used + cost > room:
            groups.append([])
            used = 0
        groups[-1].append((idx, piece))
        used += cost
    return [header.format(i=k + 1, n=len(groups), a=g[0][0], b=g[-1][0]) + "\n".join(p for _, p in g)
            for k, g in enumerate(groups)]


# ----------------------------------------------------------------------------------------------------------------------
# The annotator
# ----------------------------------------------------------------------------------------------------------------------
@dataclass
class MASTAnnotation:
    """One trace's annotation. `modes[code]` is True/False, or None when the judge gave no usable answer for it
    (`parse_error` / `flags` say why). `p_yes` (score mode) holds P(yes) per code."""

    modes: dict[str, bool | None]
    task_completed: bool | None = None
    summary: str = ""
    raw: list[str] = field(default_factory=list)  # the judge's answer per window (generate mode)
    p_yes: dict[str, float] | None = None
    p_task_completed: float | None = None
    method: str = "generate"
    key: tuple[str, str] | None = None
    windows: int = 1
    parse_error: str | None = None
    flags: list[str] = field(default_factory=list)

    @property
    def failed_modes(self) -> list[str]:
        return [c for c in MAST_CODES if self.modes.get(c)]

    def to_dict(self) -> dict[str, Any]:
        return {"key": list(self.key) if self.key else None, "method": self.method, "modes": self.modes,
                "p_yes": self.p_yes, "task_completed": self.task_completed,
                "p_task_completed": self.p_task_completed, "summary": self.summary, "windows": self.windows,
                "parse_error": self.parse_error, "flags": self.flags, "raw": self.raw}


def _as_trace(trace: Trace | str) -> Trace:
    if isinstance(trace, Trace):
        return trace
    if isinstance(trace, str):
        return Trace("text", "(see the trace)", [Turn("trace", trace)], source="text")
    raise TypeError(f"annotate takes a Trace or a str, got {type(trace).__name__}.")


class MASTAnnotator:
    """`MASTAnnotator(backend, method="generate"|"score", *, few_shot=None, thresholds=None, window_tokens=None,
    max_new_tokens=200, temperature=0.0, tokenizer=None)`.

    `thresholds` (code -> theta, default 0.5) turn score-mode P(yes) into decisions. `tokenizer` counts tokens for
    windowing when the backend is not in-process (otherwise ~4 characters per token is assumed)."""

    def __init__(self, backend, method: str = "generate", *, few_shot: str | None = None,
                 thresholds: Mapping[str, float] | None = None, window_tokens: int | None = None,
                 max_new_tokens: int = 200, temperature: float = 0.0, tokenizer=None):
        if method not in ("generate", "score"):
            raise ValueError(f"method must be 'generate' or 'score', got {method!r}.")
        self.backend, self.method, self.few_shot = backend, method, few_shot
        self.thresholds = {c: 0.5 for c in MAST_CODES} | dict(thresholds or {})
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.model = getattr(backend, "model", None)
        self.tokenizer = tokenizer or getattr(backend, "tokenizer", None)
        self.in_process = self.model is not None and getattr(backend, "tokenizer", None) is not None
        if method == "score" and not self.in_process:
            backend.require("prompt_scoring", "MAST score mode (P(yes) needs the judge's logits: use an in-process "
                                              "HFLocalBackend, or generate mode on this server)")
        if window_tokens is None:
            ctx = getattr(getattr(self.model, "config", None), "max_position_embeddings", None)
            window_tokens = min(int(ctx), 8192) if ctx else 8192
        self.window_tokens = int(window_tokens)
        self.annotated = 0
        self.garbage = 0  # generate-mode answers (per window) that could not be parsed at all
        self.missing_decisions = 0  # mode decisions left None
        self.prefill_tokens = {"prefix_tokens": 0, "prefilled_tokens": 0}

    # ----- token accounting ---------------------------------------------------------------------------------------
    def count_tokens(self, text: str) -> int:
        if self.tokenizer is not None:
            return len(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        return max(1, len(text) // 4)

    def _budget(self) -> int:
        if self.method == "generate":
            overhead = self.count_tokens(generate_prompt("", few_shot=self.few_shot)) + self.max_new_tokens
        else:
            longest = max(score_questions().values(), key=len)
            overhead = self.count_tokens(_score_prefix("") + "\n\n" + longest)
        return self.window_tokens - overhead - 16  # chat-template tokens

    def windows(self, trace: Trace | str) -> list[str]:
        return window_trace(_as_trace(trace), self._budget(), self.count_tokens)

    # ----- annotation ---------------------------------------------------------------------------------------------
    def annotate(self, trace: Trace | str) -> MASTAnnotation:
        trace = _as_trace(trace)
        texts = self.windows(trace)
        parts = [self._generate(t) if self.method == "generate" else self._score(t) for t in texts]
        ann = _combine(parts, self.method)
        ann.key = trace.key
        self.annotated += 1
        self.missing_decisions += sum(v is None for v in ann.modes.values())
        return ann

    def annotate_many(self, traces: Sequence[Trace | str]) -> list[MASTAnnotation]:
        return [self.annotate(t) for t in traces]

    def _generate(self, text: str) -> MASTAnnotation:
        prompt = generate_prompt(text, few_shot=self.few_shot)
        reply = self.backend.chat([{"role": "user", "content": prompt}], max_new_tokens=self.max_new_tokens,
                                  temperature=self.temperature)[0].text
        try:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                parsed = parse_mast_answer(reply, strict=False)
            if all(v is None for v in parsed.modes.values()):
                raise MASTParseError(f"no 'code: yes|no' line in the answer: {reply[:200]!r}")
        except MASTParseError as err:
            self.garbage += 1
            return MASTAnnotation(dict.fromkeys(MAST_CODES), raw=[reply], parse_error=str(err))
        flags = parsed.flags + [str(w.message) for w in caught]
        return MASTAnnotation(parsed.modes, parsed.task_completed, parsed.summary, [reply], flags=flags)

    def _score(self, text: str) -> MASTAnnotation:
        convs = _score_conversations(text)
        keys = list(convs)
        if self.in_process:
            probs, counters = label_probabilities(self.model, self.tokenizer, [convs[k] for k in keys])
            for k, v in counters.items():
                self.prefill_tokens[k] += v
        else:
            probs = [self._scored_probability(convs[k]) for k in keys]
        p = dict(zip(keys, probs))
        p_task = p.pop(TASK_KEY)
        modes = {c: p[c] > self.thresholds[c] for c in MAST_CODES}
        return MASTAnnotation(modes, p_task > 0.5, "", p_yes=p, p_task_completed=p_task, method="score")

    def _scored_probability(self, conversation) -> float:
        import math

        yes = sum(self.backend.score(conversation, "yes"))
        no = sum(self.backend.score(conversation, "no"))
        return 1.0 / (1.0 + math.exp(no - yes))


def _combine(parts: list[MASTAnnotation], method: str) -> MASTAnnotation:
    """Windows -> one annotation: OR / max over windows, end-of-trace modes and task completion from the last."""
    if len(parts) == 1:
        parts[0].method = method
        return parts[0]
    last = parts[-1]
    modes: dict[str, bool | None] = {}
    p_yes: dict[str, float] | None = {} if method == "score" else None
    for c in MAST_CODES:
        pool = [last] if c in END_OF_TRACE_MODES else parts
        values = [a.modes.get(c) for a in pool]
        modes[c] = True if any(v is True for v in values) else (None if any(v is None for v in values) else False)
        if p_yes is not None:
            p_yes[c] = max(a.p_yes[c] for a in pool)
    errors = [a.parse_error for a in parts if a.parse_error]
    return MASTAnnotation(modes, last.task_completed, " ".join(a.summary for a in parts if a.summary),
                          [r for a in parts for r in a.raw], p_yes, last.p_task_completed, method,
                          windows=len(parts), parse_error="; ".join(errors) or None,
                          flags=[f for a in parts for f in a.flags])


# ----------------------------------------------------------------------------------------------------------------------
# Agreement with gold labels
# ----------------------------------------------------------------------------------------------------------------------
def _labels_of(item) -> tuple[tuple[str, str] | None, Mapping[str, bool | None], bool | None]:
    if isinstance(item, Trace):
        if item.labels is None:
            raise ValueError(f"trace {item.key} has no gold labels.")
        return item.key, item.labels, item.task_completed
    if isinstance(item, MASTAnnotation):
        return item.key, item.modes, item.task_completed
    return None, item, None


def mast_agreement(pred: Sequence[MASTAnnotation | Mapping], gold: Sequence[Trace | Mapping]) -> dict[str, Any]:
    """Per-mode precision / recall / F1 / kappa, macro F1, pooled kappa, accuracy, category-level F1 (a category is
    "yes" when any of its modes is), task-completion kappa, and the counts of missing (None) decisions and unparsed
    answers. Predictions and gold are paired by composite key when both carry keys (a repeated key is an error)."""
    if len(pred) != len(gold):
        raise ValueError(f"mast_agreement: {len(pred)} annotations for {len(gold)} gold traces.")
    p_rows = [_labels_of(p) for p in pred]
    g_rows = [_labels_of(g) for g in gold]
    if all(k is not None for k, _, _ in p_rows + g_rows):
        for rows, what in ((p_rows, "annotations"), (g_rows, "gold traces")):
            keys = [k for k, _, _ in rows]
            if len(set(keys)) != len(keys):
                raise ValueError(f"mast_agreement: repeated composite keys among the {what}; keys must be unique.")
        by_key = {k: r for k, *r in p_rows}
        missing = [k for k, _, _ in g_rows if k not in by_key]
        if missing:
            raise ValueError(f"mast_agreement: no annotation for gold traces {missing[:5]}.")
        p_rows = [(k, *by_key[k]) for k, _, _ in g_rows]
    p_modes = [m for _, m, _ in p_rows]
    g_modes = [m for _, m, _ in g_rows]
    report = multilabel_agreement(p_modes, g_modes, MAST_CODES)
    cats = {}
    for cat in MAST_CATEGORIES:
        codes = [m.code for m in MAST_MODES if m.category == cat.code]
        cp = [{cat.code: any(row.get(c) for c in codes)} for row in p_modes]
        cg = [{cat.code: any(row[c] for c in codes)} for row in g_modes]
        cats[cat.code] = multilabel_agreement(cp, cg, [cat.code])["per_label"][cat.code]
    report["per_category"] = cats
    tasks = [(p, g) for (_, _, p), (_, _, g) in zip(p_rows, g_rows) if g is not None]
    report["task_completed_kappa"] = (cohen_kappa([bool(p) for p, _ in tasks], [g for _, g in tasks])
                                      if tasks else None)
    report["unparsed"] = sum(1 for p in pred if isinstance(p, MASTAnnotation) and p.parse_error)
    report["traces"] = len(gold)
    return report
