"""EndpointBackend: request building, fan-out, errors and continuation against a scripted HTTP stub; then the real
`transformers serve` (the served_model fixture)."""

import asyncio
import json
import socket

import pytest

from hf_fastslow.backends import BackendError, BackendFeatureError, BackendUnreachableError, Capabilities
from hf_fastslow.backends.endpoint import TRANSFORMERS_SERVE, EndpointBackend
from tests.chat_server import ScriptedChatServer
from tests.conftest import byte_tokenizer

USER = [{"role": "user", "content": "Name a color."}]
FULL = Capabilities(native_n=True, logprobs=True, max_top_logprobs=20, streaming=True, continue_final_message=True,
                    prompt_scoring=False, seed=True)
BARE = Capabilities(native_n=False, logprobs=False, max_top_logprobs=0, streaming=True,
                    continue_final_message=False, prompt_scoring=False, seed=True)


def choice(text, logprobs=None):
    out = {"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": text}}
    if logprobs is not None:
        out["logprobs"] = {"content": [{"token": t, "logprob": lp, "top_logprobs": [{"token": t, "logprob": lp},
                                                                                   {"token": "x", "logprob": -9.0}]}
                                       for t, lp in logprobs]}
    return out


def test_native_n_one_request_with_logprobs():
    def respond(body):
        n = body.get("n", 1)
        return {"choices": [choice(f"c{i}", [("c", -0.5), (str(i), -0.25)]) for i in range(n)],
                "usage": {"prompt_tokens": 7, "completion_tokens": 2 * n}}

    with ScriptedChatServer(respond) as srv:
        be = EndpointBackend(srv.url, "m", capabilities=FULL, server="openai", api_key="k", max_new_tokens=5)
        out = be.chat(USER, n=3, temperature=0.7, seed=4, top_logprobs=2)
    (req,) = srv.requests
    assert req["path"] == "/v1/chat/completions" and req["auth"] == "Bearer k"
    body = req["body"]
    assert (body["n"], body["seed"], body["max_tokens"], body["temperature"], body["logprobs"], body["top_logprobs"]) \
        == (3, 4, 5, 0.7, True, 2)
    assert "generation_config" not in body  # only transformers serve gets it
    assert [c.text for c in out] == ["c0", "c1", "c2"]
    assert out[1].token_logprobs == [-0.5, -0.25] and out[1].top_logprobs[0] == [-0.5, -9.0]
    assert [c.completion_tokens for c in out] == [2, 2, 2] and out[0].prompt_tokens == 7
    (rec,) = be.ledger.records
    assert (rec.requests, rec.samples, rec.completion_tokens) == (1, 3, 6)


def test_fan_out_with_seeds_and_transformers_serve_sampling():
    with ScriptedChatServer(lambda body: f"seed {body.get('seed')}") as srv:
        be = EndpointBackend(srv.url, "m", capabilities=BARE, server=TRANSFORMERS_SERVE, max_concurrency=2)
        out = be.chat_batch([USER, USER], n=3, temperature=0.8, top_p=0.9, seed=10)
        async_out = asyncio.run(be.achat(USER, n=2, seed=0, temperature=0))
        (cut,) = be.chat(USER, seed=5, stop=["5"])  # a server that leaves the stop string in: cut like OpenAI
    assert cut.text == "seed " and srv.requests[-1]["body"]["stop"] == ["5"]
    assert [[c.text for c in row] for row in out] == [["seed 10", "seed 11", "seed 12"]] * 2
    bodies = [r["body"] for r in srv.requests[:6]]
    assert len(srv.requests) == 9 and all("n" not in b for b in bodies)
    assert json.loads(bodies[0]["generation_config"]) == {"do_sample": True, "temperature": 0.8, "top_p": 0.9}
    assert be.ledger.records[0].requests == 6
    assert [c.text for c in async_out] == ["seed 0", "seed 1"]
    assert "generation_config" not in srv.requests[-2]["body"]  # greedy needs no sampling config


def test_probe_detects_missing_n_and_logprobs_and_errors_name_the_url():
    with ScriptedChatServer(lambda body: "OK") as srv:  # answers one choice, no log-probs, whatever is asked
        be = EndpointBackend(srv.url, "m")
        caps = be.capabilities
        assert (caps.native_n, caps.logprobs, caps.max_top_logprobs, caps.continue_final_message) == \
            (False, False, 0, False)
        probe = srv.requests[0]["body"]
        assert probe["n"] == 2 and probe["logprobs"] is True and probe["max_tokens"] == 1
        with pytest.raises(BackendFeatureError, match=rf"EndpointBackend\({srv.url}\) does not support log-probs"):
            be.chat(USER, logprobs=True)
        with pytest.raises(BackendFeatureError, match="pass tokenizer="):
            be.chat(USER + [{"role": "assistant", "content": "Bl"}], continue_final_message=True)
        with pytest.raises(BackendFeatureError, match="HFLocalBackend"):
            be.score(USER, "blue")
        assert len(srv.requests) == 1  # nothing was sent after the probe


