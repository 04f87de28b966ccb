"""Request limits and hostile input: each a 400 naming the field (413 for a body too large), as JSON
and as a form, never a 500, never a traceback in the log, never blocking other clients.

Against the real server (the built-in tiny model: default request 64x64, 17 frames, 50 steps at
8 fps, so the scaled limits are 1024 pixels a side, 68 frames, 200 steps, 10 seconds and a work
budget of 13 926 400 pixel-frame-steps); in process with a stub model where the model or the
timing must be controlled.
"""

from __future__ import annotations

import json
import select
import socket
import threading
from http.client import HTTPResponse
from typing import Iterator
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi.testclient import TestClient

from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.errors import InvalidRequestError, UserError
from sglang.multimodal_gen.runtime.entrypoints.http_server import ServerConfig, create_app
from sglang.multimodal_gen.runtime.entrypoints.request_limits import RequestLimits, check_json_depth

from .test_errors import BASE, _assert_error, _post
from .test_worker import StubGenerator

BIG = 10**400  # a 401-digit integer: no float holds it
MIB = 1 << 20
AS_FORM = pytest.mark.parametrize("as_form", [False, True], ids=["json", "form"])


def _ids(cases: list) -> list[str]:
    return [f"{case[1]}-{index}" for index, case in enumerate(cases)]


# --------------------------------------------------------------------------- bounds (400)
WORK_BUDGET = "more than this server's budget of 13,926,400 (--max-work)"
LIMIT_CASES = [
    ({"size": "2048x32"}, "size", "size 2048x32: width must be at most 1024 (--max-width), got 2048"),
    ({"size": "32x4096"}, "size", "size 32x4096: height must be at most 1024 (--max-height), got 4096"),
    ({"size": "4096x4096", "num_frames": None, "num_inference_steps": None}, "size", "width must be at most 1024"),
    ({"num_frames": 69}, "num_frames", "num_frames must be at most 68 (--max-frames), got 69"),
    ({"num_frames": None, "seconds": "1e9"}, "seconds", "seconds 1e+09 is longer than this server's limit of 10"),
    ({"num_frames": None, "seconds": "9", "fps": 120}, "seconds",
     "seconds 9 at 120 fps is 1081 frames: num_frames must be at most 68"),
    ({"num_inference_steps": 10**7}, "num_inference_steps", "num_inference_steps must be at most 200 (--max-steps)"),
    ({"num_inference_steps": 5 * 10**7, "cache": "magcache"}, "num_inference_steps",
     "num_inference_steps must be at most 200"),
    ({"fps": 10**9}, "fps", "fps must be at most 120 (--max-fps), got 1000000000"),
    ({"fps": 121}, "fps", "fps must be at most 120"),
    ({"seed": 2**63}, "seed", "seed must be at most 9223372036854775807 (2^63 - 1)"),
    ({"seed": 2**64}, "seed", "seed 18446744073709551616 does not fit in 64 bits"),
    ({"guidance_scale": 1e308}, "guidance_scale", "guidance_scale must be at most 100 (--max-guidance-scale)"),
    ({"guidance_scale": 100.5}, "guidance_scale", "guidance_scale must be at most 100"),
    ({"prompt": "x" * 20_001}, "prompt", "prompt has 20001 characters; this server takes at most 20000"),
    ({"negative_prompt": "y" * 20_001}, "negative_prompt", "negative_prompt has 20001 characters"),
    # the work budget names the field furthest above the model's default
    ({"size": "256x256", "num_frames": 17, "num_inference_steps": 50}, "size", WORK_BUDGET),
    ({"size": "144x128", "num_frames": None, "num_inference_steps": None}, "size", WORK_BUDGET),  # defaults fill in
    ({"size": "64x64", "num_frames": 21, "num_inference_steps": 200}, "num_inference_steps", WORK_BUDGET),
    ({"size": "64x64", "num_frames": 65, "num_inference_steps": 60}, "num_frames", WORK_BUDGET),
    ({"size": "64x64", "num_frames": None, "seconds": "8", "num_inference_steps": 60}, "seconds", WORK_BUDGET),
]


