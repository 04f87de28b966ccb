"""`cache_speedup` over HTTP: a bad one is a 400 naming it, a good one runs the planner to the
budget; EasyCache runs without a calibration and refuses a speedup."""

from __future__ import annotations

from sglang.multimodal_gen.runtime.cache.budget import checked_budget_passes
from sglang.multimodal_gen.runtime.cache.calibration import CalibrationResult
from sglang.multimodal_gen.runtime.entrypoints.generator import BUILTIN_MODEL_PATH

from .conftest import SMALL, wait_finished


def test_a_speedup_below_one_is_400_naming_cache_speedup(http):
    response = http.post("/v1/videos", json={"prompt": "a red circle", **SMALL, "cache_speedup": 0})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "cache_speedup" and "cache speedup must be a number >= 1" in error["message"]


def test_a_speedup_alone_runs_the_planner_to_the_budget(http):
    response = http.post("/v1/videos", json={"prompt": "a red circle moving left", **SMALL, "seed": 1,
                                              "cache_speedup": 2})
    assert response.status_code == 200, response.text
    video = wait_finished(http, response.json()["id"])
    assert video["status"] == "completed", video
    assert video["cache"] == "planner" and video["cache_stats"]["strategy"] == "planner"
    # A time budget: 4 of SMALL's 8 steps would give 1.87x once the skipped steps' cost (the built-in
    # calibration's) is counted, so 3 run.
    calibration = CalibrationResult.load(BUILTIN_MODEL_PATH / "calibration.json")
    passes = checked_budget_passes(8, 2, calibration.step_costs().skipped_step_cost(2, whole_model=True))
    assert passes == 3 and video["cache_stats"]["asked_speedup"] == 2
    for branch in video["cache_stats"]["branches"].values():
        assert branch["computed"] == passes and branch["skipped"] == 8 - passes


def test_easycache_over_http_needs_no_calibration_and_reports_its_pairs(http):
    response = http.post("/v1/videos", json={"prompt": "a red circle moving left", **SMALL, "seed": 1,
                                              "cache": "easycache", "cache_threshold": 0.5,
                                              "cache_params": {"warmup_steps": 2}})
    assert response.status_code == 200, response.text
    video = wait_finished(http, response.json()["id"])
    assert video["status"] == "completed", video
    stats = video["cache_stats"]
    assert video["cache"] == "easycache" and stats["strategy"] == "easycache"
    assert stats["branches"]["cond"]["skipped_steps"] == stats["branches"]["uncond"]["skipped_steps"] != []


def test_easycache_with_a_speedup_is_400_naming_cache_speedup(http):
    response = http.post("/v1/videos", json={"prompt": "a red circle", **SMALL, "cache": "easycache",
                                              "cache_speedup": 2})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "cache_speedup" and "easycache cannot be tuned to a speedup" in error["message"]


def test_a_budget_magcache_cannot_meet_names_the_fields_not_the_flags(http):
    """The runtime words the refusal with CLI flags; a client sets fields, so the server names those."""
    response = http.post("/v1/videos", json={"prompt": "a red circle", **SMALL, "num_inference_steps": 20,
                                              "cache": "magcache", "cache_speedup": 4.5})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "cache_speedup"
    assert error["message"].endswith("use cache_speedup without cache for the planner, or set cache_threshold "
                                     "yourself"), error["message"]
    assert "--" not in error["message"], error["message"]
