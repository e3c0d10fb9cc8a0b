"""Headline extractors: for each method, a function from its benchmark script's JSON to the few `Figure`s the bench
table shows (ours beside the peer on the headline metric, the paper's figure where it reports one). One module per
family of methods, each with an `EXTRACTORS` dict; standard library only (`hf-fastslow --help` imports the registry).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
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


class _RowIndex(dict):
    """A dict of rows by key whose missing key raises a KeyError naming the keys that exist. A number (or a tuple with
    numbers) also finds a key within 1e-9 of it: a float a script computed (a kept fraction) matches its literal."""

    def __init__(self, names: str):
        super().__init__()
        self.names = names

    def __missing__(self, key):
        near = next((have for have in self if _close(have, key)), None)
        if near is None:
            raise KeyError(f"no row at {self.names}={key!r} (rows at: {list(self)})")
        return self[near]


def _close(have, want) -> bool:
    if isinstance(have, tuple) and isinstance(want, tuple):
        return len(have) == len(want) and all(_close(h, w) for h, w in zip(have, want))
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (have, want))
    return abs(have - want) < 1e-9 if numbers else have == want


def index_rows(rows: Iterable[dict], *keys: str | Callable[[dict], object], grouped: bool = False) -> dict:
    """The rows of a script's JSON by key: the tuple of `keys`' values, or the value itself for a single key; a key is
    a field name or a function of the row. A later row with the same key replaces an earlier one; `grouped=True` keeps
    them all (the value is the list of rows with that key, in order). Looking up a key no row has raises a KeyError
    that lists the keys the rows do have (a renamed arm fails loudly, saying what is there)."""
    if not keys:
        raise TypeError("index_rows needs at least one key")
    names = ", ".join(k if isinstance(k, str) else getattr(k, "__name__", "key") for k in keys)
    index = _RowIndex(names if len(keys) == 1 else f"({names})")
    for row in rows:
        values = tuple(key(row) if callable(key) else row[key] for key in keys)
        key = values[0] if len(keys) == 1 else values
        if grouped:
            index.setdefault(key, []).append(row)
        else:
            index[key] = row
    return index


def smoke_note(smoke: bool, why: str) -> str:
    """The note's suffix that marks a smoke-scale run (too small to rank the arms) and says why; "" otherwise."""
    return f"; smoke scale: {why}" if smoke else ""


__all__ = ["extractors", "index_rows", "smoke_note"]
