"""The real server over a data folder: SIGKILL and a restart keep the completed videos byte for
byte (downloaded with the openai client), SIGTERM marks what was unfinished and exits, DELETE
stops a running generation."""

from __future__ import annotations

import signal
import time

import httpx
import openai
import pytest

from sglang.multimodal_gen.runtime.entrypoints.sqlite_store import SqliteJobStore

from .conftest import SMALL, ServerProcess

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

# A generation of a few seconds on the built-in model (200 steps, the server's limit, on 64x64, 9 frames), with less
# work (pixels x frames x steps) than the model's own default request.
LONG = {"size": "64x64", "num_frames": 9, "num_inference_steps": 200}


def _client(url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="sk-local", max_retries=0, timeout=30.0)


def _create(client: openai.OpenAI, prompt: str, request: dict, seed: int = 0):
    fields = {k: v for k, v in request.items() if k != "size"}
    return client.videos.create(prompt=prompt, size=request["size"], extra_body={**fields, "seed": seed})


def _wait_running(url: str, video_id: str, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        video = httpx.get(f"{url}/v1/videos/{video_id}").json()
        if video["status"] != "queued":
            assert video["status"] == "in_progress", video
            return video
        time.sleep(0.02)
    raise AssertionError(f"{video_id} did not start within {timeout}s")


def test_sigkill_and_restart_keep_completed_videos(tmp_path):
    data = tmp_path / "data"
    server = ServerProcess(data, tmp_path / "server.log")
    try:
        client = _client(server.start())
        done = [_create(client, "a red circle", SMALL, seed) for seed in (1, 2)]
        done = [client.videos.poll(video.id, poll_interval_ms=50) for video in done]
        assert [video.status for video in done] == ["completed", "completed"]
        contents = [client.videos.download_content(video.id).read() for video in done]
        assert contents[0] != contents[1]
        running = _create(client, "a long one", LONG)
        queued = _create(client, "waiting", SMALL)
        _wait_running(server.url, running.id)
        assert server.signal(signal.SIGKILL) == -signal.SIGKILL

        client = _client(server.start())
        for video, content in zip(done, contents):
            assert client.videos.retrieve(video.id).model_dump() == video.model_dump()
            assert client.videos.download_content(video.id).read() == content
        assert [v.id for v in client.videos.list(limit=100)] == [queued.id, running.id, done[1].id, done[0].id]
        for video in (running, queued):
            video = client.videos.retrieve(video.id)
            assert video.status == "failed" and video.error.code == "server_restarted"
        with pytest.raises(openai.ConflictError):
            client.videos.download_content(running.id)

        videos = data / "videos"
        assert sorted(p.name for p in videos.iterdir()) == sorted(f"{v.id}.mp4" for v in done)
        client.videos.delete(done[0].id)
        assert [p.name for p in videos.iterdir()] == [f"{done[1].id}.mp4"]
        with pytest.raises(openai.NotFoundError):
            client.videos.download_content(done[0].id)
    finally:
        server.stop()


def test_sigterm_refuses_beyond_the_queue_marks_unfinished_jobs_and_exits(tmp_path):
    data = tmp_path / "data"
    log = tmp_path / "server.log"
    server = ServerProcess(data, log, "--max-queued-videos", "2")
    try:
        client = _client(server.start())
        running = _create(client, "a long one", LONG)
        _wait_running(server.url, running.id)
        queued = [_create(client, f"waiting {i}", SMALL, i) for i in range(2)]
        with pytest.raises(openai.RateLimitError) as full:
            _create(client, "one too many", SMALL)
        assert full.value.code == "queue_full" and int(full.value.response.headers["retry-after"]) >= 1

        start = time.monotonic()
        # uvicorn shuts down gracefully, then ends the process with the signal it caught.
        assert server.signal(signal.SIGTERM) == -signal.SIGTERM
        assert time.monotonic() - start < 15
    finally:
        server.stop()
    text = log.read_text()
    assert "Traceback" not in text
    assert f"stopped: running {running.id}, 2 queued marked failed (server_stopped)" in text
    store = SqliteJobStore.open(data)  # what the next start reads
    try:
        assert store.recover("local").restarted == []
        for video in (running, *queued):
            job = store.get(video.id)
            assert job.status == "failed" and job.error.code == "server_stopped"
    finally:
        store.close()


def test_delete_stops_a_running_generation(http):
    video = http.post("/v1/videos", json={"prompt": "a long one", **LONG}).json()
    running = _wait_running(str(http.base_url).rstrip("/"), video["id"])
    assert http.get("/health").json()["worker"] == {"busy": True, "job": video["id"]}
    assert running["progress"] < 30  # a couple of seconds of steps are left

    start = time.monotonic()
    deleted = http.delete(f"/v1/videos/{video['id']}")
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    assert time.monotonic() - start < 1.0
    after = http.get(f"/v1/videos/{video['id']}")
    assert after.status_code == 404 or after.json()["error"]["code"] == "cancelled"
    # The worker stops at its next step: gone and idle long before the steps left would take.
    while http.get(f"/v1/videos/{video['id']}").status_code != 404 and time.monotonic() - start < 10:
        time.sleep(0.02)
    assert http.get(f"/v1/videos/{video['id']}").status_code == 404
    assert time.monotonic() - start < 1.5
    assert http.get("/health").json()["worker"] == {"busy": False, "job": None}
