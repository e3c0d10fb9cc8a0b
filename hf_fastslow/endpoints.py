"""A minimal client for OpenAI-compatible chat endpoints (vLLM, TGI, ...), standard library only, shared by the
judges (V1-Infer) and reflectors (FST) that can run against a served model."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any

__all__ = ["chat_completions_url", "post_chat_completion"]


def chat_completions_url(base_url: str) -> str:
    """`http://host:8000/v1` -> `http://host:8000/v1/chat/completions` (a full URL is kept as is)."""
    base_url = base_url.rstrip("/")
    return base_url if base_url.endswith("/chat/completions") else base_url + "/chat/completions"


def post_chat_completion(
    url: str, body: dict[str, Any], *, api_key: str | None = None, timeout: float = 120.0, what: str = "Endpoint"
) -> tuple[str, dict]:
    """POST `body` to `url`; returns `(choices[0].message.content, whole payload)`.

    Failures raise `RuntimeError` naming `what` and the URL: HTTP errors with the status and the start of the body,
    unreachable hosts, and replies without `choices[0].message.content`.
    """
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    request = urllib.request.Request(url, data=json.dumps(body).encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            payload = json.loads(response.read().decode())
    except urllib.error.HTTPError as err:
        detail = err.read().decode(errors="replace")[:500]
        raise RuntimeError(f"{what} {url} returned HTTP {err.code}: {detail}") from err
    except urllib.error.URLError as err:
        raise RuntimeError(f"{what} {url} is unreachable: {err.reason}") from err
    try:
        content = payload["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError) as err:
        raise RuntimeError(
            f"{what} {url} sent a reply without choices[0].message.content: {str(payload)[:300]}"
        ) from err
    return content or "", payload
