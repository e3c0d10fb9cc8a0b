"""`LocalServer`: `transformers serve` as a subprocess on localhost, for tests, examples and scale-out experiments.

    with LocalServer(default_model_path()) as server:
        backend = server.backend()            # an EndpointBackend on server.base_url
        print(backend.chat([{"role": "user", "content": "Hi"}], max_new_tokens=8)[0].text)

The server is started with the model preloaded (`transformers serve <model_path> --port P --device cpu`), considered
up when `GET /health` answers `{"status": "ok"}`, and stopped by its pid (terminate, then kill after a grace period).
Needs transformers' `serving` extra (fastapi, uvicorn): `pip install "transformers[serving]"`.
"""

from __future__ import annotations

import atexit
import contextlib
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["LocalServer", "serving_available"]

SERVING_HINT = 'transformers serve needs fastapi and uvicorn: pip install "transformers[serving]"'


def serving_available() -> bool:
    """Whether `transformers serve` can start here (fastapi and uvicorn importable)."""
    return all(importlib.util.find_spec(m) is not None for m in ("fastapi", "uvicorn"))


def _free_port(host: str) -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class LocalServer:
    """`LocalServer(model_path, *, port=None, host="127.0.0.1", extra_args=(), startup_timeout=180.0,
    device="cpu", threads=None)`; `.base_url`, `.model`, `.pid`, `.log_path`, `.stop()`, `.backend(**kw)`.

    `threads` sets the server's torch/OpenMP threads (OMP_NUM_THREADS) so it does not oversubscribe a shared box.
    """

    def __init__(self, model_path: str | os.PathLike, *, port: int | None = None, host: str = "127.0.0.1",
                 extra_args: Sequence[str] = (), startup_timeout: float = 180.0, device: str | None = "cpu",
                 threads: int | None = None):
        self.model_path = str(model_path)
        self.host = host
        self.port = port
        self.extra_args = list(extra_args)
        self.startup_timeout = startup_timeout
        self.device = device
        self.threads = threads
        self.process: subprocess.Popen | None = None
        self.log_path: str | None = None
        self._log = None

    @property
    def base_url(self) -> str:
        return f"http://{self.host}:{self.port}/v1"

    @property
    def model(self) -> str:
        """The model id to send (the server lists and serves the preloaded model under its path)."""
        return self.model_path

    @property
    def pid(self) -> int | None:
        return None if self.process is None else self.process.pid

    def command(self) -> list[str]:
        cmd = [sys.executable, "-c", "from transformers.cli.transformers import main; main()", "serve",
               self.model_path, "--host", self.host, "--port", str(self.port)]
        if self.device is not None:
            cmd += ["--device", self.device]
        return cmd + self.extra_args

    def start(self) -> LocalServer:
        if self.process is not None:
            return self
        if not serving_available():
            raise RuntimeError(SERVING_HINT)
        if self.port is None:
            self.port = _free_port(self.host)
        env = dict(os.environ)
        if self.threads is not None:
            env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(self.threads)
        fd, self.log_path = tempfile.mkstemp(prefix="transformers_serve_", suffix=".log")
        self._log = os.fdopen(fd, "w")
        self.process = subprocess.Popen(self.command(), stdout=self._log, stderr=subprocess.STDOUT, env=env)
        atexit.register(self.stop)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, chars: int = 2000) -> str:
        if not self.log_path or not Path(self.log_path).exists():
            return ""
        return Path(self.log_path).read_text(errors="replace")[-chars:]

    def health(self, timeout: float = 2.0) -> bool:
        try:
            with urllib.request.urlopen(f"http://{self.host}:{self.port}/health", timeout=timeout) as response:
                return response.status == 200 and json.loads(response.read()).get("status") == "ok"
        except (urllib.error.URLError, OSError, ValueError):
            return False

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"transformers serve exited with code {self.process.returncode} before it was "
                                   f"healthy ({' '.join(self.command())}):\n{self.log_tail()}")
            if self.health():
                return
            time.sleep(0.25)
        raise TimeoutError(f"transformers serve on {self.base_url} was not healthy after {self.startup_timeout:.0f} "
                           f"s:\n{self.log_tail()}")

    def stop(self, grace: float = 10.0) -> None:
        """Terminate the server by its pid; kill it if it has not exited after `grace` seconds."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(process.pid, signal.SIGTERM)
            try:
                process.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(process.pid, signal.SIGKILL)
                process.wait(timeout=grace)
        if self._log is not None:
            self._log.close()
            self._log = None
            with contextlib.suppress(OSError):
                os.unlink(self.log_path)
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    def backend(self, **kwargs: Any):
        """A fresh `EndpointBackend` on this server (kwargs go to its constructor)."""
        from .endpoint import TRANSFORMERS_SERVE, EndpointBackend

        kwargs.setdefault("server", TRANSFORMERS_SERVE)
        return EndpointBackend(self.base_url, self.model, **kwargs)

    def __enter__(self) -> LocalServer:
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"LocalServer({self.model_path!r}, base_url={self.base_url!r}, pid={self.pid})"
