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
import time
from pathlib import Path
from typing import Any, Iterator

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


def server_env(**extra: str) -> dict[str, str]:
    """This process's environment, with the repo's python/ on PYTHONPATH and ``extra`` on top."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "python"), env.get("PYTHONPATH")]))
    env.pop("SGLANG_API_KEY", None)  # only a test that means to set a key has one
    env.update(extra)
    return env


@contextlib.contextmanager
def serve(log: Path, *args: str, env: dict[str, str] | None = None) -> Iterator[str]:
    """``sglang serve`` on the CPU on a free loopback port, with ``args`` and ``env`` (default:
    :func:`server_env`), until the block ends; yields its base URL (no /v1). Output goes to ``log``."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "sglang.cli.main", "--log-level", "info", "serve",
               "--host", "127.0.0.1", "--port", str(port), "--device", "cpu", *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(command, cwd=REPO, env=env or server_env(), stdout=out, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(url, proc, log)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


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
