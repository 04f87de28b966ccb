"""Two real ``sglang serve`` replicas on loopback sharing one PostgreSQL job store and one video
folder: either answers for the other's videos, every job is made once, a DELETE reaches the
replica running the job, and a replica killed mid-job loses that job (``replica_lost``) while
the other drains the queue. The database is a new one on the server ``SGLANG_TEST_POSTGRES_URL``
names (scripts/test_postgres.sh; ``.ci/run`` starts one).
"""

from __future__ import annotations

import contextlib
import re
import signal
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
from conftest import fresh_postgres_database

from .conftest import SMALL, ServerProcess, server_env

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

LEASE_S = 3.0
# A generation that runs until it is stopped (about a minute on the built-in model).
ENDLESS = {"size": "48x32", "num_frames": 9, "num_inference_steps": 3000}
QUICK = {**SMALL, "num_inference_steps": 2}
MISSING_MODEL = "/no/such-model"


@dataclass
class Replica:
    name: str
    server: ServerProcess
    client: openai.OpenAI
    http: httpx.Client

    def running(self) -> str | None:
        return self.http.get("/health").json()["worker"]["job"]

    def generated(self) -> list[str]:
        """The ids this replica started generating, from its log."""
        return re.findall(r"generating (video_\w+)", self.server.log.read_text())


@dataclass
class Cluster:
    url: str
    videos: Path
    a: Replica
    b: Replica


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[Cluster]:
    """Replicas ``a`` (the job store URL from SGLANG_JOB_STORE_URL) and ``b`` (from --job-store),
    each with its own --data-dir, sharing the database and the --video-store folder."""
    folder = tmp_path_factory.mktemp("replicas")
    with contextlib.ExitStack() as stack:
        url = stack.enter_context(fresh_postgres_database())
        common = ("--video-store", str(folder / "videos"), "--job-lease-seconds", str(LEASE_S),
                  "--max-steps", "5000", "--max-work", "100000000")
        servers = {
            "a": ServerProcess(folder / "a", folder / "a.log", *common, "--replica-id", "a",
                               env=server_env(SGLANG_JOB_STORE_URL=url)),
            "b": ServerProcess(folder / "b", folder / "b.log", *common, "--replica-id", "b", "--job-store", url),
        }
        for server in servers.values():
            stack.callback(server.stop)
            server.start(wait=False)
        replicas = {}
        for name, server in servers.items():
            server.wait_ready()
            http = stack.enter_context(httpx.Client(base_url=server.url, timeout=30.0))
            client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="sk-local", max_retries=0, timeout=30.0)
            replicas[name] = Replica(name, server, client, http)
        yield Cluster(url, folder / "videos", replicas["a"], replicas["b"])


def _create(replica: Replica, request: dict, prompt: str = "a red circle", seed: int = 0) -> str:
    fields = {k: v for k, v in request.items() if k != "size"}
    return replica.client.videos.create(prompt=prompt, size=request["size"], extra_body={**fields, "seed": seed}).id


def _wait(replica: Replica, video_id: str, done, timeout: float = 60.0) -> dict | None:
    """Poll GET on ``replica`` until ``done(video or None for a 404)``; that value."""
    deadline = time.monotonic() + timeout
    while True:
        response = replica.http.get(f"/v1/videos/{video_id}")
        video = response.json() if response.status_code == 200 else None
        if done(video):
            return video
        assert time.monotonic() < deadline, f"{video_id} on {replica.name}: {video}"
        time.sleep(0.05)


def _owner(cluster: Cluster, video_id: str) -> tuple[Replica, Replica]:
    """(the replica running ``video_id``, the other one)."""
    _wait(cluster.a, video_id, lambda v: v["status"] == "in_progress")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        for mine, other in ((cluster.a, cluster.b), (cluster.b, cluster.a)):
            if mine.running() == video_id:
                return mine, other
    raise AssertionError(f"no replica reports {video_id} as its job")


