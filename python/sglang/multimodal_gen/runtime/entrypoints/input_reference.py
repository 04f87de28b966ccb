"""The first frame of an image-to-video request: ``POST /v1/videos``'s ``input_reference``.

It arrives as a multipart file (what ``client.videos.create(input_reference=open(...))`` sends)
or as OpenAI's reference object ``{"image_url": "data:image/png;base64,..."}``. Everything here
runs before the request is queued, on bytes a client controls, so the order of the checks is the
defence: the byte count first, then the format by its magic bytes (PNG, JPEG, WebP; GIF, BMP,
... are named and refused), then the pixel count as the file's header declares it, and only then
a full decode (``load()``, so a truncated file fails here and not in the worker).

The header is read by the format's own Pillow plugin class rather than ``Image.open``: that reads
the size just as lazily, but without Pillow's process-wide decompression-bomb check, whose
warning would be printed to the server log and whose limit (``Image.MAX_IMAGE_PIXELS``) is not
the operator's. ``--max-image-pixels`` is the one pixel bound; ``DecompressionBombError`` is still
caught, should a plugin raise it itself.

What a job keeps (:class:`StoredReference`) is the file as sent, under the data folder, and its
size and digest for the Video object; the worker decodes the file again when the job runs, so a
queued job holds no decoded image in memory and a job read back from the database gets its image.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
import logging
import re
from dataclasses import asdict, dataclass
from typing import Any

from PIL import Image, ImageFile, ImageOps, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from sglang.multimodal_gen.errors import InvalidRequestError

logger = logging.getLogger(__name__)

PARAM = "input_reference"
TAKEN = "PNG, JPEG or WebP"
# format -> (the plugin class that reads its header, the stored file's extension)
_READERS: dict[str, tuple[type[ImageFile.ImageFile], str]] = {
    "PNG": (PngImagePlugin.PngImageFile, "png"),
    "JPEG": (JpegImagePlugin.JpegImageFile, "jpg"),
    "WebP": (WebPImagePlugin.WebPImageFile, "webp"),
}
# Formats a client may well send, named in the refusal: "is a GIF image" helps more than "not an image".
_REFUSED = (
    (re.compile(rb"^GIF8[79]a"), "GIF"),
    (re.compile(rb"^BM"), "BMP"),
    (re.compile(rb"^(II\*\x00|MM\x00\*)"), "TIFF"),
    (re.compile(rb"^\x00\x00\x01\x00"), "ICO"),
    (re.compile(rb"^....ftyp(avif|avis)", re.DOTALL), "AVIF"),
    (re.compile(rb"^....ftyp(heic|heix|hevc|mif1|msf1)", re.DOTALL), "HEIF"),
    (re.compile(rb"^\s*(<\?xml|<svg)", re.IGNORECASE), "SVG"),
    (re.compile(rb"^\x00\x00\x00\x0cjP  "), "JPEG 2000"),
)
_DATA_URL = re.compile(r"^data:([^,;]*)((?:;[^,;]*)*),", re.IGNORECASE)
_MEDIA_TYPES = {"image/png", "image/jpeg", "image/jpg", "image/webp"}
_SEND_IT = 'send the image itself, as a multipart file or as {"image_url": "data:image/png;base64,..."}'


@dataclass(frozen=True)
class ReferenceImage:
    """An ``input_reference`` that passed every check.

    Attributes:
        data: The file as sent: what is stored with the job and hashed.
        format: ``PNG``, ``JPEG`` or ``WebP``.
        image: The decoded first frame, EXIF orientation applied, in RGB (transparency dropped).
        sha256: Hex digest of ``data``, shown on the Video object.
    """

    data: bytes
    format: str
    image: Image.Image
    sha256: str

    @property
    def width(self) -> int:
        return self.image.width

    @property
    def height(self) -> int:
        return self.image.height

    @property
    def extension(self) -> str:
        return _READERS[self.format][1]


@dataclass(frozen=True)
class StoredReference:
    """What a job's record keeps of its image: the file's name under the data folder's ``images/``,
    and what the Video object shows of it."""

    file: str
    width: int
    height: int
    sha256: str

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "StoredReference":
        data = json.loads(text)
        return cls(file=str(data["file"]), width=int(data["width"]), height=int(data["height"]),
                   sha256=str(data["sha256"]))

    def public(self) -> dict[str, Any]:
        """The Video object's ``input_reference``: no server file name."""
        return {"width": self.width, "height": self.height, "sha256": self.sha256}


# --------------------------------------------------------------------------- the field's shapes
def reference_bytes(value: Any) -> bytes | None:
    """The image bytes of the field as the request gave it: an uploaded file's bytes (a form file
    part arrives as ``bytes``), or the reference object's data URL decoded. ``None``: not given.

    The object's other forms are refused by name: a remote URL or a ``file_id`` would make this
    server fetch something on a client's word, which it never does.
    """
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        raise InvalidRequestError(f"input_reference must be an image, not a string; {_SEND_IT}", param=PARAM)
    if not isinstance(value, dict):
        raise InvalidRequestError(f"input_reference must be an image or an object; {_SEND_IT}", param=PARAM)
    unknown = sorted(str(key) for key in value if key not in ("image_url", "file_id"))
    if unknown:
        raise InvalidRequestError(f"input_reference takes image_url; {_cut(unknown[0])} is not a key of it",
                                  param=PARAM)
    if value.get("file_id") not in (None, ""):
        raise InvalidRequestError(f"input_reference.file_id names a file this server does not have (it keeps no "
                                  f"uploaded files and fetches nothing); {_SEND_IT}", param=PARAM)
    url = value.get("image_url")
    if not isinstance(url, str) or not url.strip():
        raise InvalidRequestError(f"input_reference needs image_url, a data URL; {_SEND_IT}", param=PARAM)
    return decode_data_url(url.strip())


