"""Cancellation, the queue bound, shutdown and retention, in process with a stub generator that
holds a job mid-generation until the test lets it go."""

from __future__ import annotations

import threading
import time

import pytest
from fastapi.testclient import TestClient

from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.entrypoints.http_server import ServerConfig, create_app
from sglang.multimodal_gen.runtime.entrypoints.job_store import VideoJob
from sglang.multimodal_gen.runtime.entrypoints.sqlite_store import SqliteJobStore

from .test_worker import StubGenerator, _wait


class _Stop(Exception):
    pass


def test_denoising_reports_step_zero_so_a_caller_can_stop_before_it(wan_generator):
    """The server's cancellation relies on this: progress(0, total) comes before the first step."""
    calls = []

    def progress(step: int, total: int) -> None:
        calls.append((step, total))
        raise _Stop

    params = SamplingParams(prompt="a cat", height=64, width=48, num_frames=5, num_inference_steps=6)
    with pytest.raises(_Stop):
        wan_generator.generate(params, progress=progress)
    assert calls == [(0, 6)]


class SteppingStub(StubGenerator):
    """"hold..." prompts report progress like the denoising stage (0 first, then each step) and
    wait before their second step until ``release``; ``steps_run`` counts the steps they made."""

    def __init__(self) -> None:
        super().__init__()
        self.steps_run: dict[str, int] = {}

    def generate(self, params: SamplingParams, progress=None):
        if not params.prompt.startswith("hold"):
            return super().generate(params, progress)
        self.generated.append(params.prompt)
        total = params.num_inference_steps
        progress(0, total)
        for step in range(total):
            if step == 1:
                self.holding.set()
                assert self.release.wait(10)
            self.steps_run[params.prompt] = step + 1
            progress(step + 1, total)
        return super().generate(SamplingParams(**{**params.__dict__, "prompt": "done"}), progress)


@pytest.fixture
def stub():
    return SteppingStub()


def _client(stub, tmp_path, **config) -> TestClient:
    # A loopback-bound app answers only loopback Host names (TestClient's default is "testserver").
    return TestClient(create_app(stub, "stub", ServerConfig(data_dir=str(tmp_path / "data"), **config)),
                      base_url="http://localhost")


def _health(client: TestClient) -> dict:
    return client.get("/health").json()


def test_delete_running_answers_at_once_then_404_once_the_worker_lets_go(stub, tmp_path):
    with _client(stub, tmp_path) as client:
        running = client.post("/v1/videos", json={"prompt": "hold"}).json()
        queued = client.post("/v1/videos", json={"prompt": "next"}).json()
        assert stub.holding.wait(10)
        assert _health(client)["worker"] == {"busy": True, "job": running["id"]}
        assert client.get(f"/v1/videos/{running['id']}").json()["progress"] == 33  # 1 of 3 steps, live

        start = time.perf_counter()
        deleted = client.delete(f"/v1/videos/{running['id']}")
        assert time.perf_counter() - start < 1.0
        assert deleted.json() == {"id": running["id"], "object": "video.deleted", "deleted": True}
        # The worker still holds it: failed / cancelled, listed, no content, the worker busy.
        video = client.get(f"/v1/videos/{running['id']}").json()
        assert video["status"] == "failed" and video["error"]["code"] == "cancelled"
        assert running["id"] in [v["id"] for v in client.get("/v1/videos").json()["data"]]
        assert client.get(f"/v1/videos/{running['id']}/content").json()["error"]["code"] == "video_failed"
        assert _health(client)["worker"] == {"busy": True, "job": running["id"]}
        assert client.get(f"/v1/videos/{queued['id']}").json()["status"] == "queued"
        assert client.delete(f"/v1/videos/{running['id']}").status_code == 200  # still there: same answer

        stub.release.set()
        assert _wait(client, queued["id"])["status"] == "completed"
        # It stopped at its next step (the one it was in when released), and is gone.
        assert stub.steps_run["hold"] == 2
        assert client.get(f"/v1/videos/{running['id']}").status_code == 404
        assert client.delete(f"/v1/videos/{running['id']}").status_code == 404
        assert _health(client)["worker"] == {"busy": False, "job": None}
        assert [p.name for p in (tmp_path / "data" / "videos").iterdir()] == [f"{queued['id']}.mp4"]