def test_a_video_made_on_one_replica_is_listed_polled_and_downloaded_from_the_other(cluster):
    video_id = _create(cluster.a, QUICK, seed=3)
    video = cluster.b.client.videos.poll(video_id, poll_interval_ms=50)
    assert video.status == "completed"
    assert video_id in [v.id for v in cluster.b.client.videos.list(limit=100)]
    content = cluster.b.client.videos.download_content(video_id).read()
    assert content[4:8] == b"ftyp" and content == cluster.a.client.videos.download_content(video_id).read()
    assert (cluster.videos / "videos" / f"{video_id}.mp4").read_bytes() == content
    assert cluster.a.client.videos.retrieve(video_id).model_dump() == video.model_dump()


def test_the_logs_name_the_job_store_without_its_password(cluster):
    password = httpx.URL(cluster.url).password
    for replica in (cluster.a, cluster.b):
        text = replica.server.log.read_text()
        assert "job store: postgresql://sglang:***@" in text and password not in text


def test_twenty_videos_created_across_both_are_each_made_once(cluster):
    ids = [_create(replica, QUICK, f"video {i}", seed=i)
           for i, replica in enumerate([cluster.a, cluster.b] * 10)]
    for video_id in ids:
        assert _wait(cluster.b, video_id, lambda v: v["status"] != "queued" and v["status"] != "in_progress",
                     timeout=120)["status"] == "completed"
    made = {"a": cluster.a.generated(), "b": cluster.b.generated()}
    every = [video_id for video_id in made["a"] + made["b"] if video_id in ids]
    assert sorted(every) == sorted(ids)  # each once, on one replica
    assert all(set(made[name]) & set(ids) for name in made), made  # both took a share


def test_delete_on_the_other_replica_cancels_a_running_job(cluster):
    video_id = _create(cluster.a, ENDLESS, "endless")
    owner, other = _owner(cluster, video_id)
    start = time.monotonic()
    assert other.client.videos.delete(video_id).deleted
    assert time.monotonic() - start < 1.0  # answered at once
    cancelled = other.http.get(f"/v1/videos/{video_id}")
    assert cancelled.status_code == 404 or cancelled.json()["error"]["code"] == "cancelled"
    _wait(owner, video_id, lambda v: v is None, timeout=10)
    while owner.running() is not None and time.monotonic() - start < 10:
        time.sleep(0.05)
    assert owner.running() is None and time.monotonic() - start < 10
    assert f"{video_id} deleted on another replica; stopping it" in owner.server.log.read_text()


def test_replicas_with_other_queue_settings_refuse_to_start(cluster, capsys):
    from sglang.cli.main import main

    code = main(["serve", "--model-path", MISSING_MODEL, "--port", "0", "--job-store", cluster.url,
                 "--video-store", str(cluster.videos), "--replica-id", "c", "--max-queued-videos", "7"])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: --max-queued-videos 7 differs from 64 of the running replica ")


def test_an_unreachable_database_at_start_up_is_one_error_line(tmp_path, capsys, monkeypatch):
    from sglang.cli.main import main

    monkeypatch.setenv("SGLANG_JOB_STORE_URL", "postgresql://sglang:s3cret@127.0.0.1:1/jobs")
    code = main(["serve", "--model-path", MISSING_MODEL, "--port", "0", "--data-dir", str(tmp_path)])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(lines) == 1, lines
    assert lines[0].startswith("error: cannot reach the job store postgresql://sglang:***@127.0.0.1:1/jobs: ")
    assert "s3cret" not in lines[0]


def test_serve_help_documents_the_replica_flags(capsys):
    from sglang.cli.main import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    text = capsys.readouterr().out
    for flag in ("--job-store URL", "--video-store DIR", "--replica-id ID", "--job-lease-seconds S",
                 "SGLANG_JOB_STORE_URL"):
        assert flag in text


