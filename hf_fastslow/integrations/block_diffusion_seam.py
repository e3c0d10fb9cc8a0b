"""Block diffusion: what `generate(custom_generate=<callable>)` does not hand to the callable.

transformers (5.17 and 5.24) keeps `streamer` and `assistant_model` for itself when `custom_generate` is a callable:
`_extract_generation_mode_kwargs` replaces them with the callable's own new keywords, so the loop would neither stream
nor see that an assistant model was asked for (which it must refuse). The running `generate` frame still holds them.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any


@functools.cache
def _generate_code():
    from transformers.generation.utils import GenerationMixin

    return inspect.unwrap(GenerationMixin.generate).__code__


def generate_call_arguments(model: Any, max_depth: int = 8) -> dict[str, Any]:
    """`{"streamer": ..., "assistant_model": ...}` of the `model.generate(...)` call running the current
    `custom_generate` callable; `{}` when the callable was called directly."""
    frame = inspect.currentframe()
    try:
        caller = frame.f_back if frame is not None else None
        for _ in range(max_depth):
            if caller is None:
                break
            local = caller.f_locals
            if (caller.f_code is _generate_code() or caller.f_code.co_name == "generate") and local.get(
                "self"
            ) is model and "custom_generate" in local:
                return {"streamer": local.get("streamer"), "assistant_model": local.get("assistant_model")}
            caller = caller.f_back
        return {}
    finally:
        del frame
