"""The video jobs of ``sglang serve``: the operator's settings, the job service and its worker.

One worker thread runs the queue a generation at a time, since the accelerator is the bottleneck
and the model holds one set of weights. Every state change goes to the :class:`JobStore` (SQLite
under ``--data-dir``, or a PostgreSQL database that replicas share) when it happens, so completed
videos survive a crash or restart; what this server was running then is failed
(``server_restarted``). Finished videos expire by age and count (``expires_at``). A create beyond
``max_queued_videos`` waiting is a 429 with ``Retry-After``. A DELETE of a running video answers
at once and the worker stops at its next step; with a shared store, the replica running it stops
when its :class:`LeaseKeeper` next looks. The HTTP app (``http_server.py``) only parses,
validates and reports.
"""


from __future__ import annotations

import collections
import dataclasses
import logging
import math
import shutil
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.errors import UserError
from sglang.multimodal_gen.runtime.entrypoints.access import ResponseHygiene
from sglang.multimodal_gen.runtime.entrypoints.input_reference import ReferenceImage
from sglang.multimodal_gen.runtime.entrypoints.job_store import JobStore, JobStoreError, Retention, VideoJob
from sglang.multimodal_gen.runtime.entrypoints.lease import LeaseKeeper
from sglang.multimodal_gen.runtime.entrypoints.open_store import open_job_store
from sglang.multimodal_gen.runtime.entrypoints.openai_protocol import (
    APIError,
    InputReferenceInfo,
    VideoError,
    VideoObject,
)
from sglang.multimodal_gen.runtime.entrypoints.request_limits import RequestLimits
from sglang.multimodal_gen.runtime.entrypoints.sqlite_store import DB_NAME
from sglang.multimodal_gen.runtime.entrypoints.store_url import default_replica_id, parse_job_store_url
from sglang.multimodal_gen.runtime.entrypoints.video_api import brief, format_seconds
from sglang.multimodal_gen.runtime.utils.video_io import encode_mp4

logger = logging.getLogger(__name__)

# The running job's progress reaches the store at most this often (GET shows it live).
PROGRESS_WRITE_INTERVAL_S = 1.0
# How long shutdown waits for the worker to let go of the running job.
STOP_TIMEOUT_S = 10.0
# Retry-After of a 429 before any generation has been timed.
DEFAULT_RETRY_AFTER_S = 5
DEFAULT_MAX_QUEUED_VIDEOS = 64
DEFAULT_VIDEO_RETENTION_HOURS = 24.0
DEFAULT_MAX_STORED_VIDEOS = 1000
DEFAULT_JOB_LEASE_S = 30.0
# How often an idle worker looks for jobs that other replicas queued (a shared store).
SHARED_POLL_S = 0.5


