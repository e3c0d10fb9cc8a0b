"""MAST: taxonomy data, the answer parser, score mode (cached prefix == full forward), windowing, the annotator on
scripted judges (garbage counted), agreement with composite keys."""

import math

import pytest
import torch

from hf_fastslow.backends.testing import ScriptedBackend
from hf_fastslow.evaluation.mast import (
    MASTAnnotator,
    MASTParseError,
    _score_conversations,
    label_probabilities,
    mast_agreement,
    parse_mast_answer,
    window_trace,
)
from hf_fastslow.evaluation.mast_taxonomy import LEGACY_CODES, MAST_CATEGORIES, MAST_CODES, MAST_MODES, mode
from hf_fastslow.evaluation.mast_traces import Trace, Turn
from tests.conftest import byte_tokenizer, tiny_llama


def _answer(yes=(), task="no", extra_lines=()):
    lines = ["A. summary of problems", f"B. {task}", "C."]
    lines += [f"{c} {mode(c).name}: {'yes' if c in yes else 'no'}" for c in MAST_CODES]
    return "\n".join([*lines, *extra_lines])


# ----- taxonomy ---------------------------------------------------------------------------------------------------
def test_taxonomy_constants():
    assert len(MAST_MODES) == 14 and len(set(MAST_CODES)) == 14
    assert [c.code for c in MAST_CATEGORIES] == ["FC1", "FC2", "FC3"]
    counts = {c.code: sum(m.category == c.code for m in MAST_MODES) for c in MAST_CATEGORIES}
    assert counts == {"FC1": 5, "FC2": 6, "FC3": 3}
    shares = {c.code: sum(m.share_v3 for m in MAST_MODES if m.category == c.code) for c in MAST_CATEGORIES}
    for cat in MAST_CATEGORIES:
        assert shares[cat.code] == pytest.approx(cat.share_v3, abs=0.051)
    assert shares == pytest.approx({"FC1": 44.2, "FC2": 32.35, "FC3": 23.5}, abs=1e-9)
    assert mode("FM-1.3").name == "Step repetition" and mode("3.3").name == "Incorrect verification"
    assert not LEGACY_CODES & set(MAST_CODES)
    with pytest.raises(KeyError, match="1.6"):
        mode("1.6")


# ----- parser -----------------------------------------------------------------------------------------------------
def test_parser_canonical_and_tolerant():
    p = parse_mast_answer(_answer(yes={"1.3", "3.2"}, task="yes"))
    assert p.modes == {c: c in {"1.3", "3.2"} for c in MAST_CODES}
    assert p.task_completed is True and p.summary == "summary of problems"
    messy = "@@\nA. x\nb) NO.\nC.\n" + "\n".join(
        f"  FM-{c}:  {'YES!' if c == '2.1' else 'No.'}  " for c in MAST_CODES) + "\n@@ trailing 9.9 yes"
    p = parse_mast_answer(messy)
    assert p.modes == {c: c == "2.1" for c in MAST_CODES} and p.task_completed is False
    # a paraphrased name holding "no": the verdict is what follows the colon
    assert parse_mast_answer("C.\n3.2 No verification was done: yes\n2.4 Withheld info?: no").modes["3.2"] is True


def test_parser_legacy_codes_missing_duplicates():
    legacy = _answer(extra_lines=["1.6 yes", "2.7 no"])
    with pytest.raises(MASTParseError, match=r"1\.6.*older 16-code"):
        parse_mast_answer(legacy)
    with pytest.warns(RuntimeWarning, match="outside the 14"):
        p = parse_mast_answer(legacy, strict=False)
    assert p.unknown_codes == ["1.6", "2.7"] and p.modes["1.1"] is False
    p = parse_mast_answer("C.\n1.1 yes\n1.1 no\n2.2 <yes or no>")
    assert p.modes["1.1"] is False  # the last value wins ...
    assert any("more than once" in f for f in p.flags)  # ... and is flagged
    assert p.modes["2.2"] is None and any("2.2" in f for f in p.flags)  # template echo: no single verdict
    assert p.modes["3.3"] is None  # missing
    with pytest.raises(MASTParseError, match="no 'code"):
        parse_mast_answer("I think the agents did fine.")
    with pytest.raises(MASTParseError):
        parse_mast_answer(None)


