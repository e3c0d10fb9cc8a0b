"""Headline extractors for the caches benchmarks (see hf_fastslow/bench/headlines/__init__.py)."""

from __future__ import annotations

from hf_fastslow.bench.registry import Figure  # noqa: F401  (the type every extractor returns)

EXTRACTORS: dict = {}