@AS_FORM
@pytest.mark.parametrize("change, param, fragment", LIMIT_CASES, ids=_ids(LIMIT_CASES))
def test_over_a_limit_is_400_naming_the_field(http, change, param, fragment, as_form):
    fields = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    _assert_error(_post(http, fields, as_form), 400, param, fragment)


def test_a_request_at_the_limits_is_accepted(http):
    """The bounds are inclusive: 4x the default work (128x128 at the default 17 frames, 50 steps)."""
    at_limit = {"prompt": "a red circle", "size": "128x128", "guidance_scale": 100, "fps": 120,
                "seed": 2**63 - 1, "negative_prompt": "n" * 20_000}
    video = http.post("/v1/videos", json=at_limit).json()
    assert video["status"] in ("queued", "in_progress"), video
    assert (video["num_frames"], video["num_inference_steps"], video["seed"]) == (17, 50, 2**63 - 1)
    http.delete(f"/v1/videos/{video['id']}")  # 4x the default request: no need to run it


# --------------------------------------------------------------------------- numbers that do not fit
NUMBER_CASES = [
    ({"guidance_scale": BIG}, "guidance_scale", "guidance_scale must be a finite number, got "),
    ({"cache": "magcache", "cache_threshold": BIG}, "cache_threshold", "cache_threshold must be a finite number"),
    ({"cache": "magcache", "cache_retention_ratio": BIG}, "cache_retention_ratio", "must be a finite number"),
    ({"cache_speedup": BIG}, "cache_speedup", "cache_speedup must be a finite number"),
    ({"cache": "magcache", "cache_max_skip_steps": BIG}, "cache_max_skip_steps", "does not fit in 64 bits"),
    ({"cache": "magcache", "cache_params": {"threshold": BIG}}, "cache_params",
     "cache_params.threshold = 1000000000"),
    ({"cache": "magcache", "cache_params": {"max_skip_steps": BIG}}, "cache_params", "does not fit in 64 bits"),
    ({"cache": "magcache", "cache_params": {"speedup": BIG}}, "cache_params", "cache_params.speedup"),
    ({"cache": "magcache", "cache_params": {"sync_branches": {"deeper": BIG}}}, "cache_params",
     "cache_params.sync_branches.deeper"),
    ({"cache": "magcache", "cache_params": {"options": [1]}}, "cache_params", "'options' must be a JSON object"),
    ({"cache": "magcache", "cache_params": {"options": "x"}}, "cache_params", "'options' must be a JSON object"),
]


@AS_FORM
@pytest.mark.parametrize("change, param, fragment", NUMBER_CASES, ids=_ids(NUMBER_CASES))
def test_numbers_that_do_not_fit_are_400(http, change, param, fragment, as_form):
    response = _post(http, {**BASE, **change}, as_form)
    _assert_error(response, 400, param, fragment)
    assert len(response.content) < 1000  # the 401 digits are not echoed whole


@pytest.mark.parametrize(
    "body, param, fragment",
    [
        ({**BASE, "cache": "magcache", "cache_params": {"mag_ratios": {"cond": [1.0, BIG]}}}, "cache_params",
         "cache_params.mag_ratios.cond[1] = 1000"),
        ({**BASE, "seed": 10**4000}, "seed", "seed 1000000000"),  # 4001 digits
    ],
)
def test_big_integers_in_json(http, body, param, fragment):
    _assert_error(http.post("/v1/videos", json=body), 400, param, fragment)


