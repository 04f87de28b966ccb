"""The job store that several ``sglang serve`` replicas share: PostgreSQL, through psycopg 3.

Every replica enqueues into and claims from the one ``jobs`` table (the statements are
:class:`JobStore`'s; here they get psycopg's ``%s`` placeholders). A claim picks the oldest queued
row with ``FOR UPDATE SKIP LOCKED``, so two replicas never take the same job and never wait on
each other; a create counts the queue under a transaction-scoped advisory lock, so the queue bound
holds across replicas.

Each replica holds a session advisory lock on its id for as long as it runs (a second process with
the same id is refused; the lock goes with the connection when a replica dies), and keeps its
shared-queue settings (queue bound, retention) in ``sglang_replicas``: a replica whose settings
differ from those of a live one refuses to start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import queue
import threading
import time
from typing import Any, Callable, Iterator, Mapping, Sequence

from sglang.multimodal_gen.runtime.entrypoints.job_store import DataDirError, JobStore, JobStoreError, Retention
from sglang.multimodal_gen.runtime.entrypoints.store_url import one_line, redact_url
from sglang.multimodal_gen.runtime.entrypoints.video_store import VideoStore

SCHEMA_VERSION = 3
# The first key of every advisory lock this store takes (the second says which).
LOCK_SPACE = 0x56494445  # "VIDE"
SCHEMA_LOCK, QUEUE_LOCK = 1, 2
CONNECT_TIMEOUT_S = 10

_SCHEMA = """
CREATE TABLE IF NOT EXISTS sglang_meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
    seq          BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    id           TEXT NOT NULL UNIQUE,
    model        TEXT NOT NULL,
    status       TEXT NOT NULL,
    progress     INTEGER NOT NULL DEFAULT 0,
    params       TEXT NOT NULL,
    created_at   BIGINT NOT NULL,
    completed_at BIGINT,
    error        TEXT,
    cache_stats  TEXT,
    timings      TEXT,
    file         TEXT,
    cancelled    INTEGER NOT NULL DEFAULT 0,
    input_reference TEXT,
    owner        TEXT,
    lease_until  DOUBLE PRECISION
);
CREATE INDEX IF NOT EXISTS jobs_status ON jobs (status, seq);
CREATE TABLE IF NOT EXISTS sglang_replicas (
    id         TEXT PRIMARY KEY,
    lock_key   INTEGER NOT NULL,
    settings   TEXT NOT NULL,
    started_at DOUBLE PRECISION NOT NULL
);
"""

# Replicas whose session still holds their id's advisory lock: the ones running now.
# (pg_locks lists the locks of every database on the server; advisory locks are per database.)
_LIVE = ("EXISTS (SELECT 1 FROM pg_locks l WHERE l.locktype = 'advisory' AND l.granted AND l.classid = ?::oid "
         "AND l.objid = r.lock_key::oid AND l.objsubid = 2 "
         "AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database()))")


def replica_lock_key(replica: str) -> int:
    """The second key of a replica's advisory lock: 31 bits of its id's hash."""
    return int.from_bytes(hashlib.sha256(replica.encode()).digest()[:4], "big") & 0x7FFFFFFF


class _Tx:
    """A psycopg connection taking the store's ``?`` placeholders."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def execute(self, sql: str, args: Sequence[Any] = ()) -> Any:
        return self.conn.execute(sql.replace("?", "%s"), list(args))


