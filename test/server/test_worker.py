"""The job store and worker, in process with a stub generator: failures, cancellation, 409s."""

from __future__ import annotations

import threading
import time
from types import SimpleNamespace

import numpy as np
import pytest
from fastapi.testclient import TestClient

from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.errors import InvalidRequestError
from sglang.multimodal_gen.runtime.entrypoints.http_server import create_app
from sglang.multimodal_gen.runtime.pipelines.base import VideoGeometry
from sglang.multimodal_gen.runtime.stages.input_validation import check_prompt

DEFAULTS = dict(negative_prompt="", num_inference_steps=3, guidance_scale=5.0, height=16, width=16, num_frames=5,
                fps=8)


class StubGenerator:
    """Validates like a model with DEFAULTS; "boom" crashes, "late" is refused late, "hold" waits."""

    model_path = "stub-model"
    # A model without temporal compression: every frame is a latent frame.
    geometry = VideoGeometry(spatial_multiple=16, temporal_stride=1)

    def __init__(self) -> None:
        self.holding = threading.Event()
        self.release = threading.Event()
        self.generated: list[str] = []

    def validate(self, params: SamplingParams) -> SamplingParams:
        check_prompt(params.prompt)
        return params.with_defaults(DEFAULTS)

    def generate(self, params: SamplingParams, progress=None):
        self.generated.append(params.prompt)
        if params.prompt == "boom":
            raise RuntimeError("simulated CUDA out of memory")
        if params.prompt == "late":
            raise InvalidRequestError("simulated late refusal", param="num_frames")
        if params.prompt.startswith("hold"):
            self.holding.set()
            assert self.release.wait(10)
        for step in range(1, params.num_inference_steps + 1):
            progress(step, params.num_inference_steps)
        frames = np.full((params.num_frames, params.height, params.width, 3), params.seed / 10, np.float32)
        return SimpleNamespace(params=params, frames=frames, timings={"denoising": 0.01}, cache_stats=None)


@pytest.fixture
def stub():
    return StubGenerator()


@pytest.fixture
def client(stub):
    # A loopback-bound app answers only loopback Host names (TestClient's default is "testserver").
    with TestClient(create_app(stub, "stub"), base_url="http://localhost") as client:
        yield client


def _wait(client: TestClient, video_id: str, statuses=("completed", "failed")) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        video = client.get(f"/v1/videos/{video_id}").json()
        if video["status"] in statuses:
            return video
        time.sleep(0.01)
    raise AssertionError(video)


def test_failed_generation_is_reported_and_the_server_goes_on(client, stub):
    failed = client.post("/v1/videos", json={"prompt": "boom"}).json()
    refused = client.post("/v1/videos", json={"prompt": "late"}).json()
    good = client.post("/v1/videos", json={"prompt": "fine", "seed": 5}).json()
    failed, refused, good = (_wait(client, v["id"]) for v in (failed, refused, good))
    assert failed["status"] == "failed" and failed["completed_at"] is not None
    assert failed["error"]["code"] == "out_of_memory" and failed["error"]["type"] == "server_error"
    assert "simulated" not in failed["error"]["message"] and failed["id"] in failed["error"]["message"]
    assert refused["status"] == "failed" and refused["error"]["param"] == "num_frames"
    assert good["status"] == "completed" and good["progress"] == 100
    response = client.get(f"/v1/videos/{failed['id']}/content")
    assert response.status_code == 409 and response.json()["error"]["code"] == "video_failed"
    assert "ran out of memory" in response.json()["error"]["message"]
    assert client.get(f"/v1/videos/{good['id']}/content").headers["content-type"] == "video/mp4"
    assert client.get("/health").json()["videos"] == {"queued": 0, "in_progress": 0, "completed": 1, "failed": 2}


def test_not_ready_is_409_and_delete_cancels_queued_and_running(client, stub):
    running = client.post("/v1/videos", json={"prompt": "hold"}).json()
    queued = client.post("/v1/videos", json={"prompt": "never run"}).json()
    assert stub.holding.wait(10)
    response = client.get(f"/v1/videos/{running['id']}")
    assert response.json()["status"] == "in_progress" and response.headers["openai-poll-after-ms"] == "200"
    assert client.get(f"/v1/videos/{queued['id']}").json()["status"] == "queued"
    not_ready = client.get(f"/v1/videos/{running['id']}/content")
    assert not_ready.status_code == 409 and not_ready.json()["error"]["code"] == "video_not_ready"
    assert "status in_progress" in not_ready.json()["error"]["message"]

    assert client.delete(f"/v1/videos/{queued['id']}").json() == {
        "id": queued["id"], "object": "video.deleted", "deleted": True}
    assert client.delete(f"/v1/videos/{running['id']}").json()["deleted"] is True
    stub.release.set()
    after = client.post("/v1/videos", json={"prompt": "after"}).json()
    assert _wait(client, after["id"])["status"] == "completed"
    assert stub.generated == ["hold", "after"]
    assert [v["id"] for v in client.get("/v1/videos").json()["data"]] == [after["id"]]


def test_progress_and_defaults_reported(client):
    video = client.post("/v1/videos", json={"prompt": "fine", "seconds": "2", "fps": 4}).json()
    assert video["object"] == "video" and video["model"] == "stub" and video["status"] in ("queued", "in_progress",
                                                                                          "completed")
    # the stub's temporal stride is 1, so 2 s at 4 fps is 8 frames.
    assert video["num_frames"] == 8 and video["seconds"] == "2" and video["size"] == "16x16"
    assert client.post("/v1/videos", json={"prompt": "x", "model": "stub-model"}).status_code == 200
    models = client.get("/v1/models").json()
    assert models["data"][0]["id"] == "stub" and models["object"] == "list"


def test_taken_port_is_one_clear_error(stub):
    import socket

    from sglang.multimodal_gen.errors import UserError
    from sglang.multimodal_gen.runtime.entrypoints.http_server import run_server

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(UserError, match=f"cannot listen on 127.0.0.1:{port}: Address already in use"):
            run_server(stub, "stub", port)
