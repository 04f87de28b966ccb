"""Opening the job store that ``--job-store`` names (``store_url.py``), with its video folder."""

from __future__ import annotations

import os
import time
from typing import Any, Callable, Mapping

from sglang.multimodal_gen.errors import UserError
from sglang.multimodal_gen.runtime.entrypoints.job_store import JobStore, Retention
from sglang.multimodal_gen.runtime.entrypoints.store_url import parse_job_store_url
from sglang.multimodal_gen.runtime.entrypoints.video_store import VideoStore


def open_job_store(url: str, files_folder: str | os.PathLike[str], replica: str,
                   settings: Mapping[str, Any] | None = None, retention: Retention | None = None,
                   clock: Callable[[], float] = time.time, files_flag: str = "--data-dir") -> JobStore:
    """The store ``url`` names, its files under ``files_folder``, opened for ``replica``."""
    parsed = parse_job_store_url(url)
    files = VideoStore(files_folder, replica, shared=parsed.shared, flag=files_flag)
    if parsed.kind == "sqlite":
        from sglang.multimodal_gen.runtime.entrypoints.sqlite_store import SqliteJobStore

        return SqliteJobStore.open_in(parsed.path, files, retention, clock)
    try:
        import psycopg  # noqa: F401 - the extra that a PostgreSQL job store needs
    except ImportError:
        raise UserError("a postgresql:// --job-store needs psycopg: pip install 'sglang-diffusion-cache[postgres]'"
                        ) from None
    from sglang.multimodal_gen.runtime.entrypoints.postgres_store import PostgresJobStore

    return PostgresJobStore.open(url, files, replica, settings, retention, clock)