def test_cancel_before_the_first_step(stub, tmp_path):
    """A job deleted before denoising starts (here: while the stub's progress(0) is pending) runs no step."""
    gate = threading.Event()
    original = stub.generate

    def slow_start(params, progress=None):
        def first(step, total):
            if step == 0:
                stub.holding.set()
                assert gate.wait(10)
            progress(step, total)
        return original(params, first)

    stub.generate = slow_start
    with _client(stub, tmp_path) as client:
        video = client.post("/v1/videos", json={"prompt": "hold"}).json()
        assert stub.holding.wait(10)
        client.delete(f"/v1/videos/{video['id']}")
        assert client.get(f"/v1/videos/{video['id']}").json()["error"]["code"] == "cancelled"
        assert _health(client)["worker"]["busy"] is True
        gate.set()
        deadline = time.monotonic() + 10
        while client.get(f"/v1/videos/{video['id']}").status_code != 404 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert client.get(f"/v1/videos/{video['id']}").status_code == 404
        assert "hold" not in stub.steps_run


def test_queue_bound_is_429_with_retry_after(stub, tmp_path):
    with _client(stub, tmp_path, max_queued_videos=2) as client:
        running = client.post("/v1/videos", json={"prompt": "hold"}).json()
        assert stub.holding.wait(10)
        first = client.post("/v1/videos", json={"prompt": "a"}).json()
        client.post("/v1/videos", files={"prompt": (None, "b")})  # multipart, as the openai client sends
        for full in (client.post("/v1/videos", json={"prompt": "c"}),
                     client.post("/v1/videos", files={"prompt": (None, "c")}),
                     client.post("/v1/videos", data={"prompt": "c"})):
            assert full.status_code == 429
            assert int(full.headers["retry-after"]) >= 1
            error = full.json()["error"]
            assert error["code"] == "queue_full" and "queue is full (2 videos waiting)" in error["message"]
        # Neither the running job nor refused creates count; deleting a queued one makes room.
        assert _health(client)["videos"]["queued"] == 2
        client.delete(f"/v1/videos/{first['id']}")
        assert client.post("/v1/videos", json={"prompt": "c"}).status_code == 200
        stub.release.set()
        assert _wait(client, running["id"])["status"] == "completed"


def test_shutdown_refuses_creates_and_marks_unfinished_jobs(stub, tmp_path):
    with _client(stub, tmp_path) as client:
        running = client.post("/v1/videos", json={"prompt": "hold"}).json()
        queued = [client.post("/v1/videos", json={"prompt": f"q{i}"}).json() for i in range(2)]
        assert stub.holding.wait(10)
        client.app.state.service.begin_shutdown()  # what SIGTERM does first
        refused = client.post("/v1/videos", json={"prompt": "late"})
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "server_shutting_down"
        health = client.get("/health")
        assert health.status_code == 503 and health.json()["status"] == "stopping"
        threading.Timer(0.3, stub.release.set).start()  # the held step ends while stop() waits
    # The lifespan's end failed them all; a restart on the folder shows them so.
    with _client(stub, tmp_path) as client:
        for video in (running, *queued):
            video = client.get(f"/v1/videos/{video['id']}").json()
            assert video["status"] == "failed" and video["error"]["code"] == "server_stopped"
    assert stub.generated == ["hold"] and stub.steps_run["hold"] == 2


def test_retention_by_age_and_count(stub, tmp_path):
    # Long enough that the first video cannot expire by age before the count is checked on a loaded
    # machine (the three stub videos take well under a second each).
    retention_s = 5
    with _client(stub, tmp_path, video_retention_hours=retention_s / 3600, max_stored_videos=2) as client:
        ids = []
        for i in range(3):
            ids.append(client.post("/v1/videos", json={"prompt": f"v{i}", "seed": i}).json()["id"])
            video = _wait(client, ids[-1])
            assert video["status"] == "completed"
            assert video["expires_at"] == video["completed_at"] + retention_s
        videos = tmp_path / "data" / "videos"
        # By count: the oldest of three finished videos is gone, its file too. The worker purges right
        # after a job completes, so a read just after the third completes may still see the first.
        deadline = time.monotonic() + 5
        while client.get(f"/v1/videos/{ids[0]}").status_code != 404 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get(f"/v1/videos/{ids[0]}").status_code == 404
        assert sorted(p.name for p in videos.iterdir()) == sorted(f"{i}.mp4" for i in ids[1:])
        # By age: gone from reads at expires_at, and the idle worker's sweep removes the files.
        deadline = time.monotonic() + retention_s + 5
        while (client.get(f"/v1/videos/{ids[2]}").status_code != 404 or any(videos.iterdir())) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert client.get(f"/v1/videos/{ids[2]}").status_code == 404 and not any(videos.iterdir())
        assert client.get("/v1/videos").json()["data"] == []


