"""Write generated frames to disk: mp4 through imageio's ffmpeg plugin, or lossless .npy."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import numpy as np

from sglang.multimodal_gen.errors import InvalidRequestError, UserError

SUPPORTED_SUFFIXES = (".mp4", ".npy")


def check_output_path(path: str) -> Path:
    """Refuse a path the video could not be saved to, so the mistake shows before a long generation."""
    out = Path(path)
    if out.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise InvalidRequestError(
            f"cannot write {out}: the output path must end in .mp4 or .npy", param="output_path"
        )
    check_writable_file(out, "output_path", "output path")
    return out


def check_writable_file(out: Path, param: str, what: str) -> None:
    """``out`` can be created or overwritten: not a folder, and its nearest existing ancestor is a
    folder we may write into (the folders between are created on save).

    Args:
        out: The file to be written.
        param: The parameter named in the error.
        what: How the message calls the file, e.g. "output path".
    """
    try:
        if out.is_dir():
            raise InvalidRequestError(f"{what} {out} is a directory; give a file name", param=param)
        if out.exists():
            if not os.access(out, os.W_OK):
                raise InvalidRequestError(f"{what} {out} exists and is not writable", param=param)
            return
        ancestor = out.parent
        while not ancestor.exists() and ancestor != ancestor.parent:
            ancestor = ancestor.parent
    except PermissionError:  # a folder on the way that we may not even look into
        raise InvalidRequestError(f"cannot write {what} {out}: permission denied", param=param) from None
    if not ancestor.is_dir():
        raise InvalidRequestError(f"cannot write {what} {out}: {ancestor} is a file, not a folder", param=param)
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise InvalidRequestError(
            f"cannot write {what} {out}: folder {ancestor} is not writable", param=param
        )


def to_uint8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def encode_mp4(frames: np.ndarray, fps: int, tmp_dir: str | Path | None = None) -> bytes:
    """H.264 mp4 bytes of frames (F, H, W, 3) in [0, 1]; sizes are kept as is (no macro-block resize).

    ffmpeg writes to a file, not to memory: ``tmp_dir`` is where that temporary file goes (default:
    the system's temp folder). The server passes its data folder, whose cleanup at the next start
    removes what a killed process left there.
    """
    import imageio.v3 as iio

    options = dict(extension=".mp4", fps=fps, codec="libx264", macro_block_size=1, quality=8)
    if tmp_dir is None:
        return iio.imwrite("<bytes>", to_uint8(frames), **options)
    fd, name = tempfile.mkstemp(prefix=".encode-", suffix=".mp4", dir=tmp_dir)  # ffmpeg picks mp4 by the suffix
    os.close(fd)
    try:
        iio.imwrite(name, to_uint8(frames), **options)
        return Path(name).read_bytes()
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(name)


def save_video(frames: np.ndarray, path: str | Path, fps: int) -> Path:
    """Save by suffix: .mp4 (H.264) or .npy (float32 frames in [0, 1], shape (F, H, W, 3))."""
    out = check_output_path(str(path))
    mp4 = encode_mp4(frames, fps) if out.suffix.lower() == ".mp4" else None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if mp4 is None:
            np.save(out, frames.astype(np.float32))
        else:
            out.write_bytes(mp4)
    except OSError as exc:  # e.g. a full disk, or the folder changed since the check
        raise UserError(f"cannot save {out}: {exc.strerror or exc}") from None
    return out


def read_video(path: str | Path) -> np.ndarray:
    """Frames (F, H, W, 3) uint8 of an mp4, or float32 of an .npy."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        return np.load(path)
    import imageio.v3 as iio

    return iio.imread(path, index=None)
