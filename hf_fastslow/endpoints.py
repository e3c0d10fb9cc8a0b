"""Deprecated (kept for one release): use `hf_fastslow.backends.EndpointBackend`.

The hand-written urllib client that lived here is gone; these two functions now run on `EndpointBackend`
(huggingface_hub's `InferenceClient`) and warn with a `DeprecationWarning` naming the replacement.
"""

from __future__ import annotations

import warnings
from typing import Any

from .backends.base import BackendError, Capabilities
from .backends.endpoint import EndpointBackend

__all__ = ["chat_completions_url", "post_chat_completion"]

_REPLACEMENT = ("hf_fastslow.backends.EndpointBackend(base_url, model).chat(messages) (it takes the API root, e.g. "
                "'http://127.0.0.1:8000/v1')")
_BARE = Capabilities(native_n=False, logprobs=False, max_top_logprobs=0, streaming=True,
                     continue_final_message=False, prompt_scoring=False, seed=True)
# chat_completion's own keyword arguments; anything else in a body goes through extra_body
_CLIENT_FIELDS = {"frequency_penalty", "logit_bias", "logprobs", "max_tokens", "n", "presence_penalty",
                  "response_format", "seed", "stop", "temperature", "tool_choice", "tool_prompt", "tools",
                  "top_logprobs", "top_p"}


def _warn(name: str) -> None:
    warnings.warn(f"hf_fastslow.endpoints.{name} is deprecated and will be removed in the next release; use "
                  f"{_REPLACEMENT}.", DeprecationWarning, stacklevel=3)


def _url(base_url: str) -> str:
    base_url = base_url.rstrip("/")
    return base_url if base_url.endswith("/chat/completions") else base_url + "/chat/completions"


def chat_completions_url(base_url: str) -> str:
    """Deprecated. `http://host:8000/v1` -> `http://host:8000/v1/chat/completions` (a full URL is kept as is)."""
    _warn("chat_completions_url")
    return _url(base_url)


def post_chat_completion(
    url: str, body: dict[str, Any], *, api_key: str | None = None, timeout: float = 120.0, what: str = "Endpoint"
) -> tuple[str, dict]:
    """Deprecated. POST `body` to `url` (a `/chat/completions` URL); returns `(choices[0].message.content, payload)`.

    Failures raise `RuntimeError` (`BackendError`) naming `what` and the URL.
    """
    _warn("post_chat_completion")
    url = _url(url)
    body = dict(body)
    messages = body.pop("messages", [])
    model = body.pop("model", None)
    known = {k: body.pop(k) for k in list(body) if k in _CLIENT_FIELDS}
    backend = EndpointBackend(url, model, api_key=api_key, timeout=timeout, capabilities=_BARE, server="openai",
                              name=f"{what} {url}")
    with backend.translate_errors():
        payload = backend.client.chat_completion(messages, model=model, extra_body=body or None, **known)
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as err:
        raise BackendError(f"{what} {url} sent a reply without choices[0].message.content: "
                           f"{str(payload)[:300]}") from err
    return content or "", dict(payload)
