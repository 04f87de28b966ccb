"""CacheParams validation, --cache-params parsing and build_cache resolution."""

from __future__ import annotations

import json

import pytest

from sglang.multimodal_gen.configs.cache_params import CacheParams, parse_cache_params_arg
from sglang.multimodal_gen.runtime.cache import (
    COND,
    CacheConfigError,
    MagCache,
    TeaCache,
    build_cache,
    preset_model_keys,
    registered_caches,
)


def test_defaults_and_registration():
    params = CacheParams()
    assert params.strategy == "none" and not params.enabled and params.options == {}
    assert {"magcache", "teacache"} <= set(registered_caches())
    assert CacheParams(strategy=" MagCache ").strategy == "magcache"


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"strategy": "magcache", "threshold": -0.01}, r"threshold must be a number >= 0"),
        ({"strategy": "magcache", "threshold": float("inf")}, "threshold"),
        ({"strategy": "magcache", "threshold": True}, "threshold"),
        ({"strategy": "magcache", "max_skip_steps": -1}, r"max_skip_steps must be a whole number >= 0"),
        ({"strategy": "magcache", "max_skip_steps": 2.5}, "max_skip_steps"),
        ({"strategy": "magcache", "retention_ratio": 1.5}, r"retention_ratio must be in \[0, 1\]"),
        ({"strategy": "magcache", "retention_ratio": -0.1}, "retention_ratio"),
        ({"strategy": "fastcache"}, r"unknown cache strategy 'fastcache'; choose one of: none, .*magcache"),
        ({"strategy": ""}, "strategy"),
        ({"strategy": "magcache", "preset": "turbo"}, r"unknown magcache preset 'turbo'; choose one of: default, fast"),
        ({"strategy": "teacache", "preset": "ultra"}, r"default, slow, fast"),
        (
            {"strategy": "magcache", "options": {"thresh": 1}},
            r"unknown magcache option\(s\) \['thresh'\].*valid keys are: mag_ratios, threshold",
        ),
        ({"strategy": "teacache", "options": {"sqrt_ratios": True}}, r"valid keys are: coefficients"),
        ({"strategy": "teacache", "max_skip_steps": 3}, r"teacache has no 'max_skip_steps' setting"),
        ({"strategy": "magcache", "options": [1, 2]}, "JSON object"),
        ({"strategy": "none", "threshold": 0.1}, r"strategy is 'none'"),
        ({"strategy": "none", "preset": "fast"}, r"strategy is 'none'"),
    ],
)
def test_invalid_params(kwargs, match):
    with pytest.raises(CacheConfigError, match=match):
        CacheParams(**kwargs)


def test_valid_params_are_normalised():
    params = CacheParams("magcache", threshold=0, max_skip_steps=3.0, retention_ratio=1, preset="Fast")
    assert (params.threshold, params.max_skip_steps, params.retention_ratio, params.preset) == (0.0, 3, 1.0, "fast")
    assert isinstance(params.max_skip_steps, int)


def test_from_dict_splits_fields_and_options():
    params = CacheParams.from_dict({"strategy": "magcache", "threshold": 0.2, "sqrt_ratios": True,
                                    "options": {"end_steps": 2}})
    assert params.threshold == 0.2 and params.options == {"end_steps": 2, "sqrt_ratios": True}
    assert CacheParams.from_dict(params.to_dict()) == params
    with pytest.raises(CacheConfigError, match="JSON object"):
        CacheParams.from_dict([1])


def test_parse_inline_json_and_file(tmp_path):
    parsed = parse_cache_params_arg(' {"sqrt_ratios": true, "threshold": 0.1} ')
    assert parsed == {"sqrt_ratios": True, "threshold": 0.1}
    path = tmp_path / "params.json"
    path.write_text(json.dumps({"end_steps": 1}))
    assert parse_cache_params_arg(str(path)) == {"end_steps": 1}


@pytest.mark.parametrize(
    "value, match",
    [
        ("{sqrt_ratios: true}", r"not valid JSON .*line 1 column 2.*double quotes"),
        ("{'threshold': 0.1}", "not valid JSON"),
        ("missing.json", "neither a JSON object .* nor an existing .json file"),
        ("", "needs a JSON object"),
    ],
)
def test_parse_rejects_bad_input(value, match):
    with pytest.raises(CacheConfigError, match=match):
        parse_cache_params_arg(value)


def test_parse_rejects_non_objects(tmp_path):
    path = tmp_path / "list.json"
    path.write_text("[1, 2]")
    with pytest.raises(CacheConfigError, match="must hold a JSON object .* list"):
        parse_cache_params_arg(str(path))
    path.write_text("{oops")
    with pytest.raises(CacheConfigError, match="file .*list.json.* is not valid JSON"):
        parse_cache_params_arg(str(path))


def test_build_cache_none_and_calibration():
    assert build_cache(CacheParams(), 50, "wan21_t2v_1.3b") is None
    calib = build_cache(CacheParams(), 20, "tiny-wan", calibrate=True)
    assert isinstance(calib, MagCache) and calib.calibrate and calib.num_inference_steps == 20
    assert isinstance(build_cache(CacheParams("teacache"), 30, "wan21_t2v_1.3b"), TeaCache)


def test_build_cache_precedence():
    params = CacheParams("magcache", preset="fast", threshold=0.3, options={"threshold": 0.01, "max_skip_steps": 1})
    cfg = build_cache(params, 50, "wan21_t2v_1.3b").config
    assert (cfg.threshold, cfg.max_skip_steps, cfg.retention_ratio) == (0.3, 1, 0.2)


def test_build_cache_errors_name_valid_choices():
    with pytest.raises(CacheConfigError, match=r"known: hunyuan_544p, hunyuan_720p, wan21_i2v_14b_480p"):
        build_cache(CacheParams("magcache"), 50, "sdxl")
    with pytest.raises(CacheConfigError, match=r"known: hunyuan, wan21_i2v"):
        build_cache(CacheParams("teacache"), 50, None)
    with pytest.raises(CacheConfigError, match=r"at least 2"):
        build_cache(CacheParams("magcache", options={"mag_ratios": {COND: [1.0]}}), 50, "tiny", branches=(COND,))


def test_preset_model_keys():
    assert "wan21_t2v_1.3b" in preset_model_keys("magcache")
    assert "hunyuan" in preset_model_keys("teacache")
    with pytest.raises(CacheConfigError):
        preset_model_keys("nope")
