"""The jobs of ``sglang serve``: one contract (:class:`JobStore`) over two SQL databases.

:class:`~.sqlite_store.SqliteJobStore` (the default, ``jobs.sqlite3`` under ``--data-dir``) serves
one server; :class:`~.postgres_store.PostgresJobStore` (``--job-store postgresql://...``) serves
several replicas that share one queue. Both keep the same table and run the same statements,
written here once with ``?`` placeholders; each subclass supplies its connections, transactions
and the few words where the dialects differ (locking rows, an unlimited ``LIMIT``). The files of
the jobs (mp4s, input images) live in a :class:`~.video_store.VideoStore`.

Every state change is committed before the call that made it returns. A job is claimed by one
server (its ``owner``, a replica id) with a lease (``lease_until``) that the owner renews while it
works; a job whose lease ran out is failed ``replica_lost`` by whichever replica sweeps first
(:meth:`JobStore.sweep_lost`): it is not run again, as the request may be what killed its server.
A DELETE of a job running elsewhere marks its row (``cancelled``); its owner notices when it next
renews the lease, stops, and removes the row.

What a start (:meth:`JobStore.recover`) does: with a store of its own (SQLite), jobs that were
``queued`` or ``in_progress`` become ``failed`` with error code ``server_restarted``, stray and
unreferenced files are removed and a completed job whose file has gone is marked failed
(``video_missing``). With a shared store, only the jobs this replica had claimed and its own
temporary files: queued jobs stay queued for the others.

Retention (:class:`Retention`) applies to finished jobs (completed or failed): by age, counted
from ``completed_at`` (``expires_at`` on the Video object), and by count (the newest are kept).
An expired job disappears from every read at once; its row and files are removed by
:meth:`JobStore.purge`, which the server runs after each job and periodically.
"""

from __future__ import annotations

import abc
import contextlib
import dataclasses
import json
import logging
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol, Sequence

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.errors import UserError
from sglang.multimodal_gen.runtime.cache.validation import CacheConfigError
from sglang.multimodal_gen.runtime.entrypoints.input_reference import ReferenceImage, StoredReference, load_stored
from sglang.multimodal_gen.runtime.entrypoints.openai_protocol import VideoError
from sglang.multimodal_gen.runtime.entrypoints.video_store import IMAGES, VIDEOS, DataDirError, VideoStore

__all__ = ["DataDirError", "JobStore", "JobStoreError", "RecoveryReport", "Retention", "VideoJob", "default_data_dir",
           "params_from_json", "params_to_json"]

logger = logging.getLogger(__name__)

UNFINISHED = ("queued", "in_progress")
FINISHED = ("completed", "failed")

def default_data_dir() -> Path:
    """``$XDG_CACHE_HOME/sglang/videos``, i.e. ``~/.cache/sglang/videos`` on most systems."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "sglang" / "videos"


class JobStoreError(Exception):
    """The database failed under a call: ``full`` when it cannot write (a full or failing disk),
    else it cannot be reached or answered with an error. The message is the driver's, one line."""

    def __init__(self, message: str, full: bool = False) -> None:
        super().__init__(" ".join(message.split()))
        self.full = full


@dataclass
class Retention:
    """How long finished jobs (completed or failed) and their videos are kept.

    Attributes:
        max_age_s: Seconds after ``completed_at`` a finished job expires (``expires_at``); ``None``
            keeps it until deleted. Whole seconds, rounded up.
        max_count: The most finished jobs kept; beyond it the oldest (by ``completed_at``) are
            removed. ``None``: no limit. Jobs that are queued or running never count.
    """

    max_age_s: float | None = None
    max_count: int | None = None

    def __post_init__(self) -> None:
        if self.max_age_s is not None:
            if not isinstance(self.max_age_s, (int, float)) or not math.isfinite(self.max_age_s) or self.max_age_s <= 0:
                raise UserError(f"video retention must be a positive number of seconds (or None to keep videos), "
                                f"got {self.max_age_s!r}")
            self.max_age_s = math.ceil(round(self.max_age_s, 6))  # 0.1 h is 360 s, not 361
        if self.max_count is not None and (not isinstance(self.max_count, int) or self.max_count < 1):
            raise UserError(f"the most stored videos must be a whole number >= 1 (or None for no limit), "
                            f"got {self.max_count!r}")


