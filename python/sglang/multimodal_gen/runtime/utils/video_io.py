"""Write generated frames to disk: mp4 through imageio's ffmpeg plugin, or lossless .npy."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sglang.multimodal_gen.errors import InvalidRequestError

SUPPORTED_SUFFIXES = (".mp4", ".npy")


def check_output_path(path: str) -> Path:
    out = Path(path)
    if out.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise InvalidRequestError(
            f"cannot write {out.name}: the output path must end in .mp4 or .npy", param="output_path"
        )
    if out.exists() and out.is_dir():
        raise InvalidRequestError(f"output path {out} is a directory; give a file name", param="output_path")
    return out


def to_uint8(frames: np.ndarray) -> np.ndarray:
    return (np.clip(frames, 0.0, 1.0) * 255.0).round().astype(np.uint8)


def encode_mp4(frames: np.ndarray, fps: int) -> bytes:
    """H.264 mp4 bytes of frames (F, H, W, 3) in [0, 1]; sizes are kept as is (no macro-block resize)."""
    import imageio.v3 as iio

    return iio.imwrite(
        "<bytes>", to_uint8(frames), extension=".mp4", fps=fps, codec="libx264", macro_block_size=1, quality=8
    )


def save_video(frames: np.ndarray, path: str | Path, fps: int) -> Path:
    """Save by suffix: .mp4 (H.264) or .npy (float32 frames in [0, 1], shape (F, H, W, 3))."""
    out = check_output_path(str(path))
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix.lower() == ".npy":
        np.save(out, frames.astype(np.float32))
    else:
        out.write_bytes(encode_mp4(frames, fps))
    return out


def read_video(path: str | Path) -> np.ndarray:
    """Frames (F, H, W, 3) uint8 of an mp4, or float32 of an .npy."""
    path = Path(path)
    if path.suffix.lower() == ".npy":
        return np.load(path)
    import imageio.v3 as iio

    return iio.imread(path, index=None)
