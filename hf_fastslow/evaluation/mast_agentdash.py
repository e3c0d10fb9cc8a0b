"""agentdash (the MAST authors' annotator, PyPI `agentdash`, OpenAI-only) pointed at any OpenAI-compatible server.

`agentdash.annotator(api_key, model)` builds `openai.OpenAI(api_key=...)` itself; its `.client` attribute is replaced
by a client on `base_url` (e.g. a `LocalServer` running `transformers serve` on the same judge model), so its prompt,
sampling (temperature 1.0) and parser run unchanged. Two things are added around it, never inside it:

- `max_tokens`: agentdash sends no limit and `transformers serve` then allows 1,024 new tokens; a cap (None = as
  agentdash sends it) keeps a CPU benchmark bounded. Say which you used.
- garbage accounting: agentdash scores every code it cannot find as 0 without telling. The raw answer is re-read with
  `parse_mast_answer`; an answer with no "code yes|no" line is counted in `.garbage` and its annotation carries
  `parse_error`, while `modes` stay exactly what agentdash returned (what its user gets).
"""

from __future__ import annotations

import time
import warnings

from .mast import MASTAnnotation, MASTParseError, parse_mast_answer
from .mast_taxonomy import MAST_CODES
from .mast_traces import Trace

__all__ = ["AgentDashAnnotator"]


class _CappedCompletions:
    def __init__(self, completions, max_tokens: int | None):
        self._completions, self._max_tokens = completions, max_tokens

    def create(self, **kwargs):
        if self._max_tokens is not None:
            kwargs.setdefault("max_tokens", self._max_tokens)
        return self._completions.create(**kwargs)


class _Chat:
    def __init__(self, client, max_tokens: int | None):
        self.completions = _CappedCompletions(client.chat.completions, max_tokens)


class _Client:
    """The OpenAI client agentdash calls `.chat.completions.create(...)` on, with an optional token cap."""

    def __init__(self, client, max_tokens: int | None):
        self.chat = _Chat(client, max_tokens)


class AgentDashAnnotator:
    """`AgentDashAnnotator(base_url, model, *, api_key="local", max_tokens=None, timeout=600)`;
    `.annotate(trace) -> MASTAnnotation` (method "agentdash"), `.garbage`, `.seconds`."""

    method = "agentdash"

    def __init__(self, base_url: str, model: str, *, api_key: str = "local", max_tokens: int | None = None,
                 timeout: float = 600.0):
        try:
            import agentdash
            from openai import OpenAI
        except ImportError as err:
            raise ImportError(f"agentdash needs the [eval] extra (agentdash, openai): {err}") from err
        self.inner = agentdash.annotator(api_key, model=model)
        self.inner.client = _Client(OpenAI(base_url=base_url, api_key=api_key, timeout=timeout), max_tokens)
        self.garbage = 0
        self.annotated = 0
        self.seconds = 0.0

    def annotate(self, trace: Trace | str) -> MASTAnnotation:
        text = trace.render() if isinstance(trace, Trace) else trace
        t0 = time.perf_counter()
        out = self.inner.produce_taxonomy(text)
        self.seconds += time.perf_counter() - t0
        self.annotated += 1
        raw = out.get("raw_response") or ""
        error = None
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                parsed = parse_mast_answer(raw, strict=False)
            if all(v is None for v in parsed.modes.values()):
                raise MASTParseError(f"no 'code yes|no' line in agentdash's answer: {raw[:200]!r}")
        except MASTParseError as err:
            self.garbage += 1
            error = f"{err} (agentdash reported these codes as 0)"
        modes = {c: bool(out["failure_modes"].get(c, 0)) for c in MAST_CODES}
        return MASTAnnotation(modes, bool(out.get("task_completion")), out.get("summary", ""), [raw],
                              method=self.method, key=trace.key if isinstance(trace, Trace) else None,
                              parse_error=error)

    def annotate_many(self, traces) -> list[MASTAnnotation]:
        return [self.annotate(t) for t in traces]
