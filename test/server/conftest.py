"""A real ``sglang serve`` subprocess on a free loopback port, shared by the server tests.

test/server is a package (it has ``__init__.py``) so that this file is imported as
``server.conftest`` and ``from conftest import ...`` elsewhere keeps meaning test/conftest.py.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import httpx
import pytest
from conftest import REPO

STARTUP_TIMEOUT_S = 90.0

# Small and quick on the built-in model: 48x32 pixels, 9 frames, 8 steps.
SMALL = {"size": "48x32", "num_frames": 9, "num_inference_steps": 8}


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def server_env(**extra: str) -> dict[str, str]:
    """This process's environment, with the repo's python/ on PYTHONPATH and ``extra`` on top."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "python"), env.get("PYTHONPATH")]))
    env.pop("SGLANG_API_KEY", None)  # only a test that means to set a key has one
    env.update(extra)
    return env


class ServerProcess:
    """``sglang serve`` on the built-in model, on the CPU, on a free loopback port, over one data
    folder; it can be killed (any signal) and started again on the same folder (each start takes
    a new free port).

    Args:
        data_dir: The ``--data-dir``.
        log: The file its output is appended to (shown when it fails to start).
        args: Further ``serve`` flags.
        env: Its environment (default: :func:`server_env`).
        preexec: Run in the child before it starts (e.g. to set a resource limit).
    """

    def __init__(self, data_dir: Path, log: Path, *args: str, env: dict[str, str] | None = None,
                 preexec: Callable[[], None] | None = None) -> None:
        self.data_dir, self.log, self.args, self.env, self.preexec = data_dir, log, args, env, preexec
        self.proc: subprocess.Popen | None = None
        self.url = ""

    def start(self, wait: bool = True) -> str:
        """Start it and (unless ``wait`` is false: then call :meth:`wait_ready`) wait for /health;
        its base URL (no /v1)."""
        port = _free_port()
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "sglang.cli.main", "--log-level", "info", "serve",
                   "--host", "127.0.0.1", "--port", str(port), "--device", "cpu",
                   "--data-dir", str(self.data_dir), *self.args]
        with open(self.log, "a") as out:
            self.proc = subprocess.Popen(command, cwd=REPO, env=self.env or server_env(), stdout=out,
                                         stderr=subprocess.STDOUT, preexec_fn=self.preexec)
        if wait:
            self.wait_ready()
        return self.url

    def wait_ready(self) -> None:
        assert self.proc is not None
        _wait_healthy(self.url, self.proc, self.log)

    def signal(self, sig: int, timeout: float = 30.0) -> int:
        """Send ``sig`` and wait for the exit; its return code (``-sig`` when the signal ended it)."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        return self.proc.wait(timeout=timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.terminate()
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"sglang serve exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"sglang serve did not answer /health within {STARTUP_TIMEOUT_S:.0f}s:\n{log.read_text()}")


@contextlib.contextmanager
def serve(log: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """``sglang serve`` (a :class:`ServerProcess` over a new data folder beside ``log``) with
    ``args`` and ``env`` until the block ends; yields its base URL (no /v1)."""
    server = ServerProcess(Path(tempfile.mkdtemp(prefix="data-", dir=log.parent)), log, *args, env=env)
    try:
        yield server.start()
    finally:
        server.stop()


@pytest.fixture(scope="session")
def server_log(tmp_path_factory) -> Path:
    """Where the server of ``server_url`` writes its log (stdout and stderr, level info)."""
    return tmp_path_factory.mktemp("server") / "server.log"


@pytest.fixture(scope="session")
def server_url(server_log) -> Iterator[str]:
    """Base URL (no /v1) of a server running the built-in model on the CPU."""
    with serve(server_log) as url:
        yield url


@pytest.fixture(scope="session")
def openai_client(server_url):
    import openai

    return openai.OpenAI(base_url=f"{server_url}/v1", api_key="sk-local", max_retries=0, timeout=30.0)


@pytest.fixture(scope="session")
def http(server_url) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server_url, timeout=30.0) as client:
        yield client


def wait_finished(http: httpx.Client, video_id: str, timeout: float = 60.0) -> dict[str, Any]:
    """Poll GET /v1/videos/{id} until it is completed or failed; returns the Video object."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        video = http.get(f"/v1/videos/{video_id}").json()
        if video["status"] in ("completed", "failed"):
            return video
        time.sleep(0.05)
    raise AssertionError(f"video {video_id} not finished after {timeout}s: {video}")