@dataclass
class ServerConfig:
    """What the operator of ``sglang serve`` sets besides the model (``sglang serve --help``).

    Attributes:
        host: Address the server is bound to (loopback unless the operator chose otherwise). On a
            loopback address, requests must be addressed to a loopback name (Host header) and must
            not come from a web page of another origin (Origin header); see ``access.py``.
        log_level: uvicorn's log level.
        api_key: When set, every route but ``/health`` requires ``Authorization: Bearer <api_key>``
            (``--api-key``, else the ``SGLANG_API_KEY`` environment variable). Left out of ``repr``.
        limits: Bounds on each request (``--max-steps``, ...); its unset bounds are scaled from the
            model's default request when the app is created (see :class:`RequestLimits`).
        data_dir: Folder of the job database and the mp4 files (``job_store.py``); one server at a
            time may use it. ``None``: a temporary folder removed when the server stops (nothing
            survives a restart); ``sglang serve`` always passes one, by default
            ``~/.cache/sglang/videos`` (``job_store.default_data_dir``).
        video_retention_hours: Finished videos (completed or failed) expire this long after
            ``completed_at`` (the Video object's ``expires_at``); ``None`` keeps them until deleted.
        max_stored_videos: The most finished videos kept; the oldest beyond it are removed when a
            video finishes. ``None``: no limit.
        max_queued_videos: Videos that may wait behind the running one; a create beyond it is a
            429 with ``Retry-After``.
        job_store: The jobs' database URL (``store_url.py``); ``None``: SQLite,
            ``jobs.sqlite3`` under ``data_dir``. Left out of ``repr`` (a password).
        video_store: Folder of the mp4 and image files; ``None``: ``data_dir``. Replicas of a
            shared job store share it.
        replica_id: This server's id in the job store (what it claimed is recovered by it alone);
            ``None``: ``host:pid``. ``sglang serve`` passes ``host:port``.
        job_lease_seconds: How long a claimed job stays this server's without a renewal (it
            renews a third of the way); a replica silent for longer loses it (``replica_lost``).
    """

    host: str = "127.0.0.1"
    log_level: str = "warning"
    api_key: str | None = field(default=None, repr=False)
    limits: RequestLimits = field(default_factory=RequestLimits)
    data_dir: str | None = None
    video_retention_hours: float | None = DEFAULT_VIDEO_RETENTION_HOURS
    max_stored_videos: int | None = DEFAULT_MAX_STORED_VIDEOS
    max_queued_videos: int = DEFAULT_MAX_QUEUED_VIDEOS
    job_store: str | None = field(default=None, repr=False)
    video_store: str | None = None
    replica_id: str | None = None
    job_lease_seconds: float = DEFAULT_JOB_LEASE_S

    def __post_init__(self) -> None:
        if isinstance(self.max_queued_videos, bool) or not isinstance(self.max_queued_videos, int) \
                or self.max_queued_videos < 1:
            raise UserError(f"max_queued_videos must be a whole number >= 1, got {self.max_queued_videos!r}")
        if not (isinstance(self.job_lease_seconds, (int, float)) and 0 < self.job_lease_seconds < math.inf):
            raise UserError(f"job_lease_seconds must be a number of seconds > 0, got {self.job_lease_seconds!r}")
        self.retention()  # raises for a bad retention
        if self.job_store is not None:
            parse_job_store_url(self.job_store)  # one line for a URL that names no store
        if self.replica_id is None:
            self.replica_id = default_replica_id(0)

    def retention(self) -> Retention:
        """What the job store keeps, from ``video_retention_hours`` and ``max_stored_videos``."""
        hours = self.video_retention_hours
        return Retention(max_age_s=None if hours is None else hours * 3600.0, max_count=self.max_stored_videos)

    def shared_settings(self) -> dict[str, Any]:
        """What every replica of one shared queue must set alike, by flag."""
        return {"--max-queued-videos": self.max_queued_videos, "--video-retention-hours": self.video_retention_hours,
                "--max-stored-videos": self.max_stored_videos}

    def open_store(self, data_dir: str) -> JobStore:
        """The job store these settings name (``data_dir`` standing in for an unset ``data_dir``),
        opened for this replica; ``DataDirError`` (one line) when it cannot be used."""
        url = self.job_store or f"sqlite:///{Path(data_dir) / DB_NAME}"
        return open_job_store(url, self.video_store or data_dir, self.replica_id, self.shared_settings(),
                              self.retention(), files_flag="--video-store" if self.video_store else "--data-dir")


class _Cancelled(Exception):
    """Raised from the progress callback to stop a generation that was deleted or is being stopped."""


