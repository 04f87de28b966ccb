"""Every bad input is a 4xx with an OpenAI-shaped body naming the parameter, as JSON and as a form."""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

BASE = {"prompt": "a red circle", "size": "48x32", "num_frames": 5, "num_inference_steps": 2}


def _form_items(fields: dict[str, Any], prefix: str = "") -> list[tuple[str, tuple[None, str]]]:
    """Flatten as the openai client does: ``name[key]`` for dicts, "true"/"false" for booleans."""
    items = []
    for key, value in fields.items():
        name = f"{prefix}[{key}]" if prefix else key
        if isinstance(value, dict):
            items.extend(_form_items(value, name))
        else:
            text = {True: "true", False: "false"}.get(value, value) if isinstance(value, bool) else str(value)
            items.append((name, (None, text)))
    return items


def _post(http: httpx.Client, fields: dict[str, Any], as_form: bool) -> httpx.Response:
    if as_form:
        return http.post("/v1/videos", files=_form_items(fields))
    return http.post("/v1/videos", json=fields)


def _assert_error(response: httpx.Response, status: int, param: str | None, fragment: str) -> None:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param
    assert fragment in error["message"], error["message"]


CASES = [
    ({"cache": "fastcache"}, "cache",
     "unknown cache strategy 'fastcache'; choose one of: none, easycache, even, magcache, planner, teacache"),
    ({"cache": "easycache", "cache_preset": "fast"}, "cache_preset", "easycache has no presets"),
    ({"cache": "easycache", "cache_speedup": 2}, "cache_speedup",
     "easycache cannot be tuned to a speedup; use cache_speedup without cache (the planner), or with cache even"),
    ({"cache": "magcache", "cache_threshold": -0.5}, "cache_threshold", "threshold must be a number >= 0"),
    ({"cache": "magcache", "cache_threshold": "abc"}, "cache_threshold", "cache_threshold must be a finite number"),
    ({"cache": "magcache", "cache_retention_ratio": 1.5}, "cache_retention_ratio", "retention_ratio must be in [0, 1]"),
    ({"cache": "magcache", "cache_max_skip_steps": "two"}, "cache_max_skip_steps", "must be an integer"),
    ({"cache": "magcache", "cache_preset": "turbo"}, "cache_preset", "unknown magcache preset 'turbo'"),
    ({"cache": "magcache", "cache_params": {"warp_speed": 1}}, "cache_params", "unknown magcache option(s)"),
    ({"cache": "teacache", "cache_max_skip_steps": 2}, "cache_max_skip_steps", "teacache has no 'max_skip_steps'"),
    ({"cache": "magcache", "cache_estimator": "linear"}, "cache_estimator",
     "unknown cache estimator 'linear'; choose one of: blend, fitted, forecast1"),
    ({"cache_estimator": "forecast1"}, "cache_estimator", "the cache strategy is 'none'"),
    ({"cache": "teacache", "cache_params": {"blend_alpha": 0.3}}, "cache_params",
     "blend_alpha is a setting of the 'blend' estimator"),
    ({"cache": "magcache", "cache_estimator": "forecast2", "cache_params": {"scale_residual": True}}, "cache_params",
     "scale_residual: true means estimator 'scale'"),
    ({"cache_threshold": 0.1}, "cache_threshold", "the cache strategy is 'none'"),
    ({"cache": "magcache", "cache_params": "{bad json"}, "cache_params", "cache_params is not valid JSON"),
    ({"cache": "magcache", "cache_params": {"calibration_file": "/etc/passwd"}}, "cache_params",
     "calibration_file cannot be set over HTTP"),
    ({"size": "50x32"}, "size", "size 50x32: width 50 is not a multiple of 16"),
    ({"size": "48x40"}, "size", "size 48x40: height 40 is not a multiple of 16"),
    ({"size": "huge"}, "size", "size must be 'WIDTHxHEIGHT'"),
    ({"seed": "abc"}, "seed", "seed must be an integer, got 'abc'"),
    ({"seed": -1}, "seed", "seed must be an integer >= 0"),
    ({"seed": 2**64}, "seed", "seed 18446744073709551616 does not fit in 64 bits"),
    ({"num_inference_steps": "2.5"}, "num_inference_steps", "num_inference_steps must be an integer"),
    ({"num_inference_steps": 0}, "num_inference_steps", "num_inference_steps must be an integer >= 1"),
    ({"guidance_scale": "lots"}, "guidance_scale", "guidance_scale must be a finite number"),
    ({"guidance_scale_2": 3.0}, "guidance_scale_2",
     "guidance_scale_2 sets the low-noise expert's guidance of a Wan2.2 two-expert model; this model has one"),
    ({"guidance_scale_2": "lots"}, "guidance_scale_2", "guidance_scale_2 must be a finite number"),
    ({"fps": "fast"}, "fps", "fps must be an integer"),
    ({"num_frames": 6}, "num_frames", "num_frames 6 cannot be taken by the VAE: it must be 4k+1"),
    ({"num_frames": None, "seconds": "0"}, "seconds", "seconds must be > 0"),
    ({"num_frames": None, "seconds": "soon"}, "seconds", "seconds must be a finite number"),
    ({"seconds": "1"}, "seconds", "give either seconds or num_frames, not both"),
    ({"prompt": "   "}, "prompt", "the prompt is empty"),
    ({"prompt": None}, "prompt", "missing required parameter 'prompt'"),
    ({"model": "sora-2"}, "model", "model 'sora-2' is not served here; this server serves 'wan2.1-t2v-tiny'"),
    ({"cache_treshold": 0.1}, "cache_treshold", "unknown parameter 'cache_treshold'"),
    ({"input_reference": "x"}, "input_reference", "input_reference must be an image, not a string"),
]


