"""The jobs of ``sglang serve`` and their mp4 files, kept on disk so a restart loses nothing finished.

One data folder (``sglang serve --data-dir``) holds::

    jobs.sqlite3        the jobs: parameters, status, progress, error, cache stats, timings, times
    videos/<id>.mp4     the video of each completed job
    images/<id>.<ext>   the input_reference image of an image-to-video job, as uploaded
    lock                held (flock) while a server uses the folder; names its pid

SQLite (the standard library's) runs in WAL mode with ``synchronous=FULL``: every state change is
committed, and on disk, before the call that made it returns. Each thread (the event loop, the
worker) has its own connection; writes take the database lock up front (``BEGIN IMMEDIATE``), so
the worker and the event loop never see half of a change. An mp4 is written to a temporary name
in the same folder, fsynced and renamed before its job is marked completed, so a completed job
always has its whole file. An input image is written the same way before its job's row is added,
and lives as long as the row: removed with the job (delete, retention, a dropped cancelled job).

What a restart (:meth:`JobStore.recover`) does: completed and failed jobs stay as they were;
jobs that were ``queued`` or ``in_progress`` become ``failed`` with error code
``server_restarted`` (they are not run again: a restart after a crash should not repeat the
request that may have caused it); jobs deleted while running are dropped; temporary and
unreferenced files (videos and images) are removed, and a completed job whose file has gone is
marked failed (``video_missing``).

Retention (:class:`Retention`) applies to finished jobs (completed or failed): by age, counted
from ``completed_at`` (``expires_at`` on the Video object), and by count (the newest are kept).
An expired job disappears from every read at once; its row and file are removed by
:meth:`JobStore.purge`, which the server runs after each job and periodically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import json
import logging
import math
import os
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.errors import UserError
from sglang.multimodal_gen.runtime.cache.validation import CacheConfigError
from sglang.multimodal_gen.runtime.entrypoints.input_reference import ReferenceImage, StoredReference, load_stored
from sglang.multimodal_gen.runtime.entrypoints.openai_protocol import VideoError

logger = logging.getLogger(__name__)

# 2: the input_reference column (a version-1 database gains it when opened).
SCHEMA_VERSION = 2
DB_NAME = "jobs.sqlite3"
VIDEOS = "videos"
IMAGES = "images"
LOCK_NAME = "lock"
TMP_SUFFIX = ".tmp"

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    seq          INTEGER PRIMARY KEY AUTOINCREMENT,  -- creation order, for listing
    id           TEXT NOT NULL UNIQUE,
    model        TEXT NOT NULL,
    status       TEXT NOT NULL,                      -- queued | in_progress | completed | failed
    progress     INTEGER NOT NULL DEFAULT 0,
    params       TEXT NOT NULL,                      -- SamplingParams as JSON (params_to_json)
    created_at   INTEGER NOT NULL,
    completed_at INTEGER,
    error        TEXT,                               -- VideoError as JSON
    cache_stats  TEXT,
    timings      TEXT,
    file         TEXT,                               -- name under videos/ once completed
    cancelled    INTEGER NOT NULL DEFAULT 0,         -- deleted while running: dropped once the worker lets go
    input_reference TEXT                             -- StoredReference as JSON: the image under images/
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
"""

UNFINISHED = ("queued", "in_progress")
FINISHED = ("completed", "failed")


def default_data_dir() -> Path:
    """``$XDG_CACHE_HOME/sglang/videos``, i.e. ``~/.cache/sglang/videos`` on most systems."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "sglang" / "videos"


class DataDirError(UserError):
    """The data folder cannot be used (in use by another server, not writable, a newer schema)."""


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
    ``None`` in the store, the worker loads the file (:meth:`JobStore.read_image`)."""

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


@dataclass
class RecoveryReport:
    """What :meth:`JobStore.recover` changed: ids failed as ``server_restarted``, and the rest."""

    restarted: list[str] = field(default_factory=list)
    dropped_cancelled: int = 0
    removed_files: int = 0
    missing_files: list[str] = field(default_factory=list)


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