def decode_data_url(url: str) -> bytes:
    """The bytes of ``data:image/png;base64,...``. Any other URL is refused: a remote one is never
    fetched (the server would otherwise reach wherever a client points it)."""
    scheme = url.split(":", 1)[0].lower() if ":" in url else ""
    if scheme in ("http", "https"):
        raise InvalidRequestError(f"input_reference.image_url is a remote URL; this server fetches nothing, "
                                  f"{_SEND_IT}", param=PARAM)
    match = _DATA_URL.match(url)
    if match is None:
        raise InvalidRequestError(f"input_reference.image_url must be a data URL (data:image/png;base64,...), "
                                  f"got {_cut(url)}", param=PARAM)
    media_type = match.group(1).strip().lower()
    options = [option.strip().lower() for option in match.group(2).split(";") if option.strip()]
    if media_type not in _MEDIA_TYPES:
        raise InvalidRequestError(f"input_reference.image_url is a data URL of {_cut(media_type or 'text/plain')}; "
                                  f"this server takes {TAKEN} images (image/png, image/jpeg, image/webp)",
                                  param=PARAM)
    if "base64" not in options:
        raise InvalidRequestError("input_reference.image_url must be base64 encoded (data:image/png;base64,...)",
                                  param=PARAM)
    payload = "".join(url[match.end():].split())  # MIME encoders wrap lines
    payload += "=" * (-len(payload) % 4)  # some encoders leave the padding out
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequestError("input_reference.image_url is not valid base64 after 'base64,'",
                                  param=PARAM) from None


def _cut(text: str, limit: int = 40) -> str:
    return repr(text) if len(text) <= limit else repr(text[:limit]) + f"... ({len(text)} characters)"


# --------------------------------------------------------------------------- decoding
def sniff_format(data: bytes) -> str:
    """``PNG``, ``JPEG`` or ``WebP`` by the file's magic bytes, else a 400 that names what it is."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "PNG"
    if data.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WebP"
    for magic, name in _REFUSED:
        if magic.match(data[:64]):
            raise InvalidRequestError(f"input_reference is a {name} image; this server takes {TAKEN}", param=PARAM)
    raise InvalidRequestError(f"input_reference is not an image this server reads; send {TAKEN}", param=PARAM)


def decode_image(data: bytes, max_bytes: int, max_pixels: int) -> ReferenceImage:
    """``data`` checked and decoded; every refusal is a 400 naming ``input_reference``.

    ``max_bytes`` bounds the file, ``max_pixels`` its width x height, read from the header before
    any pixel is decoded (a PNG header may claim 100000x100000 in 33 bytes).
    """
    if not data:
        raise InvalidRequestError(f"input_reference is empty (0 bytes); send a {TAKEN} image", param=PARAM)
    if len(data) > max_bytes:
        raise InvalidRequestError(f"input_reference is {len(data)} bytes; this server takes images of at most "
                                  f"{max_bytes} bytes (--max-image-bytes)", param=PARAM)
    kind = sniff_format(data)
    reader = _READERS[kind][0]
    try:
        image = reader(io.BytesIO(data))  # reads the header only
    except Exception as exc:  # any plugin error on hostile bytes is a damaged file, not a server fault
        raise _damaged(kind, exc) from None
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise InvalidRequestError(f"input_reference is {width}x{height} = {width * height} pixels; this server "
                                  f"takes at most {max_pixels} (width x height, --max-image-pixels)", param=PARAM)
    try:
        image.load()  # the whole decode: a truncated or corrupt file fails here
        upright = ImageOps.exif_transpose(image)
        rgb = upright.convert("RGB")
    except Image.DecompressionBombError:
        raise InvalidRequestError(f"input_reference is {width}x{height} pixels, more than this server decodes",
                                  param=PARAM) from None
    except Exception as exc:  # as above: the bytes are the client's
        raise _damaged(kind, exc) from None
    finally:
        image.close()
    return ReferenceImage(data=data, format=kind, image=rgb, sha256=hashlib.sha256(data).hexdigest())


def _damaged(kind: str, exc: Exception) -> InvalidRequestError:
    logger.debug("input_reference does not decode as %s: %s: %s", kind, type(exc).__name__, exc)
    return InvalidRequestError(f"input_reference is a damaged or truncated {kind} file: it does not decode; "
                               "send the whole image", param=PARAM)


def load_stored(data: bytes, record: StoredReference) -> Image.Image:
    """The image of a stored job, decoded again for its run: it must still be the file that was
    checked (same digest), so what was refused at the door cannot come in through the folder."""
    if hashlib.sha256(data).hexdigest() != record.sha256:
        raise ValueError(f"{record.file} is not the file that was uploaded (its sha256 differs)")
    return decode_image(data, max_bytes=len(data), max_pixels=record.width * record.height).image
