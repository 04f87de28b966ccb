"""Residual estimators: exact arithmetic on small tensors, fallbacks, per-branch state, reset,
dtype round trip, the registry, and how a TimestepCache and CacheParams choose one."""

from __future__ import annotations

import pytest
import torch

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.runtime.cache import COND, UNCOND, CacheConfigError, StepFeatures, TimestepCache, build_cache
from sglang.multimodal_gen.runtime.cache.estimators import (
    build_estimator,
    get_estimator,
    lagrange_weights,
    registered_estimators,
)
from sglang.multimodal_gen.runtime.cache.magcache import MagCache, MagCacheConfig

ALL = ["blend", "fitted", "forecast1", "forecast1_sigma", "forecast2", "forecast2_sigma", "reuse", "scale"]
#: Estimators that need no strategy to hand them anything (``fitted`` takes the planner's weights).
STANDALONE = [name for name in ALL if name != "fitted"]


def full(value: float, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.full((1, 2, 3), value, dtype=dtype)


def fed(name: str, points: list[tuple[int, float | None, float]], branch: str = COND, **options):
    """An estimator that observed ``(step, sigma, value)`` points on ``branch``."""
    estimator = build_estimator(name, (COND, UNCOND), **options)
    for step, sigma, value in points:
        estimator.observe(branch, step, sigma, full(value))
    return estimator


def value(tensor: torch.Tensor) -> float:
    assert torch.equal(tensor, torch.full_like(tensor, tensor.flatten()[0].item()))
    return tensor.flatten()[0].item()


def test_registry_lists_every_estimator_and_refuses_unknown_names():
    assert registered_estimators() == ALL
    with pytest.raises(CacheConfigError, match="unknown cache estimator 'linear'; choose one of: blend, fitted, forecast1, "):
        get_estimator("linear")


def test_reuse_returns_the_stored_tensor_itself_and_scale_multiplies_by_the_hint():
    stored = full(4.0)
    reuse = build_estimator("reuse", (COND,))
    reuse.observe(COND, 0, 1.0, stored)
    assert reuse.estimate(COND, 1, 0.9, scale=0.5) is stored
    scale = build_estimator("scale", (COND,))
    scale.observe(COND, 0, 1.0, stored)
    assert value(scale.estimate(COND, 1, 0.9, scale=0.5)) == 2.0


def test_first_order_forecast_in_step_index():
    # Computed at steps 0 and 2 (values 1, 3): slope 1 per step; step 3 -> 4, step 4 -> 5.
    estimator = fed("forecast1", [(0, None, 1.0), (2, None, 3.0)])
    assert value(estimator.estimate(COND, 3, None)) == 4.0
    assert value(estimator.estimate(COND, 4, None)) == 5.0


def test_second_order_forecast_in_step_index():
    # Values step ** 2 at steps 0, 1, 2: the parabola gives 9 at step 3.
    estimator = fed("forecast2", [(0, None, 0.0), (1, None, 1.0), (2, None, 4.0)])
    assert value(estimator.estimate(COND, 3, None)) == 9.0
    assert lagrange_weights([0.0, 1.0, 2.0], 3.0) == [1.0, -3.0, 3.0]


def test_forecasts_fall_back_to_the_next_lower_order_until_history_exists():
    assert value(fed("forecast2", [(0, None, 5.0)]).estimate(COND, 1, None)) == 5.0  # reuse
    assert value(fed("forecast2", [(1, None, 1.0), (2, None, 4.0)]).estimate(COND, 3, None)) == 7.0  # linear
    assert value(fed("forecast1", [(0, None, 5.0)]).estimate(COND, 1, None)) == 5.0
    assert value(fed("blend", [(0, None, 5.0)]).estimate(COND, 1, None)) == 5.0
    # Two points at the same sigma allow no first order in sigma: reuse the last.
    assert value(fed("forecast1_sigma", [(0, 0.5, 1.0), (1, 0.5, 2.0)]).estimate(COND, 2, 0.25)) == 2.0
    # Three points, two at the same sigma: the last two still give the linear forecast.
    three = [(0, 1.0, 9.0), (1, 0.5, 1.0), (2, 0.25, 0.5)]
    assert value(fed("forecast2_sigma", [(0, 0.25, 7.0), *three[1:]]).estimate(COND, 3, 0.125)) == 0.25


def test_sigma_and_step_forecasts_differ_when_the_spacings_differ():
    # Residual = 2 * sigma at sigmas 1.0, 0.5 (steps 0, 1); step 2 has sigma 0.25, not 0.0.
    points = [(0, 1.0, 2.0), (1, 0.5, 1.0)]
    assert value(fed("forecast1_sigma", points).estimate(COND, 2, 0.25)) == 0.5
    assert value(fed("forecast1", points).estimate(COND, 2, 0.25)) == 0.0
    # Residual = sigma ** 2 at sigmas 1, 0.5, 0.25: exact in sigma, not in step index.
    squares = [(0, 1.0, 1.0), (1, 0.5, 0.25), (2, 0.25, 0.0625)]
    assert value(fed("forecast2_sigma", squares).estimate(COND, 3, 0.125)) == 0.015625
    assert value(fed("forecast2", squares).estimate(COND, 3, 0.125)) == 1.0 - 3 * 0.25 + 3 * 0.0625


def test_sigma_forecasts_use_step_index_when_a_sigma_is_unknown():
    points = [(0, None, 2.0), (1, 0.5, 1.0)]
    assert value(fed("forecast1_sigma", points).estimate(COND, 2, 0.25)) == 0.0


def test_blend_moves_from_reuse_towards_the_first_order_forecast():
    points = [(0, None, 1.0), (1, None, 2.0)]  # reuse 2, forecast1 at step 2: 3
    assert value(fed("blend", points, alpha=0.25).estimate(COND, 2, None)) == 2.25
    assert value(fed("blend", points).estimate(COND, 2, None)) == 2.5  # default alpha 0.5
    assert value(fed("blend", points, alpha=0.0).estimate(COND, 2, None)) == 2.0
    assert value(fed("blend", points, alpha=1.0).estimate(COND, 2, None)) == 3.0
    with pytest.raises(CacheConfigError, match="blend_alpha must be a finite number"):
        build_estimator("blend", (COND,), alpha=float("nan"))


@pytest.mark.parametrize("name", STANDALONE)
def test_bf16_round_trip(name):
    estimator = build_estimator(name, (COND,))
    for step, v in enumerate((1.0, 1.5, 2.0)):
        estimator.observe(COND, step, 1.0 - step / 4, full(v, torch.bfloat16))
    out = estimator.estimate(COND, 3, 0.25, scale=0.5)
    assert out.dtype == torch.bfloat16
    expected = {"reuse": 2.0, "scale": 1.0, "blend": 2.25}.get(name, 2.5)
    assert value(out) == expected


def test_fitted_adds_its_weight_per_branch_and_step_times_the_last_change():
    """``r_i + c_k (r_i - r_h)`` with the planner's ``c_k``: computed 1 then 3 (change 2); weight
    0.5 at step 3 gives 4, 1.25 at step 4 gives 5.5 (4.25 at a trust of 0.5); a step without a
    weight, or the other branch (its own weights), reuses; in bf16 the arithmetic is fp32 and the
    result bf16."""
    weights = {COND: {3: 0.5, 4: 1.25}, UNCOND: {}}
    estimator = fed("fitted", [(0, None, 1.0), (2, None, 3.0)], weights=weights)
    assert value(estimator.estimate(COND, 3, None)) == 4.0
    assert value(estimator.estimate(COND, 4, None)) == 5.5
    assert value(estimator.estimate(COND, 5, None)) == 3.0
    estimator.observe(UNCOND, 0, None, full(1.0))
    estimator.observe(UNCOND, 2, None, full(3.0))
    assert value(estimator.estimate(UNCOND, 3, None)) == 3.0
    estimator.trust[COND] = 0.5  # the planner's check lowered it: half of each weight
    assert value(estimator.estimate(COND, 4, None)) == 4.25
    estimator.reset()
    assert estimator.trust == {COND: 1.0, UNCOND: 1.0}
    half = build_estimator("fitted", (COND,), weights={COND: {2: 0.5}})
    half.observe(COND, 0, None, full(1.0, torch.bfloat16))
    half.observe(COND, 1, None, full(1.5, torch.bfloat16))
    out = half.estimate(COND, 2, None)
    assert out.dtype == torch.bfloat16 and value(out) == 1.75


def test_fitted_without_the_planner_is_refused_in_one_line():
    with pytest.raises(CacheConfigError, match="fitted estimator takes its weights from the budget planner") as exc:
        build_cache(CacheParams(strategy="teacache", estimator="fitted"), 10, "wan21_t2v_1.3b")
    assert "\n" not in str(exc.value)


def test_forecast_arithmetic_is_fp32():
    # 2 * 40032 - 40000 in fp16 would overflow at 2 * 40032 (fp16 max 65504); in fp32 it is 40064,
    # which fp16 holds exactly.
    estimator = build_estimator("forecast1", (COND,))
    estimator.observe(COND, 0, None, full(40000.0, torch.float16))
    estimator.observe(COND, 1, None, full(40032.0, torch.float16))
    out = estimator.estimate(COND, 2, None)
    assert out.dtype == torch.float16 and value(out) == 40064.0


@pytest.mark.parametrize("name", STANDALONE)
def test_branches_are_isolated_and_reset_forgets(name):
    estimator = fed(name, [(0, 1.0, 1.0), (1, 0.5, 2.0)])
    with pytest.raises(RuntimeError, match="no computed residual of branch 'uncond'"):
        estimator.estimate(UNCOND, 2, 0.25)
    before = estimator.estimate(COND, 2, 0.25).clone()
    estimator.observe(UNCOND, 0, 1.0, full(100.0))
    estimator.observe(UNCOND, 1, 0.5, full(-100.0))
    assert torch.equal(estimator.estimate(COND, 2, 0.25), before)
    assert estimator.history_bytes() > 0
    estimator.reset()
    assert estimator.history_bytes() == 0
    with pytest.raises(RuntimeError):
        estimator.estimate(COND, 2, 0.25)


def test_history_keeps_only_what_the_order_needs():
    for name, kept in (("reuse", 1), ("scale", 1), ("forecast1", 2), ("blend", 2), ("forecast2_sigma", 3)):
        estimator = fed(name, [(s, None, float(s)) for s in range(5)])
        assert estimator.history_bytes() == kept * 6 * 4, name
        assert [p.step for p in estimator._history[COND]] == list(range(5 - kept, 5))


# --------------------------------------------------------------------------- inside a TimestepCache
class EveryOther(TimestepCache):
    name = "estimator-test-every-other"

    def _decide(self, step, branch, features):
        return step % 2 == 0


def drive(cache: TimestepCache, sigmas: list[float]) -> list[float]:
    """Residual = 10 * sigma on computed steps; the values every step used, cond branch."""
    used = []
    for step, sigma in enumerate(sigmas):
        features = StepFeatures(timestep=torch.tensor([1000.0]), sigma=sigma)
        if cache.should_compute(step, COND, features):
            residual = full(10 * sigma)
            cache.store(step, COND, residual)
        else:
            residual = cache.reuse(step, COND)
        used.append(value(residual))
    return used


def test_cache_feeds_its_estimator_the_stage_sigmas():
    sigmas = [1.0, 0.75, 0.5, 0.375, 0.25, 0.125]
    cache = EveryOther(None, 6, (COND,))
    assert cache.estimator.name == "reuse" and cache.stats.estimator == "reuse"
    assert drive(cache, sigmas) == [10.0, 10.0, 5.0, 5.0, 2.5, 2.5]
    cache.use_estimator("forecast1_sigma")
    assert drive(cache, sigmas) == [10.0, 10.0, 5.0, 3.75, 2.5, 1.25]  # exact: linear in sigma
    assert cache.stats.to_dict()["estimator"] == "forecast1_sigma"
    assert cache.stats.to_dict()["estimator_history_bytes"] == 2 * 6 * 4
    assert cache.stats.estimator_line() == "estimator forecast1_sigma, history 0.00 MiB"
    cache.reset()
    assert cache.estimator.history_bytes() == 0 and cache.stats.estimator_history_bytes == 0


def _magcache(**knobs) -> MagCache:
    ratios = {COND: [1.0, 0.5, 0.5, 0.5, 0.5]}
    config = MagCacheConfig(ratios, threshold=100.0, max_skip_steps=3, retention_ratio=0.0, **knobs)
    return MagCache(config, 5, (COND,))


def test_magcache_scale_residual_is_the_scale_estimator():
    assert _magcache(scale_residual=True).estimator.name == "scale"
    cache = _magcache()
    cache.use_estimator("scale")
    base = full(4.0)
    got = []
    for step in range(5):
        if cache.should_compute(step, COND, StepFeatures(timestep=torch.tensor([1.0]))):
            cache.store(step, COND, base)
        else:
            got.append(value(cache.reuse(step, COND)))
    assert got == [2.0, 1.0, 0.5]
    scaled = _magcache(scale_residual=True)
    scaled.use_estimator("scale")  # agrees: fine
    with pytest.raises(CacheConfigError, match="scale_residual: true means estimator 'scale'.*'forecast1'"):
        scaled.use_estimator("forecast1")


def test_cache_params_take_the_estimator_from_the_field_or_cache_params():
    assert CacheParams(strategy="magcache").estimator is None
    assert CacheParams(strategy="magcache", estimator=" Forecast2 ").estimator == "forecast2"
    from_options = CacheParams(strategy="teacache", options={"estimator": "blend", "blend_alpha": 0.3})
    assert (from_options.estimator, from_options.blend_alpha, from_options.options) == ("blend", 0.3, {})
    explicit = CacheParams(strategy="teacache", estimator="forecast1", options={"estimator": "blend"})
    assert explicit.estimator == "forecast1"
    assert CacheParams.from_dict({"strategy": "magcache", "estimator": "scale"}).estimator == "scale"


@pytest.mark.parametrize("kwargs, message", [
    (dict(strategy="magcache", estimator="linear"), "unknown cache estimator 'linear'; choose one of: blend, "),
    (dict(strategy="magcache", estimator=3), "unknown cache estimator 3"),
    (dict(strategy="magcache", blend_alpha=0.5), "blend_alpha is a setting of the 'blend' estimator"),
    (dict(strategy="magcache", estimator="blend", blend_alpha="x"), "blend_alpha must be a finite number"),
    (dict(strategy="none", estimator="forecast1"), r"cache settings \['estimator'\] were given"),
])
def test_cache_params_refuse_bad_estimator_settings_in_one_line(kwargs, message):
    with pytest.raises(CacheConfigError, match=message) as exc:
        CacheParams(**kwargs)
    assert "\n" not in str(exc.value)


def test_build_cache_installs_the_requested_estimator_for_any_strategy():
    for strategy in ("magcache", "teacache"):
        for name in STANDALONE:
            cache = build_cache(CacheParams(strategy=strategy, estimator=name), 10, "wan21_t2v_1.3b")
            assert cache.estimator.name == name and cache.stats.estimator == name
    blend = build_cache(CacheParams(strategy="teacache", estimator="blend", blend_alpha=0.8), 10, "wan21_t2v_1.3b")
    assert blend.estimator.alpha == 0.8
    with pytest.raises(CacheConfigError, match="means estimator 'scale'"):
        build_cache(CacheParams(strategy="magcache", estimator="reuse", options={"scale_residual": True}), 10,
                    "wan21_t2v_1.3b")


def test_stage_reads_the_scheduler_sigmas_once_per_request():
    from types import SimpleNamespace

    from sglang.multimodal_gen.runtime.stages.denoising import scheduler_sigmas

    with_sigmas = SimpleNamespace(sigmas=torch.tensor([1.0, 0.5, 0.25, 0.0]))  # UniPC / Euler: steps + 1 values
    assert scheduler_sigmas(with_sigmas, 3) == [1.0, 0.5, 0.25]
    assert scheduler_sigmas(SimpleNamespace(), 2) == [None, None]


# --------------------------------------------------------------------------- calibrated blend alpha
def _calibration_records(values: list[float]):
    cache = EveryOther(None, len(values), (COND,), calibrate=True)
    for step, v in enumerate(values):
        assert cache.should_compute(step, COND, StepFeatures(timestep=torch.tensor([1.0])))
        cache.store(step, COND, full(v))
    return dict(cache.calibration_records())


def test_calibration_fits_the_blend_alpha_by_least_squares():
    from sglang.multimodal_gen.runtime.cache.calibration import fit_blend_alpha

    linear = _calibration_records([0.0, 1.0, 2.0, 3.0])  # the forecast is exact: alpha 1
    assert linear[COND].blend_numerator == [0.0, 0.0, 6.0, 6.0] and linear[COND].blend_denominator == [0.0, 0.0, 6.0, 6.0]
    assert fit_blend_alpha([linear]) == 1.0
    # Changes 1, 1, then 0: sum <e, d> = 6 + 0, sum |d|^2 = 6 + 6 -> 0.5 (over prompts too).
    assert fit_blend_alpha([_calibration_records([0.0, 1.0, 2.0, 2.0])]) == 0.5
    assert fit_blend_alpha([linear, _calibration_records([0.0, 1.0, 2.0, 2.0])]) == 0.75
    assert fit_blend_alpha([_calibration_records([5.0, 5.0, 5.0])]) is None  # nothing changed


def test_a_calibration_alpha_reaches_blend_unless_the_user_set_one(tmp_path):
    from sglang.multimodal_gen.runtime.cache.calibration import CalibrationResult, apply_calibration

    result = CalibrationResult.from_records(
        [_calibration_records([0.0, 1.0, 2.0, 2.0])], model="m", model_family="wan", num_inference_steps=4,
        dtype="float32", device="cpu", seed=0, guidance_scale=5.0, size=[5, 32, 32],
    )
    assert result.blend_alpha == 0.5
    path = result.save(tmp_path / "c.json")
    assert CalibrationResult.load(path).blend_alpha == 0.5

    def alpha(**knobs):
        return apply_calibration(CacheParams(strategy="teacache", **knobs), path, "wan", 4).blend_alpha

    assert alpha(estimator="blend") == 0.5
    assert alpha(estimator="blend", blend_alpha=0.9) == 0.9
    assert alpha(estimator="forecast1") is None and alpha() is None