# ----- score mode -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_judge():
    model = tiny_llama(vocab=259, num_layers=2)
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # spread the label probabilities so a wrong path shows far above atol
    return model, byte_tokenizer()


def _short_convs():
    convs = _score_conversations("TASK: add 2 and 3\n[solver] 5\n[verifier] checked, 5. FINAL ANSWER: 5")
    return [convs[k] for k in ("1.1", "1.3", "2.6", "3.2", "task")]


def test_score_cached_prefix_equals_full_forward(tiny_judge):
    model, tok = tiny_judge
    convs = _short_convs()
    full, c_full = label_probabilities(model, tok, convs, path="full")
    cached, c_cached = label_probabilities(model, tok, convs, path="cached")
    seq, _ = label_probabilities(model, tok, convs, path="cached_sequential")
    assert cached == pytest.approx(full, abs=1e-5)
    assert seq == pytest.approx(full, abs=1e-5)
    assert all(0.0 < p < 1.0 for p in full)
    assert max(full) - min(full) > 1e-3  # the rows differ, so a row mix-up would be seen
    assert c_cached["prefix_tokens"] > 0 and c_cached["prefilled_tokens"] < c_full["prefilled_tokens"]


def test_score_mode_probabilities_pair_and_thresholds(tiny_judge):
    model, tok = tiny_judge
    from hf_fastslow.backends.hf_local import HFLocalBackend

    judge = MASTAnnotator(HFLocalBackend(model, tok), "score", thresholds={"1.1": 0.0, "1.2": 1.0},
                          window_tokens=8192)  # the tiny config says 512 positions; RoPE runs past it
    ann = judge.annotate(Trace("t", "add 2 and 3", [Turn("solver", "5")]))
    assert set(ann.p_yes) == set(MAST_CODES) and 0 < ann.p_task_completed < 1
    assert ann.modes["1.1"] is True and ann.modes["1.2"] is False  # thresholds 0 and 1
    assert all(ann.modes[c] == (ann.p_yes[c] > 0.5) for c in MAST_CODES if c not in ("1.1", "1.2"))
    assert judge.prefill_tokens["prefix_tokens"] > 0


def test_score_mode_through_backend_scoring():
    # A backend that scores continuations: P(yes) = e^lp(yes) / (e^lp(yes) + e^lp(no)).
    def scorer(messages, continuation):
        wants_yes = "1.3" in messages[-1]["content"].split("Question:")[-1]
        return [-0.1] if (continuation == "yes") == wants_yes else [-2.3]

    judge = MASTAnnotator(ScriptedBackend("x", scorer=scorer), "score")
    ann = judge.annotate("[a] hi")
    assert ann.failed_modes == ["1.3"]
    assert ann.p_yes["1.3"] == pytest.approx(1 / (1 + math.exp(-2.3 + 0.1)))


def test_score_mode_needs_logits():
    from hf_fastslow.backends.base import BackendFeatureError

    with pytest.raises(BackendFeatureError, match="MAST score mode"):
        MASTAnnotator(ScriptedBackend("x"), "score")  # no scorer: like a server without prompt scoring
    with pytest.raises(ValueError, match="method"):
        MASTAnnotator(ScriptedBackend("x"), "vote")


# ----- windowing --------------------------------------------------------------------------------------------------
def test_window_trace_splits_and_keeps_the_end():
    turns = [Turn(f"agent{i % 2}", f"message {i} " + "word " * 20) for i in range(30)]
    trace = Trace("long", "a long task", turns)
    count = lambda s: len(s.split())  # noqa: E731
    windows = window_trace(trace, 120, count)
    assert len(windows) > 2 and all(count(w) <= 120 for w in windows)
    assert all("a long task" in w for w in windows)
    joined = "\n".join(windows)
    assert all(f"message {i} " in joined for i in range(30))  # nothing lost
    assert "message 29 " in windows[-1]
    assert window_trace(trace, 10_000, count) == [trace.render()]
    big = Trace("big", "t", [Turn("a", "x " * 500)])
    assert len(window_trace(big, 100, count)) >= 5  # one over-long turn is cut too
    with pytest.raises(ValueError, match="fills the judge's context"):
        window_trace(trace, 0, count)


