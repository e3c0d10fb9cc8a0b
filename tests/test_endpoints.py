"""hf_fastslow.endpoints: the deprecated (one release) chat helpers, now on EndpointBackend; each use warns."""

import socket

import pytest

from hf_fastslow.endpoints import chat_completions_url, post_chat_completion
from tests.chat_server import ScriptedChatServer


def test_url_normalisation():
    with pytest.warns(DeprecationWarning, match="EndpointBackend"):
        assert chat_completions_url("http://h:8000/v1/") == "http://h:8000/v1/chat/completions"
    with pytest.warns(DeprecationWarning, match="EndpointBackend"):
        assert chat_completions_url("http://h/v1/chat/completions") == "http://h/v1/chat/completions"


def test_reply_payload_and_auth_header():
    with ScriptedChatServer(lambda body: body["messages"][0]["content"].upper(), usage={"total_tokens": 3}) as srv:
        with pytest.warns(DeprecationWarning, match=r"deprecated.*hf_fastslow\.backends\.EndpointBackend"):
            content, payload = post_chat_completion(srv.url + "/chat/completions", {"messages": [
                {"role": "user", "content": "hi"}], "max_tokens": 4, "custom_field": 1}, api_key="secret",
                what="Test endpoint")
    assert content == "HI" and payload["usage"]["total_tokens"] == 3
    req = srv.requests[0]
    assert req["auth"] == "Bearer secret" and req["path"] == "/v1/chat/completions"
    assert req["body"]["max_tokens"] == 4 and req["body"]["custom_field"] == 1  # unknown fields still sent


@pytest.mark.parametrize("answer,match", [(502, "Test endpoint .* returned HTTP 502"),
                                          ({"unexpected": True}, "without choices")])
def test_failures_name_the_endpoint(answer, match):
    with ScriptedChatServer(lambda body: answer) as srv:
        with pytest.raises(RuntimeError, match=match), pytest.warns(DeprecationWarning):
            post_chat_completion(srv.url + "/chat/completions", {"messages": []}, what="Test endpoint")


def test_unreachable_host():
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(RuntimeError, match="unreachable"), pytest.warns(DeprecationWarning):
        post_chat_completion(f"http://127.0.0.1:{port}/v1/chat/completions", {"messages": []}, timeout=5)