@pytest.mark.parametrize("as_form", [False, True], ids=["json", "form"])
@pytest.mark.parametrize("change, param, fragment", CASES, ids=[c[1] + "-" + str(i) for i, c in enumerate(CASES)])
def test_bad_create_is_400_naming_the_param(http, change, param, fragment, as_form):
    fields = {k: v for k, v in {**BASE, **change}.items() if v is not None}
    _assert_error(_post(http, fields, as_form), 400, param, fragment)


@pytest.mark.parametrize(
    "value, fragment", [(True, "seed must be an integer, got true"), ([1], "seed must be an integer")]
)
def test_json_types_are_checked(http, value, fragment):
    _assert_error(http.post("/v1/videos", json={**BASE, "seed": value}), 400, "seed", fragment)


@pytest.mark.parametrize(
    "param, escaped, fragment",
    [
        ("prompt", r"caf\udce9 \udcff", "prompt is not valid UTF-8: character 3 is the undecodable byte 0xe9"),
        ("prompt", r"a \ud800 cat", "prompt is not valid UTF-8: character 2 is the lone surrogate U+D800"),
        ("negative_prompt", r"blurry \udcff", "negative_prompt is not valid UTF-8"),
    ],
)
def test_lone_surrogates_in_json_text_are_400(http, param, escaped, fragment):
    """JSON may spell a lone surrogate ("\\ud800"); it decodes to a str no tokenizer takes."""
    fields = {**BASE, "prompt": "a cat", param: "@TEXT@"}
    body = json.dumps(fields).replace("@TEXT@", escaped).encode()
    assert any(0xD800 <= ord(c) <= 0xDFFF for c in json.loads(body)[param])  # what the server decodes
    response = http.post("/v1/videos", content=body, headers={"content-type": "application/json"})
    _assert_error(response, 400, param, fragment)


def test_bad_bodies(http):
    _assert_error(http.post("/v1/videos", content=b"{not json", headers={"content-type": "application/json"}),
                  400, None, "not valid JSON")
    _assert_error(http.post("/v1/videos", json=["a list"]), 400, None, "must be a JSON object")
    _assert_error(http.post("/v1/videos", content=b"prompt", headers={"content-type": "text/plain"}),
                  415, None, "unsupported content type 'text/plain'")
    nested_twice = [("prompt", (None, "x")), ("cache_params", (None, "{}")), ("cache_params[a]", (None, "1"))]
    _assert_error(http.post("/v1/videos", files=nested_twice), 400, "cache_params", "both as a value and as nested")
    _assert_error(http.post("/v1/videos", files=[("prompt", (None, "x")), ("prompt", (None, "y"))]),
                  400, "prompt", "given more than once")


def test_unknown_video_id_is_404(http):
    for method, path in [("GET", "/v1/videos/video_nope"), ("DELETE", "/v1/videos/video_nope"),
                         ("GET", "/v1/videos/video_nope/content")]:
        response = http.request(method, path)
        _assert_error(response, 404, "video_id", "no video with id 'video_nope'")
        assert response.json()["error"]["code"] == "not_found"


@pytest.mark.parametrize(
    "query, param, fragment",
    [
        ({"limit": 0}, "limit", "limit must be in [1, 100]"),
        ({"limit": "many"}, "limit", "limit must be an integer"),
        ({"order": "sideways"}, "order", "order must be 'asc' or 'desc'"),
        ({"after": "video_nope"}, "after", "no video with id 'video_nope'"),
        ({"page": 2}, "page", "unknown query parameter 'page'"),
    ],
)
def test_bad_list_query_is_400(http, query, param, fragment):
    _assert_error(http.get("/v1/videos", params=query), 400, param, fragment)


def test_unknown_route_and_variant(http):
    _assert_error(http.get("/v1/nothing"), 404, None, "GET /v1/nothing: Not Found")
    _assert_error(http.get("/v1/videos/video_nope/content", params={"variant": "thumbnail"}), 400, "variant",
                  "variant 'thumbnail' is not available")


