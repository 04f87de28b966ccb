"""Read the first frame of an image-to-video request: a PIL image, or the path of an image file."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from PIL import Image, ImageOps, UnidentifiedImageError

from sglang.multimodal_gen.errors import InvalidRequestError

# What PIL raises on a file it cannot read: unknown or broken formats (OSError and its
# UnidentifiedImageError, SyntaxError from some decoders), and images over its pixel limit.
_UNREADABLE = (OSError, ValueError, SyntaxError, Image.DecompressionBombError)


def check_image(image: Any) -> None:
    """Refuse what cannot be a first frame, without decoding it: a value that is neither a PIL
    image nor a path, a path that is no file, a file PIL does not recognise (its header only is
    read, so this is cheap enough to run before a model loads and again per request)."""
    if image is None or isinstance(image, Image.Image):
        return
    path = _image_path(image)
    try:
        with Image.open(path):
            pass
    except _UNREADABLE as exc:
        raise _unreadable(path, exc) from None


def load_image(image: Any) -> Image.Image:
    """The first frame as an RGB PIL image. A path is read as ``diffusers.utils.load_image`` reads a
    file (turned upright by its EXIF orientation, then converted to RGB), so a path and the image
    that function returns for it make the same video; a PIL image is only converted to RGB."""
    if isinstance(image, Image.Image):
        if image.mode == "RGB":
            return image
        try:
            return image.convert("RGB")
        except _UNREADABLE as exc:
            raise InvalidRequestError(f"image of mode {image.mode} cannot be converted to RGB ({exc})",
                                      param="image") from None
    path = _image_path(image)
    try:
        with Image.open(path) as opened:
            upright = ImageOps.exif_transpose(opened)
            return upright.convert("RGB")
    except _UNREADABLE as exc:
        raise _unreadable(path, exc) from None


def _image_path(image: Any) -> Path:
    """``image`` as the path of an existing file, or one line saying why it is not one."""
    if not isinstance(image, (str, os.PathLike)):
        raise InvalidRequestError(
            f"image must be a PIL image or the path of an image file, got {type(image).__name__}", param="image")
    path = Path(image).expanduser()
    if not str(image).strip():
        raise InvalidRequestError("image is an empty path; give the path of an image file", param="image")
    if path.is_dir():
        raise InvalidRequestError(f"image {path} is a folder; give the path of an image file", param="image")
    if not path.is_file():
        raise InvalidRequestError(f"image file {path} does not exist", param="image")
    return path


def _unreadable(path: Path, exc: Exception) -> InvalidRequestError:
    if isinstance(exc, UnidentifiedImageError):
        reason = "not an image format PIL reads (PNG, JPEG, WebP, ...)"
    else:
        reason = " ".join(str(exc).split()) or type(exc).__name__
    return InvalidRequestError(f"cannot read image {path}: {reason}", param="image")