def test_http_errors_and_unreachable_server():
    with ScriptedChatServer(lambda body: 503) as srv:
        be = EndpointBackend(srv.url, "m", capabilities=BARE)
        with pytest.raises(BackendError, match=rf"EndpointBackend\({srv.url}\) returned HTTP 503"):
            be.chat(USER)
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}/v1"
    be = EndpointBackend(url, "m", timeout=5)
    with pytest.raises(BackendUnreachableError, match=rf"EndpointBackend\({url}\) is unreachable"):
        be.probe()
    be = EndpointBackend(url, "m", timeout=5, capabilities=BARE)
    with pytest.raises(BackendUnreachableError, match="unreachable"):
        asyncio.run(be.achat(USER))
    with pytest.raises(BackendUnreachableError, match="unreachable"):
        list(be.stream(USER))
    with pytest.raises(ValueError, match="http"):
        EndpointBackend("localhost:8000", "m")


def test_continuation_renders_locally_and_uses_completions():
    tok = byte_tokenizer()
    with ScriptedChatServer(lambda body: {"choices": [{"index": 0, "text": "ue sky", "finish_reason": "stop"}],
                                          "usage": {"prompt_tokens": 9, "completion_tokens": 6}}) as srv:
        be = EndpointBackend(srv.url, "m", tokenizer=tok, capabilities=FULL)
        partial = USER + [{"role": "assistant", "content": "Bl"}]
        (c,) = be.chat(partial, continue_final_message=True, max_new_tokens=4, seed=1)
    (req,) = srv.requests
    assert req["path"] == "/v1/completions"
    assert req["body"]["prompt"] == "<user>Name a color.\n<assistant>Bl" and req["body"]["max_tokens"] == 4
    assert c.text == "ue sky" and c.completion_tokens == 6


# ----- the real server -------------------------------------------------------------------------------------------
@pytest.mark.serve
def test_served_capabilities_chat_and_fan_out(served_model):
    be = served_model.backend(max_new_tokens=4)
    caps = be.capabilities
    # transformers serve ignores n and log-probs (checked in its source: UNUSED_CHAT_COMPLETION_FIELDS)
    assert not caps.native_n and not caps.logprobs and caps.max_top_logprobs == 0
    with pytest.raises(BackendFeatureError, match="transformers serve"):
        be.chat(USER, top_logprobs=5)
    (greedy,) = be.chat(USER, temperature=0)
    assert greedy.text and greedy.completion_tokens == 4 and greedy.prompt_tokens > 0
    samples = be.chat(USER, n=3, temperature=1.0, seed=0)
    assert len(samples) == 3 and len({c.text for c in samples}) >= 2  # distinct seeds -> distinct samples
    rec = be.ledger.records[-1]
    assert (rec.requests, rec.samples, rec.completion_tokens) == (3, 3, sum(c.completion_tokens for c in samples))


@pytest.mark.serve
def test_served_stream_async_and_continuation(served_model):
    from transformers import AutoTokenizer

    be = served_model.backend(max_new_tokens=4, temperature=0, tokenizer=AutoTokenizer.from_pretrained(
        served_model.model))
    (reference,) = be.chat(USER)
    assert "".join(be.stream(USER)) == reference.text
    rec = be.ledger.records[-1]
    assert rec.kind == "stream" and 0 < rec.ttft_s <= rec.seconds and rec.completion_tokens == 4

    async def run():
        return await be.achat(USER), [d async for d in be.astream(USER)]

    (async_reply,), deltas = asyncio.run(run())
    assert async_reply.text == reference.text == "".join(deltas)
    partial = USER + [{"role": "assistant", "content": reference.text[:4]}]
    (cont,) = be.chat(partial, continue_final_message=True, max_new_tokens=2)
    assert cont.completion_tokens == 2 and cont.text


@pytest.mark.serve
@pytest.mark.slow  # the one default real-server check per method is above; this one runs with -m slow
def test_served_judge_and_reflector_run_on_the_backend(served_model):
    from hf_fastslow.generation.v1_judges import EndpointJudge
    from hf_fastslow.trainers.reflection import OpenAIReflector

    judge = EndpointJudge(served_model.base_url, served_model.model, max_tokens=3, max_workers=2)
    replies = judge.complete(["Rate 2+2=4 from 1 to 9.", "Rate 2+2=5 from 1 to 9."])
    assert len(replies) == 2 and all(replies) and judge.calls == 2 and judge.tokens > 6
    reflector = OpenAIReflector(served_model.base_url, served_model.model, max_tokens=3, temperature=0.0)
    assert reflector.complete("Improve: 'Answer.'") and reflector.backend.ledger.total().completion_tokens <= 3


def test_hub_offline_mode_does_not_block_a_named_server_but_still_blocks_the_hub(monkeypatch):
    # HF_HUB_OFFLINE=1 makes huggingface_hub refuse every request, also to the local server a user runs offline
    import huggingface_hub.constants as hub_constants
    from huggingface_hub.errors import OfflineModeIsEnabled
    from huggingface_hub.utils import get_session

    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    with ScriptedChatServer(lambda body: "OK") as srv:
        be = EndpointBackend(srv.url, "m", capabilities=FULL, server="openai", max_new_tokens=2)
        assert be.chat(USER)[0].text == "OK"
        assert asyncio.run(be.achat(USER))[0].text == "OK"
        with pytest.raises(OfflineModeIsEnabled):  # outside the backend's calls the Hub stays offline
            get_session().get(srv.url + "/models")