@pytest.mark.parametrize(
    "raw, param, fragment",
    [  # JSON floats beyond a double parse to inf; NaN is a Python extension of JSON
        ('"cache_params": {"threshold": 1e400}', "cache_params", "cache_params.threshold must be a finite number"),
        ('"cache_params": {"mag_ratios": {"cond": [NaN, 1.0]}}', "cache_params", "must be a finite number, got nan"),
        ('"guidance_scale": 1e400', "guidance_scale", "guidance_scale must be a finite number"),
        ('"cache_params": {"threshold": ' + "9" * 5000 + "}", None, "a number of more than 4300 digits"),
    ],
)
def test_json_numbers_beyond_a_double(http, raw, param, fragment):
    body = '{"prompt": "a red circle", "size": "48x32", "num_frames": 5, "cache": "magcache", ' + raw + "}"
    response = http.post("/v1/videos", content=body, headers={"content-type": "application/json"})
    _assert_error(response, 400, param, fragment)


def test_thousands_of_digits_in_form_fields(http):
    digits = "9" * 5000  # past Python's 4300-digit int() limit
    for name, fragment in [("seed", "does not fit in 64 bits"), ("cache_max_skip_steps", "does not fit in 64 bits"),
                           ("guidance_scale", "must be a finite number"), ("size", "far larger than any video")]:
        value = f"{digits}x16" if name == "size" else digits
        fields = [("prompt", (None, "x")), ("cache", (None, "magcache")), (name, (None, value))]
        response = http.post("/v1/videos", files=fields)
        _assert_error(response, 400, name, fragment)
        assert len(response.content) < 1000
    response = http.post("/v1/videos", files=[("prompt", (None, "x")), ("cache", (None, "magcache")),
                                              ("cache_params", (None, '{"threshold": ' + digits + "}"))])
    _assert_error(response, 400, "cache_params", "cache_params holds a number of more than 4300 digits")


# --------------------------------------------------------------------------- nesting
def _nested(levels: int) -> str:
    return "[" * levels + "]" * levels


@pytest.mark.parametrize(
    "body, param",
    [
        ('{"prompt": "x", "cache": "magcache", "cache_params": {"a": ' + _nested(31) + "}}", "cache_params"),  # 33
        ('{"prompt": "x", "cache": "magcache", "cache_params": ' + _nested(100_000) + "}", "cache_params"),
        ('{"prompt": "x", "cache_params": ' + "[" * 100_000 + "}", "cache_params"),  # never closed
        (_nested(100_000), None),
        ("{" * 100_000, None),
    ],
    ids=["33-levels", "100k-levels", "100k-unclosed", "100k-list", "100k-objects"],
)
def test_json_nesting_beyond_the_limit_is_400(http, body, param):
    response = http.post("/v1/videos", content=body, headers={"content-type": "application/json"})
    _assert_error(response, 400, param, "nested deeper than 32 levels of objects and lists")


def test_json_nesting_at_the_limit_is_parsed(http):
    body = '{"prompt": "x", "cache": "magcache", "cache_params": {"a": ' + _nested(30) + "}}"  # 32 levels
    _assert_error(http.post("/v1/videos", content=body, headers={"content-type": "application/json"}),
                  400, "cache_params", "unknown magcache option(s) ['a']")


@pytest.mark.parametrize(
    "fields, fragment",
    [
        ([("cache_params" + "[a]" * 40, "1")], "is nested 40 levels deep; this server takes at most 31"),
        ([("cache_params", _nested(100_000))], "cache_params is nested deeper than 32 levels"),
        ([("cache_params", "[" * 100_000)], "cache_params is nested deeper than 32 levels"),
    ],
    ids=["key-40-levels", "json-string-100k", "json-string-unclosed"],
)
def test_form_nesting_beyond_the_limit_is_400(http, fields, fragment):
    form = [("prompt", (None, "x")), ("cache", (None, "magcache"))] + [(k, (None, v)) for k, v in fields]
    _assert_error(http.post("/v1/videos", files=form), 400, "cache_params", fragment)


