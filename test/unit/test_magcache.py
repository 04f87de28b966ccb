"""MagCache: the plan matches the published release algorithm, resampling, presets, residual reuse."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.runtime.cache import (
    COND,
    UNCOND,
    CacheConfigError,
    MagCache,
    MagCacheConfig,
    StepFeatures,
    build_cache,
)
from sglang.multimodal_gen.runtime.cache.magcache import nearest_interp, preset_ratio_table

DATA = Path(__file__).resolve().parents[2] / "python/sglang/multimodal_gen/configs/data"
PUBLISHED = DATA / "published_cache_params.json"
WAN13 = json.loads(PUBLISHED.read_text())["magcache"]["wan21_t2v_1.3b"]
FEATURES = StepFeatures(timestep=torch.tensor([500.0]))


def release_magcache(interleaved, sample_steps, thresh, K, retention_ratio, sqrt=False):
    """The release ``magcache_forward`` (MagCache4Wan2.1), reduced to its decisions.

    One counter over the interleaved cond/uncond calls, per-branch accumulators in slots cnt % 2.
    """
    mag_ratios = np.array(interleaved) ** (0.5 if sqrt else 1.0)
    num_steps = sample_steps * 2
    acc_ratio, acc_err, acc_steps = [1.0, 1.0], [0.0, 0.0], [0, 0]
    plans: list[list[bool]] = [[], []]
    for cnt in range(num_steps):
        b = cnt % 2
        skip = False
        if cnt >= int(num_steps * retention_ratio):
            acc_ratio[b] = acc_ratio[b] * mag_ratios[cnt]
            acc_steps[b] += 1
            acc_err[b] += np.abs(1 - acc_ratio[b])
            if acc_err[b] < thresh and acc_steps[b] <= K:
                skip = True
            else:
                acc_err[b], acc_steps[b], acc_ratio[b] = 0, 0, 1.0
        plans[b].append(not skip)
    return {COND: plans[0], UNCOND: plans[1]}


def magcache(num_steps=50, branches=(COND, UNCOND), calibrate=False, **kwargs) -> MagCache:
    kwargs.setdefault("mag_ratios", {COND: WAN13[0::2], UNCOND: WAN13[1::2]})
    return MagCache(MagCacheConfig(**kwargs), num_steps, branches, calibrate)


@pytest.mark.parametrize("sqrt", [False, True])
@pytest.mark.parametrize("thresh,K", [(0.06, 2), (0.12, 2), (0.12, 4), (0.24, 6)])
def test_plan_matches_release_code(thresh, K, sqrt):
    expected = release_magcache(WAN13, 50, thresh, K, 0.2, sqrt)
    cache = magcache(threshold=thresh, max_skip_steps=K, retention_ratio=0.2, sqrt_ratios=sqrt)
    assert cache.plan() == expected
    assert any(not c for c in expected[COND])  # the comparison is not vacuous


def test_plan_is_what_the_loop_does():
    cache = magcache(threshold=0.12, max_skip_steps=4)
    plan = cache.plan()
    residual = {COND: torch.ones(1, 4, 8), UNCOND: -torch.ones(1, 4, 8)}
    for step in range(50):
        for branch in (COND, UNCOND):
            if cache.should_compute(step, branch, FEATURES):
                cache.store(step, branch, residual[branch] * (step + 1))
            else:
                assert not plan[branch][step]
    for branch in (COND, UNCOND):
        assert cache.stats.branches[branch].computed_steps == [i for i, c in enumerate(plan[branch]) if c]


@pytest.mark.parametrize("steps", [20, 30, 50, 100])
def test_resampled_to_request_steps(steps):
    cache = magcache(num_steps=steps)
    retention = int(0.2 * steps + 0.5)
    assert cache.retention_steps == retention
    for branch, plan in cache.plan().items():
        assert len(plan) == steps
        assert all(plan[:retention])
        assert not all(plan)
        assert len(cache._ratios[branch]) == steps


def test_nearest_interp_matches_release_and_diffusers():
    diffusers_interp = pytest.importorskip("diffusers.hooks.mag_cache").nearest_interp
    src = np.array(WAN13[0::2])
    for n in (1, 7, 20, 30, 49, 50, 51, 100):
        ours = nearest_interp(src, n)
        theirs = diffusers_interp(torch.tensor(src), n).numpy()
        np.testing.assert_array_equal(ours, theirs)
    np.testing.assert_array_equal(nearest_interp(src, 50), src)


@pytest.mark.parametrize("key", ["wan21_t2v_1.3b", "wan21_t2v_14b", "wan21_i2v_14b_480p", "hunyuan_720p"])
@pytest.mark.parametrize("K", [2, 4, 6])
def test_higher_threshold_never_skips_fewer(key, K):
    ratios = preset_ratio_table()[key]
    branches = tuple(ratios)
    for steps in (30, 50):
        computed = []
        for thresh in np.linspace(0.0, 0.6, 31):
            cache = MagCache(MagCacheConfig(ratios, threshold=float(thresh), max_skip_steps=K), steps, branches)
            computed.append(sum(sum(p) for p in cache.plan().values()))
        assert computed == sorted(computed, reverse=True)
        assert computed[0] == steps * len(branches)  # threshold 0 never skips


def test_k_zero_and_full_retention_never_skip():
    assert all(all(p) for p in magcache(max_skip_steps=0, threshold=10.0).plan().values())
    assert all(all(p) for p in magcache(retention_ratio=1.0, threshold=10.0).plan().values())


def test_zero_retention_still_computes_first_step():
    plan = magcache(retention_ratio=0.0, threshold=10.0, max_skip_steps=3).plan()
    assert plan[COND][:5] == [True, False, False, False, True]


def test_end_steps_computes_the_last_steps():
    plan = magcache(threshold=10.0, max_skip_steps=50, end_steps=3).plan()
    assert plan[COND][-3:] == [True] * 3 and not plan[COND][-4]
    assert magcache(threshold=10.0, max_skip_steps=50).plan()[COND][-1] is False  # release: no cutoff


def test_scale_residual_uses_accumulated_ratio():
    ratios = {COND: [1.0, 0.5, 0.5, 0.5, 0.5]}
    cache = MagCache(MagCacheConfig(ratios, threshold=100.0, max_skip_steps=3, retention_ratio=0.0,
                                    scale_residual=True), 5, (COND,))
    assert cache.plan()[COND] == [True, False, False, False, True]
    base = torch.full((1, 2, 3), 4.0)
    got = []
    for step in range(5):
        if cache.should_compute(step, COND, FEATURES):
            cache.store(step, COND, base)
        else:
            got.append(cache.reuse(step, COND)[0, 0, 0].item())
    assert got == [2.0, 1.0, 0.5]
    rooted = MagCache(MagCacheConfig(ratios, threshold=100.0, max_skip_steps=3, retention_ratio=0.0,
                                     scale_residual=True, sqrt_ratios=True), 5, (COND,))
    assert rooted._scale[COND] == [1.0, 0.5, 0.25, 0.125, 1.0]  # the root smooths decisions, not the scale
    unscaled = MagCache(MagCacheConfig(ratios, threshold=100.0, max_skip_steps=3, retention_ratio=0.0), 5, (COND,))
    unscaled.should_compute(0, COND, FEATURES)
    unscaled.store(0, COND, base)
    unscaled.should_compute(1, COND, FEATURES)
    assert unscaled.reuse(1, COND) is base


def test_branches_are_isolated():
    alone = magcache(mag_ratios={COND: WAN13[0::2]}, branches=(COND,)).plan()[COND]
    flat_uncond = {COND: WAN13[0::2], UNCOND: [1.0] * 50}
    assert magcache(mag_ratios=flat_uncond).plan()[COND] == alone
    cache = magcache()
    residuals = {COND: torch.ones(2, 3), UNCOND: torch.full((2, 3), 7.0)}
    last: dict[str, int] = {}
    for step in range(50):
        for branch in (UNCOND, COND):
            if cache.should_compute(step, branch, FEATURES):
                cache.store(step, branch, residuals[branch] * step)
                last[branch] = step
            else:
                assert torch.equal(cache.reuse(step, branch), residuals[branch] * last[branch])


def test_reset_and_calibration():
    cache = magcache()
    for step in range(3):
        cache.should_compute(step, COND, FEATURES)
        cache.store(step, COND, torch.ones(1, 2, 4))
    plan = cache.plan()
    cache.reset()
    assert cache.plan() == plan and cache.stats.total_computed == 0
    calib = magcache(calibrate=True, num_steps=20)
    assert all(all(p) for p in calib.plan().values())
    for step in range(20):
        for branch in (COND, UNCOND):
            assert calib.should_compute(step, branch, FEATURES)
            calib.store(step, branch, torch.randn(1, 4, 8))
    for record in calib.calibration_records().values():
        assert len(record.mag_ratio) == len(record.cosine_distance) == 20
        assert record.mag_ratio[0] == 1.0


def test_calibration_needs_no_ratios():
    cache = MagCache(MagCacheConfig(), 10, (COND, UNCOND), calibrate=True)
    assert cache.plan() == {COND: [True] * 10, UNCOND: [True] * 10}


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": -0.1}, "threshold"),
        ({"threshold": float("nan")}, "threshold"),
        ({"max_skip_steps": -1}, "max_skip_steps"),
        ({"max_skip_steps": 1.5}, "max_skip_steps"),
        ({"retention_ratio": 1.2}, "retention_ratio"),
        ({"end_steps": -2}, "end_steps"),
        ({"sqrt_ratios": "yes"}, "sqrt_ratios"),
        ({"mag_ratios": {COND: [1.0]}}, "at least 2"),
        ({"mag_ratios": {COND: []}}, "at least 2"),
        ({"mag_ratios": {COND: [1.0, -0.5]}}, "positive"),
        ({"mag_ratios": [1.0, 0.9]}, "branch"),
    ],
)
def test_invalid_config(kwargs, match):
    with pytest.raises(CacheConfigError, match=match):
        MagCacheConfig(**kwargs)


def test_missing_branch_ratios_refused():
    with pytest.raises(CacheConfigError, match=r"uncond.*mag_ratios"):
        magcache(mag_ratios={COND: WAN13[0::2]})


def test_presets_and_levels():
    cache = build_cache(CacheParams("magcache"), 50, "wan21_t2v_1.3b")
    assert (cache.config.threshold, cache.config.max_skip_steps, cache.config.retention_ratio) == (0.12, 2, 0.2)
    assert cache.plan() == release_magcache(WAN13, 50, 0.12, 2, 0.2)
    fast = build_cache(CacheParams("magcache", preset="fast"), 50, "wan21_t2v_1.3b").config
    assert (fast.threshold, fast.max_skip_steps) == (0.12, 4)
    for key in ("wan21_t2v_14b", "wan21_i2v_14b_480p", "wan21_i2v_14b_720p"):
        fast = build_cache(CacheParams("magcache", preset="fast"), 40, key).config
        assert (fast.threshold, fast.max_skip_steps, fast.retention_ratio) == (0.24, 6, 0.2)
    params = CacheParams("magcache", preset="fast", threshold=0.06, max_skip_steps=1)
    explicit = build_cache(params, 50, "wan21_t2v_14b")
    assert (explicit.config.threshold, explicit.config.max_skip_steps) == (0.06, 1)
    hunyuan = build_cache(CacheParams("magcache", options={"sqrt_ratios": True}), 50, "hunyuan", branches=(COND,))
    assert hunyuan.config.sqrt_ratios and list(hunyuan.plan()) == [COND]
    with pytest.raises(CacheConfigError, match="uncond"):
        build_cache(CacheParams("magcache"), 50, "hunyuan_544p")


def test_wan_presets_deinterleave():
    table = preset_ratio_table()
    assert table["wan21_t2v_1.3b"][COND][:2] == [1.0, 1.0124]
    assert table["wan21_t2v_1.3b"][UNCOND][:2] == [1.0, 1.02213]
    assert len(table["wan21_i2v_14b_720p"][COND]) == 40
    assert list(table["hunyuan_544p"]) == [COND] and len(table["hunyuan_544p"][COND]) == 50


def test_unknown_model_needs_ratios():
    with pytest.raises(CacheConfigError, match="wan21_t2v_1.3b"):
        build_cache(CacheParams("magcache"), 20, "tiny-wan")
    ratios = {COND: [1.0, 0.99, 0.98], UNCOND: [1.0, 0.99, 0.97]}
    cache = build_cache(CacheParams("magcache", options={"mag_ratios": ratios}, preset="fast"), 12, "tiny-wan")
    assert cache.config.threshold == 0.24 and len(cache.plan()[COND]) == 12
    assert build_cache(CacheParams("magcache"), 12, "tiny-wan", calibrate=True).calibrate


@pytest.mark.parametrize("thresh, K", [(0.06, 2), (0.12, 2), (0.12, 4), (0.24, 6)])
def test_unsynced_branches_are_exactly_the_release_per_branch_plans(thresh, K):
    cache = magcache(threshold=thresh, max_skip_steps=K, retention_ratio=0.2, sync_branches=False)
    assert cache.plan() == release_magcache(WAN13, 50, thresh, K, 0.2)


def test_synced_branches_share_one_plan_where_calibrated_curves_diverge():
    # Two curves whose own plans drift apart: uncond falls a little faster mid-way.
    cond = [1.0] + [0.99] * 49
    uncond = [1.0] + [0.99] * 20 + [0.975] * 29
    ratios = {COND: cond, UNCOND: uncond}
    apart = magcache(threshold=0.06, max_skip_steps=3, mag_ratios=ratios, sync_branches=False).plan()
    assert apart[COND] != apart[UNCOND]
    together = magcache(threshold=0.06, max_skip_steps=3, mag_ratios=ratios).plan()
    assert together[COND] == together[UNCOND]
    assert 0 < together[COND].count(False) <= min(apart[COND].count(False), apart[UNCOND].count(False))
    # One branch, or identical curves: syncing changes nothing.
    single = magcache(threshold=0.06, max_skip_steps=3, mag_ratios={COND: cond}, branches=(COND,)).plan()
    same = magcache(threshold=0.06, max_skip_steps=3, mag_ratios={COND: cond, UNCOND: cond}).plan()
    assert same[COND] == same[UNCOND] == single[COND] == apart[COND]


# --------------------------------------------------------------------------- a plan that skips nothing says why
# Ratios chosen so |1 - ratio| is exact in binary: after retention the smallest error of a step is 0.25.
EXACT_RATIOS = {COND: [1.0, 0.875, 0.5, 0.75, 0.5, 0.5, 0.5, 0.5], UNCOND: [1.0, 0.875, 0.5, 1.25, 0.5, 0.5, 0.5, 0.5]}


def exact(threshold: float, **kwargs) -> MagCache:
    kwargs = {"mag_ratios": EXACT_RATIOS, "max_skip_steps": 2, "retention_ratio": 0.25, **kwargs}
    return magcache(num_steps=8, threshold=threshold, **kwargs)


def skips(cache: MagCache) -> int:
    return sum(not c for p in cache.plan().values() for c in p)


def test_no_skip_reason_names_the_threshold_to_reach_exactly():
    at_edge = exact(0.25)  # skipping needs error < threshold: 0.25 is not enough
    assert skips(at_edge) == 0
    reason = at_edge.no_skip_reason()
    assert reason.startswith("magcache skips no step at 8 steps: ")
    assert "reaches the threshold 0.25 at every step after the 2 steps of retention (smallest 0.25)" in reason
    assert "raise --cache-threshold to 0.26 or more" in reason
    assert skips(exact(float(np.nextafter(0.25, 1.0)))) > 0
    suggested = exact(0.26)
    assert skips(suggested) > 0 and suggested.no_skip_reason() is None


def test_no_skip_reason_follows_how_branches_are_planned():
    # Synced, step 3 needs both branches under the threshold (max 0.25); planned alone, cond's 0.25 and
    # uncond's 0.25 at step 3 agree, so use step 2's 0.5 / 0.5 and retention that starts at step 2.
    synced = exact(0.25, mag_ratios={COND: [1.0, 1.0, 0.9375, 0.5], UNCOND: [1.0, 1.0, 0.5, 0.5]},
                   retention_ratio=0.5, end_steps=0)
    assert "(smallest 0.5); raise --cache-threshold to 0.51 or more" in synced.no_skip_reason()
    alone = exact(0.0625, mag_ratios={COND: [1.0, 1.0, 0.9375, 0.5], UNCOND: [1.0, 1.0, 0.5, 0.5]},
                  retention_ratio=0.5, sync_branches=False)
    assert "(smallest 0.0625); raise --cache-threshold to 0.063 or more" in alone.no_skip_reason()


def test_no_skip_reason_suggests_lower_retention_only_when_a_retained_step_would_skip():
    # Retained step 1 has error 0.125: it would skip under any threshold above that, and only then.
    assert exact(0.2).no_skip_reason().endswith(
        "raise --cache-threshold to 0.26 or more, or lower --cache-retention-ratio (now 0.25)"
    )
    assert exact(0.125).no_skip_reason().endswith("raise --cache-threshold to 0.26 or more")
    assert skips(exact(0.125, retention_ratio=0.0)) == 0
    assert skips(exact(0.2, retention_ratio=0.0)) > 0


def test_no_skip_reason_when_no_step_is_eligible_or_k_is_zero():
    covered = exact(10.0, retention_ratio=1.0).no_skip_reason()
    assert covered == ("magcache skips no step at 8 steps: 8 steps of retention cover every step; "
                       "lower --cache-retention-ratio (now 1), or use more steps")
    with_end = exact(10.0, retention_ratio=0.5, end_steps=4).no_skip_reason()
    assert "4 steps of retention and 4 steps of end_steps cover every step" in with_end
    assert "or end_steps" in with_end
    single = magcache(num_steps=1, threshold=10.0, retention_ratio=0.0).no_skip_reason()
    assert "the first step cover every step" in single
    k_zero = exact(10.0, max_skip_steps=0).no_skip_reason()
    assert "max_skip_steps (K) is 0" in k_zero and "raise --cache-max-skip-steps" in k_zero


def test_no_skip_reason_is_none_when_skipping_or_calibrating():
    assert magcache(threshold=0.12).no_skip_reason() is None
    assert magcache(calibrate=True, threshold=0.12).no_skip_reason() is None
