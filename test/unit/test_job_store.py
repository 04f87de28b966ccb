"""The job store on its own: params round trip, durability, restart recovery, retention, threads.

The contract tests run on both stores (``stores``): SQLite in a temporary folder and PostgreSQL
in a new database on the server ``SGLANG_TEST_POSTGRES_URL`` names (scripts/test_postgres.sh)."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

import pytest
from conftest import fresh_postgres_database

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.entrypoints.job_store import (
    DataDirError,
    JobStore,
    Retention,
    VideoJob,
    params_from_json,
    params_to_json,
)
from sglang.multimodal_gen.runtime.entrypoints.lease import check_interval_s
from sglang.multimodal_gen.runtime.entrypoints.open_store import open_job_store
from sglang.multimodal_gen.runtime.entrypoints.openai_protocol import VideoError
from sglang.multimodal_gen.runtime.entrypoints.sqlite_store import DB_NAME, SqliteJobStore

BASE = dict(prompt="a cat", negative_prompt="", num_inference_steps=8, guidance_scale=5.0, seed=7, height=32,
            width=48, num_frames=9, fps=8)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _job(job_id: str, prompt: str = "a cat", created_at: int = 1_000_000) -> VideoJob:
    return VideoJob(id=job_id, model="m", params=SamplingParams(**{**BASE, "prompt": prompt}), created_at=created_at)


class Stores:
    """Opens stores over one database and one video folder, as replicas would, and closes them
    all at the end."""

    def __init__(self, url: str, folder: Path) -> None:
        self.url, self.folder = url, folder
        self.opened: list[JobStore] = []

    def open(self, retention: Retention | None = None, clock: Callable[[], float] = time.time,
             replica: str = "a", settings: dict | None = None) -> JobStore:
        store = open_job_store(self.url, self.folder, replica, settings, retention, clock)
        self.opened.append(store)
        return store

    def close(self) -> None:
        for store in self.opened:
            store.close()


@pytest.fixture(params=["sqlite", "postgresql"])
def stores(request, tmp_path) -> Iterator[Stores]:
    with contextlib.ExitStack() as stack:
        if request.param == "sqlite":
            url = f"sqlite:///{tmp_path / 'data' / DB_NAME}"
        else:
            url = stack.enter_context(fresh_postgres_database())
        opened = Stores(url, tmp_path / "data")
        stack.callback(opened.close)
        yield opened


@pytest.fixture
def store(stores) -> JobStore:
    return stores.open()


@pytest.mark.parametrize("cache", [
    CacheParams(),
    CacheParams(strategy="magcache", threshold=0.5, max_skip_steps=3, retention_ratio=0.1,
                options={"sqrt_ratios": True, "mag_ratios": {"cond": [1.0, 0.9], "uncond": [1.0, 0.8]}}),
    CacheParams(strategy="teacache", preset="fast"),
    CacheParams(speedup=2.0),
    CacheParams(strategy="magcache", estimator="blend", blend_alpha=0.25),
    CacheParams(strategy="magcache", estimator="forecast1_sigma", calibration_file="/models/cal.json"),
], ids=lambda c: c.strategy)
def test_params_round_trip(cache):
    params = SamplingParams(**BASE, cache=cache)
    text = params_to_json(params)
    assert json.loads(text)["cache"]["strategy"] == cache.strategy
    assert params_from_json(text) == params


def test_params_a_later_version_refuses_are_kept_unchecked():
    data = json.loads(params_to_json(SamplingParams(**BASE, cache=CacheParams(strategy="magcache"))))
    data["cache"]["strategy"] = "gone_strategy"
    data["future_field"] = 1
    params = params_from_json(json.dumps(data))
    assert params.cache.strategy == "gone_strategy" and params.prompt == "a cat"


def test_every_state_change_is_on_disk_at_once(tmp_path):
    """Another connection (another process after a crash) sees each change as soon as it returns."""
    store = SqliteJobStore.open(tmp_path / "data")
    other = sqlite3.connect(tmp_path / "data" / DB_NAME)
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    def status():
        return other.execute("SELECT status, progress FROM jobs WHERE id = 'a'").fetchone()

    assert store.add(_job("a"))
    assert status() == ("queued", 0)
    assert store.claim_next("r", 30).status == "in_progress" and status() == ("in_progress", 0)
    assert store.claim_next("r", 30) is None  # only once
    store.set_progress("a", 40)
    assert status() == ("in_progress", 40)
    name = store.write_video("a", b"mp4 bytes")
    assert [p.name for p in store.videos_dir.iterdir()] == [name]  # no temporary file left
    store.complete("a", name, {"strategy": "none"}, {"denoising": 0.5}, owner="r")
    assert status() == ("completed", 100)
    job = store.get("a")
    assert job.cache_stats == {"strategy": "none"} and job.timings == {"denoising": 0.5}
    assert store.read_video(job) == b"mp4 bytes"
    assert store.delete("a") and not (store.videos_dir / name).exists() and status() is None
    assert store.delete("a") is False
    other.close()
    store.close()


def test_queue_bound_is_checked_with_the_insert(store):
    assert store.add(_job("a"), max_queued=2) and store.add(_job("b"), max_queued=2)
    assert store.add(_job("c"), max_queued=2) is False
    store.claim_next("r", 30)
    assert store.add(_job("c"), max_queued=2) and store.count_queued() == 2


def test_restart_recovery(tmp_path):
    folder = tmp_path / "data"
    store = SqliteJobStore.open(folder)
    for job_id in "abcdef":
        store.add(_job(job_id))
    for job_id in "abcd":
        store.claim_next("r", 30)
    store.complete("a", store.write_video("a", b"A"), None, {"denoising": 1.0}, owner="r")
    store.complete("b", store.write_video("b", b"B"), None, None, owner="r")
    store.fail("c", VideoError(code="cancelled", message="deleted while running"), cancelled=True)
    # "d" running, "e" and "f" queued; a crash mid-write leaves a temporary file and an unreferenced mp4.
    (store.videos_dir / ".d.mp4.tmp").write_bytes(b"half")
    (store.videos_dir / "d.mp4").write_bytes(b"renamed, not yet recorded")
    (store.videos_dir / "b.mp4").unlink()
    store.close()

    store = SqliteJobStore.open(folder)
    report = store.recover("other")
    assert report.restarted == ["d", "e", "f"] and report.dropped_cancelled == 1
    assert report.missing_files == ["b"] and report.removed_files == 2
    assert sorted(p.name for p in store.videos_dir.iterdir()) == ["a.mp4"]
    assert store.get("a").status == "completed" and store.read_video(store.get("a")) == b"A"
    assert store.get("b").status == "failed" and store.get("b").error.code == "video_missing"
    assert store.get("c") is None
    for job_id in "def":
        job = store.get(job_id)
        assert job.status == "failed" and job.error.code == "server_restarted" and job.completed_at is not None
    assert store.recover("other").restarted == []  # nothing more on the next start
    store.close()


def test_one_server_per_folder(tmp_path):
    store = SqliteJobStore.open(tmp_path / "data")
    with pytest.raises(DataDirError, match="in use by another sglang serve"):
        SqliteJobStore.open(tmp_path / "data")
    store.close()
    SqliteJobStore.open(tmp_path / "data").close()  # the folder is free again


def test_unusable_folders_are_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataDirError, match="cannot use --data-dir"):
        SqliteJobStore.open(tmp_path / "file")
    store = SqliteJobStore.open(tmp_path / "newer")
    store._conn().execute("PRAGMA user_version = 99")
    store.close()
    with pytest.raises(DataDirError, match="written by a newer sglang"):
        SqliteJobStore.open(tmp_path / "newer")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / DB_NAME).write_bytes(b"not a database" * 100)
    with pytest.raises(DataDirError, match=r"is damaged \(file is not a database\); move it aside"):
        SqliteJobStore.open(tmp_path / "garbage")


def test_retention_by_age(stores):
    clock = Clock()
    store = stores.open(Retention(max_age_s=59.5), clock=clock)
    store.add(_job("a"))
    store.add(_job("b"))
    store.claim_next("r", 30)
    store.complete("a", store.write_video("a", b"A"), None, None, owner="r")
    assert store.expires_at(store.get("a")) == int(clock.now) + 60 and store.expires_at(store.get("b")) is None
    clock.now += 59
    assert store.get("a") is not None and store.purge() == []
    clock.now += 1
    # Gone from every read at once, removed for good by purge.
    assert store.get("a") is None and store.page(None, 10, "asc")[0][0].id == "b"
    assert store.counts() == {"queued": 1, "in_progress": 0, "completed": 0, "failed": 0}
    assert store.purge() == ["a"] and list(store.videos_dir.iterdir()) == []
    assert store.get("b") is not None  # unfinished jobs never expire


def test_retention_by_count_keeps_the_newest_finished(stores):
    clock = Clock()
    store = stores.open(Retention(max_count=2), clock=clock)
    for job_id in "abcd":
        store.add(_job(job_id))
    for job_id in "abc":
        clock.now += 1
        assert store.claim_next("r", 30).id == job_id
        store.complete(job_id, store.write_video(job_id, job_id.encode()), None, None, owner="r")
    assert store.purge() == ["a"]
    assert sorted(p.name for p in store.videos_dir.iterdir()) == ["b.mp4", "c.mp4"]
    assert [j.id for j in store.page(None, 10, "asc")[0]] == ["b", "c", "d"]


def test_pages_follow_creation_order(store):
    for job_id in "abcde":
        store.add(_job(job_id))
    jobs, more = store.page(None, 2, "desc")
    assert [j.id for j in jobs] == ["e", "d"] and more
    jobs, more = store.page("d", 2, "desc")
    assert [j.id for j in jobs] == ["c", "b"] and more
    jobs, more = store.page("b", 5, "asc")
    assert [j.id for j in jobs] == ["c", "d", "e"] and not more
    assert store.page("zz", 2, "asc") is None


def test_worker_and_event_loop_threads_together(store):
    """A worker thread claiming, updating and finishing while another thread adds and reads."""
    errors: list[BaseException] = []
    count = 60

    def worker():
        try:
            done = 0
            while done < count:
                job = store.claim_next("r", 30)
                if job is not None:
                    for p in range(0, 100, 25):
                        store.set_progress(job.id, p)
                    store.complete(job.id, store.write_video(job.id, job.id.encode()), None, None, owner="r")
                    done += 1
        except BaseException as exc:  # noqa: BLE001 - reported by the test
            errors.append(exc)

    thread = threading.Thread(target=worker)
    thread.start()
    for i in range(count):
        assert store.add(_job(f"j{i:03d}"))
        store.counts()
        store.get(f"j{i:03d}")
    thread.join(60)
    assert not errors and not thread.is_alive()
    assert store.counts() == {"queued": 0, "in_progress": 0, "completed": count, "failed": 0}
    assert len(list(store.videos_dir.iterdir())) == count


@pytest.mark.parametrize("hours, seconds", [(0.1, 360), (24, 86400), (1 / 3600, 1), (0.0001, 1)])
def test_retention_hours_become_whole_seconds(hours, seconds):
    assert Retention(max_age_s=hours * 3600).max_age_s == seconds


# --------------------------------------------------------------------------- replicas: claims, leases, DELETE
def _replicas(stores: Stores, clock: Clock) -> tuple[JobStore, JobStore]:
    """Two replicas of one PostgreSQL store; on SQLite (one server), the one store twice."""
    first = stores.open(clock=clock, replica="a")
    return first, stores.open(clock=clock, replica="b") if first.shared else first


def test_each_job_is_claimed_once_by_concurrent_claimers(stores):
    first, second = _replicas(stores, Clock())
    count = 40
    for i in range(count):
        first.add(_job(f"j{i:03d}"))
    claimed: dict[str, list[str]] = {"a": [], "b": []}

    def claim(store: JobStore, owner: str) -> None:
        while (job := store.claim_next(owner, 30)) is not None:
            claimed[owner].append(job.id)

    threads = [threading.Thread(target=claim, args=(store, owner)) for store, owner in ((first, "a"), (second, "b"))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    every = claimed["a"] + claimed["b"]
    assert sorted(every) == [f"j{i:03d}" for i in range(count)]  # each once, none left
    assert {job.owner for job in first.page(None, 100, "asc")[0]} == {o for o in claimed if claimed[o]}


def test_the_queue_bound_holds_for_concurrent_creates_on_both_replicas(stores):
    """docs/api.md (Several replicas): --max-queued-videos bounds the whole queue, counted under a lock."""
    first, second = _replicas(stores, Clock())
    threads_n, bound = 8, 5
    barrier = threading.Barrier(threads_n)
    added: list[str] = []

    def create(store: JobStore, prefix: str) -> None:
        barrier.wait()
        for i in range(10):
            if store.add(_job(f"{prefix}-{i}"), max_queued=bound):
                added.append(f"{prefix}-{i}")

    threads = [threading.Thread(target=create, args=((first, second)[n % 2], f"t{n}")) for n in range(threads_n)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert len(added) == bound and first.count_queued() == bound


def test_an_expired_lease_fails_the_job_replica_lost(stores):
    clock = Clock()
    first, second = _replicas(stores, clock)
    first.add(_job("a"))
    first.add(_job("b"))
    running = first.claim_next("a", 10)
    clock.now += 9
    assert first.renew("a", "a", 10) == "running" and second.sweep_lost() == []
    clock.now += 9  # renewed at +9: the lease runs to +19
    assert second.sweep_lost() == []
    clock.now += 2
    assert second.sweep_lost() == ["a"]
    job = second.get("a")
    assert job.status == "failed" and job.error.code == "replica_lost" and job.completed_at == int(clock.now)
    assert first.renew("a", "a", 10) == "lost"  # the replica comes back: no longer its job
    assert not first.complete("a", first.write_video("a", b"late"), None, None, owner="a")
    assert second.get("a").status == "failed" and second.get("b").status == "queued"  # never re-run
    assert second.claim_next("b", 10).id == "b" and running.id == "a"


@pytest.mark.parametrize("lease_s, interval_s", [(30, 5.0), (12, 4.0), (3, 1.0), (0.1, 0.1)])
def test_a_lease_is_renewed_every_third_of_it_at_most_5_s_apart(lease_s, interval_s):
    """docs/api.md (Several replicas): the renewal and sweep interval, which also bounds how late a
    DELETE on another replica is seen."""
    assert check_interval_s(lease_s) == pytest.approx(interval_s)


def test_delete_from_another_replica_cancels_a_running_job(stores):
    clock = Clock()
    first, second = _replicas(stores, clock)
    for job_id in "abc":
        first.add(_job(job_id))
    first.claim_next("a", 10)
    cancelled = VideoError(code="cancelled", message="deleted while running")
    assert second.remove("b", cancelled) == "removed" and second.get("b") is None
    assert second.remove("a", cancelled) == "cancelling"
    assert second.get("a").status == "failed" and second.get("a").error.code == "cancelled"
    assert second.remove("a", cancelled) == "cancelling"  # a second DELETE while it unwinds answers the same
    assert first.renew("a", "a", 10) == "cancelled"
    assert first.delete("a") and second.get("a") is None and second.remove("a", cancelled) is None
    # A replica that dies while a DELETE waits for it: the sweep drops the row when its lease runs out.
    first.claim_next("a", 10)
    assert second.remove("c", cancelled) == "cancelling"
    clock.now += 11
    assert second.sweep_lost() == [] and second.get("c") is None


def test_a_start_recovers_the_jobs_of_its_replica_only(stores):
    """Shared: a restarted replica fails what it had claimed; queued jobs and the other replica's
    stay. SQLite (one server): every unfinished job fails, as a restart always did."""
    first, second = _replicas(stores, Clock())
    for job_id in "abc":
        first.add(_job(job_id))
    first.claim_next("a", 30)
    second.claim_next("b", 30)
    (first.files.scratch / ".half.mp4.tmp").write_bytes(b"half")
    report = first.recover("a")
    status = {job.id: (job.status, job.error.code if job.error else None) for job in first.page(None, 10, "asc")[0]}
    if first.shared:
        assert report.restarted == ["a"] and report.removed_files == 1
        assert status == {"a": ("failed", "server_restarted"), "b": ("in_progress", None), "c": ("queued", None)}
    else:
        assert report.restarted == ["a", "b", "c"]
        assert set(status.values()) == {("failed", "server_restarted")}
    assert list(first.files.scratch.iterdir()) == []


# --------------------------------------------------------------------------- PostgreSQL: replicas that disagree
SETTINGS = {"--max-queued-videos": 64, "--video-retention-hours": 24.0, "--max-stored-videos": 1000}


def test_replicas_with_other_queue_settings_or_the_same_id_are_refused(postgres_url, tmp_path):
    stores = Stores(postgres_url, tmp_path / "data")
    try:
        stores.open(replica="a", settings=SETTINGS)
        with pytest.raises(DataDirError, match=r"^--max-queued-videos 8 differs from 64 of the running replica 'a'; "):
            stores.open(replica="b", settings={**SETTINGS, "--max-queued-videos": 8})
        with pytest.raises(DataDirError, match=r"^replica 'a' already runs on --data-dir"):
            stores.open(replica="a", settings=SETTINGS)
        stores.open(replica="b", settings=SETTINGS)
        stores.close()
        stores.opened.clear()
        stores.open(replica="c", settings={**SETTINGS, "--max-stored-videos": None})  # none running: new settings
    finally:
        stores.close()


def test_an_unreachable_database_is_one_line_without_the_password(tmp_path):
    url = "postgresql://sglang:s3cret-pw@127.0.0.1:1/jobs"
    with pytest.raises(DataDirError) as raised:
        open_job_store(url, tmp_path / "data", "a")
    message = str(raised.value)
    assert message.startswith("cannot reach the job store postgresql://sglang:***@127.0.0.1:1/jobs: ")
    assert "\n" not in message and "s3cret-pw" not in message and "Connection refused" in message
