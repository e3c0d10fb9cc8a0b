"""What the bench tests share: the saved reports they read (tests/bench/data, and the recorded runs under docs/)."""

from __future__ import annotations

import json
from pathlib import Path

DATA = Path(__file__).resolve().parent / "data"
ROOT = Path(__file__).resolve().parents[2]


def load_json(name: str | Path) -> dict:
    """A saved report: a relative name is read from tests/bench/data, an absolute path as it is."""
    path = Path(name)
    return json.loads((path if path.is_absolute() else DATA / path).read_text())
