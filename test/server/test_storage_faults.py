"""Storage that fails under the server: a damaged database, a damaged row, a full disk, a write or
fsync that raises, the encoder's temporary file. Each is a clean startup error or a 4xx/5xx with a
code, never a 500 traceback, and never leaves a partial video behind.

The database faults run against a real ``sglang serve`` (one extra server for the module, whose
files may grow to at most ``FILE_LIMIT`` bytes: the test fills its disk); the write faults in
process, where the failure can be made to happen exactly at the write.
"""

from __future__ import annotations

import errno
import os
import resource
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import pytest
from conftest import REPO
from fastapi.testclient import TestClient

from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.entrypoints.http_server import ServerConfig, create_app
from sglang.multimodal_gen.runtime.entrypoints.job_store import VideoJob
from sglang.multimodal_gen.runtime.entrypoints.sqlite_store import DB_NAME, SqliteJobStore

from .conftest import SMALL, ServerProcess, server_env
from .test_worker import StubGenerator

FILE_LIMIT = 512 * 1024  # RLIMIT_FSIZE of the module's server: its "disk" is full past this


# --------------------------------------------------------------------------- a damaged database: startup
def _damaged_database(folder: Path) -> Path:
    """A job database of a few dozen pages whose pages past the first are overwritten."""
    store = SqliteJobStore.open(folder)
    for index in range(40):
        store.add(VideoJob(id=f"video_{index}", model="m", params=SamplingParams(prompt="p" * 2000), created_at=1))
    store.close()
    path = folder / DB_NAME
    data = bytearray(path.read_bytes())
    assert len(data) > 16 * 4096
    data[4 * 4096:12 * 4096] = bytes(range(256)) * 128
    path.write_bytes(bytes(data))
    return path


def test_a_damaged_database_is_one_error_line_at_startup(tmp_path):
    path = _damaged_database(tmp_path / "data")
    done = subprocess.run(
        [sys.executable, "-m", "sglang.cli.main", "serve", "--port", "0", "--device", "cpu",
         "--data-dir", str(path.parent)],
        cwd=REPO, env=server_env(), capture_output=True, text=True, timeout=120,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: the job database"), done.stderr
    assert str(path) in lines[0] and "is damaged" in lines[0] and f"mv '{path}' '{path}.damaged'" in lines[0]


# --------------------------------------------------------------------------- a damaged row, a full disk
@pytest.fixture(scope="module")
def limited_server(tmp_path_factory):
    """``sglang serve`` whose files may grow to at most FILE_LIMIT bytes; (url, data folder, log)."""
    folder = tmp_path_factory.mktemp("limited")
    log = folder / "server.log"
    # The log is written by this process's descriptor, but the server's writes to it count too:
    # it stays far below the limit.
    server = ServerProcess(folder / "data", log, "--max-queued-videos", "1000",
                           preexec=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_LIMIT, FILE_LIMIT)))
    try:
        yield server.start(), folder / "data", log
    finally:
        server.stop()


def test_a_row_that_does_not_parse_is_left_out_and_logged(limited_server):
    url, data, log = limited_server
    with httpx.Client(base_url=url, timeout=30.0) as http:
        good = http.post("/v1/videos", json={**SMALL, "prompt": "a good row", "num_inference_steps": 2}).json()
        with sqlite3.connect(data / DB_NAME) as db:
            db.execute("INSERT INTO jobs (id, model, status, params, created_at) "
                       "VALUES ('video_damaged', 'm', 'completed', '{not json', 1)")
        listed = http.get("/v1/videos")
        assert listed.status_code == 200, listed.text
        assert [video["id"] for video in listed.json()["data"]] == [good["id"]]
        assert http.get("/v1/videos/video_damaged").status_code == 404
    assert "skipping job 'video_damaged': its row in jobs.sqlite3 does not parse" in log.read_text()


def test_a_full_disk_is_507_storage_failed(limited_server):
    """Each create stores a 19 000-character prompt; within the file-size limit they stop fitting."""
    url, _, log = limited_server
    with httpx.Client(base_url=url, timeout=30.0) as http:
        for index in range(2 * FILE_LIMIT // 19_000):
            response = http.post("/v1/videos", json={**SMALL, "num_inference_steps": 2,
                                                     "prompt": f"{index} " + "x" * 19_000})
            if response.status_code != 200:
                break
        assert response.status_code == 507, response.text
        error = response.json()["error"]
        assert (error["code"], error["type"]) == ("storage_failed", "server_error"), error
        assert http.get("/health").status_code == 200  # reads go on
    assert "Traceback" not in log.read_text()


# --------------------------------------------------------------------------- writes that raise (in process)
def test_a_write_that_raises_leaves_no_video_file(tmp_path):
    """A full disk part-way through the mp4 (RLIMIT_FSIZE: the write raises EFBIG): no file stays,
    neither the temporary one nor a partial video under the final name."""
    store = SqliteJobStore.open(tmp_path)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, hard))
        with pytest.raises(OSError) as raised:
            store.write_video("video_1", b"x" * (256 * 1024))
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        store.close()
    assert raised.value.errno == errno.EFBIG
    assert list(store.videos_dir.iterdir()) == []


def test_an_fsync_that_raises_fails_the_job_and_leaves_no_video_file(tmp_path, monkeypatch):
    def failing_fsync(fd: int) -> None:
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    with TestClient(create_app(StubGenerator(), "stub", ServerConfig(data_dir=str(tmp_path))),
                    base_url="http://localhost") as client:
        monkeypatch.setattr(os, "fsync", failing_fsync)
        video = client.post("/v1/videos", json={"prompt": "fine"}).json()
        deadline = time.monotonic() + 10
        while video["status"] not in ("completed", "failed") and time.monotonic() < deadline:
            time.sleep(0.01)
            video = client.get(f"/v1/videos/{video['id']}").json()
        monkeypatch.undo()
        assert video["status"] == "failed" and video["error"]["code"] == "storage_failed", video
        assert list((tmp_path / "videos").iterdir()) == []


def test_the_encoders_temporary_file_goes_under_the_data_folder(tmp_path, monkeypatch):
    """With no usable system temp folder the video is still made: ffmpeg's file is written under
    --data-dir, whose cleanup at the next start removes what a killed server left."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path / "no-such-folder"))
    with TestClient(create_app(StubGenerator(), "stub", ServerConfig(data_dir=str(tmp_path / "data"))),
                    base_url="http://localhost") as client:
        video = client.post("/v1/videos", json={"prompt": "fine"}).json()
        deadline = time.monotonic() + 10
        while video["status"] not in ("completed", "failed") and time.monotonic() < deadline:
            time.sleep(0.01)
            video = client.get(f"/v1/videos/{video['id']}").json()
    assert video["status"] == "completed", video
    assert [p.name for p in (tmp_path / "data" / "videos").iterdir()] == [f"{video['id']}.mp4"]