@dataclass
class VideoJob:
    """One generation as the store keeps it. ``cancelled``: deleted by its user while running.
    ``input_reference``: its image's record (the file under ``images/``); ``params.image`` stays
    ``None`` in the store, the worker loads the file (:meth:`JobStore.read_image`). ``owner``: the
    replica that claimed it."""

    id: str
    model: str
    params: SamplingParams
    created_at: int
    status: str = "queued"
    progress: int = 0
    completed_at: int | None = None
    error: VideoError | None = None
    cache_stats: dict[str, Any] | None = None
    timings: dict[str, float] | None = None
    file: str | None = None
    cancelled: bool = False
    input_reference: StoredReference | None = None
    owner: str | None = None


@dataclass
class RecoveryReport:
    """What :meth:`JobStore.recover` changed: ids failed as ``server_restarted``, and the rest."""

    restarted: list[str] = field(default_factory=list)
    dropped_cancelled: int = 0
    removed_files: int = 0
    missing_files: list[str] = field(default_factory=list)


class Row(Protocol):
    def __getitem__(self, key: str) -> Any: ...


class Cursor(Protocol):
    rowcount: int

    def fetchone(self) -> Row | None: ...

    def fetchall(self) -> list[Row]: ...

    def __iter__(self) -> Iterator[Row]: ...


class Transaction(Protocol):
    """What a subclass's :meth:`JobStore._write` and :meth:`JobStore._read` yield: SQL with ``?``
    placeholders, rows read by column name."""

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Cursor: ...


# --------------------------------------------------------------------------- params <-> JSON
def params_to_json(params: SamplingParams) -> str:
    """The request's parameters, cache settings included, as JSON (numpy values as lists). The
    ``image`` is left out: a job's image is a file of its own (``input_reference``)."""
    return json.dumps(dataclasses.asdict(dataclasses.replace(params, image=None)), default=_jsonable,
                      sort_keys=True)


def params_from_json(text: str) -> SamplingParams:
    """What :func:`params_to_json` wrote. Fields this version does not know are dropped, and cache
    settings it would now refuse (say, a strategy since removed) are kept unchecked, so an old
    video stays listable."""
    data = json.loads(text)
    cache_data = data.pop("cache", None) or {}
    known = {f.name for f in dataclasses.fields(SamplingParams)} - {"cache"}
    try:
        cache = CacheParams(**cache_data)
    except (CacheConfigError, TypeError, ValueError):
        cache = _unchecked(CacheParams, cache_data)
    return SamplingParams(**{k: v for k, v in data.items() if k in known}, cache=cache)


def _unchecked(cls: type, data: dict[str, Any]) -> Any:
    obj = object.__new__(cls)
    for f in dataclasses.fields(cls):
        if f.name in data:
            value = data[f.name]
        elif f.default is not dataclasses.MISSING:
            value = f.default
        else:
            value = f.default_factory()  # type: ignore[misc]
        setattr(obj, f.name, value)
    return obj


def _jsonable(value: Any) -> Any:
    if hasattr(value, "tolist"):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def _dump(value: Any) -> str | None:
    return None if value is None else json.dumps(value, default=_jsonable)


