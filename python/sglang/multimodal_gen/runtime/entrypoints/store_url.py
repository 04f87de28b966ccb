"""``--job-store URL``: which database holds the jobs, and opening it.

``sqlite:///relative/path`` and ``sqlite:////absolute/path`` name a SQLite file as SQLAlchemy
writes them (one server); ``postgresql://user:password@host:port/database`` (or ``postgres://``)
a PostgreSQL database that several replicas share. The URL may come from ``SGLANG_JOB_STORE_URL``,
which keeps a password out of ``ps``; wherever it is shown, its password is not.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

from sglang.multimodal_gen.errors import UserError

ENV_VAR = "SGLANG_JOB_STORE_URL"
SQLITE_PREFIX = "sqlite:///"
POSTGRES_SCHEMES = ("postgresql", "postgres")


@dataclass(frozen=True)
class JobStoreURL:
    """A parsed ``--job-store``: ``kind`` ``sqlite`` (with its ``path``) or ``postgresql``."""

    url: str
    kind: str
    path: Path | None = None

    @property
    def shared(self) -> bool:
        return self.kind == "postgresql"

    def __str__(self) -> str:
        return redact_url(self.url)


def parse_job_store_url(url: str) -> JobStoreURL:
    """``url`` checked; a ``UserError`` (one line, the password hidden) when it names no store."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme == "sqlite":
        if not url.startswith(SQLITE_PREFIX) or len(url) == len(SQLITE_PREFIX):
            raise UserError(f"--job-store {url!r} names no SQLite file; write sqlite:///relative/path or "
                            "sqlite:////absolute/path")
        return JobStoreURL(url, "sqlite", Path(url[len(SQLITE_PREFIX):]).expanduser())
    if scheme in POSTGRES_SCHEMES:
        parts = urlsplit(url)
        if not parts.hostname and "host=" not in parts.query:
            raise UserError(f"--job-store {redact_url(url)} names no host; write "
                            "postgresql://user:password@host:port/database")
        return JobStoreURL(url, "postgresql")
    raise UserError(f"--job-store {redact_url(url)!r} is not a job store URL; use sqlite:///path/jobs.sqlite3 (one "
                    "server) or postgresql://user:password@host:port/database (replicas sharing one queue)")


def redact_url(url: str) -> str:
    """``url`` with its password (in the authority or a ``password=`` query field) as ``***``."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<the job store URL>"
    netloc = parts.netloc
    if parts.password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.split(':', 1)[0]}:***@{host}"
    query = re.sub(r"(?i)(password=)[^&]*", r"\1***", parts.query)
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def one_line(exc: BaseException, url: str) -> str:
    """A driver's error as one line, without the URL's password should the driver repeat it."""
    text = " ".join(str(exc).split())
    password = urlsplit(url).password
    return text.replace(password, "***") if password else text


def default_replica_id(port: int) -> str:
    """``host:port`` (this machine's name), or ``host:pid`` when the port is picked at start (0)."""
    import socket

    return f"{socket.gethostname()}:{port}" if port else f"{socket.gethostname()}:pid{os.getpid()}"
