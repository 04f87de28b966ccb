"""The job store on its own: params round trip, durability, restart recovery, retention, threads."""

from __future__ import annotations

import json
import sqlite3
import threading

import pytest

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.entrypoints.job_store import (
    DB_NAME,
    DataDirError,
    JobStore,
    Retention,
    VideoJob,
    params_from_json,
    params_to_json,
)
from sglang.multimodal_gen.runtime.entrypoints.openai_protocol import VideoError

BASE = dict(prompt="a cat", negative_prompt="", num_inference_steps=8, guidance_scale=5.0, seed=7, height=32,
            width=48, num_frames=9, fps=8)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def _job(job_id: str, prompt: str = "a cat", created_at: int = 1_000_000) -> VideoJob:
    return VideoJob(id=job_id, model="m", params=SamplingParams(**{**BASE, "prompt": prompt}), created_at=created_at)


@pytest.fixture
def store(tmp_path):
    store = JobStore.open(tmp_path / "data")
    yield store
    store.close()


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


def test_every_state_change_is_on_disk_at_once(store, tmp_path):
    """Another connection (another process after a crash) sees each change as soon as it returns."""
    other = sqlite3.connect(tmp_path / "data" / DB_NAME)
    assert other.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

    def status():
        return other.execute("SELECT status, progress FROM jobs WHERE id = 'a'").fetchone()

    assert store.add(_job("a"))
    assert status() == ("queued", 0)
    assert store.claim("a").status == "in_progress" and status() == ("in_progress", 0)
    assert store.claim("a") is None  # only once
    store.set_progress("a", 40)
    assert status() == ("in_progress", 40)
    name = store.write_video("a", b"mp4 bytes")
    assert [p.name for p in store.videos_dir.iterdir()] == [name]  # no temporary file left
    store.complete("a", name, {"strategy": "none"}, {"denoising": 0.5})
    assert status() == ("completed", 100)
    job = store.get("a")
    assert job.cache_stats == {"strategy": "none"} and job.timings == {"denoising": 0.5}
    assert store.video_path(job).read_bytes() == b"mp4 bytes"
    assert store.delete("a") and not store.video_path(job).exists() and status() is None
    assert store.delete("a") is False
    other.close()


def test_queue_bound_is_checked_with_the_insert(store):
    assert store.add(_job("a"), max_queued=2) and store.add(_job("b"), max_queued=2)
    assert store.add(_job("c"), max_queued=2) is False
    store.claim("a")
    assert store.add(_job("c"), max_queued=2) and store.count_queued() == 2


def test_restart_recovery(tmp_path):
    folder = tmp_path / "data"
    store = JobStore.open(folder)
    for job_id in "abcdef":
        store.add(_job(job_id))
    for job_id in "abcd":
        store.claim(job_id)
    store.complete("a", store.write_video("a", b"A"), None, {"denoising": 1.0})
    store.complete("b", store.write_video("b", b"B"), None, None)
    store.fail("c", VideoError(code="cancelled", message="deleted while running"), cancelled=True)
    # "d" running, "e" and "f" queued; a crash mid-write leaves a temporary file and an unreferenced mp4.
    (store.videos_dir / ".d.mp4.tmp").write_bytes(b"half")
    (store.videos_dir / "d.mp4").write_bytes(b"renamed, not yet recorded")
    (store.videos_dir / "b.mp4").unlink()
    store.close()

    store = JobStore.open(folder)
    report = store.recover()
    assert report.restarted == ["d", "e", "f"] and report.dropped_cancelled == 1
    assert report.missing_files == ["b"] and report.removed_files == 2
    assert sorted(p.name for p in store.videos_dir.iterdir()) == ["a.mp4"]
    assert store.get("a").status == "completed" and store.video_path(store.get("a")).read_bytes() == b"A"
    assert store.get("b").status == "failed" and store.get("b").error.code == "video_missing"
    assert store.get("c") is None
    for job_id in "def":
        job = store.get(job_id)
        assert job.status == "failed" and job.error.code == "server_restarted" and job.completed_at is not None
    assert store.recover().restarted == []  # nothing more on the next start
    store.close()


def test_one_server_per_folder(tmp_path):
    store = JobStore.open(tmp_path / "data")
    with pytest.raises(DataDirError, match="in use by another sglang serve"):
        JobStore.open(tmp_path / "data")
    store.close()
    JobStore.check(tmp_path / "data")


def test_unusable_folders_are_one_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(DataDirError, match="cannot use --data-dir"):
        JobStore.open(tmp_path / "file")
    store = JobStore.open(tmp_path / "newer")
    store._conn().execute("PRAGMA user_version = 99")
    store.close()
    with pytest.raises(DataDirError, match="written by a newer sglang"):
        JobStore.open(tmp_path / "newer")
    (tmp_path / "garbage").mkdir()
    (tmp_path / "garbage" / DB_NAME).write_bytes(b"not a database" * 100)
    with pytest.raises(DataDirError, match=r"is damaged \(file is not a database\); move it aside"):
        JobStore.open(tmp_path / "garbage")


def test_retention_by_age(tmp_path):
    clock = Clock()
    store = JobStore.open(tmp_path / "data", Retention(max_age_s=59.5), clock=clock)
    store.add(_job("a"))
    store.add(_job("b"))
    store.claim("a")
    store.complete("a", store.write_video("a", b"A"), None, None)
    assert store.expires_at(store.get("a")) == int(clock.now) + 60 and store.expires_at(store.get("b")) is None
    clock.now += 59
    assert store.get("a") is not None and store.purge() == []
    clock.now += 1
    # Gone from every read at once, removed for good by purge.
    assert store.get("a") is None and store.page(None, 10, "asc")[0][0].id == "b"
    assert store.counts() == {"queued": 1, "in_progress": 0, "completed": 0, "failed": 0}
    assert store.purge() == ["a"] and list(store.videos_dir.iterdir()) == []
    assert store.get("b") is not None  # unfinished jobs never expire
    store.close()


def test_retention_by_count_keeps_the_newest_finished(tmp_path):
    clock = Clock()
    store = JobStore.open(tmp_path / "data", Retention(max_count=2), clock=clock)
    for job_id in "abcd":
        store.add(_job(job_id))
    for job_id in "abc":
        clock.now += 1
        store.claim(job_id)
        store.complete(job_id, store.write_video(job_id, job_id.encode()), None, None)
    assert store.purge() == ["a"]
    assert sorted(p.name for p in store.videos_dir.iterdir()) == ["b.mp4", "c.mp4"]
    assert [j.id for j in store.page(None, 10, "asc")[0]] == ["b", "c", "d"]
    store.close()


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
                for job in store.page(None, 100, "asc")[0]:
                    if job.status == "queued" and store.claim(job.id) is not None:
                        for p in range(0, 100, 25):
                            store.set_progress(job.id, p)
                        store.complete(job.id, store.write_video(job.id, job.id.encode()), None, None)
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