# --------------------------------------------------------------------------- UTF-8 only, bodies whole
def _json_post(http: httpx.Client, body: bytes, content_type: str = "application/json") -> httpx.Response:
    return http.post("/v1/videos", content=body, headers={"content-type": content_type})


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-32"])
def test_json_in_another_encoding_is_400_before_the_depth_check(http, encoding):
    """U+0122 is 0x22 0x01 in UTF-16-LE: a byte scan takes it for a quote and misses 3000 levels."""
    text = '{"prompt": "\u0122", "cache_params": ' + "[" * 3000 + "]" * 3000 + "}"
    _assert_error(_json_post(http, text.encode(encoding)), 400, None, "send UTF-8")


@pytest.mark.parametrize(
    "body, content_type, fragment",
    [
        (b'{"prompt": "caf\xe9"}', "application/json", "the request body is not valid UTF-8 (byte 0xe9 at position 15)"),
        (b'\xef\xbb\xbf{"prompt": "x"}', "application/json", "byte order mark"),
        (b'{"prompt": "x"}', "application/json; charset=utf-16", "declares charset 'utf-16'"),
        (b"prompt=x", "application/x-www-form-urlencoded; charset=latin-1", "declares charset 'latin-1'"),
    ],
    ids=["invalid-utf8", "bom", "json-charset", "urlencoded-charset"],
)
def test_json_and_form_bodies_are_utf8_only(http, body, content_type, fragment):
    _assert_error(_json_post(http, body, content_type), 400, None, fragment)


def _multipart(*parts: bytes, boundary: str = "XyZ", close: bool = True) -> bytes:
    body = b"".join(b"--" + boundary.encode() + b"\r\n" + part + b"\r\n" for part in parts)
    return body + (b"--" + boundary.encode() + b"--\r\n" if close else b"")


def _part(name: str, value: bytes, headers: bytes = b"") -> bytes:
    return b'Content-Disposition: form-data; name="' + name.encode() + b'"\r\n' + headers + b"\r\n" + value


MULTIPART = "multipart/form-data; boundary=XyZ"


@pytest.mark.parametrize(
    "body, content_type, param, fragment",
    [
        (_multipart(_part("prompt", b"\xff\xfe")), MULTIPART, "prompt", "form field 'prompt' looks like UTF-16"),
        (_multipart(_part("prompt", b"caf\xe9")), MULTIPART, "prompt",
         "form field 'prompt' is not valid UTF-8 (byte 0xe9 at position 3)"),
        (_multipart(_part("prompt", b"x"), _part("negative_prompt", b"a\x00b\x00")), MULTIPART, "negative_prompt",
         "looks like UTF-16"),
        (_multipart(_part("prompt", b"a+ADw-b")), "multipart/form-data; charset=utf-7; boundary=XyZ", None,
         "the multipart body declares charset 'utf-7'"),
        (_multipart(_part("prompt", b"a+ADw-b", b"Content-Type: text/plain; charset=utf-7\r\n")), MULTIPART, None,
         "form field 'prompt' declares charset 'utf-7'"),
        (b"prompt=%FF%FE", "application/x-www-form-urlencoded", "prompt", "form field 'prompt' looks like UTF-16"),
        (b"prompt=a%E9", "application/x-www-form-urlencoded", "prompt", "form field 'prompt' is not valid UTF-8"),
        (b"prompt=caf\xe9", "application/x-www-form-urlencoded", "prompt", "byte 0xe9 at position 3"),
        (_multipart(_part("prompt", b"x"), _part("num_inference_steps", b"4"), close=False), MULTIPART, None,
         "the multipart body ends before its closing boundary"),
    ],
    ids=["multipart-bom", "multipart-latin1", "multipart-utf16", "multipart-charset", "part-charset", "urlencoded-bom",
         "urlencoded-escaped", "urlencoded-raw", "multipart-truncated"],
)
def test_form_bodies_are_utf8_only_and_whole(http, body, content_type, param, fragment):
    _assert_error(_json_post(http, body, content_type), 400, param, fragment)


@pytest.mark.parametrize("content_type, body", [
    ("application/x-www-form-urlencoded", "prompt=caf\u00e9&num_inference_steps=3&size=48x32&num_frames=5".encode()),
    (MULTIPART, _multipart(_part("prompt", "caf\u00e9".encode()), _part("num_inference_steps", b"3"),
                           _part("size", b"48x32"), _part("num_frames", b"5"))),
], ids=["urlencoded", "multipart"])
def test_utf8_form_text_arrives_unchanged(http, content_type, body):
    """Raw UTF-8 in a form is read as UTF-8 (not Latin-1: 'cafÃ©'); the last field is kept."""
    response = _json_post(http, body, content_type)
    assert response.status_code == 200, response.text
    video = response.json()
    http.delete(f"/v1/videos/{video['id']}")
    assert (video["prompt"], video["num_inference_steps"]) == ("caf\u00e9", 3)


def test_long_values_are_cut_in_messages(http):
    response = http.post("/v1/videos", json={**BASE, "cache": "c" * 10_000})
    _assert_error(response, 400, "cache", "unknown cache strategy 'cccc")
    assert len(response.text) < 600, response.text
    response = http.get("/v1/videos/video_" + "9" * 10_000)
    _assert_error(response, 404, "video_id", "no video with id 'video_999")
    assert len(response.text) < 300, response.text
