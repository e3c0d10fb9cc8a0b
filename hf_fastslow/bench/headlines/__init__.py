"""Headline extractors: for each method, a function from its benchmark script's JSON to the few `Figure`s the bench
table shows (ours beside the peer on the headline metric, the paper's figure where it reports one). One module per
family of methods, each with an `EXTRACTORS` dict; standard library only (`hf-fastslow --help` imports the registry).
"""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

_FAMILIES = ("caches", "attention", "decoding", "dlm_trainers", "agents", "eval_vision")


def extractors() -> dict[str, Callable]:
    """Method name -> extractor, over every family module; a method claimed by two modules is an error."""
    found: dict[str, Callable] = {}
    for family in _FAMILIES:
        module = import_module(f"{__name__}.{family}")
        twice = found.keys() & module.EXTRACTORS.keys()
        if twice:
            raise RuntimeError(f"headline extractor(s) for {sorted(twice)} defined twice ({family} and another)")
        found.update(module.EXTRACTORS)
    return found


__all__ = ["extractors"]
