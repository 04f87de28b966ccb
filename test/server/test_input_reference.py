"""``input_reference``, the first frame of an image-to-video request: decoded and checked at the
door (each hostile image a 400 naming it), stored with its job, read back by the worker, shown on
the Video object, removed with the job.

Over the real server (the session's, serving the built-in text-to-video model): an image is a 400
saying the model makes video from text, and every hostile image, URL or data URL is a 400 naming
``input_reference``, with no traceback in the log. The path of a job that has an image runs in
process with a stub image-to-video generator, and the decoding and storage helpers on their own;
over the real server it runs on the built-in ``wan2.1-i2v-tiny``, the openai client uploading a
first frame from a file, and the video read back starts with that frame.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import io
import json
import re
import sqlite3
import struct
import time
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import conftest as shared
import httpx
import imageio.v3 as iio
import numpy as np
import openai
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.errors import InvalidRequestError
from sglang.multimodal_gen.runtime.entrypoints.http_server import ServerConfig, create_app
from sglang.multimodal_gen.runtime.entrypoints.input_reference import decode_image, reference_bytes
from sglang.multimodal_gen.runtime.entrypoints.job_store import JobStore, Retention, VideoJob
from sglang.multimodal_gen.runtime.entrypoints.sqlite_store import DB_NAME, SqliteJobStore
from sglang.multimodal_gen.runtime.entrypoints.openai_protocol import VideoError
from sglang.multimodal_gen.runtime.entrypoints.request_limits import DEFAULT_MAX_IMAGE_BYTES, RequestLimits
from sglang.multimodal_gen.runtime.models.loader import BUILTIN_MODELS_DIR

from .conftest import SMALL, serve, wait_finished
from .test_worker import StubGenerator

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROMPT = "a red circle moving left on a blue background"
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
    store = SqliteJobStore.open(tmp_path)
    kept = _job(store, "video_kept")
    _job(store, "video_deleted")
    assert sorted(p.name for p in (tmp_path / "images").iterdir()) == ["video_deleted.png", "video_kept.png"]
    store.delete("video_deleted")
    assert not (tmp_path / "images" / "video_deleted.png").exists()
    (tmp_path / "images" / "video_stray.png").write_bytes(PNG)  # a crash between the write and the row
    store.close()

    store = SqliteJobStore.open(tmp_path)
    report = store.recover("local")
    assert report.restarted == ["video_kept"] and report.removed_files == 1
    job = store.get("video_kept")
    assert job.input_reference == kept.input_reference and job.params.image is None
    assert json.loads(job.input_reference.to_json())["sha256"] == hashlib.sha256(PNG).hexdigest()
    image = store.read_image(job)  # what the worker runs the job with
    assert image.mode == "RGB" and image.tobytes() == frame().tobytes()
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["video_kept.png"]
    store.close()


def test_a_changed_or_missing_file_is_not_read(tmp_path):
    store = SqliteJobStore.open(tmp_path)
    job = _job(store, "video_a")
    (tmp_path / "images" / "video_a.png").write_bytes(encode(frame(), "JPEG"))
    with pytest.raises(ValueError, match="sha256 differs"):
        store.read_image(job)
    (tmp_path / "images" / "video_a.png").unlink()
    with pytest.raises(OSError):
        store.read_image(job)
    store.close()


def test_retention_removes_the_image_with_the_job(tmp_path):
    store = SqliteJobStore.open(tmp_path, Retention(max_count=1))
    for job_id in ("video_1", "video_2"):
        _job(store, job_id)
        store.fail(job_id, VideoError(code="generation_failed", message="x"))
    assert store.purge() == ["video_1"]
    assert [p.name for p in (tmp_path / "images").iterdir()] == ["video_2.png"]
    store.close()


def test_a_version_1_database_gains_the_column(tmp_path):
    store = SqliteJobStore.open(tmp_path)
    store.close()
    conn = sqlite3.connect(tmp_path / DB_NAME)
    conn.executescript("ALTER TABLE jobs DROP COLUMN input_reference; PRAGMA user_version = 1;")
    conn.execute("INSERT INTO jobs (id, model, status, params, created_at) VALUES ('video_old', 'm', 'failed', "
                 "'{\"prompt\": \"p\"}', 1)")
    conn.commit()
    conn.close()
    store = SqliteJobStore.open(tmp_path)
    assert store.get("video_old").input_reference is None
    _job(store, "video_new")
    assert store.get("video_new").input_reference is not None
    store.close()


# --------------------------------------------------------------------------- in process: a stub I2V model
class ImageToVideoStub(StubGenerator):
    """The stub model, made an image-to-video one: it records the image each run was given."""

    pipeline = SimpleNamespace(model_info=SimpleNamespace(image_input="required"))

    def __init__(self) -> None:
        super().__init__()
        self.images: list[Image.Image | None] = []

    def generate(self, params: SamplingParams, progress=None):
        self.images.append(params.image)
        return super().generate(params, progress)


@contextlib.contextmanager
def i2v_app(data_dir: Path, **config) -> Iterator[tuple[ImageToVideoStub, TestClient, Path]]:
    """The stub image-to-video model served in process over ``data_dir``: (stub, client, images folder)."""
    stub = ImageToVideoStub()
    config = ServerConfig(data_dir=str(data_dir), limits=RequestLimits(max_image_bytes=4096), **config)
    with TestClient(create_app(stub, "stub-i2v", config), base_url="http://localhost") as client:
        yield stub, client, data_dir / "images"


@pytest.fixture
def i2v(tmp_path):
    with i2v_app(tmp_path) as app:
        yield app


def _wait(client: TestClient, video_id: str) -> dict:
    deadline = time.monotonic() + 10
    while (video := client.get(f"/v1/videos/{video_id}").json())["status"] not in ("completed", "failed"):
        assert time.monotonic() < deadline, video
        time.sleep(0.01)
    return video


def test_an_uploaded_image_reaches_the_model_and_goes_with_the_job(i2v):
    stub, client, images = i2v
    created = client.post("/v1/videos", data={"prompt": "p"}, files={"input_reference": ("f.png", PNG, "image/png")})
    assert created.status_code == 200, created.text
    video = _wait(client, created.json()["id"])
    assert video["status"] == "completed", video
    expected = {"width": 48, "height": 32, "sha256": hashlib.sha256(PNG).hexdigest()}
    assert created.json()["input_reference"] == expected and video["input_reference"] == expected
    assert stub.images[0].tobytes() == frame().tobytes()
    assert [p.read_bytes() for p in images.iterdir()] == [PNG]
    client.delete(f"/v1/videos/{video['id']}")
    assert list(images.iterdir()) == []


def test_a_data_url_in_json_is_taken_too(i2v):
    stub, client, _ = i2v
    jpeg = encode(frame(16, 16), "JPEG")
    created = client.post("/v1/videos", json={"prompt": "p", "input_reference": {"image_url": data_url(jpeg,
                                                                                                        "image/jpeg")}})
    assert _wait(client, created.json()["id"])["input_reference"]["sha256"] == hashlib.sha256(jpeg).hexdigest()
    assert stub.images[0].size == (16, 16)


def test_image_to_video_without_an_image_and_an_image_over_the_bound(i2v):
    _, client, images = i2v
    missing = client.post("/v1/videos", json={"prompt": "p"}).json()["error"]
    assert missing["param"] == "input_reference" and "makes video from an image" in missing["message"]
    big = b"\x89PNG\r\n\x1a\n" + bytes(4096)
    over = client.post("/v1/videos", data={"prompt": "p"}, files={"input_reference": ("f.png", big, "image/png")})
    assert over.status_code == 400 and over.json()["error"]["param"] == "input_reference"
    assert "more than 4096 bytes" in over.json()["error"]["message"] and "--max-image-bytes" in over.text
    assert list(images.iterdir()) == []


def test_images_of_refused_jobs_are_not_kept_and_a_lost_image_fails_its_job(tmp_path):
    with i2v_app(tmp_path, max_queued_videos=1) as (stub, client, images):
        upload = {"input_reference": ("f.png", PNG, "image/png")}
        running = client.post("/v1/videos", data={"prompt": "hold"}, files=upload).json()
        assert stub.holding.wait(10)
        queued = client.post("/v1/videos", data={"prompt": "queued"}, files=upload).json()
        full = client.post("/v1/videos", data={"prompt": "one too many"}, files=upload)
        assert full.status_code == 429
        assert sorted(p.name for p in images.iterdir()) == sorted(f"{v['id']}.png" for v in (running, queued))
        (images / f"{queued['id']}.png").unlink()
        stub.release.set()
        assert _wait(client, running["id"])["status"] == "completed"
        lost = _wait(client, queued["id"])
        assert lost["status"] == "failed" and lost["error"]["code"] == "input_reference_missing"
        assert lost["input_reference"]["sha256"] == hashlib.sha256(PNG).hexdigest()


def test_an_image_that_cannot_be_stored_is_507(i2v, monkeypatch):
    _, client, _ = i2v

    def full_disk(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(client.app.state.service.store, "write_image", full_disk)
    response = client.post("/v1/videos", data={"prompt": "p"}, files={"input_reference": ("f.png", PNG)})
    assert response.status_code == 507 and response.json()["error"]["code"] == "storage_failed"
    assert "No space left on device" in response.json()["error"]["message"]
    assert client.get("/v1/videos").json()["data"] == []


def test_a_runtime_refusal_of_the_image_names_the_field(i2v):
    """The pipeline words refusals for the CLI (``param="image"``, ``--image``); a client reads
    ``input_reference``."""
    stub, client, _ = i2v
    stub.validate = lambda params: (_ for _ in ()).throw(
        InvalidRequestError("--image must be at least 16 pixels wide", param="image"))
    refused = client.post("/v1/videos", data={"prompt": "p"}, files={"input_reference": ("f.png", PNG)}).json()
    assert refused["error"]["param"] == "input_reference"
    assert refused["error"]["message"] == "input_reference must be at least 16 pixels wide"


# --------------------------------------------------------------------------- the real server (text to video)
def _refused(response: httpx.Response) -> str:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "input_reference" and error["type"] == "invalid_request_error", error
    assert "\n" not in error["message"] and "Traceback" not in error["message"]
    return error["message"]


def test_an_image_for_a_text_to_video_model_is_a_400(openai_client, http, tmp_path):
    (tmp_path / "frame.png").write_bytes(PNG)
    with pytest.raises(openai.BadRequestError) as refused, open(tmp_path / "frame.png", "rb") as image:
        openai_client.videos.create(prompt=PROMPT, input_reference=image, extra_body=SMALL)
    assert refused.value.body["param"] == "input_reference"
    assert refused.value.body["message"] == ("this model makes video from text only and takes no input_reference; "
                                             "send the request without it")
    as_json = http.post("/v1/videos", json={"prompt": PROMPT, "input_reference": {"image_url": data_url(PNG)}})
    assert "makes video from text only" in _refused(as_json)


@pytest.mark.parametrize("name", HOSTILE)
def test_hostile_uploads_are_400_over_the_server(http, name):
    data, fragment = HOSTILE[name]
    response = http.post("/v1/videos", data={"prompt": PROMPT}, files={"input_reference": ("x.png", data)})
    assert fragment in _refused(response)


@pytest.mark.parametrize("reference, fragment", [
    ({"image_url": "https://example.com/frame.png"}, "remote URL; this server fetches nothing"),
    ({"file_id": "file-abc123"}, "file_id names a file this server does not have"),
    ({"image_url": "data:image/png;base64,not base64!"}, "is not valid base64"),
    ({"image_url": data_url(HOSTILE["truncated-png"][0])}, "damaged or truncated PNG"),
])
def test_reference_objects_are_400_over_the_server(openai_client, http, reference, fragment):
    """As JSON, and as the form fields ``input_reference[image_url]``, which the ``openai`` client
    sends for ``extra_body`` (its ``input_reference`` argument takes only a file)."""
    assert fragment in _refused(http.post("/v1/videos", json={"prompt": PROMPT, "input_reference": reference}))
    with pytest.raises(openai.BadRequestError) as refused:
        openai_client.videos.create(prompt=PROMPT, extra_body={"input_reference": reference})
    assert refused.value.body["param"] == "input_reference" and fragment in refused.value.body["message"]


def test_an_upload_over_max_image_bytes_is_400_and_a_second_file_is_refused(http):
    over = b"\x89PNG\r\n\x1a\n" + bytes(DEFAULT_MAX_IMAGE_BYTES - 7)  # one byte over the default 20 MiB
    message = _refused(http.post("/v1/videos", data={"prompt": PROMPT}, files={"input_reference": ("x.png", over)}))
    assert f"more than {DEFAULT_MAX_IMAGE_BYTES} bytes" in message and "(--max-image-bytes)" in message
    other = http.post("/v1/videos", data={"prompt": PROMPT}, files={"photo": ("x.png", PNG)})
    assert other.status_code == 400 and other.json()["error"]["param"] == "photo"


def test_refused_images_log_no_traceback(http, server_log):
    before = server_log.stat().st_size
    for data, _ in HOSTILE.values():
        http.post("/v1/videos", data={"prompt": PROMPT}, files={"input_reference": ("x.png", data)})
    http.post("/v1/videos", json={"prompt": PROMPT, "input_reference": {"image_url": "https://example.com/x.png"}})
    with open(server_log, encoding="utf-8", errors="replace") as log:
        log.seek(before)
        text = log.read()
    assert "Traceback" not in text and "DecompressionBomb" not in text, text
    assert not [line for line in text.splitlines() if line.startswith(("ERROR", "CRITICAL", "WARNING"))], text


# --------------------------------------------------------------------------- the real server (image to video)
I2V_MODEL = BUILTIN_MODELS_DIR / "wan2.1-i2v-tiny"
# The held-out frame sent: its VAE round trip scores 22.3 dB, the best of the 12 (mean 18.9): the
# tiny VAE bounds what any first frame can score on this world (docs/reference-model.md).
HELD_OUT_LINE = 5


def vae_round_trip(image: Image.Image) -> np.ndarray:
    """The frame as the model's VAE reconstructs it (encoded alone, decoded), in [0, 1]: the best a
    first frame made in its latent space can be."""
    import torch
    from diffusers import AutoencoderKLWan

    vae = AutoencoderKLWan.from_pretrained(I2V_MODEL / "vae")
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1).permute(2, 0, 1)[None, :, None]
    with torch.no_grad():
        decoded = vae.decode(vae.encode(pixels).latent_dist.mode()).sample
    return (decoded[0, :, 0].permute(1, 2, 0).numpy() / 2 + 0.5).clip(0, 1)


def test_image_to_video_over_the_server(tmp_path_factory, tmp_path):
    """The built-in I2V model served for real: the openai client uploads a held-out first frame
    from a file, the job completes, the mp4 read back starts with that frame (at least 20 dB, and
    within 1.5 dB of the VAE's own round trip of it), the Video object shows the image, which is
    stored with the job and removed with it; a request without an image is a 400."""
    first_line = (I2V_MODEL / "heldout_prompts.txt").read_text().splitlines()[HELD_OUT_LINE]
    image_path, _, caption = first_line.partition("\t")
    png = (I2V_MODEL / image_path).read_bytes()
    log = tmp_path_factory.mktemp("i2v-server") / "server.log"
    with serve(log, "--model-path", "wan2.1-i2v-tiny") as url, httpx.Client(base_url=url, timeout=30.0) as http:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-local", max_retries=0, timeout=60.0)
        with open(I2V_MODEL / image_path, "rb") as upload:
            created = client.videos.create(prompt=caption, input_reference=upload,
                                           extra_body={"num_inference_steps": 20})
        video = wait_finished(http, created.id, timeout=120.0)
        assert video["status"] == "completed", video["error"]
        assert video["input_reference"] == {"width": 64, "height": 64, "sha256": hashlib.sha256(png).hexdigest()}
        mp4 = tmp_path / "i2v.mp4"
        client.videos.download_content(created.id).write_to_file(mp4)
        frames = iio.imread(mp4, index=None)
        image = Image.open(I2V_MODEL / image_path).convert("RGB")
        first = np.asarray(image, dtype=np.float32) / 255
        assert frames.shape == (17, 64, 64, 3)
        score = shared.psnr_db(frames[0].astype(np.float32) / 255, first)
        assert score >= 20.0 and score >= shared.psnr_db(vae_round_trip(image), first) - 1.5
        images = next(log.parent.glob("data-*")) / "images"
        assert [p.read_bytes() for p in images.iterdir()] == [png]
        client.videos.delete(created.id)
        assert list(images.iterdir()) == []
        missing = http.post("/v1/videos", json={"prompt": PROMPT})
        assert "makes video from an image" in _refused(missing)
