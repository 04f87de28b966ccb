"""Access control and information hygiene: the API key, loopback Host/Origin checks, the warning
when bound to all interfaces, and no machine paths or allocator text in responses.

Over real ``sglang serve`` subprocesses (one with a key from the environment, the shared one
without) with httpx and the ``openai`` client; failed jobs in process with a stub generator.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import httpx
import openai
import pytest
import torch
from conftest import REPO
from fastapi.testclient import TestClient

from sglang.multimodal_gen.errors import InvalidRequestError, UserError
from sglang.multimodal_gen.runtime.entrypoints.access import AccessControl, exposure_warning, resolve_api_key
from sglang.multimodal_gen.runtime.entrypoints.http_server import ServerConfig, create_app

from .conftest import SMALL, serve, server_env, wait_finished
from .test_worker import StubGenerator

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")  # the client's videos resource

KEY = "sk-test-0123456789abcdef"
BUILTIN = REPO / "python" / "sglang" / "multimodal_gen" / "builtin" / "wan2.1-t2v-tiny"
REQUEST = {"prompt": "a red circle", **SMALL, "num_inference_steps": 2, "num_frames": 5}


def _assert_error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["code"] == code and error["param"] is None
    return error


def _video_count(http: httpx.Client) -> int:
    return sum(http.get("/health").json()["videos"].values())


# --------------------------------------------------------------------------- the API key
@pytest.fixture(scope="module")
def keyed_server(tmp_path_factory) -> Iterator[tuple[str, Path]]:
    """A server whose key comes from SGLANG_API_KEY (not the command line, so not in ``ps``) and
    whose --cache-calibration is a copy a test may spoil: (base URL, that copy)."""
    folder = tmp_path_factory.mktemp("keyed-server")
    calibration = folder / "private" / "cal.json"
    calibration.parent.mkdir()
    shutil.copy(BUILTIN / "calibration.json", calibration)
    with serve(folder / "server.log", "--cache-calibration", str(calibration),
               env=server_env(SGLANG_API_KEY=KEY)) as url:
        yield url, calibration


@pytest.fixture(scope="module")
def keyed_http(keyed_server) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=keyed_server[0], timeout=30.0, headers={"Authorization": f"Bearer {KEY}"}) as client:
        yield client


@pytest.mark.parametrize("headers, reason", [
    ({}, "missing API key"),
    ({"Authorization": "Bearer sk-wrong"}, "incorrect API key"),
    ({"Authorization": f"Bearer {KEY}x"}, "incorrect API key"),
    ({"Authorization": f"Basic {KEY}"}, "missing API key"),
    ({"Authorization": KEY}, "missing API key"),
], ids=["missing", "wrong", "longer", "basic", "no-scheme"])
def test_api_key_required_on_every_route_but_health(keyed_server, keyed_http, headers, reason):
    url = keyed_server[0]
    before = _video_count(keyed_http)
    for method, path, kwargs in [("GET", "/v1/models", {}), ("GET", "/v1/videos", {}),
                                 ("POST", "/v1/videos", {"json": REQUEST}),
                                 ("POST", "/v1/videos", {"data": {"prompt": "x"}}),
                                 ("GET", "/v1/videos/video_1", {}), ("DELETE", "/v1/videos/video_1", {}),
                                 ("GET", "/v1/videos/video_1/content", {}), ("GET", "/no/such/route", {})]:
        response = httpx.request(method, url + path, headers=headers, timeout=30.0, **kwargs)
        error = _assert_error(response, 401, "invalid_api_key")
        assert response.headers["www-authenticate"] == "Bearer", (method, path)
        assert KEY not in response.text and "sk-wrong" not in response.text
        assert reason in error["message"], error["message"]
    assert _video_count(keyed_http) == before  # nothing was created
    health = httpx.get(url + "/health", headers=headers)
    assert health.status_code == 200 and health.json()["status"] == "ok"


def test_the_key_opens_every_route(keyed_server, keyed_http):
    assert httpx.get(keyed_server[0] + "/v1/models").status_code == 401
    assert keyed_http.get("/health").status_code == 200
    assert keyed_http.get("/v1/models").status_code == 200
    video = keyed_http.post("/v1/videos", json=REQUEST).json()
    assert wait_finished(keyed_http, video["id"])["status"] == "completed"
    assert keyed_http.get(f"/v1/videos/{video['id']}/content").headers["content-type"] == "video/mp4"
    assert keyed_http.delete(f"/v1/videos/{video['id']}").json()["deleted"] is True


def test_openai_client_with_the_key_and_with_a_wrong_one(keyed_server):
    url = keyed_server[0]
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=KEY, max_retries=0, timeout=30.0)
    created = client.videos.create(prompt="a blue square", size=SMALL["size"],
                                   extra_body={"num_inference_steps": 2, "num_frames": 5})
    video = client.videos.poll(created.id, poll_interval_ms=50)
    assert video.status == "completed"
    assert client.videos.download_content(created.id).read()[4:8] == b"ftyp"
    assert [m.id for m in client.models.list()] == ["wan2.1-t2v-tiny"]

    wrong = openai.OpenAI(base_url=f"{url}/v1", api_key="sk-wrong", max_retries=0, timeout=30.0)
    with pytest.raises(openai.AuthenticationError) as refused:
        wrong.videos.create(prompt="a blue square", size=SMALL["size"])
    assert refused.value.status_code == 401 and refused.value.code == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        wrong.videos.retrieve(created.id)


def test_api_key_flag_wins_over_the_environment():
    from sglang.cli.main import build_parser
    from sglang.cli.serve import server_config

    assert resolve_api_key("sk-flag", {"SGLANG_API_KEY": "sk-env"}) == "sk-flag"
    assert resolve_api_key(None, {"SGLANG_API_KEY": "sk-env"}) == "sk-env"
    assert resolve_api_key(None, {"SGLANG_API_KEY": ""}) is None and resolve_api_key(None, {}) is None
    with pytest.raises(UserError, match="--api-key is empty"):
        resolve_api_key("", {})
    with pytest.raises(UserError, match="SGLANG_API_KEY may hold only printable ASCII"):
        resolve_api_key(None, {"SGLANG_API_KEY": "two words"})
    config = server_config(build_parser().parse_args(["serve", "--api-key", KEY]))
    assert config.api_key == KEY and KEY not in repr(config)


# --------------------------------------------------------------------------- Host and Origin on loopback
@pytest.mark.parametrize("host", ["evil.example", "evil.example:{port}", "127.0.0.1.nip.io:{port}",
                                  "localhost.evil.example", "0.0.0.0:{port}", "192.168.1.10"])
def test_a_foreign_host_header_is_refused(http, server_url, host):
    """DNS rebinding: a page on evil.example whose name now resolves to 127.0.0.1 sends its own Host."""
    host = host.format(port=server_url.rsplit(":", 1)[1])
    before = _video_count(http)
    for method, path, kwargs in [("GET", "/v1/models", {}), ("GET", "/health", {}),
                                 ("POST", "/v1/videos", {"json": REQUEST})]:
        response = http.request(method, path, headers={"Host": host}, **kwargs)
        error = _assert_error(response, 421, "invalid_host")
        assert "not a loopback name" in error["message"] and "DNS rebinding" in error["message"]
    assert _video_count(http) == before


@pytest.mark.parametrize("host", ["localhost", "localhost:{port}", "LOCALHOST:{port}", "127.0.0.1",
                                  "127.0.0.1:{port}", "[::1]", "[::1]:{port}"])
def test_loopback_host_headers_are_accepted(http, server_url, host):
    host = host.format(port=server_url.rsplit(":", 1)[1])
    assert http.get("/v1/models", headers={"Host": host}).status_code == 200


def _cross_origin_posts() -> dict[str, dict]:
    """What a web page can send without a CORS preflight (a <form> or a simple fetch), and JSON."""
    fields = {k: str(v) for k, v in REQUEST.items()}
    return {
        "urlencoded": {"data": fields},
        "multipart": {"files": [(k, (None, v)) for k, v in fields.items()]},
        "text-plain": {"content": "\n".join(f"{k}={v}" for k, v in fields.items()),
                       "headers": {"content-type": "text/plain"}},
        "json": {"json": REQUEST},
    }


@pytest.mark.parametrize("origin", ["http://evil.example", "https://evil.example:8443", "null",
                                    "http://localhost.evil.example", "http://127.0.0.1.nip.io"])
@pytest.mark.parametrize("kind", list(_cross_origin_posts()))
def test_cross_origin_post_creates_no_job(http, origin, kind):
    request = _cross_origin_posts()[kind]
    headers = {"Origin": origin, **request.pop("headers", {})}
    before = _video_count(http)
    response = http.post("/v1/videos", headers=headers, **request)
    error = _assert_error(response, 403, "origin_not_allowed")
    assert "cross-site" in error["message"] and repr(origin) in error["message"]
    assert _video_count(http) == before


def test_cross_origin_reads_and_deletes_are_refused(http):
    video = http.post("/v1/videos", json=REQUEST).json()
    for method in ("GET", "DELETE"):
        response = http.request(method, f"/v1/videos/{video['id']}", headers={"Origin": "http://evil.example"})
        _assert_error(response, 403, "origin_not_allowed")
    assert http.get(f"/v1/videos/{video['id']}").status_code == 200  # not deleted


@pytest.mark.parametrize("origin", ["http://127.0.0.1:{port}", "http://localhost:5173", "https://localhost",
                                    "http://[::1]:{port}"])
def test_loopback_origin_is_accepted(http, server_url, origin):
    origin = origin.format(port=server_url.rsplit(":", 1)[1])
    response = http.post("/v1/videos", json=REQUEST, headers={"Origin": origin})
    assert response.status_code == 200, response.text
    assert wait_finished(http, response.json()["id"])["status"] == "completed"
    form = {k: str(v) for k, v in REQUEST.items()}
    assert http.post("/v1/videos", data=form, headers={"Origin": origin}).status_code == 200


def test_host_and_origin_parsing():
    """Edge cases of the checks, without a server."""
    check = AccessControl(None, local_only=True)

    def refused(*headers: tuple[str, str]) -> int | None:
        response = check.refusal([(k.encode(), v.encode()) for k, v in headers], "/v1/videos")
        return None if response is None else response.status_code

    assert refused() is None  # HTTP/1.0 without Host, no Origin: a local program
    assert refused(("host", "127.0.0.2:80"), ("origin", "http://127.0.0.2")) is None  # all of 127/8 is loopback
    assert refused(("host", "[::1]:30000"), ("origin", "http://[::1]:30000")) is None
    assert refused(("host", "::1")) == 400 and refused(("host", "localhost:port")) == 400
    assert refused(("host", "localhost:\u00b2")) == 400  # a digit to str.isdigit, not a port
    assert refused(("host", "[::1")) == 400 and refused(("host", "[::1]x")) == 400
    assert refused(("host", "localhost"), ("host", "evil.example")) == 400
    assert refused(("host", "[::ffff:7f00:1]")) == 421 and refused(("host", "localhost.")) == 421
    assert refused(("origin", "http://localhost:99999")) == 403  # a malformed port
    assert refused(("origin", "file://")) == 403 and refused(("origin", "ftp://localhost")) == 403
    assert refused(("origin", "http://localhost"), ("origin", "http://evil.example")) == 403
    assert AccessControl(None, local_only=False).refusal([(b"host", b"evil.example"),
                                                          (b"origin", b"http://evil.example")], "/") is None
    named = AccessControl(None, local_only=True, host_names=["devbox"])  # --host devbox, resolving to loopback
    assert named.refusal([(b"host", b"DevBox:30000"), (b"origin", b"http://devbox:30000")], "/") is None


# --------------------------------------------------------------------------- binding to all interfaces
def test_exposure_warning_decision():
    for host in ("127.0.0.1", "localhost", "::1", "127.0.1.1"):
        assert exposure_warning(host, None) is None, host
    for host in ("0.0.0.0", "::"):
        warning = exposure_warning(host, None)
        assert "all interfaces" in warning and "--api-key" in warning and "SGLANG_API_KEY" in warning
        assert "--api-key" not in exposure_warning(host, KEY) and "loopback only" in exposure_warning(host, KEY)
    assert "not a loopback address" in exposure_warning("192.0.2.7", None)
    # Off loopback the Host and Origin checks do not apply (TestClient's Host is "testserver").
    with TestClient(create_app(StubGenerator(), "stub", ServerConfig(host="0.0.0.0"))) as client:
        assert client.get("/v1/models", headers={"Origin": "http://evil.example"}).status_code == 200
    with TestClient(create_app(StubGenerator(), "stub", ServerConfig(host="127.0.0.1"))) as client:
        assert client.get("/v1/models").status_code == 421


def test_serving_on_all_interfaces_warns_at_startup(tmp_path):
    command = [sys.executable, "-m", "sglang.cli.main", "serve", "--host", "0.0.0.0", "--port", "0", "--device", "cpu",
               "--data-dir", str(tmp_path / "data")]
    proc = subprocess.Popen(command, cwd=REPO, env=server_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    lines = []
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if line.startswith("serving "):
                break
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    warnings = [line for line in lines if line.startswith("warning:")]
    assert len(warnings) == 1, "".join(lines)
    assert "0.0.0.0 (all interfaces)" in warnings[0] and "--api-key" in warnings[0]
    assert lines[-1].startswith("serving wan2.1-t2v-tiny at http://0.0.0.0:"), "".join(lines)


# --------------------------------------------------------------------------- no paths, no allocator text
def test_models_and_health_show_no_absolute_path(http):
    models = http.get("/v1/models")
    assert models.json()["data"][0]["root"] == "wan2.1-t2v-tiny"
    for response in (models, http.get("/health")):
        assert str(REPO) not in response.text and "/builtin" not in response.text, response.text


def test_calibration_file_error_names_no_path(keyed_server, keyed_http):
    """The operator's calibration file spoiled while the server runs: the 400 names the file, not where it is."""
    calibration = keyed_server[1]
    good = calibration.read_bytes()
    calibration.write_text("not json")
    try:
        response = keyed_http.post("/v1/videos", json={**REQUEST, "cache": "magcache"})
    finally:
        calibration.write_bytes(good)
    assert response.status_code == 400, response.text
    message = response.json()["error"]["message"]
    assert "cal.json is not a calibration file" in message
    assert str(calibration.parent) not in message and "private" not in message and "/" not in message


