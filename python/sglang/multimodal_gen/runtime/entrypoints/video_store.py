"""The files of ``sglang serve``'s jobs: each completed video's mp4 and each uploaded first frame.

One folder (``--video-store``, by default ``--data-dir``) holds::

    videos/<id>.mp4        the video of each completed job
    images/<id>.<ext>      the input_reference image of an image-to-video job, as uploaded
    tmp/<replica>/         files being written by one server (renamed into place when whole)
    lock                   one server's lock (SQLite job store: one server per folder)
    replicas/<replica>.lock  with a shared job store: one lock per replica id

Several replicas may share the folder (a network file system): each writes under its own
``tmp/<replica>/`` and renames the whole file into place, so a reader never sees half a file
and a replica cleaning up after a crash removes only what it was writing itself.

The interface is kept to names and bytes (write, read, remove, list) plus a local scratch folder
for the encoder, so that an object store can take this class's place later.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import os
import re
import shutil
from pathlib import Path

from sglang.multimodal_gen.errors import UserError

VIDEOS = "videos"
IMAGES = "images"
KINDS = (VIDEOS, IMAGES)
LOCK_NAME = "lock"


class DataDirError(UserError):
    """A store cannot be used (in use by another server, not writable, a newer schema, unreachable)."""


def replica_dir_name(replica: str) -> str:
    """A file name for a replica id (ids such as ``host:port`` may hold any character): its safe
    characters and a short hash, so that two ids never share a name."""
    safe = re.sub(r"[^A-Za-z0-9._-]", "_", replica)[:64]
    return f"{safe}-{hashlib.sha256(replica.encode()).hexdigest()[:8]}"


class VideoStore:
    """The files of the jobs under ``folder``, written durably (temporary name, fsync, rename,
    fsync the folder) so that a completed job always has its whole file.

    Args:
        folder: The folder; created if missing.
        replica: The id of the server using it (its scratch folder and, when ``shared``, its lock).
        shared: Other servers use the folder too: the lock is per replica id, not per folder.
        flag: The option that named the folder, for error messages.
    """

    def __init__(self, folder: str | Path, replica: str, shared: bool = False, flag: str = "--data-dir") -> None:
        self.folder = Path(folder).expanduser()
        self.replica = replica
        self.shared = shared
        self.flag = flag
        self.scratch = self.folder / "tmp" / replica_dir_name(replica)
        self._lock_fd: int | None = None

    def dir(self, kind: str) -> Path:
        return self.folder / kind

    # ----------------------------------------------------------------------------- the lock
    def open(self) -> None:
        """Create the folders and take this server's lock; ``DataDirError`` when it is taken."""
        lock = self.folder / "replicas" / f"{replica_dir_name(self.replica)}.lock" if self.shared \
            else self.folder / LOCK_NAME
        try:
            for path in (*map(self.dir, KINDS), self.scratch, lock.parent):
                path.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise DataDirError(f"cannot use {self.flag} {str(self.folder)!r}: {exc.strerror or exc}; "
                               "pick a folder this user may write") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            if self.shared:
                raise DataDirError(f"replica {self.replica!r} already runs on {self.flag} {str(self.folder)!r} "
                                   f"(pid {holder}); give each replica its own --replica-id") from None
            raise DataDirError(f"{self.flag} {str(self.folder)!r} is in use by another sglang serve (pid {holder}); "
                               f"stop it or pass another {self.flag}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._lock_fd = fd

    def close(self) -> None:
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # releases the flock
            self._lock_fd = None

    # ----------------------------------------------------------------------------- files
    def write(self, kind: str, name: str, content: bytes) -> str:
        """``content`` as ``kind/name``: written in the scratch folder, fsynced, renamed, the folder
        fsynced; returns ``name``."""
        tmp = self.scratch / f".{name}.tmp"
        try:
            with open(tmp, "wb") as out:
                out.write(content)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.dir(kind) / name)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        _fsync_dir(self.dir(kind))
        return name

    def read(self, kind: str, name: str) -> bytes:
        """The file's bytes; ``FileNotFoundError`` when it has gone."""
        return (self.dir(kind) / name).read_bytes()

    def exists(self, kind: str, name: str) -> bool:
        return (self.dir(kind) / name).is_file()

    def remove(self, kind: str, name: str) -> bool:
        """Remove the file; ``False`` when it was not there."""
        try:
            (self.dir(kind) / name).unlink()
        except FileNotFoundError:
            return False
        return True

    def names(self, kind: str) -> set[str]:
        return {path.name for path in self.dir(kind).iterdir() if path.is_file()}

    def clear_scratch(self, every_replica: bool = False) -> int:
        """Remove what this server (or, with ``every_replica``, any server) left half written;
        how many files."""
        root = self.scratch.parent if every_replica else self.scratch
        count = sum(1 for path in root.rglob("*") if path.is_file())
        shutil.rmtree(root, ignore_errors=True)
        self.scratch.mkdir(parents=True, exist_ok=True)
        return count


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