class PostgresJobStore(JobStore):
    """The jobs of every replica in the PostgreSQL database at ``url``; this replica's files in
    ``files`` (a folder the replicas share).

    Args:
        url: A libpq URL (``postgresql://user:password@host:port/database``).
        files: The shared video folder.
        replica: This replica's id.
        settings: This replica's shared-queue settings, by flag (``--max-queued-videos``, ...);
            every live replica must have the same.
    """

    shared = True
    CLAIM_LOCK = " FOR UPDATE SKIP LOCKED"
    ROW_LOCK = " FOR UPDATE"
    NAME = "the PostgreSQL job store"

    def __init__(self, url: str, files: VideoStore, replica: str, settings: Mapping[str, Any] | None = None,
                 retention: Retention | None = None, clock: Callable[[], float] = time.time) -> None:
        super().__init__(files, retention, clock)
        self.url = url
        self.replica = replica
        self.settings = dict(settings or {})
        self._idle: queue.LifoQueue[Any] = queue.LifoQueue()
        self._identity: Any = None  # the connection holding this replica's advisory lock
        self._closed = threading.Event()

    @classmethod
    def open(cls, url: str, files: VideoStore, replica: str, settings: Mapping[str, Any] | None = None,
             retention: Retention | None = None, clock: Callable[[], float] = time.time) -> "PostgresJobStore":
        """Connect, create the tables if missing, take this replica's lock and check its settings
        against the live replicas'; ``DataDirError`` (one line) when any of it fails."""
        import psycopg

        store = cls(url, files, replica, settings, retention, clock)
        files.open()
        try:
            store._identity = store._connect()
            store._create()
            store._register()
        except (JobStoreError, psycopg.Error) as exc:  # reached, but refused (no right to create tables, ...)
            store.close()
            raise DataDirError(f"cannot use the job store {redact_url(url)}: {one_line(exc, url)}") from None
        except BaseException:
            store.close()
            raise
        return store

    def _connect(self) -> Any:
        import psycopg
        from psycopg.rows import dict_row

        try:
            return psycopg.connect(self.url, autocommit=True, row_factory=dict_row,
                                   connect_timeout=CONNECT_TIMEOUT_S)
        except psycopg.Error as exc:
            if self._identity is not None:  # connected before: a failure under a request, not at start-up
                raise JobStoreError(f"cannot reach {self.NAME}: {exc}") from None
            raise DataDirError(f"cannot reach the job store {redact_url(self.url)}: {one_line(exc, self.url)}; "
                               "check that PostgreSQL runs there and the URL's user, password and database") from None

    def _create(self) -> None:
        with self._write() as tx:
            tx.execute("SELECT pg_advisory_xact_lock(?, ?)", [LOCK_SPACE, SCHEMA_LOCK])
            for statement in filter(str.strip, _SCHEMA.split(";")):
                tx.execute(statement)
            row = tx.execute("SELECT value FROM sglang_meta WHERE key = 'schema_version'").fetchone()
            if row is not None and int(row["value"]) > SCHEMA_VERSION:
                raise DataDirError(f"the job store {redact_url(self.url)} was written by a newer sglang (schema "
                                   f"{row['value']}, this one reads {SCHEMA_VERSION}); upgrade this replica")
            tx.execute("INSERT INTO sglang_meta (key, value) VALUES ('schema_version', ?) ON CONFLICT (key) "
                       "DO UPDATE SET value = EXCLUDED.value", [str(SCHEMA_VERSION)])

    def _register(self) -> None:
        """Take this replica's advisory lock, refuse settings that differ from a live replica's,
        and record ours (replacing the rows of replicas that have stopped)."""
        key = replica_lock_key(self.replica)
        if not self._identity.execute("SELECT pg_try_advisory_lock(%s, %s) AS ok", [LOCK_SPACE, key]).fetchone()["ok"]:
            raise DataDirError(f"replica {self.replica!r} is already running on the job store "
                               f"{redact_url(self.url)}; give each replica its own --replica-id")
        with self._write() as tx:
            tx.execute("SELECT pg_advisory_xact_lock(?, ?)", [LOCK_SPACE, SCHEMA_LOCK])
            for row in tx.execute(f"SELECT id, settings FROM sglang_replicas r WHERE id <> ? AND {_LIVE} ORDER BY id",
                                  [self.replica, LOCK_SPACE]).fetchall():
                theirs = json.loads(row["settings"])
                differing = [name for name in self.settings if theirs.get(name) != self.settings[name]]
                if differing:
                    name = differing[0]
                    raise DataDirError(
                        f"{name} {_shown(self.settings[name])} differs from {_shown(theirs.get(name))} of the running "
                        f"replica {row['id']!r}; the replicas of one job store share one queue, start each with the "
                        "same --max-queued-videos, --video-retention-hours and --max-stored-videos")
            tx.execute(f"DELETE FROM sglang_replicas r WHERE id = ? OR NOT {_LIVE}", [self.replica, LOCK_SPACE])
            tx.execute("INSERT INTO sglang_replicas (id, lock_key, settings, started_at) VALUES (?, ?, ?, ?)",
                       [self.replica, key, json.dumps(self.settings, sort_keys=True), self.clock()])

    def close(self) -> None:
        """Close the connections (releasing this replica's lock) and the video folder's lock."""
        self._closed.set()
        conns = [self._identity] if self._identity is not None else []
        while not self._idle.empty():
            conns.append(self._idle.get_nowait())
        self._identity = None
        for conn in conns:
            with contextlib.suppress(Exception):
                conn.close()
        self.files.close()

    # ----------------------------------------------------------------------------- connections
    @contextlib.contextmanager
    def _connection(self) -> Iterator[Any]:
        """An idle connection, or a new one; put back unless it broke."""
        import psycopg

        if self._closed.is_set():
            raise JobStoreError("the job store is closed")
        try:
            conn = self._idle.get_nowait()
        except queue.Empty:
            conn = self._connect()
        try:
            yield conn
        except (psycopg.OperationalError, psycopg.InterfaceError) as exc:  # not a bug here: the database's state
            raise JobStoreError(str(exc), full=isinstance(exc, psycopg.errors.DiskFull)) from exc
        finally:
            if conn.closed or conn.broken or self._closed.is_set():
                with contextlib.suppress(Exception):
                    conn.close()
            else:
                self._idle.put(conn)

    @contextlib.contextmanager
    def _read(self) -> Iterator[_Tx]:
        with self._connection() as conn:
            yield _Tx(conn)

    @contextlib.contextmanager
    def _write(self) -> Iterator[_Tx]:
        with self._connection() as conn, conn.transaction():
            yield _Tx(conn)

    def _lock_queue(self, tx: _Tx) -> None:
        tx.execute("SELECT pg_advisory_xact_lock(?, ?)", [LOCK_SPACE, QUEUE_LOCK])


def _shown(value: Any) -> str:
    return "unset" if value is None else str(value)
