"""The job store of one server: SQLite (the standard library's), ``jobs.sqlite3`` under ``--data-dir``.

SQLite runs in WAL mode with ``synchronous=FULL``: every state change is committed, and on disk,
before the call that made it returns. Each thread (the event loop, the worker) has its own
connection; writes take the database lock up front (``BEGIN IMMEDIATE``), so the worker and the
event loop never see half of a change. One server at a time uses the store: it holds the lock of
its video folder (``lock``), so what it does at a start (fail every unfinished job, remove
unreferenced files) cannot hit another server's work.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from pathlib import Path
from typing import Callable, Iterator

from sglang.multimodal_gen.runtime.entrypoints.job_store import DataDirError, JobStore, JobStoreError, Retention
from sglang.multimodal_gen.runtime.entrypoints.video_store import VideoStore

# 2: the input_reference column; 3: owner and lease_until (an older database gains them when opened).
SCHEMA_VERSION = 3
DB_NAME = "jobs.sqlite3"

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
    input_reference TEXT,                            -- StoredReference as JSON: the image under images/
    owner        TEXT,                               -- the replica id that claimed it
    lease_until  REAL                                -- the owner renews it while it works
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status);
"""
# Columns later versions added, for a database an older version wrote.
_ADDED_COLUMNS = {"input_reference": "TEXT", "owner": "TEXT", "lease_until": "REAL"}


class SqliteJobStore(JobStore):
    """The jobs of one server in the SQLite file ``path``, their files in ``files``.

    Open it with :meth:`open` or :meth:`open_in` (which take the video folder's lock) and
    :meth:`close` it.
    """

    NO_LIMIT = "-1"
    NAME = DB_NAME

    def __init__(self, path: str | Path, files: VideoStore, retention: Retention | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(files, retention, clock)
        self.path = Path(path).expanduser()
        self._local = threading.local()
        self._conns: list[sqlite3.Connection] = []
        self._conns_lock = threading.Lock()
        self._closed = True

    # ----------------------------------------------------------------------------- opening
    @classmethod
    def open(cls, folder: str | Path, retention: Retention | None = None,
             clock: Callable[[], float] = time.time) -> "SqliteJobStore":
        """The store of the data folder ``folder``: ``jobs.sqlite3`` and the files beside it."""
        return cls.open_in(Path(folder).expanduser() / DB_NAME, VideoStore(folder, "local"), retention, clock)

    @classmethod
    def open_in(cls, path: str | Path, files: VideoStore, retention: Retention | None = None,
                clock: Callable[[], float] = time.time) -> "SqliteJobStore":
        store = cls(path, files, retention, clock)
        files.open()
        store._closed = False
        try:
            store._create()
        except BaseException:
            store.close()
            raise
        return store

    def _create(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = self._conn()
            conn.execute("PRAGMA journal_mode=WAL")
            self._check_integrity(conn)
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            if version > SCHEMA_VERSION:
                raise DataDirError(f"the job database {str(self.path)!r} was written by a newer sglang (schema "
                                   f"{version}, this one reads {SCHEMA_VERSION}); upgrade or pass another --data-dir")
            with self._write() as conn:
                for statement in filter(str.strip, _SCHEMA.split(";")):
                    conn.execute(statement)
                columns = {row["name"] for row in conn.execute("PRAGMA table_info(jobs)")}
                for name, kind in _ADDED_COLUMNS.items():
                    if name not in columns:
                        conn.execute(f"ALTER TABLE jobs ADD COLUMN {name} {kind}")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except OSError as exc:
            raise DataDirError(f"cannot use the job database {str(self.path)!r}: {exc.strerror or exc}") from None
        except (sqlite3.DatabaseError, JobStoreError) as exc:
            raise self._damaged(str(exc)) from None

    def _check_integrity(self, conn: sqlite3.Connection) -> None:
        """``PRAGMA quick_check``: a database damaged past its first page opens without complaint and
        fails later, in the middle of a request; found here, it is one error at startup."""
        problems = [row[0] for row in conn.execute("PRAGMA quick_check(1)")]
        if problems != ["ok"]:
            raise self._damaged(" ".join(" ".join(problems).replace("*** in database main ***", "").split()))

    def _damaged(self, detail: str) -> DataDirError:
        path = str(self.path)
        return DataDirError(f"the job database {path!r} is damaged ({detail}); move it aside "
                            f"(mv {path!r} {path + '.damaged'!r}) to start with an empty one, "
                            "or pass another --data-dir")

    def close(self) -> None:
        """Close every thread's connection and release the folder's lock."""
        self._closed = True
        with self._conns_lock:
            conns, self._conns = self._conns, []
        for conn in conns:
            with contextlib.suppress(sqlite3.Error):
                conn.close()
        self.files.close()

    # ----------------------------------------------------------------------------- connections
    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._closed:
                raise sqlite3.ProgrammingError("the job store is closed")
            conn = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA synchronous=FULL")
            with self._conns_lock:
                self._conns.append(conn)
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def _read(self) -> Iterator[sqlite3.Connection]:
        with _translated():
            yield self._conn()

    @contextlib.contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        """One transaction holding the write lock from its start (no upgrade deadlocks)."""
        with _translated():
            conn = self._conn()
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:  # SQLite rolls back by itself on a full disk or an I/O error
                    conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")


@contextlib.contextmanager
def _translated() -> Iterator[None]:
    """SQLite's operational errors as :class:`JobStoreError`: a full disk (or one failing to
    write) is ``full``, the code a create answers with 507."""
    try:
        yield
    except sqlite3.OperationalError as exc:
        name = getattr(exc, "sqlite_errorname", "")
        raise JobStoreError(f"{exc} ({name})" if name else str(exc),
                            full=name == "SQLITE_FULL" or name.startswith("SQLITE_IOERR")) from exc