def test_hostile_input_logs_no_traceback(http, server_log):
    """What used to be 500s with two tracebacks each: now 400s, and nothing at ERROR in the log."""
    before = server_log.stat().st_size
    for change, _, _ in NUMBER_CASES:
        for as_form in (False, True):
            assert _post(http, {**BASE, **change}, as_form).status_code == 400
    for body in ('{"prompt": "x", "cache_params": ' + _nested(100_000) + "}", _nested(100_000)):
        assert http.post("/v1/videos", content=body, headers={"content-type": "application/json"}).status_code == 400
    with open(server_log, encoding="utf-8", errors="replace") as log:
        log.seek(before)
        text = log.read()
    assert "Traceback" not in text, text
    assert not [line for line in text.splitlines() if line.startswith(("ERROR", "CRITICAL"))], text


# --------------------------------------------------------------------------- body size (413)
def _raw_request(server_url: str, head: str, chunks: Iterator[bytes]) -> tuple[int, dict, int]:
    """Send a request over a plain socket, one chunk at a time, until the server answers (or the
    chunks run out); returns the status, the JSON body and how many body bytes were sent."""
    url = urlsplit(server_url)
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head.encode())
        sent = 0
        for chunk in chunks:
            if select.select([sock], [], [], 0)[0]:
                break  # the server has answered (or closed): stop sending
            try:
                sock.sendall(chunk)
            except (BrokenPipeError, ConnectionResetError):
                break
            sent += len(chunk)
        response = HTTPResponse(sock)
        response.begin()
        return response.status, json.loads(response.read()), sent


def _head(content_type: str, length: int | None) -> str:
    framing = f"Content-Length: {length}" if length is not None else "Transfer-Encoding: chunked"
    return f"POST /v1/videos HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: {content_type}\r\n{framing}\r\n\r\n"


def _assert_413(status: int, body: dict, fragment: str) -> None:
    assert status == 413, body
    assert body["error"]["code"] == "request_too_large" and body["error"]["param"] is None
    assert fragment in body["error"]["message"] and "(--max-body-bytes)" in body["error"]["message"]


def test_chunked_body_of_100_mb_is_413_before_it_is_read(server_url):
    """No content-length: the server counts the chunks and answers once the count passes 1 MiB."""
    prefix = b'{"prompt": "'
    chunk = b"x" * 65536

    def chunks() -> Iterator[bytes]:
        yield b"%x\r\n%s\r\n" % (len(prefix), prefix)
        for _ in range(1600):  # 100 MiB
            yield b"%x\r\n%s\r\n" % (len(chunk), chunk)
        yield b"0\r\n\r\n"

    status, body, sent = _raw_request(server_url, _head("application/json", None), chunks())
    _assert_413(status, body, "the request body is more than 1048576 bytes")
    assert sent < 16 * MIB, f"the server read {sent} bytes before refusing"


def test_declared_100_mb_body_is_413_at_once(server_url):
    status, body, sent = _raw_request(server_url, _head("application/json", 100 * MIB), iter([b'{"prompt": "']))
    _assert_413(status, body, "the request body is 104857600 bytes (content-length)")


@pytest.mark.parametrize("content_type", ["multipart/form-data", "application/x-www-form-urlencoded"])
@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_form_body_over_the_limit_is_413(server_url, content_type, declared):
    """A 2 MiB prompt part (the openai client sends multipart): refused while it streams in."""
    if content_type == "multipart/form-data":
        content_type += "; boundary=XyZ"
        body = (b'--XyZ\r\nContent-Disposition: form-data; name="prompt"\r\n\r\n' + b"x" * 2 * MIB
                + b"\r\n--XyZ--\r\n")
    else:
        body = b"prompt=" + b"x" * 2 * MIB
    pieces = [body[i:i + 65536] for i in range(0, len(body), 65536)]
    if not declared:
        pieces = [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]
    status, response, _ = _raw_request(server_url, _head(content_type, len(body) if declared else None), iter(pieces))
    _assert_413(status, response, "the request body is")