# --------------------------------------------------------------------------- the contract
class JobStore(abc.ABC):
    """Jobs in a SQL database and their files in a :class:`VideoStore`; safe to use from several
    threads. Reads never return expired jobs. Writes are single transactions; the caller (the
    server) decides the order of state changes, the store only makes each durable.

    A subclass opens the database (``open``), closes it (:meth:`close`) and provides
    :meth:`_read`, :meth:`_write` and the dialect words below.

    Args:
        files: Where the videos and images live.
        retention: What is kept (default: everything, until deleted).
        clock: Seconds since the epoch (``time.time``); tests may pass their own. Leases are
            compared on it, so replicas need clocks that agree to well within the lease (NTP).
    """

    #: Other servers use the same jobs (a start or stop touches only this replica's own).
    shared: bool = False
    #: Appended to the SELECT that picks the next queued job (PostgreSQL: skip rows others are claiming).
    CLAIM_LOCK = ""
    #: Appended to a SELECT of a row about to be changed (PostgreSQL: lock it).
    ROW_LOCK = ""
    #: A LIMIT that does not limit, before OFFSET.
    NO_LIMIT = "ALL"
    #: What the log calls the database.
    NAME = "the job database"

    def __init__(self, files: VideoStore, retention: Retention | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.files = files
        self.retention = retention or Retention()
        self.clock = clock

    # ----------------------------------------------------------------------------- for subclasses
    @abc.abstractmethod
    def close(self) -> None:
        """Close the connections and release this server's locks."""

    @abc.abstractmethod
    def _read(self) -> contextlib.AbstractContextManager[Transaction]:
        """A connection for reads (each statement sees what was committed before it)."""

    @abc.abstractmethod
    def _write(self) -> contextlib.AbstractContextManager[Transaction]:
        """One transaction, committed when the block ends, rolled back when it raises."""

    def _lock_queue(self, tx: Transaction) -> None:
        """Serialise what counts the queue and adds to it (SQLite's write lock already does)."""

    @property
    def videos_dir(self) -> Path:
        return self.files.dir(VIDEOS)

    # ----------------------------------------------------------------------------- reads
    def _visible(self) -> tuple[str, list[Any]]:
        """SQL condition and arguments: not expired by age."""
        if self.retention.max_age_s is None:
            return "1 = 1", []
        return "(completed_at IS NULL OR completed_at > ?)", [self.clock() - self.retention.max_age_s]

    def expires_at(self, job: VideoJob) -> int | None:
        """When a finished job expires by age (Unix seconds); ``None`` while unfinished or kept."""
        if self.retention.max_age_s is None or job.completed_at is None or job.cancelled:
            return None
        return job.completed_at + int(self.retention.max_age_s)

    def get(self, job_id: str) -> VideoJob | None:
        """The job, or ``None`` when it is not stored, expired, or its row does not parse (logged)."""
        where, args = self._visible()
        with self._read() as tx:
            row = tx.execute(f"SELECT * FROM jobs WHERE id = ? AND {where}", [job_id, *args]).fetchone()
        return None if row is None else _readable_job(row, self.NAME)

    def page(self, after: str | None, limit: int, order: str) -> tuple[list[VideoJob], bool] | None:
        """Up to ``limit`` jobs after the id ``after`` in creation order (``asc``) or newest first;
        ``None`` when ``after`` is not a stored job."""
        where, args = self._visible()
        op, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        with self._read() as tx:
            if after is not None:
                row = tx.execute(f"SELECT seq FROM jobs WHERE id = ? AND {where}", [after, *args]).fetchone()
                if row is None:
                    return None
                where += f" AND seq {op} ?"
                args.append(row["seq"])
            rows = tx.execute(f"SELECT * FROM jobs WHERE {where} ORDER BY seq {direction} LIMIT ?",
                              [*args, limit + 1]).fetchall()
        jobs = [_readable_job(r, self.NAME) for r in rows[:limit]]
        return [job for job in jobs if job is not None], len(rows) > limit

    def counts(self) -> dict[str, int]:
        where, args = self._visible()
        with self._read() as tx:
            found = {r["status"]: r["n"] for r in tx.execute(
                f"SELECT status, COUNT(*) AS n FROM jobs WHERE {where} GROUP BY status", args)}
        return {s: found.get(s, 0) for s in (*UNFINISHED, *FINISHED)}

    def count_queued(self) -> int:
        with self._read() as tx:
            return _count_queued(tx)

    def read_video(self, job: VideoJob) -> bytes:
        """The completed job's mp4; ``FileNotFoundError`` when it has gone (deleted or expired since)."""
        if job.file is None:
            raise FileNotFoundError(job.id)
        return self.files.read(VIDEOS, job.file)

    def read_image(self, job: VideoJob) -> Any:
        """The job's input image, decoded again from its file (a PIL image in RGB), or ``None``
        for a text-to-video job. ``OSError`` when the file has gone, ``ValueError`` when it is no
        longer the file that was checked."""
        record = job.input_reference
        if record is None:
            return None
        return load_stored(self.files.read(IMAGES, record.file), record)

    # ----------------------------------------------------------------------------- the queue
    def add(self, job: VideoJob, max_queued: int | None = None) -> bool:
        """Insert ``job``; with ``max_queued``, only if fewer jobs are queued (checked in the same
        transaction, across replicas). ``False`` when there was no room."""
        with self._write() as tx:
            self._lock_queue(tx)
            if max_queued is not None and _count_queued(tx) >= max_queued:
                return False
            tx.execute(
                "INSERT INTO jobs (id, model, status, progress, params, created_at, input_reference) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                [job.id, job.model, job.status, job.progress, params_to_json(job.params), job.created_at,
                 job.input_reference.to_json() if job.input_reference is not None else None],
            )
        return True

    def claim_next(self, owner: str, lease_s: float) -> VideoJob | None:
        """The oldest queued job -> in_progress, claimed by ``owner`` for ``lease_s`` seconds; each
        job is claimed once, by one replica. ``None`` when nothing is queued. A job whose row does
        not parse is failed (``job_unreadable``) on the way."""
        while True:
            with self._write() as tx:
                row = tx.execute(f"SELECT * FROM jobs WHERE status = 'queued' ORDER BY seq LIMIT 1{self.CLAIM_LOCK}"
                                 ).fetchone()
                if row is None:
                    return None
                job = _readable_job(row, self.NAME)
                if job is not None:
                    tx.execute("UPDATE jobs SET status = 'in_progress', owner = ?, lease_until = ? WHERE id = ?",
                               [owner, self.clock() + lease_s, job.id])
                    job.status, job.owner = "in_progress", owner
                    return job
                unreadable = VideoError(code="job_unreadable", type="server_error",
                                        message="this video's stored record is damaged; create it again")
                tx.execute("UPDATE jobs SET status = 'failed', completed_at = ?, error = ? WHERE id = ?",
                           [int(self.clock()), unreadable.model_dump_json(), row["id"]])

    def renew(self, job_id: str, owner: str, lease_s: float) -> str:
        """Extend the lease of a job ``owner`` runs. ``"running"``: renewed; ``"cancelled"``: it was
        deleted meanwhile (the owner stops and removes it); ``"lost"``: it is no longer this
        owner's to run (its lease ran out and it was failed, or it is gone)."""
        with self._write() as tx:
            if tx.execute("UPDATE jobs SET lease_until = ? WHERE id = ? AND owner = ? AND status = 'in_progress' "
                          "AND cancelled = 0", [self.clock() + lease_s, job_id, owner]).rowcount:
                return "running"
            row = tx.execute("SELECT cancelled FROM jobs WHERE id = ? AND owner = ?", [job_id, owner]).fetchone()
        return "cancelled" if row is not None and row["cancelled"] else "lost"

    def set_progress(self, job_id: str, progress: int) -> None:
        with self._write() as tx:
            tx.execute("UPDATE jobs SET progress = ? WHERE id = ? AND status = 'in_progress'", [progress, job_id])

    def complete(self, job_id: str, file: str, cache_stats: dict[str, Any] | None,
                 timings: dict[str, float] | None, owner: str) -> bool:
        """Mark completed, once ``file`` (from :meth:`write_video`) is in place, while ``owner`` (the
        replica that claimed it) still holds the job and it was not deleted. ``False``: not marked."""
        with self._write() as tx:
            return bool(tx.execute(
                "UPDATE jobs SET status = 'completed', progress = 100, completed_at = ?, error = NULL, file = ?, "
                "cache_stats = ?, timings = ? WHERE id = ? AND owner = ? AND cancelled = 0",
                [int(self.clock()), file, _dump(cache_stats), _dump(timings), job_id, owner],
            ).rowcount)

    def fail(self, job_id: str, error: VideoError, cancelled: bool = False) -> None:
        with self._write() as tx:
            tx.execute("UPDATE jobs SET status = 'failed', completed_at = ?, error = ?, cancelled = ? WHERE id = ?",
                       [int(self.clock()), error.model_dump_json(), int(cancelled), job_id])

    def fail_queued(self, error: VideoError) -> list[str]:
        """Every queued job -> failed with ``error``; returns their ids."""
        with self._write() as tx:
            ids = [r["id"] for r in tx.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq")]
            tx.execute("UPDATE jobs SET status = 'failed', completed_at = ?, error = ? WHERE status = 'queued'",
                       [int(self.clock()), error.model_dump_json()])
        return ids

    def remove(self, job_id: str, cancelled: VideoError) -> str | None:
        """A DELETE from any replica: a job that is not running is removed with its files
        (``"removed"``); a running one is marked failed with ``cancelled`` for its owner to stop
        and remove (``"cancelling"``, also while it unwinds). ``None``: not stored."""
        with self._write() as tx:
            row = tx.execute(f"SELECT status, cancelled, file, input_reference FROM jobs WHERE id = ?{self.ROW_LOCK}",
                             [job_id]).fetchone()
            if row is None:
                return None
            if row["cancelled"]:
                return "cancelling"
            if row["status"] == "in_progress":
                tx.execute("UPDATE jobs SET status = 'failed', completed_at = ?, error = ?, cancelled = 1 WHERE id = ?",
                           [int(self.clock()), cancelled.model_dump_json(), job_id])
                return "cancelling"
            tx.execute("DELETE FROM jobs WHERE id = ?", [job_id])
        self._remove_files(row)
        return "removed"

    def delete(self, job_id: str) -> bool:
        """Remove the job and its files; ``False`` if it was not stored."""
        with self._write() as tx:
            row = tx.execute("SELECT file, input_reference FROM jobs WHERE id = ?", [job_id]).fetchone()
            if row is None:
                return False
            tx.execute("DELETE FROM jobs WHERE id = ?", [job_id])
        self._remove_files(row)
        return True

    # ----------------------------------------------------------------------------- files
    def write_video(self, job_id: str, content: bytes) -> str:
        """Write the mp4 durably (temporary name, fsync, rename, fsync the folder); its file name."""
        return self.files.write(VIDEOS, f"{job_id}.mp4", content)

    def remove_video(self, file: str) -> None:
        """Remove an mp4 whose job was not marked completed (deleted or lost meanwhile)."""
        self.files.remove(VIDEOS, file)

    def write_image(self, job_id: str, image: ReferenceImage) -> StoredReference:
        """Write a job's input image as sent, durably, before its row is added (:meth:`add`): a
        crash in between leaves an unreferenced file, which :meth:`recover` removes."""
        name = self.files.write(IMAGES, f"{job_id}.{image.extension}", image.data)
        return StoredReference(file=name, width=image.width, height=image.height, sha256=image.sha256)

    def remove_image(self, record: StoredReference) -> None:
        """Remove an image whose job was never added (the queue was full, the server stopping)."""
        self.files.remove(IMAGES, record.file)

    def _remove_files(self, row: Row) -> None:
        """The video and the image of a removed job's row (``file``, ``input_reference``)."""
        if row["file"] is not None:
            self.files.remove(VIDEOS, row["file"])
        image = _image_name(row["input_reference"])
        if image is not None:
            self.files.remove(IMAGES, image)

    # ----------------------------------------------------------------------------- upkeep
    def recover(self, owner: str) -> RecoveryReport:
        """After a start: the unfinished jobs of this server (with a store of its own, every
        unfinished job; shared, those ``owner`` had claimed) -> failed ``server_restarted``, its
        deleted ones dropped, its half-written files removed; unshared, unreferenced files too."""
        report = RecoveryReport()
        error = VideoError(code="server_restarted", type="server_error",
                           message="the server stopped or crashed before this video was finished; create it again")
        mine, args = ("owner = ?", [owner]) if self.shared else ("1 = 1", [])
        unfinished = "status = 'in_progress'" if self.shared else "status IN ('queued', 'in_progress')"
        removed: list[Row] = []
        with self._write() as tx:
            report.restarted = [r["id"] for r in tx.execute(
                f"SELECT id FROM jobs WHERE {unfinished} AND cancelled = 0 AND {mine} ORDER BY seq", args)]
            removed = tx.execute(f"SELECT file, input_reference FROM jobs WHERE cancelled = 1 AND {mine}",
                                 args).fetchall()
            report.dropped_cancelled = len(removed)
            tx.execute(f"DELETE FROM jobs WHERE cancelled = 1 AND {mine}", args)
            tx.execute(f"UPDATE jobs SET status = 'failed', completed_at = ?, error = ? WHERE {unfinished} AND {mine}",
                       [int(self.clock()), error.model_dump_json(), *args])
            if not self.shared:
                report.missing_files = self._mark_missing(tx)
                kept = {r["file"] for r in tx.execute("SELECT file FROM jobs WHERE status = 'completed'")}
                images = {_image_name(r["input_reference"]) for r in tx.execute("SELECT input_reference FROM jobs")}
        for row in removed:
            self._remove_files(row)
        report.removed_files = self.files.clear_scratch(every_replica=not self.shared)
        if not self.shared:
            for kind, keep in ((VIDEOS, kept), (IMAGES, images)):
                report.removed_files += sum(self.files.remove(kind, name) for name in self.files.names(kind) - keep)
        return report

    def _mark_missing(self, tx: Transaction) -> list[str]:
        """Completed jobs whose file has gone -> failed ``video_missing``; their ids."""
        files = {r["id"]: r["file"] for r in tx.execute("SELECT id, file FROM jobs WHERE status = 'completed'")}
        missing = [i for i, name in files.items() if name is None or not self.files.exists(VIDEOS, name)]
        lost = VideoError(code="video_missing", type="server_error",
                          message="the video file was removed from the server's data folder; create it again")
        for job_id in missing:
            tx.execute("UPDATE jobs SET status = 'failed', file = NULL, error = ? WHERE id = ?",
                       [lost.model_dump_json(), job_id])
        return missing

    def sweep_lost(self) -> list[str]:
        """Jobs whose owner stopped renewing their lease (a replica that died): running ones ->
        failed ``replica_lost`` (not run again), deleted ones removed. The ids failed."""
        error = VideoError(code="replica_lost", type="server_error",
                           message="the server running this video stopped answering before it was finished; "
                                   "create it again")
        now = self.clock()
        with self._write() as tx:
            lost = [r["id"] for r in tx.execute(
                f"SELECT id FROM jobs WHERE status = 'in_progress' AND cancelled = 0 AND lease_until < ? "
                f"ORDER BY seq{self.ROW_LOCK}", [now])]
            for job_id in lost:  # no owner: the replica, should it come back, cannot complete it
                tx.execute("UPDATE jobs SET status = 'failed', completed_at = ?, error = ?, owner = NULL WHERE id = ?",
                           [int(now), error.model_dump_json(), job_id])
            dropped = tx.execute(f"SELECT id, file, input_reference FROM jobs WHERE cancelled = 1 AND lease_until < ?"
                                 f"{self.ROW_LOCK}", [now]).fetchall()
            for row in dropped:
                tx.execute("DELETE FROM jobs WHERE id = ?", [row["id"]])
        for row in dropped:
            self._remove_files(row)
        return lost

    def purge(self) -> list[str]:
        """Remove expired jobs (by age) and the oldest finished beyond the count; their ids."""
        removed: dict[str, Row] = {}
        with self._write() as tx:
            if self.retention.max_age_s is not None:
                removed.update((r["id"], r) for r in tx.execute(
                    "SELECT id, file, input_reference FROM jobs WHERE status IN ('completed', 'failed') "
                    "AND cancelled = 0 AND completed_at <= ?", [self.clock() - self.retention.max_age_s]))
            if self.retention.max_count is not None:
                removed.update((r["id"], r) for r in tx.execute(
                    "SELECT id, file, input_reference FROM jobs WHERE status IN ('completed', 'failed') "
                    f"AND cancelled = 0 ORDER BY completed_at DESC, seq DESC LIMIT {self.NO_LIMIT} OFFSET ?",
                    [self.retention.max_count]))
            for job_id in removed:
                tx.execute("DELETE FROM jobs WHERE id = ?", [job_id])
        for row in removed.values():
            self._remove_files(row)
        return list(removed)


def _count_queued(tx: Transaction) -> int:
    return tx.execute("SELECT COUNT(*) AS n FROM jobs WHERE status = 'queued'").fetchone()["n"]


def _readable_job(row: Row, where: str) -> VideoJob | None:
    """The row as a job, or ``None`` (logged) when it does not parse: one damaged row must not
    take every listing down with it."""
    try:
        return _job(row)
    except (ValueError, TypeError, KeyError) as exc:  # JSONDecodeError and pydantic's errors are ValueErrors
        logger.warning("skipping job %s: its row in %s does not parse (%s: %s)", _brief_id(row), where,
                       type(exc).__name__, str(exc)[:200])
        return None


def _brief_id(row: Row) -> str:
    """The row's id for the log, cut: the row is damaged, its id may be anything."""
    text = repr(row["id"])
    return text if len(text) <= 60 else text[:60] + "..."


def _job(row: Row) -> VideoJob:
    return VideoJob(
        id=row["id"],
        model=row["model"],
        params=params_from_json(row["params"]),
        created_at=row["created_at"],
        status=row["status"],
        progress=row["progress"],
        completed_at=row["completed_at"],
        error=VideoError.model_validate_json(row["error"]) if row["error"] else None,
        cache_stats=json.loads(row["cache_stats"]) if row["cache_stats"] else None,
        timings=json.loads(row["timings"]) if row["timings"] else None,
        file=row["file"],
        cancelled=bool(row["cancelled"]),
        input_reference=StoredReference.from_json(row["input_reference"]) if row["input_reference"] else None,
        owner=row["owner"],
    )


def _image_name(record: str | None) -> str | None:
    """The file name in a row's ``input_reference``; ``None`` without one or when it does not
    parse (the row is then skipped by reads; its file is treated as unreferenced)."""
    if not record:
        return None
    try:
        return StoredReference.from_json(record).file
    except (ValueError, TypeError, KeyError):
        return None