# --------------------------------------------------------------------------- the store
class JobStore:
    """Jobs in SQLite and videos as files under ``folder``; safe to use from several threads.

    Open it with :meth:`open` (which takes the folder's lock) and :meth:`close` it. Reads never
    return expired jobs. Writes are single transactions; the caller (the server) decides the
    order of state changes, the store only makes each durable.

    Args:
        folder: The data folder; created if missing.
        retention: What is kept (default: everything, until deleted).
        clock: Seconds since the epoch (``time.time``); tests may pass their own.
    """

    def __init__(self, folder: str | Path, retention: Retention | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        self.folder = Path(folder).expanduser()
        self.videos_dir = self.folder / VIDEOS
        self.images_dir = self.folder / IMAGES
        self.retention = retention or Retention()
        self.clock = clock
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._lock_fd: int | None = None
        self._closed = True

    # ----------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, folder: str | Path, retention: Retention | None = None,
             clock: Callable[[], float] = time.time) -> "JobStore":
        store = cls(folder, retention, clock)
        store._open()
        return store

    @classmethod
    def check(cls, folder: str | Path) -> None:
        """Open and close at once: a folder that cannot be used is one ``DataDirError`` up front."""
        cls.open(folder).close()

    def _open(self) -> None:
        try:
            self.videos_dir.mkdir(parents=True, exist_ok=True)
            self.images_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.folder / LOCK_NAME, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DataDirError(f"cannot use --data-dir {str(self.folder)!r}: {exc.strerror or exc}; "
                               "pick a folder this user may write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise DataDirError(f"--data-dir {str(self.folder)!r} is in use by another sglang serve (pid {holder}); "
                               "stop it or pass another --data-dir") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd
        self._closed = False
        try:
            conn = self._conn()
            conn.execute("PRAGMA journal_mode=WAL")
            self._check_integrity(conn)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise DataDirError(f"--data-dir {str(self.folder)!r} was written by a newer sglang (schema {version}, "
                                   f"this one reads {SCHEMA_VERSION}); upgrade or pass another --data-dir")
            with self._write() as conn:
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(statement)
                columns = {row["name"] for row in conn.execute("PRAGMA table_info(jobs)")}
                if "input_reference" not in columns:  # written by version 1
                    conn.execute("ALTER TABLE jobs ADD COLUMN input_reference TEXT")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.DatabaseError as exc:
            self.close()
            raise self._damaged(str(exc)) from None
        except BaseException:
            self.close()
            raise

    def _check_integrity(self, conn: sqlite3.Connection) -> None:
        """``PRAGMA quick_check``: a database damaged past its first page opens without complaint and
        fails later, in the middle of a request; found here, it is one error at startup."""
        problems = [row[0] for row in conn.execute("PRAGMA quick_check(1)")]
        if problems != ["ok"]:
            raise self._damaged(" ".join(" ".join(problems).replace("*** in database main ***", "").split()))

    def _damaged(self, detail: str) -> DataDirError:
        path = self.folder / DB_NAME
        return DataDirError(f"the job database {str(path)!r} is damaged ({detail}); move it aside "
                            f"(mv {str(path)!r} {str(path) + '.damaged'!r}) to start with an empty one, "
                            "or pass another --data-dir")

    def close(self) -> None:
        """Close every thread's connection and release the folder's lock."""
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise sqlite3.ProgrammingError("the job store is closed")
            conn = sqlite3.connect(self.folder / DB_NAME, timeout=30.0, isolation_level=None,
                                   check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA synchronous=FULL")
            with self._conns_lock:
                self._conns.append(conn)
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction holding the write lock from its start (no upgrade deadlocks)."""
        conn = self._conn()
        conn.execute("BEGIN IMMEDIATE")
        try:
            yield conn
        except BaseException:
            if conn.in_transaction:  # SQLite rolls back by itself on a full disk or an I/O error
                conn.execute("ROLLBACK")
            raise
        conn.execute("COMMIT")

    # ----------------------------------------------------------------------------- reads
    def _visible(self) -> tuple[str, dict[str, Any]]:
        """SQL condition and arguments: not expired by age."""
        if self.retention.max_age_s is None:
            return "1", {}
        return "(completed_at IS NULL OR completed_at > :cutoff)", {"cutoff": self.clock() - self.retention.max_age_s}

    def expires_at(self, job: VideoJob) -> int | None:
        """When a finished job expires by age (Unix seconds); ``None`` while unfinished or kept."""
        if self.retention.max_age_s is None or job.completed_at is None or job.cancelled:
            return None
        return job.completed_at + int(self.retention.max_age_s)

    def get(self, job_id: str) -> VideoJob | None:
        """The job, or ``None`` when it is not stored, expired, or its row does not parse (logged)."""
        where, args = self._visible()
        row = self._conn().execute(f"SELECT * FROM jobs WHERE id = :id AND {where}", {"id": job_id, **args}).fetchone()
        return None if row is None else _readable_job(row)

    def page(self, after: str | None, limit: int, order: str) -> tuple[list[VideoJob], bool] | None:
        """Up to ``limit`` jobs after the id ``after`` in creation order (``asc``) or newest first;
        ``None`` when ``after`` is not a stored job."""
        where, args = self._visible()
        conn = self._conn()
        op, direction = (">", "ASC") if order == "asc" else ("<", "DESC")
        if after is not None:
            row = conn.execute(f"SELECT seq FROM jobs WHERE id = :id AND {where}", {"id": after, **args}).fetchone()
            if row is None:
                return None
            where += f" AND seq {op} :after"
            args["after"] = row["seq"]
        rows = conn.execute(f"SELECT * FROM jobs WHERE {where} ORDER BY seq {direction} LIMIT :n",
                            {**args, "n": limit + 1}).fetchall()
        jobs = [_readable_job(r) for r in rows[:limit]]
        return [job for job in jobs if job is not None], len(rows) > limit

    def counts(self) -> dict[str, int]:
        where, args = self._visible()
        rows = self._conn().execute(f"SELECT status, COUNT(*) AS n FROM jobs WHERE {where} GROUP BY status", args)
        found = {r["status"]: r["n"] for r in rows}
        return {s: found.get(s, 0) for s in (*UNFINISHED, *FINISHED)}

    def count_queued(self) -> int:
        return self._conn().execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0]

    def video_path(self, job: VideoJob) -> Path | None:
        return None if job.file is None else self.videos_dir / job.file

    def read_image(self, job: VideoJob) -> Any:
        """The job's input image, decoded again from its file (a PIL image in RGB), or ``None``
        for a text-to-video job. ``OSError`` when the file has gone, ``ValueError`` when it is no
        longer the file that was checked."""
        record = job.input_reference
        if record is None:
            return None
        return load_stored((self.images_dir / record.file).read_bytes(), record)

    # ----------------------------------------------------------------------------- writes
    def add(self, job: VideoJob, max_queued: int | None = None) -> bool:
        """Insert ``job``; with ``max_queued``, only if fewer jobs are queued (checked in the same
        transaction). ``False`` when there was no room."""
        with self._write() as conn:
            if max_queued is not None and (
                conn.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued'").fetchone()[0] >= max_queued
            ):
                return False
            conn.execute(
                "INSERT INTO jobs (id, model, status, progress, params, created_at, input_reference) "
                "VALUES (?, ?, ?, ?, ?, ?, ?)",
                (job.id, job.model, job.status, job.progress, params_to_json(job.params), job.created_at,
                 job.input_reference.to_json() if job.input_reference is not None else None),
            )
        return True

    def claim(self, job_id: str) -> VideoJob | None:
        """queued -> in_progress; ``None`` when the job is gone or no longer queued."""
        with self._write() as conn:
            changed = conn.execute("UPDATE jobs SET status = 'in_progress' WHERE id = ? AND status = 'queued'",
                                   (job_id,)).rowcount
            row = conn.execute("SELECT * FROM jobs WHERE id = ?", (job_id,)).fetchone() if changed else None
            job = None if row is None else _readable_job(row)
            if row is not None and job is None:
                unreadable = VideoError(code="job_unreadable", type="server_error",
                                        message="this video's stored record is damaged; create it again")
                conn.execute("UPDATE jobs SET status = 'failed', completed_at = ?, error = ? WHERE id = ?",
                             (int(self.clock()), unreadable.model_dump_json(), job_id))
        return job

    def set_progress(self, job_id: str, progress: int) -> None:
        with self._write() as conn:
            conn.execute("UPDATE jobs SET progress = ? WHERE id = ? AND status = 'in_progress'", (progress, job_id))

    def complete(self, job_id: str, file: str, cache_stats: dict[str, Any] | None,
                 timings: dict[str, float] | None) -> None:
        """Mark completed, once ``file`` (from :meth:`write_video`) is in place."""
        with self._write() as conn:
            conn.execute(
                "UPDATE jobs SET status = 'completed', progress = 100, completed_at = ?, error = NULL, file = ?, "
                "cache_stats = ?, timings = ? WHERE id = ?",
                (int(self.clock()), file, _dump(cache_stats), _dump(timings), job_id),
            )

    def fail(self, job_id: str, error: VideoError, cancelled: bool = False) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE jobs SET status = 'failed', completed_at = ?, error = ?, cancelled = ? WHERE id = ?",
                (int(self.clock()), error.model_dump_json(), int(cancelled), job_id),
            )

    def fail_queued(self, error: VideoError) -> list[str]:
        """Every queued job -> failed with ``error``; returns their ids."""
        with self._write() as conn:
            ids = [r["id"] for r in conn.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY seq")]
            conn.execute("UPDATE jobs SET status = 'failed', completed_at = ?, error = ? WHERE status = 'queued'",
                         (int(self.clock()), error.model_dump_json()))
        return ids

    def delete(self, job_id: str) -> bool:
        """Remove the job and its files; ``False`` if it was not stored."""
        with self._write() as conn:
            row = conn.execute("SELECT file, input_reference FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                return False
            conn.execute("DELETE FROM jobs WHERE id = ?", (job_id,))
        self._remove_files(row)
        return True

    def write_video(self, job_id: str, content: bytes) -> str:
        """Write the mp4 durably (temporary name, fsync, rename, fsync the folder); its file name."""
        return _write_durably(self.videos_dir, f"{job_id}.mp4", content)

    def write_image(self, job_id: str, image: ReferenceImage) -> StoredReference:
        """Write a job's input image as sent, durably, before its row is added (:meth:`add`): a
        crash in between leaves an unreferenced file, which :meth:`recover` removes."""
        name = _write_durably(self.images_dir, f"{job_id}.{image.extension}", image.data)
        return StoredReference(file=name, width=image.width, height=image.height, sha256=image.sha256)

    def remove_image(self, record: StoredReference) -> None:
        """Remove an image whose job was never added (the queue was full, the server stopping)."""
        with contextlib.suppress(FileNotFoundError):
            (self.images_dir / record.file).unlink()

    def _remove_files(self, row: sqlite3.Row) -> None:
        """The video and the image of a removed job's row (``file``, ``input_reference``)."""
        if row["file"] is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.videos_dir / row["file"]).unlink()
        image = _image_name(row["input_reference"])
        if image is not None:
            with contextlib.suppress(FileNotFoundError):
                (self.images_dir / image).unlink()

    # ----------------------------------------------------------------------------- upkeep
    def recover(self) -> RecoveryReport:
        """After a start: unfinished jobs -> failed ``server_restarted``, stray files removed."""
        report = RecoveryReport()
        error = VideoError(code="server_restarted", type="server_error",
                           message="the server stopped or crashed before this video was finished; create it again")
        with self._write() as conn:
            report.restarted = [r["id"] for r in conn.execute(
                "SELECT id FROM jobs WHERE status IN ('queued', 'in_progress') AND cancelled = 0 ORDER BY seq")]
            report.dropped_cancelled = conn.execute("SELECT COUNT(*) FROM jobs WHERE cancelled = 1").fetchone()[0]
            conn.execute("DELETE FROM jobs WHERE cancelled = 1")
            conn.execute("UPDATE jobs SET status = 'failed', completed_at = ?, error = ? "
                         "WHERE status IN ('queued', 'in_progress')", (int(self.clock()), error.model_dump_json()))
            files = {r["id"]: r["file"] for r in conn.execute("SELECT id, file FROM jobs WHERE status = 'completed'")}
            missing = [i for i, name in files.items() if name is None or not (self.videos_dir / name).is_file()]
            lost = VideoError(code="video_missing", type="server_error",
                              message="the video file was removed from the server's data folder; create it again")
            for job_id in missing:
                conn.execute("UPDATE jobs SET status = 'failed', file = NULL, error = ? WHERE id = ?",
                             (lost.model_dump_json(), job_id))
            report.missing_files = missing
            kept = {name for i, name in files.items() if i not in missing}
            images = {_image_name(r["input_reference"]) for r in conn.execute("SELECT input_reference FROM jobs")}
        for folder, keep in ((self.videos_dir, kept), (self.images_dir, images)):
            for path in folder.iterdir():
                if path.name not in keep and path.is_file():
                    with contextlib.suppress(FileNotFoundError):
                        path.unlink()
                        report.removed_files += 1
        return report

    def purge(self) -> list[str]:
        """Remove expired jobs (by age) and the oldest finished beyond the count; their ids."""
        removed: dict[str, sqlite3.Row] = {}
        with self._write() as conn:
            if self.retention.max_age_s is not None:
                removed.update((r["id"], r) for r in conn.execute(
                    "SELECT id, file, input_reference FROM jobs WHERE status IN ('completed', 'failed') "
                    "AND cancelled = 0 AND completed_at <= ?", (self.clock() - self.retention.max_age_s,)))
            if self.retention.max_count is not None:
                removed.update((r["id"], r) for r in conn.execute(
                    "SELECT id, file, input_reference FROM jobs WHERE status IN ('completed', 'failed') "
                    "AND cancelled = 0 ORDER BY completed_at DESC, seq DESC LIMIT -1 OFFSET ?",
                    (self.retention.max_count,)))
            conn.executemany("DELETE FROM jobs WHERE id = ?", [(i,) for i in removed])
        for row in removed.values():
            self._remove_files(row)
        return list(removed)


def _readable_job(row: sqlite3.Row) -> VideoJob | None:
    """The row as a job, or ``None`` (logged) when it does not parse: one damaged row must not
    take every listing down with it."""
    try:
        return _job(row)
    except (ValueError, TypeError, KeyError) as exc:  # JSONDecodeError and pydantic's errors are ValueErrors
        logger.warning("skipping job %s: its row in %s does not parse (%s: %s)", _brief_id(row), DB_NAME,
                       type(exc).__name__, str(exc)[:200])
        return None


def _brief_id(row: sqlite3.Row) -> str:
    """The row's id for the log, cut: the row is damaged, its id may be anything."""
    text = repr(row["id"])
    return text if len(text) <= 60 else text[:60] + "..."


def _job(row: sqlite3.Row) -> VideoJob:
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


def _write_durably(folder: Path, name: str, content: bytes) -> str:
    """``content`` as ``folder/name``: a temporary name, fsync, rename, fsync the folder; ``name``."""
    tmp = folder / f".{name}{TMP_SUFFIX}"
    try:
        with open(tmp, "wb") as out:
            out.write(content)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, folder / name)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    _fsync_dir(folder)
    return name


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