def test_restart_in_process_keeps_videos(stub, tmp_path):
    """The same folder under a new app: finished videos and their bytes, unfinished ones failed."""
    with _client(stub, tmp_path) as client:
        done = client.post("/v1/videos", json={"prompt": "kept", "seed": 4}).json()
        done = _wait(client, done["id"])
        content = client.get(f"/v1/videos/{done['id']}/content").content
    store = SqliteJobStore.open(tmp_path / "data")  # as if killed with a job still queued
    store.add(VideoJob(id="video_lost", model="stub", params=store.get(done["id"]).params, created_at=0))
    store.close()
    with _client(stub, tmp_path) as client:
        assert client.get(f"/v1/videos/{done['id']}").json() == done
        assert client.get(f"/v1/videos/{done['id']}/content").content == content
        lost = client.get("/v1/videos/video_lost").json()
        assert lost["status"] == "failed" and lost["error"]["code"] == "server_restarted"


# ------------------------------------------------------------------------------ serve flags
MISSING_MODEL = "/no/such-model"


def test_a_data_dir_in_use_is_refused_before_the_model_is_looked_at(tmp_path, capsys):
    from sglang.cli.main import main

    store = SqliteJobStore.open(tmp_path / "data")
    try:
        assert main(["serve", "--model-path", MISSING_MODEL, "--port", "0", "--data-dir", str(tmp_path / "data")]) == 2
    finally:
        store.close()
    (tmp_path / "a-file").write_text("x")
    assert main(["serve", "--model-path", MISSING_MODEL, "--port", "0", "--data-dir", str(tmp_path / "a-file")]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2 and "is in use by another sglang serve" in lines[0] and "cannot use --data-dir" in lines[1]
    assert "such-model" not in " ".join(lines)


@pytest.mark.parametrize("flag, value, message", [
    ("--max-queued-videos", "0", "count must be >= 1, got 0"),
    ("--max-stored-videos", "-1", "count must be >= 0 (0: no limit), got -1"),
    ("--video-retention-hours", "-1", "hours must be a finite number >= 0"),
    ("--video-retention-hours", "nan", "hours must be a finite number >= 0"),
    ("--video-retention-hours", "soon", "invalid number of hours 'soon'"),
    ("--job-lease-seconds", "0", "seconds must be a finite number > 0, got 0"),
    ("--job-lease-seconds", "inf", "seconds must be a finite number > 0, got inf"),
    ("--job-lease-seconds", "soon", "invalid number of seconds 'soon'; use e.g. 30 or 2.5"),
])
def test_bad_job_flags_are_usage_errors(flag, value, message, capsys):
    from sglang.cli.main import main

    with pytest.raises(SystemExit) as info:
        main(["serve", "--model-path", MISSING_MODEL, flag, value])
    assert info.value.code == 2 and f"argument {flag}: {message}" in capsys.readouterr().err


def test_server_config_of_the_flags(tmp_path, monkeypatch):
    from sglang.cli.main import build_parser
    from sglang.cli.serve import server_config

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    config = server_config(build_parser().parse_args(["serve"]))
    assert config.data_dir == str(tmp_path / "cache" / "sglang" / "videos")
    assert (config.video_retention_hours, config.max_stored_videos, config.max_queued_videos) == (24.0, 1000, 64)
    config = server_config(build_parser().parse_args(
        ["serve", "--data-dir", "d", "--video-retention-hours", "0", "--max-stored-videos", "0"]))
    assert (config.data_dir, config.video_retention_hours, config.max_stored_videos) == ("d", None, None)
    assert config.retention().max_age_s is None and config.retention().max_count is None
