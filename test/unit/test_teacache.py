"""TeaCache: decisions match the release algorithm, windows, presets, branch isolation."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.runtime.cache import (
    COND,
    UNCOND,
    CacheConfigError,
    StepFeatures,
    TeaCache,
    TeaCacheConfig,
    build_cache,
)
from sglang.multimodal_gen.runtime.cache.teacache import preset_table

STEPS = 50
WAN13 = preset_table()["wan21_t2v_1.3b"]


def wan_like_embeddings(steps: int = STEPS, seed: int = 0, shift: float = 5.0) -> tuple[torch.Tensor, torch.Tensor]:
    """A stand-in for Wan's ``e`` / ``e0`` along a flow-shifted schedule: functions of t only.

    Sinusoidal timestep features (Wan's ``sinusoidal_embedding_1d``, low-frequency part) through a
    fixed random projection; relative changes of 1-8% per step, growing towards the end, the
    range the published polynomials were fitted on.
    """
    sigmas = torch.linspace(1, 0, steps + 1)[:-1]
    t = shift * sigmas / (1 + (shift - 1) * sigmas) * 1000
    freqs = torch.pow(10000, -torch.arange(128, dtype=torch.float64) / 128)[80:]
    x = t.double()[:, None] * freqs[None]
    feats = torch.cat([torch.cos(x), torch.sin(x)], 1).float()
    g = torch.Generator().manual_seed(seed)
    e = torch.nn.functional.silu(feats @ torch.randn(feats.shape[1], 64, generator=g) / feats.shape[1] ** 0.5
                                 + torch.randn(64, generator=g) * 0.5)
    e0 = torch.nn.functional.silu(e) @ torch.randn(64, 6 * 64, generator=g) / 8
    return e[:, None], e0.view(steps, 1, 6, 64)


E, E0 = wan_like_embeddings()


def features(step: int, e: torch.Tensor = E, e0: torch.Tensor = E0) -> StepFeatures:
    return StepFeatures(timestep=torch.tensor([float(step)]), modulated_input=e[step], timestep_projection=e0[step])


def release_teacache(seqs, steps, thresh, coefficients, ret_steps, cutoff_steps):
    """The release ``teacache_forward`` (TeaCache4Wan2.1), reduced to its decisions.

    ``seqs[b][i]`` is branch b's indicator at step i; one counter over interleaved calls.
    """
    acc, prev, plans = [0.0, 0.0], [None, None], [[], []]
    rescale = np.poly1d(coefficients)
    for cnt in range(2 * steps):
        b = cnt % 2
        inp = seqs[b][cnt // 2]
        if cnt < ret_steps or cnt >= cutoff_steps:
            calc = True
            acc[b] = 0
        else:
            acc[b] += rescale(((inp - prev[b]).abs().mean() / prev[b].abs().mean()).cpu().item())
            calc = not acc[b] < thresh
            if calc:
                acc[b] = 0
        prev[b] = inp.clone()
        plans[b].append(calc)
    return {COND: plans[0], UNCOND: plans[1]}


def run(cache: TeaCache, feats_by_branch, latents: torch.Tensor | None = None) -> dict[str, list[bool]]:
    """Drive ``cache`` like the denoising stage; residuals come from ``latents``."""
    latents = torch.zeros(1, 4, 8) if latents is None else latents
    decisions: dict[str, list[bool]] = {b: [] for b in cache.branches}
    for step in range(cache.num_inference_steps):
        for branch in cache.branches:
            compute = cache.should_compute(step, branch, feats_by_branch[branch](step))
            if compute:
                cache.store(step, branch, latents * (step + 1))
            else:
                cache.reuse(step, branch)
            decisions[branch].append(compute)
    return decisions


def teacache(indicator="modulated_input", threshold=None, level="default", steps=STEPS, branches=(COND, UNCOND)):
    options = {"indicator": indicator}
    return build_cache(CacheParams("teacache", threshold=threshold, preset=level, options=options),
                       steps, "wan21_t2v_1.3b", branches)


UNCOND_E, UNCOND_E0 = wan_like_embeddings(seed=1)
BRANCH_FEATURES = {COND: features, UNCOND: lambda i: features(i, UNCOND_E, UNCOND_E0)}


@pytest.mark.parametrize("threshold", [0.05, 0.08, 0.2])
def test_default_mode_matches_release_code(threshold):
    cache = teacache(threshold=threshold)
    expected = release_teacache([E, UNCOND_E], STEPS, threshold, WAN13["modulated_input"]["coefficients"],
                                ret_steps=1 * 2, cutoff_steps=STEPS * 2 - 2)
    assert run(cache, BRANCH_FEATURES) == expected
    assert not all(expected[COND])


@pytest.mark.parametrize("threshold", [0.05, 0.1, 0.2])
def test_ret_steps_mode_matches_release_code(threshold):
    cache = teacache("timestep_projection", threshold)
    expected = release_teacache([E0, UNCOND_E0], STEPS, threshold, WAN13["timestep_projection"]["coefficients"],
                                ret_steps=5 * 2, cutoff_steps=STEPS * 2)
    assert run(cache, BRANCH_FEATURES) == expected
    assert not all(expected[COND])


@pytest.mark.parametrize("indicator", ["modulated_input", "timestep_projection"])
def test_decisions_depend_only_on_the_schedule(indicator):
    feats = {COND: features, UNCOND: features}
    first = run(teacache(indicator, level="fast"), feats, torch.randn(1, 4, 8))
    second = run(teacache(indicator, level="fast"), feats, 100 * torch.randn(1, 4, 8))
    assert first == second
    assert first[COND] == first[UNCOND]


@pytest.mark.parametrize("indicator", ["modulated_input", "timestep_projection"])
def test_higher_threshold_never_skips_fewer(indicator):
    computed = []
    for threshold in np.linspace(0.0, 0.5, 26):
        decisions = run(teacache(indicator, float(threshold), branches=(COND,)), {COND: features})
        computed.append(sum(decisions[COND]))
    assert computed == sorted(computed, reverse=True)
    assert computed[0] == STEPS and computed[-1] < STEPS // 2


def test_warmup_and_end_windows():
    default = run(teacache(threshold=1e9, branches=(COND,)), {COND: features})[COND]
    assert [i for i, c in enumerate(default) if c] == [0, STEPS - 1]
    ret = run(teacache("timestep_projection", 1e9, branches=(COND,)), {COND: features})[COND]
    assert [i for i, c in enumerate(ret) if c] == [0, 1, 2, 3, 4]
    short = run(teacache(threshold=1e9, steps=8, branches=(COND,)), {COND: features})[COND]
    assert short == [True] + [False] * 6 + [True]


def test_branch_isolation_and_reset():
    alone = run(teacache(level="fast", branches=(COND,)), {COND: features})[COND]
    noisy = {COND: features, UNCOND: lambda i: features(i, torch.randn(STEPS, 1, 64), torch.randn(STEPS, 1, 6, 64))}
    cache = teacache(level="fast")
    first = run(cache, noisy)
    assert first[COND] == alone
    assert first[UNCOND] != alone
    cache.reset()
    assert cache.stats.total_computed == 0
    assert run(cache, noisy)[COND] == alone
    assert cache.stats.branches[COND].num_computed == sum(alone)
    assert cache.plan() is None


def test_calibration_never_skips_and_records():
    cache = TeaCache(TeaCacheConfig(), 20, (COND, UNCOND), calibrate=True)
    decisions = run(cache, BRANCH_FEATURES)
    assert all(all(d) for d in decisions.values())
    for record in cache.calibration_records().values():
        assert len(record.input_change) == len(record.output_change) == 20
        assert record.input_change[0] == 0.0 and record.input_change[1] > 0


def test_missing_indicator_is_reported():
    cache = teacache("timestep_projection")
    with pytest.raises(CacheConfigError, match="timestep_projection"):
        cache.should_compute(0, COND, StepFeatures(timestep=torch.tensor([1.0]), modulated_input=E[0]))


def test_presets():
    for key in ("wan21_t2v_1.3b", "wan21_t2v_14b", "wan21_i2v_14b_480p", "wan21_i2v_14b_720p"):
        for indicator, (warmup, end) in (("modulated_input", (1, 1)), ("timestep_projection", (5, 0))):
            cfg = build_cache(CacheParams("teacache", options={"indicator": indicator}), 50, key).config
            assert (cfg.indicator, cfg.warmup_steps, cfg.end_steps) == (indicator, warmup, end)
            assert len(cfg.coefficients) == 5
    slow = build_cache(CacheParams("teacache", preset="slow"), 50, "wan21_t2v_1.3b").config
    fast = build_cache(CacheParams("teacache", preset="fast"), 50, "wan21_t2v_1.3b").config
    assert (slow.threshold, fast.threshold) == (0.05, 0.08)
    assert build_cache(CacheParams("teacache"), 50, "wan21_t2v_1.3b").config.threshold == 0.05
    hunyuan = build_cache(CacheParams("teacache", preset="fast"), 50, "hunyuan_720p", branches=(COND,)).config
    assert hunyuan.coefficients[0] == 733.226126 and hunyuan.threshold == 0.15
    assert (hunyuan.warmup_steps, hunyuan.end_steps) == (1, 1)
    with pytest.raises(CacheConfigError, match="indicator 'timestep_projection'"):
        build_cache(CacheParams("teacache", options={"indicator": "timestep_projection"}), 50, "hunyuan")
    override = build_cache(CacheParams("teacache", threshold=0.3, options={"end_steps": 0}), 50, "wan21_t2v_14b")
    assert (override.config.threshold, override.config.end_steps) == (0.3, 0)


def test_unknown_model_needs_coefficients():
    with pytest.raises(CacheConfigError, match="wan21_t2v_1.3b"):
        build_cache(CacheParams("teacache"), 20, "tiny-wan")
    cache = build_cache(CacheParams("teacache", options={"coefficients": [1.0, 0.0]}), 20, "tiny-wan")
    assert cache.config.coefficients == [1.0, 0.0]
    with pytest.raises(CacheConfigError, match="threshold"):
        build_cache(CacheParams("teacache", preset="fast", options={"coefficients": [1.0, 0.0]}), 20, "tiny-wan")
    assert build_cache(CacheParams("teacache"), 20, "tiny-wan", calibrate=True).calibrate


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"threshold": -1.0}, "threshold"),
        ({"indicator": "latents"}, "indicator"),
        ({"warmup_steps": -1}, "warmup_steps"),
        ({"end_steps": 0.5}, "end_steps"),
        ({"coefficients": []}, "coefficients"),
        ({"coefficients": "1,2"}, "coefficients"),
    ],
)
def test_invalid_config(kwargs, match):
    with pytest.raises(CacheConfigError, match=match):
        TeaCacheConfig(**kwargs)


# --------------------------------------------------------------------------- a run that skips nothing says why
def growing(factor: float):
    """Indicators whose relative L1 change is exactly ``factor - 1`` at every step (exact in binary)."""
    return lambda step: StepFeatures(timestep=torch.tensor([float(step)]), modulated_input=torch.full((1, 4), factor**step))


def identity_teacache(threshold: float, steps: int = 8, **options) -> TeaCache:
    return TeaCache(TeaCacheConfig(coefficients=[1.0, 0.0], threshold=threshold, **options), steps, (COND,))


def test_no_skip_reason_names_the_smallest_change_and_the_threshold_to_reach():
    at_edge = identity_teacache(0.25)  # every step changes by exactly 0.25; skipping needs < threshold
    assert at_edge.no_skip_reason() is None  # not known before the run
    assert all(run(at_edge, {COND: growing(1.25)})[COND])
    assert at_edge.no_skip_reason() == (
        "teacache skipped no step at 8 steps: the smallest rescaled change of a step was 0.25, not below the "
        "threshold 0.25; raise --cache-threshold to 0.26 or more"
    )
    above = identity_teacache(0.26)
    assert not all(run(above, {COND: growing(1.25)})[COND])
    assert above.no_skip_reason() is None
    at_edge.reset()
    assert at_edge.no_skip_reason() is None


def test_no_skip_reason_when_the_windows_cover_every_step():
    cache = identity_teacache(10.0, steps=4, warmup_steps=2, end_steps=2)
    run(cache, {COND: growing(1.25)})
    assert cache.no_skip_reason() == (
        "teacache skipped no step at 4 steps: warmup_steps (2) and end_steps (2) cover every step; "
        "lower them in --cache-params, or use more steps"
    )


def test_no_skip_reason_is_none_in_calibration_mode():
    cache = TeaCache(TeaCacheConfig(), 8, (COND,), calibrate=True)
    run(cache, {COND: growing(1.25)})
    assert cache.no_skip_reason() is None


# --------------------------------------------------------------------------- other step counts than the calibration's
def test_presets_record_their_calibration_step_count_and_own_coefficients_do_not():
    assert teacache().config.calibration_steps == 50
    assert teacache(level="fast", steps=20).config.calibration_steps == 50
    # Wan2.1's image-to-video presets were tuned at the release's I2V default, 40 steps.
    i2v = build_cache(CacheParams("teacache"), 40, "wan21_i2v_14b_480p")
    assert i2v.config.calibration_steps == 40 and i2v.step_ratio == 1.0
    own = build_cache(CacheParams("teacache", options={"coefficients": [1.0, 0.0]}), 20, "wan21_t2v_1.3b")
    assert own.config.calibration_steps is None and own.threshold == own.config.threshold
    stated = build_cache(CacheParams("teacache", options={"coefficients": [1.0, 0.0], "calibration_steps": 40}),
                         20, "wan21_t2v_1.3b")
    assert stated.config.calibration_steps == 40 and stated.step_ratio == 2.0


@pytest.mark.parametrize("level, threshold", [("slow", 0.05), ("fast", 0.08)])
def test_at_the_calibration_step_count_the_threshold_is_the_preset_bit_for_bit(level, threshold):
    cache = teacache(level=level)
    assert cache.step_ratio == 1.0 and cache.threshold == threshold
    expected = release_teacache([E, UNCOND_E], STEPS, threshold, WAN13["modulated_input"]["coefficients"],
                                ret_steps=1 * 2, cutoff_steps=STEPS * 2 - 2)
    assert run(cache, BRANCH_FEATURES) == expected


def test_a_calibration_at_another_step_count_is_used_as_is_at_that_count():
    steps = 20
    e, uncond_e = wan_like_embeddings(steps)[0], wan_like_embeddings(steps, seed=1)[0]
    coefficients = WAN13["modulated_input"]["coefficients"]
    cache = build_cache(CacheParams("teacache", threshold=0.2, options={"coefficients": coefficients,
                                                                         "calibration_steps": steps}),
                        steps, "wan21_t2v_1.3b")
    feats = {COND: lambda i: features(i, e), UNCOND: lambda i: features(i, uncond_e)}
    expected = release_teacache([e, uncond_e], steps, 0.2, coefficients, ret_steps=2, cutoff_steps=2 * steps - 2)
    assert run(cache, feats) == expected and not all(expected[COND])


def scaled_teacache(threshold: float, steps: int, calibration_steps: int) -> TeaCache:
    config = TeaCacheConfig(coefficients=[1.0, 0.0], threshold=threshold, warmup_steps=1, end_steps=0,
                            calibration_steps=calibration_steps)
    return TeaCache(config, steps, (COND,))


@pytest.mark.parametrize("threshold, calibration_steps", [(0.25, 16), (1.0, 4)])
def test_the_threshold_scales_by_calibration_over_request_steps(threshold, calibration_steps):
    # Every step changes by exactly 0.25; the budget is threshold * calibration_steps / 8 = 0.5, so a
    # step skips at 0.25 accumulated and computes at 0.5 (not below it): fewer steps than calibrated
    # get a larger budget, more steps a smaller one.
    cache = scaled_teacache(threshold, 8, calibration_steps)
    assert cache.threshold == 0.5
    assert run(cache, {COND: growing(1.25)})[COND] == [True, False, True, False, True, False, True, False]


def test_scaled_threshold_exact_edge_and_the_no_skip_message():
    at_edge = scaled_teacache(0.125, 8, 16)  # budget 0.25: a change of 0.25 is not below it
    assert all(run(at_edge, {COND: growing(1.25)})[COND])
    assert at_edge.no_skip_reason() == (
        "teacache skipped no step at 8 steps: the smallest rescaled change of a step was 0.25, not below the "
        "threshold 0.25 (0.125 scaled by 16/8 calibration/request steps); raise --cache-threshold to 0.13 or more"
    )
    suggested = scaled_teacache(0.13, 8, 16)
    assert not all(run(suggested, {COND: growing(1.25)})[COND])
    assert suggested.no_skip_reason() is None


def test_calibration_file_supplies_its_step_count():
    class Calibration:
        teacache_coefficients = [1.0, 0.0]
        num_inference_steps = 30
        branches: dict = {}

    options = TeaCache.options_from_calibration(Calibration())
    assert options["calibration_steps"] == 30 and options["coefficients"] == [1.0, 0.0]
    cache = build_cache(CacheParams("teacache", options=options), 20, "wan21_t2v_1.3b")
    assert cache.step_ratio == 1.5 and cache.threshold == pytest.approx(0.05 * 1.5)


@pytest.mark.parametrize("value", [0, -50, 2.5, "50", True])
def test_invalid_calibration_steps(value):
    with pytest.raises(CacheConfigError, match="calibration_steps"):
        TeaCacheConfig(calibration_steps=value)
