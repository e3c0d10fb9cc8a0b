"""huggingface_hub seam for the endpoint backend: `HF_HUB_OFFLINE=1` must not block a server the user named, and
which HTTP library's transport errors mean "unreachable" (huggingface_hub 1.x uses httpx, 2.x its fork httpx2).

huggingface_hub's HTTP clients (the ones `InferenceClient` and `get_session()` use) refuse EVERY request while
offline mode is on, through a request hook that asks `huggingface_hub.constants.is_offline_mode()` — also requests to
`http://127.0.0.1:8000/v1`, the local `transformers serve` / vLLM a user runs precisely because the machine is
offline. `endpoint_requests_allowed()` marks the current thread / asyncio task as sending requests to such a named
endpoint, for which that check answers False; every other Hub request, in this and other threads, stays offline.
"""

from __future__ import annotations

import contextlib
import contextvars
import importlib
from collections.abc import Iterator

import huggingface_hub.constants as _hub_constants
from huggingface_hub.utils import get_session

__all__ = ["endpoint_requests_allowed", "hub_transport_error"]

_SENDING_TO_NAMED_ENDPOINT = contextvars.ContextVar("hf_fastslow_named_endpoint_request", default=False)


def _install_offline_check() -> None:
    original = _hub_constants.is_offline_mode
    if getattr(original, "_hf_fastslow_wrapped", False):
        return

    def is_offline_mode() -> bool:
        return False if _SENDING_TO_NAMED_ENDPOINT.get() else original()

    is_offline_mode._hf_fastslow_wrapped = True  # type: ignore[attr-defined]
    _hub_constants.is_offline_mode = is_offline_mode


@contextlib.contextmanager
def endpoint_requests_allowed() -> Iterator[None]:
    """Requests sent from this context (thread / task) go out even under `HF_HUB_OFFLINE=1`.

    Restores the previous value with `set` rather than a token reset, so the block may span awaits or generator
    suspensions without tripping contextvars' same-context rule."""
    _install_offline_check()
    previous = _SENDING_TO_NAMED_ENDPOINT.get()
    _SENDING_TO_NAMED_ENDPOINT.set(True)
    try:
        yield
    finally:
        _SENDING_TO_NAMED_ENDPOINT.set(previous)


def hub_transport_error() -> type[Exception]:
    """The base class of connection / timeout errors raised by the HTTP library huggingface_hub's clients run on."""
    http = importlib.import_module(type(get_session()).__module__.split(".")[0])
    return http.TransportError