class FailingGenerator(StubGenerator):
    """The stub, in an absolute folder, failing the way real generations fail."""

    model_path = "/srv/models/secret-model"

    def generate(self, params, progress=None):
        failures = {
            "oom": RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB (GPU 0; 79.15 GiB total capacity; "
                                "77.10 GiB already allocated; 1.25 GiB free; 78.00 GiB reserved in total by PyTorch)"),
            "torch-oom": torch.OutOfMemoryError("Tried to allocate 20.00 MiB"),
            "host-oom": MemoryError(),
            "cpu-oom": RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate "
                                    "memory: you tried to allocate 85899345920 bytes. Error code 12"),
            "file": FileNotFoundError(2, "No such file or directory", "/srv/models/secret-model/vae/weights.bin"),
            "late": InvalidRequestError("calibration file /srv/models/secret-model/calibration.json is damaged",
                                        param="cache_calibration"),
        }
        if params.prompt in failures:
            raise failures[params.prompt]
        return super().generate(params, progress)


def test_failed_jobs_carry_codes_not_allocator_text_or_paths(caplog):
    expected = {"oom": "out_of_memory", "torch-oom": "out_of_memory", "host-oom": "out_of_memory",
                "cpu-oom": "out_of_memory", "file": "generation_failed", "late": "invalid_request"}
    caplog.set_level(logging.INFO, logger="sglang")
    with TestClient(create_app(FailingGenerator(), "stub"), base_url="http://localhost") as client:
        ids = {prompt: client.post("/v1/videos", json={"prompt": prompt}).json()["id"] for prompt in expected}
        videos = {prompt: _wait_failed(client, video_id) for prompt, video_id in ids.items()}
        contents = {prompt: client.get(f"/v1/videos/{video_id}/content") for prompt, video_id in ids.items()}
        models = client.get("/v1/models").json()
    for prompt, code in expected.items():
        error = videos[prompt]["error"]
        assert error["code"] == code, (prompt, error)
        for text in (error["message"], contents[prompt].json()["error"]["message"]):
            for leak in ("GiB", "allocate", "/srv", "weights.bin", "RuntimeError", "Error code", "alloc_cpu"):
                assert leak not in text, (prompt, text)
        if code != "invalid_request":
            assert error["type"] == "server_error" and ids[prompt] in error["message"]
    assert "ran out of memory" in videos["oom"]["error"]["message"]
    assert videos["late"]["error"]["message"] == "calibration file secret-model/calibration.json is damaged"
    # The detail goes to the log, with the job id.
    log = caplog.text
    assert f"generation of {ids['oom']} ran out of memory" in log and "Tried to allocate 2.00 GiB" in log
    assert f"generation of {ids['file']} failed" in log and "/srv/models/secret-model/vae/weights.bin" in log
    assert models["data"][0]["root"] == "secret-model"


def _wait_failed(client: TestClient, video_id: str) -> dict:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        video = client.get(f"/v1/videos/{video_id}").json()
        if video["status"] in ("completed", "failed"):
            return video
        time.sleep(0.01)
    raise AssertionError(video)
