"""agentdash pointed at an OpenAI-compatible server: a stub HTTP server offline (its real openai client, prompt and
parser run), and `transformers serve` on the default model (slow, serve)."""

import pytest

pytest.importorskip("agentdash")
pytest.importorskip("openai")

from hf_fastslow.evaluation.mast_agentdash import AgentDashAnnotator  # noqa: E402
from hf_fastslow.evaluation.mast_taxonomy import MAST_CODES  # noqa: E402
from hf_fastslow.evaluation.mast_traces import Trace, Turn  # noqa: E402
from tests.chat_server import ScriptedChatServer  # noqa: E402


def _openai_payload(body, text):
    # the openai client agentdash uses needs the full chat.completion shape, not the minimal one
    return {"id": "x", "object": "chat.completion", "created": 0, "model": body["model"],
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}


def test_agentdash_through_a_local_openai_server():
    answer = "A. loops.\nB. no\nC.\n" + "\n".join(f"{c} {'yes' if c == '1.3' else 'no'}" for c in MAST_CODES)
    replies = [answer, "Sorry, I cannot help with that."]
    with ScriptedChatServer(lambda body: _openai_payload(body, replies.pop(0))) as server:
        judge = AgentDashAnnotator(server.url, "local-judge", max_tokens=64)
        trace = Trace("t1", "add", [Turn("a", "UNIQUE-TRACE")], source="s")
        good = judge.annotate(trace)
        bad = judge.annotate(trace)
    seen = [r["body"] for r in server.requests]
    assert seen[0]["model"] == "local-judge" and seen[0]["max_tokens"] == 64 and seen[0]["temperature"] == 1.0
    assert "UNIQUE-TRACE" in seen[0]["messages"][0]["content"]  # agentdash's own prompt around our trace
    assert good.failed_modes == ["1.3"] and good.parse_error is None and good.key == ("s", "t1")
    assert good.task_completed is False
    # agentdash turns garbage into fourteen silent "no"s; we keep its answer and count the garbage
    assert not any(bad.modes.values()) and bad.parse_error and judge.garbage == 1 and judge.annotated == 2


@pytest.mark.slow
@pytest.mark.serve
def test_agentdash_on_transformers_serve(served_model):
    judge = AgentDashAnnotator(served_model.base_url, served_model.model, max_tokens=16)
    ann = judge.annotate(Trace("t", "say hi", [Turn("a", "hi"), Turn("b", "FINAL ANSWER: hi")]))
    assert ann.raw and isinstance(ann.raw[0], str) and set(ann.modes) == set(MAST_CODES)
    assert judge.annotated == 1 and judge.garbage in (0, 1)  # a 16-token answer from a 135M judge may be garbage