@pytest.mark.parametrize("declared", [True, False], ids=["content-length", "chunked"])
def test_a_body_of_exactly_the_limit_passes_and_one_byte_more_is_413(server_url, declared):
    """The bound is inclusive: 1 MiB is read and parsed (here a 400 naming a field), 1 MiB + 1 is not."""
    fields = json.dumps({**BASE, "num_inference_steps": 201}).encode()
    for size, status in ((MIB, 400), (MIB + 1, 413)):
        body = fields + b" " * (size - len(fields))  # JSON allows trailing whitespace
        pieces = [body[i:i + 65536] for i in range(0, len(body), 65536)]
        if not declared:
            pieces = [b"%x\r\n%s\r\n" % (len(p), p) for p in pieces] + [b"0\r\n\r\n"]
        got, response, _ = _raw_request(server_url, _head("application/json", size if declared else None),
                                         iter(pieces))
        assert got == status, (size, response)
        if status == 400:
            assert response["error"]["param"] == "num_inference_steps", response


def test_json_body_over_the_limit_is_413_with_httpx(http):
    response = http.post("/v1/videos", json={"prompt": "x" * (MIB + 1)})
    assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"


def test_server_still_serves_after_oversized_bodies(http):
    video = http.post("/v1/videos", json={**BASE, "prompt": "after the big bodies"})
    assert video.status_code == 200, video.text
    http.delete(f"/v1/videos/{video.json()['id']}")


# --------------------------------------------------------------------------- in process: scaling, slow validation
WAN = SamplingParams(prompt="x", width=832, height=480, num_frames=81, num_inference_steps=50, fps=16)
HUNYUAN = SamplingParams(prompt="x", width=1280, height=720, num_frames=129, num_inference_steps=50, fps=24)
TINY = SamplingParams(prompt="x", width=64, height=64, num_frames=17, num_inference_steps=50, fps=8)


@pytest.mark.parametrize(
    "defaults, side, frames, steps, seconds, work",
    [(TINY, 1024, 68, 200, 10.0, 13_926_400), (WAN, 3328, 324, 200, 20.25, 6_469_632_000),
     (HUNYUAN, 5120, 516, 200, 21.5, 23_777_280_000)],
    ids=["tiny", "wan-480p", "hunyuan-720p"],
)
def test_limits_scale_with_the_models_default_request(defaults, side, frames, steps, seconds, work):
    limits = RequestLimits().resolved(defaults)
    assert (limits.max_width, limits.max_height, limits.max_frames, limits.max_steps) == (side, side, frames, steps)
    assert (limits.max_seconds, limits.max_work) == (seconds, work)
    assert (limits.max_fps, limits.max_guidance_scale, limits.max_prompt_chars) == (120, 100.0, 20_000)
    assert (limits.max_body_bytes, limits.max_json_depth) == (MIB, 32)
    limits.check(defaults)  # the model's own default request always fits


def test_operator_limits_win_over_the_scaled_ones():
    limits = RequestLimits(max_steps=10, max_work=10**12).resolved(WAN)
    assert (limits.max_steps, limits.max_work, limits.max_frames) == (10, 10**12, 324)
    with pytest.raises(InvalidRequestError, match=r"num_inference_steps must be at most 10 \(--max-steps\)") as exc:
        limits.check(WAN)  # the model's default of 50 steps is over the operator's bound
    assert exc.value.param == "num_inference_steps"


@pytest.mark.parametrize("bad", [{"max_steps": 0}, {"max_width": -5}, {"max_seconds": float("nan")},
                                 {"max_work": 2.5}, {"max_json_depth": True}])
def test_bad_limits_are_refused_naming_the_flag(bad):
    name = next(iter(bad))
    with pytest.raises(UserError, match=f"{name} \\(--{name.replace('_', '-')}\\) must be"):
        RequestLimits(**bad)