class VideoService:
    """The job store and its single worker thread.

    Every state change is written to the :class:`JobStore` when it happens. ``_lock`` orders
    what the worker and the requests do around the running job (claiming it, cancelling it,
    finishing it) and the queue bound; reads go to the store without it. The running job's
    progress is kept here and written to the store at most every ``PROGRESS_WRITE_INTERVAL_S``.
    The worker takes the oldest queued job from the store when woken by a create here, or, with
    a shared store, every ``SHARED_POLL_S`` (creates on other replicas).
    """

    def __init__(self, generator: Any, model_name: str, config: ServerConfig | None = None) -> None:
        self.generator = generator
        self.model_name = model_name
        self.config = config or ServerConfig()
        self.store: JobStore | None = None
        self._temp_dir: str | None = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._keeper: LeaseKeeper | None = None
        self._stopping = False
        # The running job: its id (None when idle), live progress, and why it is being stopped:
        # None, "deleted" (DELETE: dropped once the worker lets go), "stopping" (server_stopped)
        # or "lost" (no longer this replica's: its lease ran out).
        self._current: str | None = None
        self._progress = 0
        self._cancel = threading.Event()
        self._cancel_reason: str | None = None
        self._durations: collections.deque[float] = collections.deque(maxlen=8)
        self.hygiene = ResponseHygiene.for_generator(generator)

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        """Open the store (taking this server's locks), fail what this server left unfinished,
        apply retention, start the worker (and, with a shared store, the lease keeper)."""
        if self._thread is not None:
            return
        folder = self.config.data_dir
        if folder is None:
            self._temp_dir = folder = tempfile.mkdtemp(prefix="sglang-videos-")
        self.store = self.config.open_store(folder)
        report = self.store.recover(self.config.replica_id)
        if report.restarted:
            logger.warning("%d video(s) queued or running when the server last stopped are now failed "
                           "(server_restarted): %s", len(report.restarted), ", ".join(report.restarted))
        if report.missing_files:
            logger.warning("%d completed video(s) lost their file and are now failed (video_missing): %s",
                           len(report.missing_files), ", ".join(report.missing_files))
        self._purge()
        self._stopping = False
        self._thread = threading.Thread(target=self._work, name="sglang-video-worker", daemon=True)
        self._thread.start()
        if self.store.shared:
            self._keeper = LeaseKeeper(self.store, self.config.replica_id, self.config.job_lease_seconds,
                                       lambda: self._current, self._lost)
            self._keeper.start()

    def begin_shutdown(self) -> None:
        """Refuse new videos (503) from now on; safe to call from a signal handler (no lock)."""
        self._stopping = True

    @property
    def stopping(self) -> bool:
        return self._stopping

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """Stop taking work; mark the running video ``failed`` with code ``server_stopped`` (it
        stops at its next step), and the queued ones too unless other replicas share the queue;
        then join the worker and close the store. A running video that finishes before its next
        step stays completed."""
        if self.store is None:
            return
        error = VideoError(code="server_stopped", type="server_error",
                           message="the server was stopped before this video was finished; create it again")
        with self._lock:
            self._stopping = True
            running = self._current if self._cancel_reason is None else None
            if running is not None:
                self._cancel_reason = "stopping"
                self._cancel.set()
            try:
                queued = [] if self.store.shared else self.store.fail_queued(error)
                if running is not None:
                    self.store.fail(running, error)
            except JobStoreError as exc:  # a full disk: the next start fails them (server_restarted)
                logger.error("could not mark the unfinished videos failed: %s; the next start will", exc)
                queued = []
        self._wake.set()
        if self._keeper is not None:
            self._keeper.stop()
            self._keeper = None
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                logger.warning("the worker did not stop within %.0fs; %s stays failed (server_stopped)", timeout,
                               running)
            self._thread = None
        if queued or running:
            logger.warning("stopped: %s marked failed (server_stopped)",
                           ", ".join(filter(None, [f"running {running}" if running else None,
                                                   f"{len(queued)} queued" if queued else None])))
        self.store.close()
        self.store = None
        if self._temp_dir is not None:
            shutil.rmtree(self._temp_dir, ignore_errors=True)
            self._temp_dir = None

    # ----------------------------------------------------------------------------- requests
    def check_accepting(self) -> None:
        """Raise the 503 (shutting down) or 429 (queue full) a create would get, before any work."""
        self._refuse_if_stopping()
        if self._store().count_queued() >= self.config.max_queued_videos:
            raise self._queue_full()

    def _refuse_if_stopping(self) -> None:
        if self._stopping:
            raise APIError(503, "the server is shutting down and takes no new videos; retry once it is back",
                           code="server_shutting_down", type="server_error")

    def _queue_full(self) -> APIError:
        wait = self.retry_after_s()
        return APIError(
            429, f"the queue is full ({self.config.max_queued_videos} videos waiting); retry in about {wait} s",
            code="queue_full", type="rate_limit_error", headers={"Retry-After": str(wait)},
        )

    def retry_after_s(self) -> int:
        """Seconds until a queue slot is likely free: the mean recent generation time, 1-60 s."""
        if not self._durations:
            return DEFAULT_RETRY_AFTER_S
        return max(1, min(60, math.ceil(sum(self._durations) / len(self._durations))))

    def submit(self, params: SamplingParams, image: ReferenceImage | None = None) -> VideoJob:
        """Queue a validated request. Its ``image`` (the decoded ``input_reference``) is written
        under the data folder first and the job records its file; the job's stored params hold no
        image, the worker reads the file back. Blocking (fsyncs): call it off the event loop."""
        job = VideoJob(id=f"video_{uuid.uuid4().hex}", model=self.model_name,
                       params=dataclasses.replace(params, image=None), created_at=int(time.time()))
        store = self._store()
        if image is not None:
            self._refuse_if_stopping()
            try:
                job.input_reference = store.write_image(job.id, image)
            except OSError as exc:
                logger.error("cannot store the input_reference of a new video: %s", exc)
                raise APIError(507, f"the server cannot store the input_reference image now "
                               f"({exc.strerror or type(exc).__name__}); retry later",
                               code="storage_failed", type="server_error") from None
        added = False
        try:
            with self._lock:
                self._refuse_if_stopping()
                added = self._store().add(job, max_queued=self.config.max_queued_videos)
                if not added:
                    raise self._queue_full()
        finally:
            if not added and job.input_reference is not None:
                store.remove_image(job.input_reference)
        self._wake.set()
        logger.info("queued %s", job.id)
        return job

    def _store(self) -> JobStore:
        if self.store is None:
            raise APIError(503, "the server is not running (starting or stopped)", code="server_not_running",
                           type="server_error")
        return self.store

    def get(self, video_id: str) -> VideoJob:
        job = self._store().get(video_id)
        if job is None:
            raise APIError(404, f"no video with id {brief(video_id)}", param="video_id", code="not_found")
        return job

    def list(self, after: str | None, limit: int, order: str) -> tuple[list[VideoJob], bool]:
        """One page in creation order (``asc``) or newest first (``desc``), after the id ``after``."""
        page = self._store().page(after, limit, order)
        if page is None:
            raise APIError(400, f"after: no video with id {brief(after)} (deleted?)", param="after")
        return page

    def delete(self, video_id: str) -> VideoJob:
        """Delete a video and its file. A queued one is never run. A running one is answered at
        once: it shows as ``failed`` (code ``cancelled``) until the worker running it (here, or on
        another replica) lets go at its next step, and is then removed."""
        error = VideoError(code="cancelled", message="deleted while running; it is removed once the worker "
                                                     "stops at its next step")
        with self._lock:
            job = self.get(video_id)
            if video_id != self._current:
                if self._store().remove(video_id, error) is None:  # deleted meanwhile by another replica
                    raise APIError(404, f"no video with id {brief(video_id)}", param="video_id", code="not_found")
                return job
            if self._cancel_reason != "deleted":
                self._store().fail(video_id, error, cancelled=True)
                self._cancel_reason = "deleted"
                self._cancel.set()
        logger.info("%s deleted while running; cancelling", video_id)
        return job

    def _lost(self, video_id: str, state: str) -> None:
        """The lease keeper's report that the running job was deleted on another replica
        (``cancelled``) or is no longer this replica's (``lost``): stop it at its next step."""
        with self._lock:
            if video_id != self._current or self._cancel_reason is not None:
                return
            self._cancel_reason = "deleted" if state == "cancelled" else "lost"
            self._cancel.set()
        logger.info("%s %s; stopping it", video_id,
                    "deleted on another replica" if state == "cancelled" else "is no longer this replica's")

    def content(self, video_id: str) -> bytes:
        job = self.get(video_id)
        if job.status == "completed":
            try:
                return self._store().read_video(job)
            except FileNotFoundError:  # deleted or expired since it was read
                raise APIError(404, f"no video with id {brief(video_id)}", param="video_id", code="not_found") from None
        if job.status == "failed":
            reason = job.error.message if job.error is not None else "unknown error"
            raise APIError(409, f"video {video_id} failed and has no content: {reason}", code="video_failed")
        progress = self._live_progress(job)
        raise APIError(
            409, f"video {video_id} is not ready yet (status {job.status}, progress {progress}%); "
            "poll GET /v1/videos/{id} until status is completed", code="video_not_ready",
        )

    def counts(self) -> dict[str, int]:
        return self._store().counts()

    def worker_state(self) -> dict[str, Any]:
        """``{"busy": bool, "job": id or None}``: busy until the worker has let go of a job,
        cancelled ones included."""
        current = self._current
        return {"busy": current is not None, "job": current}

    def _live_progress(self, job: VideoJob) -> int:
        if job.status == "in_progress" and job.id == self._current:
            return max(job.progress, self._progress)
        return job.progress

    def to_listed_object(self, job: VideoJob) -> VideoObject | None:
        """:meth:`to_object` for a listing: a stored job whose values no longer make a Video object
        (a damaged row) is logged and left out, rather than failing the whole page."""
        try:
            return self.to_object(job)
        except (ValueError, TypeError, ArithmeticError) as exc:  # pydantic's ValidationError is a ValueError
            logger.warning("leaving %s out of the listing: its stored values do not make a video object (%s)",
                           brief(job.id), type(exc).__name__)
            return None

    def to_object(self, job: VideoJob) -> VideoObject:
        p = job.params
        return VideoObject(
            id=job.id,
            model=job.model,
            status=job.status,
            progress=self._live_progress(job),
            created_at=job.created_at,
            completed_at=job.completed_at,
            expires_at=self._store().expires_at(job),
            prompt=p.prompt,
            size=f"{p.width}x{p.height}",
            seconds=format_seconds(p.num_frames, p.fps),
            error=job.error,
            negative_prompt=p.negative_prompt,
            seed=p.seed,
            num_inference_steps=p.num_inference_steps,
            guidance_scale=p.guidance_scale,
            guidance_scale_2=p.guidance_scale_2,
            num_frames=p.num_frames,
            fps=p.fps,
            cache=p.cache.strategy,
            cache_stats=job.cache_stats,
            inference_time_s=round(sum(job.timings.values()), 4) if job.timings else None,
            timings={k: round(v, 4) for k, v in job.timings.items()} if job.timings else None,
            input_reference=InputReferenceInfo(**job.input_reference.public()) if job.input_reference else None,
        )

    # ----------------------------------------------------------------------------- the worker
    def _work(self) -> None:
        sweep_s = _sweep_interval_s(self.config.retention())
        wait_s = min(sweep_s, SHARED_POLL_S) if self._store().shared else sweep_s
        purged = time.monotonic()
        while not self._stopping:
            try:
                job = self._claim()
                if job is not None:
                    self._run(job)
                    self._purge()
                    purged = time.monotonic()
                    continue
                if time.monotonic() - purged >= sweep_s:
                    self._purge()
                    purged = time.monotonic()
            except JobStoreError as exc:  # a full or failing disk, the database away: one line, the worker goes on
                logger.error("the worker could not use the job store: %s", exc)
            except Exception:  # the store failing (disk gone, closed at shutdown) must not end the worker silently
                logger.exception("the worker failed")
            self._wake.wait(wait_s)
            self._wake.clear()

    def _claim(self) -> VideoJob | None:
        """The oldest queued job -> in_progress, this replica's; ``None`` when none is queued."""
        with self._lock:
            if self._stopping:
                return None
            job = self._store().claim_next(self.config.replica_id, self.config.job_lease_seconds)
            if job is not None:
                self._current, self._progress, self._cancel_reason = job.id, 0, None
                self._cancel = threading.Event()
        return job

    def _run(self, job: VideoJob) -> None:
        cancel, store = self._cancel, self._store()
        written = {"progress": 0, "at": time.monotonic()}

        def progress(step: int, total: int) -> None:
            if cancel.is_set():
                raise _Cancelled
            value = min(99, int(100 * step / max(total, 1)))
            self._progress = value
            now = time.monotonic()
            if value != written["progress"] and now - written["at"] >= PROGRESS_WRITE_INTERVAL_S:
                written.update(progress=value, at=now)
                try:
                    store.set_progress(job.id, value)
                except JobStoreError as exc:  # progress is informative: a busy database must not fail the video
                    logger.warning("could not record the progress of %s: %s", job.id, exc)

        try:
            params = dataclasses.replace(job.params, image=store.read_image(job))
        except (OSError, ValueError) as exc:  # ValueError: a file changed since, or refused when read again
            logger.error("the input_reference of %s cannot be read: %s", job.id, exc)
            self._finish(job, error=VideoError(
                code="input_reference_missing", type="server_error",
                message="the input_reference image of this video is gone from the server's data folder or was "
                        "changed there; create the video again"))
            return
        logger.info("generating %s", job.id)
        started = time.monotonic()
        try:
            result = self.generator.generate(params, progress=progress)
            if cancel.is_set():
                raise _Cancelled
            content = encode_mp4(result.frames, result.params.fps, tmp_dir=store.files.scratch)
        except _Cancelled:
            logger.info("%s cancelled (%s)", job.id, self._cancel_reason)
            self._finish(job)
            return
        except Exception as exc:  # a failed generation must not take the server down; the detail goes to the log
            self._finish(job, error=self.hygiene.failure(job.id, exc))
            return
        self._durations.append(time.monotonic() - started)
        try:
            file = store.write_video(job.id, content)
        except OSError as exc:
            logger.exception("storing the video of %s failed", job.id)
            self._finish(job, error=VideoError(
                code="storage_failed", type="server_error",
                message=f"the video was made but could not be stored: {exc.strerror or type(exc).__name__}"))
            return
        self._finish(job, file=file, cache_stats=result.cache_stats.to_dict() if result.cache_stats else None,
                     timings=dict(result.timings))

    def _finish(self, job: VideoJob, error: VideoError | None = None, file: str | None = None,
                cache_stats: dict[str, Any] | None = None, timings: dict[str, float] | None = None) -> None:
        """Record the outcome and let go of the job: a deleted one is removed (its file too), a
        finished video is kept even when the server is stopping, a stopped one stays failed, a
        lost one (failed ``replica_lost`` by another replica) is left as it is."""
        with self._lock:
            reason, self._current = self._cancel_reason, None
            store = self._store()
            if reason == "deleted":
                store.delete(job.id)
                logger.info("%s removed: deleted while running", job.id)
            elif file is not None and reason != "lost" \
                    and store.complete(job.id, file, cache_stats, timings, owner=self.config.replica_id):
                logger.info("%s completed in %.2fs", job.id, sum((timings or {}).values()))
            elif file is not None:
                store.remove_video(file)
                logger.warning("%s was made but is no longer this replica's (deleted, or its lease ran out); "
                               "its file is removed", job.id)
            elif reason is None:
                store.fail(job.id, error)

    def _purge(self) -> None:
        removed = self._store().purge()
        if removed:
            logger.info("retention removed %d video(s): %s", len(removed), ", ".join(removed))


def _sweep_interval_s(retention: Retention) -> float:
    """How often an idle worker applies retention: a tenth of the age limit, 1-60 s."""
    return max(1.0, min(60.0, (retention.max_age_s or 600) / 10))