def test_windowed_generate_combines_or_and_end_modes_from_last_window():
    # Window answers: 1.3 yes only in the first window; 3.2 yes only in the first (an end-of-trace mode: ignored).
    def responder(messages, index, kwargs):
        text = messages[-1]["content"]
        first = "part 1 of" in text
        return _answer(yes={"1.3", "3.2"} if first else {"2.2"}, task="no" if first else "yes")

    trace = Trace("w", "task", [Turn("a", f"turn {i} " + "blah " * 60) for i in range(40)])
    judge = MASTAnnotator(ScriptedBackend(responder), "generate", window_tokens=1200)
    ann = judge.annotate(trace)
    assert ann.windows > 1 and len(ann.raw) == ann.windows
    assert ann.modes["1.3"] is True and ann.modes["2.2"] is True
    assert ann.modes["3.2"] is False and ann.task_completed is True


# ----- generate mode and garbage ------------------------------------------------------------------------------------
def test_generate_mode_counts_garbage():
    replies = iter([_answer(yes={"2.3"}, task="yes"), "I like turtles.", _answer(extra_lines=["1.6 yes"])])
    judge = MASTAnnotator(ScriptedBackend(lambda m, i, k: next(replies)), "generate")
    good = judge.annotate("[a] hi")
    bad = judge.annotate("[a] hi")
    legacy = judge.annotate("[a] hi")  # legacy codes: recorded in flags (a judge's quirk, not a crash)
    assert good.failed_modes == ["2.3"] and good.task_completed is True and good.parse_error is None
    assert bad.parse_error and all(v is None for v in bad.modes.values()) and bad.raw == ["I like turtles."]
    assert legacy.parse_error is None and any("1.6" in f for f in legacy.flags)
    assert judge.garbage == 1 and judge.annotated == 3 and judge.missing_decisions == 14
    # the prompt: our example answer carries no legacy code, the trace comes before the definitions
    prompt = ScriptedBackend("x")
    judge = MASTAnnotator(ScriptedBackend(lambda m, i, k: prompt.calls.append(m) or "x"), "generate")
    judge.annotate("[a] UNIQUE-TRACE-TEXT")
    text = prompt.calls[0][-1]["content"]
    assert "1.6" not in text and "2.7" not in text
    assert text.index("UNIQUE-TRACE-TEXT") < text.index("Definitions of the failure modes")


# ----- agreement --------------------------------------------------------------------------------------------------
def test_mast_agreement_pairs_by_composite_key_and_counts_unparsed():
    gold = [Trace("1", "t", [Turn("a", "x")], source=s, labels={c: c == "1.3" for c in MAST_CODES},
                  task_completed=True) for s in ("chatdev/gpt", "metagpt/gpt")]  # same id, two frameworks
    judge = MASTAnnotator(ScriptedBackend(lambda m, i, k: _answer(yes={"1.3"}, task="yes")), "generate")
    preds = [judge.annotate(t) for t in reversed(gold)]  # other order: paired by key, not position
    r = mast_agreement(preds, gold)
    assert r["per_label"]["1.3"]["f1"] == 1.0 and r["pooled_kappa"] == pytest.approx(1.0)
    assert r["per_category"]["FC1"]["tp"] == 2 and r["unparsed"] == 0
    dup = [preds[0], preds[0]]
    with pytest.raises(ValueError, match="repeated composite keys"):
        mast_agreement(dup, gold)
    garbage = MASTAnnotator(ScriptedBackend("nonsense"), "generate")
    r = mast_agreement(garbage.annotate_many(gold), gold)
    assert r["unparsed"] == 2 and r["missing"] == 28 and r["per_label"]["1.3"]["fn"] == 2


# ----- the real judge ---------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_score_mode_on_smollm2_cached_equals_full(default_model):
    model, tok = default_model
    from hf_fastslow.evaluation.mast_fixtures import fixture_traces

    trace = fixture_traces()[2]  # the step-repetition trace
    convs = list(_score_conversations(trace.render()).values())
    full, _ = label_probabilities(model, tok, convs, path="full")
    cached, counters = label_probabilities(model, tok, convs, path="cached")
    seq, _ = label_probabilities(model, tok, convs, path="cached_sequential")
    assert cached == pytest.approx(full, abs=1e-5) and seq == pytest.approx(full, abs=1e-5)
    assert all(0.0 < p < 1.0 for p in full)
    per_row_suffix = (counters["prefilled_tokens"] - counters["prefix_tokens"]) / len(convs)
    assert counters["prefix_tokens"] > 5 * per_row_suffix  # most of each row is the shared, once-prefilled prefix
