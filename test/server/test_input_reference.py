"""``input_reference``, the first frame of an image-to-video request, without a server: decoding
and checking (each hostile image refused naming the field), and its storage with the job (kept
across a restart, read back for the run, removed with the job)."""

from __future__ import annotations

import base64
import hashlib
import io
import json
import re
import sqlite3
import struct
import zlib

import pytest
from PIL import Image

from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.errors import InvalidRequestError
from sglang.multimodal_gen.runtime.entrypoints.input_reference import decode_image, reference_bytes
from sglang.multimodal_gen.runtime.entrypoints.job_store import DB_NAME, JobStore, Retention, VideoJob
from sglang.multimodal_gen.runtime.entrypoints.openai_protocol import VideoError

MAX_BYTES, MAX_PIXELS = 1 << 20, 4096 * 4096


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **options)
    return out.getvalue()


def frame(width: int = 48, height: int = 32, mode: str = "RGB") -> Image.Image:
    """A small picture whose pixels differ (so a swap or a transpose shows)."""
    image = Image.new("RGB", (width, height))
    image.putdata([(x * 5 % 256, y * 7 % 256, (x + y) % 256) for y in range(height) for x in range(width)])
    return image.convert(mode)


def png_header(width: int, height: int) -> bytes:
    """A PNG of only a header that declares ``width`` x ``height``: 45 bytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def data_url(data: bytes, media_type: str = "image/png") -> str:
    return f"data:{media_type};base64,{base64.b64encode(data).decode()}"


PNG = encode(frame())
# Hostile or unsupported images, each refused with a message holding the fragment.
HOSTILE = {
    "not-an-image": (b"hello, this is text and not a picture", "is not an image this server reads"),
    "empty": (b"", "is empty (0 bytes)"),
    "huge-declared-size": (png_header(100_000, 100_000), "100000x100000 = 10000000000 pixels"),
    "truncated-png": (PNG[: len(PNG) // 2], "damaged or truncated PNG"),
    "header-only-png": (PNG[:40], "damaged or truncated PNG"),
    "gif": (encode(frame(), "GIF"), "is a GIF image; this server takes PNG, JPEG or WebP"),
    "bmp": (encode(frame(), "BMP"), "is a BMP image"),
}


# --------------------------------------------------------------------------- decoding, no server
@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WebP"])
def test_formats_decode_to_rgb(fmt):
    data = encode(frame(40, 24, "RGBA" if fmt != "JPEG" else "RGB"), fmt.upper())
    image = decode_image(data, MAX_BYTES, MAX_PIXELS)
    assert (image.format, image.width, image.height, image.image.mode) == (fmt, 40, 24, "RGB")
    assert image.sha256 == hashlib.sha256(data).hexdigest() and image.data == data


def test_exif_orientation_is_applied():
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image = decode_image(encode(frame(40, 24), "JPEG", exif=exif), MAX_BYTES, MAX_PIXELS)
    assert (image.width, image.height) == (24, 40)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_images_are_refused_naming_the_field(name):
    data, fragment = HOSTILE[name]
    with pytest.raises(InvalidRequestError, match=re.escape(fragment)) as refused:
        decode_image(data, MAX_BYTES, MAX_PIXELS)
    assert refused.value.param == "input_reference"


def test_byte_and_pixel_bounds_are_inclusive():
    assert decode_image(PNG, len(PNG), 48 * 32).width == 48
    with pytest.raises(InvalidRequestError, match=rf"is {len(PNG)} bytes; .* at most {len(PNG) - 1} bytes "
                                                  r"\(--max-image-bytes\)"):
        decode_image(PNG, len(PNG) - 1, MAX_PIXELS)
    with pytest.raises(InvalidRequestError, match=r"48x32 = 1536 pixels; this server takes at most 1535 "
                                                  r"\(width x height, --max-image-pixels\)"):
        decode_image(PNG, MAX_BYTES, 48 * 32 - 1)


@pytest.mark.parametrize("value, fragment", [
    ({"image_url": "https://example.com/frame.png"}, "is a remote URL; this server fetches nothing"),
    ({"image_url": "http://169.254.169.254/latest"}, "is a remote URL"),
    ({"file_id": "file-abc123"}, "file_id names a file this server does not have"),
    ({"image_url": "file:///etc/passwd"}, "must be a data URL"),
    ({"image_url": "data:image/png;base64,***"}, "is not valid base64"),
    ({"image_url": "data:image/gif;base64,R0lGODlh"}, "is a data URL of 'image/gif'"),
    ({"image_url": "data:image/png,%89PNG"}, "must be base64 encoded"),
    ({"image_url": ""}, "needs image_url"),
    ({"url": "x"}, "'url' is not a key of it"),
    ("data:image/png;base64,AAAA", "must be an image, not a string"),
    (["x"], "must be an image or an object"),
])
def test_reference_objects_other_than_a_data_url_are_refused(value, fragment):
    with pytest.raises(InvalidRequestError, match=re.escape(fragment)) as refused:
        reference_bytes(value)
    assert refused.value.param == "input_reference"


def test_data_url_decodes_with_or_without_padding_and_line_breaks():
    url = data_url(PNG)
    assert reference_bytes({"image_url": url}) == PNG
    wrapped = url[:40] + "\n" + url[40:].rstrip("=")
    assert reference_bytes({"image_url": wrapped}) == PNG
    assert reference_bytes(None) is None and reference_bytes("") is None


# --------------------------------------------------------------------------- storage, no server
def _job(store: JobStore, job_id: str, data: bytes = PNG) -> VideoJob:
    job = VideoJob(id=job_id, model="m", params=SamplingParams(prompt="p", image=Image.new("RGB", (2, 2))),
                   created_at=1)
    job.input_reference = store.write_image(job_id, decode_image(data, MAX_BYTES, MAX_PIXELS))
    assert store.add(job)
    return job


def test_a_stored_image_survives_a_restart_and_goes_with_its_job(tmp_path):
    store = JobStore.open(tmp_path)
    kept = _job(store, "video_kept")
    _job(store, "video_deleted")
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["video_deleted.png", "video_kept.png"]
    store.delete("video_deleted")
    assert not (tmp_path / "images" / "video_deleted.png").exists()
    (tmp_path / "images" / "video_stray.png").write_bytes(PNG)  # a crash between the write and the row
    store.close()

    store = JobStore.open(tmp_path)
    report = store.recover()
    assert report.restarted == ["video_kept"] and report.removed_files == 1
    job = store.get("video_kept")
    assert job.input_reference == kept.input_reference and job.params.image is None
    assert json.loads(job.input_reference.to_json())["sha256"] == hashlib.sha256(PNG).hexdigest()
    image = store.read_image(job)  # what the worker runs the job with
    assert image.mode == "RGB" and image.tobytes() == frame().tobytes()
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["video_kept.png"]
    store.close()


def test_a_changed_or_missing_file_is_not_read(tmp_path):
    store = JobStore.open(tmp_path)
    job = _job(store, "video_a")
    (tmp_path / "images" / "video_a.png").write_bytes(encode(frame(), "JPEG"))
    with pytest.raises(ValueError, match="sha256 differs"):
        store.read_image(job)
    (tmp_path / "images" / "video_a.png").unlink()
    with pytest.raises(OSError):
        store.read_image(job)
    store.close()


def test_retention_removes_the_image_with_the_job(tmp_path):
    store = JobStore.open(tmp_path, Retention(max_count=1))
    for job_id in ("video_1", "video_2"):
        _job(store, job_id)
        store.fail(job_id, VideoError(code="generation_failed", message="x"))
    assert store.purge() == ["video_1"]
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["video_2.png"]
    store.close()


def test_a_version_1_database_gains_the_column(tmp_path):
    store = JobStore.open(tmp_path)
    store.close()
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.executescript("ALTER TABLE jobs DROP COLUMN input_reference; PRAGMA user_version = 1;")
    conn.execute("INSERT INTO jobs (id, model, status, params, created_at) VALUES ('video_old', 'm', 'failed', "
                 "'{\"prompt\": \"p\"}', 1)")
    conn.commit()
    conn.close()
    store = JobStore.open(tmp_path)
    assert store.get("video_old").input_reference is None
    _job(store, "video_new")
    assert store.get("video_new").input_reference is not None
    store.close()