def test_sigkill_fails_the_job_replica_lost_within_the_lease_and_the_other_drains_the_queue(cluster):
    """Kept last: it kills one of the module's replicas."""
    first = _create(cluster.a, ENDLESS, "endless 1")
    victim, survivor = _owner(cluster, first)
    second = _create(survivor, ENDLESS, "endless 2")
    _wait(survivor, second, lambda v: v["status"] == "in_progress")
    assert {cluster.a.running(), cluster.b.running()} == {first, second}  # both busy: the rest waits
    queued = [_create(survivor, QUICK, f"queued {i}", seed=i) for i in range(3)]

    killed = time.monotonic()
    assert victim.server.signal(signal.SIGKILL) == -signal.SIGKILL
    survivor.client.videos.delete(second)  # frees the survivor for the queue
    lost = _wait(survivor, first, lambda v: v["status"] == "failed", timeout=2 * LEASE_S + 5)
    # The lease ran out at most LEASE_S after the last renewal; one sweep interval (a third of it) to see it.
    assert time.monotonic() - killed < LEASE_S + LEASE_S / 3 + 1.0
    assert lost["error"]["code"] == "replica_lost"
    for video_id in queued:
        assert _wait(survivor, video_id, lambda v: v["status"] == "completed", timeout=60)
    assert set(queued) <= set(survivor.generated())


def test_a_job_store_gone_while_serving_is_503_and_the_server_goes_on(tmp_path):
    """The database dropped under a running server (as a PostgreSQL restart would cut it off):
    each request is a 503 ``job_store_unavailable`` with Retry-After, never a 500 traceback."""
    import os

    import psycopg
    from fastapi.testclient import TestClient

    from sglang.multimodal_gen.runtime.entrypoints.http_server import ServerConfig, create_app

    from .test_worker import StubGenerator

    with fresh_postgres_database() as url:
        config = ServerConfig(data_dir=str(tmp_path), job_store=url, replica_id="solo")
        with TestClient(create_app(StubGenerator(), "stub", config), base_url="http://localhost") as client:
            assert client.get("/v1/videos").status_code == 200
            name = httpx.URL(url).path.lstrip("/")
            with psycopg.connect(os.environ["SGLANG_TEST_POSTGRES_URL"], autocommit=True) as admin:
                admin.execute(f"DROP DATABASE {name} WITH (FORCE)")
            for response in (client.get("/v1/videos"), client.post("/v1/videos", json={"prompt": "p"})):
                assert response.status_code == 503, response.text
                assert response.json()["error"]["code"] == "job_store_unavailable"
                assert response.headers["retry-after"] == "5"
            assert client.get("/v1/models").status_code == 200


def test_a_stopping_replica_fails_its_running_video_and_leaves_the_queue_to_the_others(tmp_path):
    """docs/api.md: on SIGTERM a replica fails only the video it was running (``server_stopped``);
    with one server the queued ones fail too (test_jobs), here they stay queued."""
    import threading

    from fastapi.testclient import TestClient

    from sglang.multimodal_gen.runtime.entrypoints.http_server import ServerConfig, create_app
    from sglang.multimodal_gen.runtime.entrypoints.open_store import open_job_store

    from .test_worker import StubGenerator

    stub = StubGenerator()
    with fresh_postgres_database() as url:
        config = ServerConfig(data_dir=str(tmp_path), job_store=url, replica_id="stopping")
        with TestClient(create_app(stub, "stub", config), base_url="http://localhost") as client:
            running = client.post("/v1/videos", json={"prompt": "hold"}).json()["id"]
            queued = [client.post("/v1/videos", json={"prompt": f"q{i}"}).json()["id"] for i in range(2)]
            assert stub.holding.wait(10)
            threading.Timer(0.3, stub.release.set).start()  # the held step ends while stop() waits
        store = open_job_store(url, tmp_path, "reader")
        try:
            stopped = store.get(running)
            assert stopped.status == "failed" and stopped.error.code == "server_stopped"
            assert [store.get(video_id).status for video_id in queued] == ["queued", "queued"]
        finally:
            store.close()
    assert stub.generated == ["hold"]
