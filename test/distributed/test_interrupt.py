"""Ctrl-C on a multi-process ``sglang generate`` stops it as it stops one process: ``interrupted``,
exit 130, within seconds, no traceback, no worker left behind and none respawned.

The terminal sends SIGINT to the whole foreground process group, so the test does the same to a
real two-process run started in its own session (its own process group), with SIGINT's default
disposition restored in the child: pytest and xdist workers may run with it ignored, which the
child would inherit.
"""

from __future__ import annotations

import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

from conftest import REPO

DENOISING = re.compile(rb"denoising: +\d+%")


def _default_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def _group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _read_until(fd: int, pattern: re.Pattern[bytes], timeout_s: float) -> bytes:
    """What ``fd`` says until ``pattern`` shows (the progress bar rewrites one line with ``\\r``)."""
    seen = b""
    deadline = time.monotonic() + timeout_s
    while not pattern.search(seen):
        left = deadline - time.monotonic()
        assert left > 0, f"no {pattern.pattern!r} within {timeout_s} s:\n{seen.decode(errors='replace')}"
        if select.select([fd], [], [], left)[0]:
            chunk = os.read(fd, 65536)
            assert chunk, f"the run ended before {pattern.pattern!r}:\n{seen.decode(errors='replace')}"
            seen += chunk
    return seen


def test_ctrl_c_on_two_processes_exits_130_without_respawning(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO / "python"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "sglang.cli.main", "generate", "--prompt", "a cat", "--device", "cpu",
         "--num-gpus", "2", "--enable-cfg-parallel", "--height", "32", "--width", "48", "--num-frames", "5",
         "--num-inference-steps", "2000", "--output-path", str(tmp_path / "x.mp4")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env, cwd=tmp_path,
        start_new_session=True, preexec_fn=_default_sigint,
    )
    pgid = proc.pid  # the session leader's group
    try:
        output = _read_until(proc.stdout.fileno(), DENOISING, timeout_s=120)
        os.killpg(pgid, signal.SIGINT)
        sent = time.monotonic()
        rest, _ = proc.communicate(timeout=10)
        took = time.monotonic() - sent
        output = (output + rest).decode(errors="replace")
        assert proc.returncode == 130, output
        assert took < 10, took
        assert "interrupted" in output.splitlines()[-1], output
        assert "Traceback" not in output and "leaked semaphore" not in output, output
        assert "restarting the worker group" not in output, output
        deadline = time.monotonic() + 5  # daemonic workers are joined before the driver exits
        while _group_alive(pgid) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _group_alive(pgid), "a process of the run outlived it"
        assert not (tmp_path / "x.mp4").exists()
    finally:
        if _group_alive(pgid):
            os.killpg(pgid, signal.SIGKILL)
        proc.wait()
