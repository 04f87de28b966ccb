"""Request parsing without a server: form nesting, types, seconds -> frames, cache field naming."""

from __future__ import annotations

import io

import pytest
from starlette.datastructures import UploadFile

from sglang.multimodal_gen.errors import InvalidRequestError
from sglang.multimodal_gen.runtime.entrypoints.video_api import (
    build_cache_params,
    form_to_fields,
    format_seconds,
    frames_for_seconds,
    parse_create_request,
)


def test_form_nesting_lists_and_scalars():
    fields = form_to_fields([
        ("prompt", "a cat"),
        ("seed", "3"),
        ("cache_params[sqrt_ratios]", "true"),
        ("cache_params[end_steps]", "2"),
        ("cache_params[mag_ratios][cond][]", "1.0"),
        ("cache_params[mag_ratios][cond][]", "0.5"),
        ("cache_params[note]", "fast"),
        ("cache_params[missing]", ""),
    ])
    assert fields == {
        "prompt": "a cat",
        "seed": "3",
        "cache_params": {"sqrt_ratios": True, "end_steps": 2, "mag_ratios": {"cond": [1.0, 0.5]}, "note": "fast",
                         "missing": None},
    }


@pytest.mark.parametrize(
    "items, param, fragment",
    [
        ([("a[", "1")], "a[", "malformed form field name"),
        ([("seed", "1"), ("seed", "2")], "seed", "more than once"),
        ([("cache_params[x][][y]", "1")], "cache_params", "lists are only taken as 'name[key][]'"),
        ([("cache_params[x]", "1"), ("cache_params[x][y]", "2")], "cache_params", "both as a value and as nested"),
        ([("photo", UploadFile(io.BytesIO(b"x"), filename="x.png"))], "photo", "takes a file only as input_reference"),
    ],
)
def test_bad_forms(items, param, fragment):
    with pytest.raises(InvalidRequestError, match=fragment.replace("[", r"\[")) as exc:
        form_to_fields(items)
    assert exc.value.param == param


def test_form_strings_and_json_values_parse_alike():
    from_form = parse_create_request({"prompt": "p", "seed": "7", "guidance_scale": "4.5", "size": "832x480",
                                      "seconds": "5", "model": "", "cache_params": '{"sqrt_ratios": true}'})
    from_json = parse_create_request({"prompt": "p", "seed": 7, "guidance_scale": 4.5, "size": "832x480",
                                      "seconds": 5, "model": None, "cache_params": {"sqrt_ratios": True}})
    assert from_form == from_json
    assert from_form.size == (832, 480) and from_form.model is None and from_form.seed == 7


@pytest.mark.parametrize(
    "seconds, fps, stride, frames",
    [(1, 8, 4, 9), (5, 16, 4, 81), (4, 16, 4, 65), (0.01, 8, 4, 1), (2, 4, 1, 8), (1.1, 8, 4, 9), (1.3, 8, 4, 9),
     (1.5, 8, 4, 13)],
)
def test_frames_for_seconds(seconds, fps, stride, frames):
    assert frames_for_seconds(seconds, fps, stride) == frames
    assert (frames - 1) % stride == 0


def test_format_seconds():
    assert format_seconds(9, 8) == "1.125" and format_seconds(8, 8) == "1" and format_seconds(81, 16) == "5.062"


def test_cache_fields_override_cache_params_and_name_the_bad_one():
    request = parse_create_request({"prompt": "p", "cache": "magcache", "cache_threshold": "0.3",
                                    "cache_params": {"threshold": 0.9, "sqrt_ratios": True, "preset": "fast"}})
    params = build_cache_params(request)
    assert params.strategy == "magcache" and params.threshold == 0.3 and params.preset == "fast"
    assert params.options == {"sqrt_ratios": True}
    assert build_cache_params(parse_create_request({"prompt": "p", "cache_params": {"strategy": "teacache"}})
                              ).strategy == "teacache"
    assert build_cache_params(parse_create_request({"prompt": "p"})).strategy == "none"
    with pytest.raises(InvalidRequestError) as exc:
        build_cache_params(parse_create_request({"prompt": "p", "cache": "magcache", "cache_max_skip_steps": -1}))
    assert exc.value.param == "cache_max_skip_steps"


def test_cache_estimator_field_wins_over_cache_params_and_is_merged_before_blend_alpha():
    request = parse_create_request({"prompt": "p", "cache": "teacache", "cache_estimator": "blend",
                                    "cache_params": {"estimator": "forecast2", "blend_alpha": 0.25}})
    params = build_cache_params(request)
    assert (params.estimator, params.blend_alpha, params.options) == ("blend", 0.25, {})
    from_params = build_cache_params(parse_create_request({"prompt": "p", "cache": "magcache",
                                                           "cache_params": {"estimator": "scale"}}))
    assert from_params.estimator == "scale"
    assert build_cache_params(parse_create_request({"prompt": "p", "cache": "magcache"})).estimator is None