def test_serve_flags_set_the_limits(capsys):
    from sglang.cli.main import build_parser
    from sglang.cli.serve import server_config

    args = build_parser().parse_args(["serve", "--max-steps", "64", "--max-seconds", "2.5", "--max-body-bytes", "4096"])
    limits = server_config(args).limits
    assert (limits.max_steps, limits.max_seconds, limits.max_body_bytes) == (64, 2.5, 4096)
    assert limits.max_width is None and limits.max_json_depth == 32  # scaled later / fixed default
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-steps", "0"])
    assert "--max-steps: invalid limit '0'; use a whole number >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    for flag, default in [("--max-width", "at least 1024"), ("--max-frames", "4x the model's default frame count"),
                          ("--max-steps", "at least 200"), ("--max-seconds", "at least 10"),
                          ("--max-work", "4x the model's default request"), ("--max-fps", "Default: 120"),
                          ("--max-guidance-scale", "Default: 100"), ("--max-prompt-chars", "Default: 20000"),
                          ("--max-body-bytes", "Default: 1048576"), ("--max-json-depth", "Default: 32")]:
        assert default in help_text.rsplit(flag, 1)[1].split("--max-", 1)[0], flag  # its entry, not the usage


def test_limits_follow_the_served_model_and_config():
    stub = StubGenerator()  # default request 16x16, 5 frames, 3 steps, 8 fps
    app = create_app(stub, "stub", ServerConfig(limits=RequestLimits(max_body_bytes=2048)))
    limits = app.state.limits
    assert (limits.max_width, limits.max_frames, limits.max_steps, limits.max_work) == (1024, 20, 200, 15_360)
    with TestClient(app, base_url="http://localhost") as client:
        _assert_error(client.post("/v1/videos", json={"prompt": "x", "size": "32x32", "num_frames": 20}),
                      400, "size", "more than this server's budget of 15,360")
        response = client.post("/v1/videos", json={"prompt": "x" * 3000})
        assert response.status_code == 413 and "at most 2048 bytes" in response.json()["error"]["message"]


class SlowValidation(StubGenerator):
    """A model whose validation of the prompt "slow" takes until the test lets it finish, then
    finds the request bad: as tokenizing or building a big cache plan would take a while."""

    def __init__(self) -> None:
        super().__init__()
        self.validating = threading.Event()
        self.finish = threading.Event()

    def validate(self, params: SamplingParams) -> SamplingParams:
        if params.prompt == "slow":
            self.validating.set()
            assert self.finish.wait(30)
            raise InvalidRequestError("found only after a long validation", param="num_frames")
        return super().validate(params)


def test_slow_validation_does_not_block_other_clients():
    """While one request's validation runs, /health answers; the slow request still gets its 400.

    Deterministic: the validation holds until /health has answered (or 10 s have passed, which
    only the old code, validating on the event loop, takes), so no timing decides the outcome.
    """
    stub = SlowValidation()
    with TestClient(create_app(stub, "stub"), base_url="http://localhost") as client:
        slow: dict[str, httpx.Response] = {}
        poster = threading.Thread(target=lambda: slow.update(response=client.post("/v1/videos",
                                                                                json={"prompt": "slow"})))
        poster.start()
        try:
            assert stub.validating.wait(10)
            health: list[httpx.Response] = []
            poller = threading.Thread(target=lambda: health.append(client.get("/health")), daemon=True)
            poller.start()
            poller.join(10)
            answered_during_validation = bool(health)
        finally:
            stub.finish.set()
            poster.join(30)
        assert answered_during_validation, "/health waited for another request's validation"
        assert health[0].status_code == 200 and health[0].json()["status"] == "ok"
        _assert_error(slow["response"], 400, "num_frames", "found only after a long validation")


def test_depth_check_is_exact():
    for levels in (1, 31, 32):
        check_json_depth(_nested(levels), 32)
    check_json_depth('{"a": "[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[\\"[["}', 2)  # brackets in strings do not count
    check_json_depth("[[[}", 32)  # unbalanced but shallow: the parser says where
    with pytest.raises(InvalidRequestError) as exc:
        check_json_depth('{"fine": [[]], "deep": {"x": ' + _nested(40) + "}}", 32)
    assert exc.value.param == "deep"
