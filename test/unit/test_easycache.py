"""EasyCache: decisions and outputs match the release rule on recorded inputs, warm-up, the reset,
the exact threshold edge, per-model defaults, and the per-pair / whole-model contract."""

from __future__ import annotations

import pytest
import torch

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.runtime.cache import (
    COND,
    UNCOND,
    CacheConfigError,
    EasyCache,
    EasyCacheConfig,
    StepFeatures,
    build_cache,
)

STEPS = 50


def recorded_run(steps: int = STEPS, branches: int = 2, seed: int = 0) -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Latents ``x[t]`` and per-branch model outputs ``y[b][t]`` of a flow-matching-like run.

    ``x`` follows a shifted schedule from noise towards a sample; each branch's output is a velocity
    whose predicted sample drifts from one estimate to another with noise that fades, so the
    output changes fast early, slowly in the middle and faster again near the end.
    """
    g = torch.Generator().manual_seed(seed)
    shape = (1, 4, 3, 6, 6)
    noise, sample = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
    s = torch.linspace(1, 0, steps + 1)[:-1]
    sigmas = 3 * s / (1 + 2 * s)
    xs = [(1 - sig) * sample + sig * noise for sig in sigmas]
    outputs = []
    for _ in range(branches):
        early, late = torch.randn(shape, generator=g), torch.randn(shape, generator=g)
        wiggle = [torch.randn(shape, generator=g) for _ in range(steps)]
        ys = []
        for t, sig in enumerate(sigmas):
            guess = sample + sig * (0.6 * early + 0.2 * late) + 0.02 * sig * wiggle[t] + 0.01 * (1 - sig) ** 4 * wiggle[t]
            ys.append(noise - guess)
        outputs.append(ys)
    return xs, outputs


XS, YS = recorded_run()


def release_easycache(xs, ys, steps, thresh, ret_steps, cutoff_steps, branches=2):
    """The release ``easycache_forward`` (EasyCache4Wan2.1) on recorded inputs, one counter over the
    interleaved cond/uncond calls; returns each call's decision and the output it returns.

    ``ret_steps`` and ``cutoff_steps`` are in calls, as the release sets them (``10 * 2`` and
    ``steps * 2 - 2`` for Wan; HunyuanVideo, one call per step: ``5`` and ``steps - 1``).
    """
    state = dict(k=None, acc=0, prev_in=None, prev_out=None, prev_prev_in=None, cache={}, calc=True)
    decisions, returned = [[] for _ in range(branches)], [[] for _ in range(branches)]
    for cnt in range(steps * branches):
        b, step = cnt % branches, cnt // branches
        raw_input = xs[step]
        if b == 0:
            if cnt < ret_steps or cnt >= cutoff_steps:
                state["calc"], state["acc"] = True, 0
            elif state["prev_in"] is not None and state["prev_out"] is not None:
                raw_input_change = (raw_input - state["prev_in"]).abs().mean()
                if state["k"] is not None:
                    output_norm = state["prev_out"].abs().mean()
                    state["acc"] += state["k"] * (raw_input_change / output_norm)
                    if state["acc"] < thresh:
                        state["calc"] = False
                    else:
                        state["calc"], state["acc"] = True, 0
                else:
                    state["calc"] = True
            else:
                state["calc"] = True
            state["prev_in"] = raw_input.clone()
        decisions[b].append(state["calc"])
        if not state["calc"]:
            returned[b].append(raw_input + state["cache"][b])
            continue
        output = ys[b][step]
        if b == 0:
            if state["prev_out"] is not None and state["prev_prev_in"] is not None:
                state["k"] = (output - state["prev_out"]).abs().mean() / (state["prev_in"] - state["prev_prev_in"]).abs().mean()
            state["prev_prev_in"] = state["prev_in"]
            state["prev_out"] = output.clone()
        state["cache"][b] = output - raw_input
        returned[b].append(output)
    return decisions, returned


def drive(cache, xs, ys):
    """Drive ``cache`` as the denoising stage does for a whole-model strategy, on recorded inputs."""
    decisions = {b: [] for b in cache.branches}
    returned = {b: [] for b in cache.branches}
    for step in range(cache.num_inference_steps):
        for i, branch in enumerate(cache.branches):
            x = xs[step]
            compute = cache.should_compute(step, branch, StepFeatures(timestep=torch.tensor([1.0]), latents=x))
            if compute:
                y = ys[i][step]
                cache.store(step, branch, y.float() - x.float())
            else:
                y = x.float() + cache.reuse(step, branch)
            decisions[branch].append(compute)
            returned[branch].append(y)
    return decisions, returned


def easycache(threshold=0.05, warmup_steps=10, steps=STEPS, branches=(COND, UNCOND), estimator=None):
    return build_cache(CacheParams("easycache", threshold=threshold, options={"warmup_steps": warmup_steps},
                                   estimator=estimator), steps, "wan21_t2v_1.3b", branches)


@pytest.mark.parametrize("threshold", [0.02, 0.03, 0.05, 0.1])
@pytest.mark.parametrize("warmup", [10, 3])
def test_wan_decisions_and_outputs_match_the_release_code(threshold, warmup):
    cache = easycache(threshold, warmup)
    decisions, returned = drive(cache, XS, YS)
    expected, expected_out = release_easycache(XS, YS, STEPS, threshold, ret_steps=warmup * 2,
                                               cutoff_steps=STEPS * 2 - 2)
    assert [decisions[COND], decisions[UNCOND]] == expected
    assert 0 < expected[0].count(False) < STEPS - warmup - 1  # some skips, some computes after warm-up
    for b, branch in enumerate((COND, UNCOND)):
        for ours, theirs in zip(returned[branch], expected_out[b]):
            torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("threshold", [0.025, 0.1])
def test_hunyuan_single_branch_matches_the_release_code(threshold):
    cache = build_cache(CacheParams("easycache", threshold=threshold), STEPS, "hunyuan_544p", (COND,))
    assert (cache.config.threshold, cache.config.warmup_steps) == (threshold, 5)
    decisions, _ = drive(cache, XS, YS[:1])
    expected, _ = release_easycache(XS, YS[:1], STEPS, threshold, ret_steps=5, cutoff_steps=STEPS - 1, branches=1)
    assert [decisions[COND]] == expected
    assert expected[0].count(False) > 0


def test_warmup_and_last_step_always_compute():
    cache = easycache(threshold=1e9, warmup_steps=7)
    decisions, _ = drive(cache, XS, YS)
    for branch in (COND, UNCOND):
        assert decisions[branch][:7] == [True] * 7
        assert decisions[branch][-1] is True
        assert decisions[branch][7:-1] == [False] * (STEPS - 8)  # k known from the warm-up: all skip


def test_rate_needs_two_computed_steps_before_any_skip():
    cache = easycache(threshold=1e9, warmup_steps=0)
    decisions, _ = drive(cache, XS, YS)
    assert decisions[COND][:3] == [True, True, False]  # step 0: no previous; step 1: no k yet


def test_accumulator_resets_on_each_computed_step():
    cache = easycache(threshold=0.05)
    drive(cache, XS, YS)
    skipped = cache.stats.branches[COND].skipped_steps
    computed_after_warmup = [s for s in cache.stats.branches[COND].computed_steps if 10 <= s < STEPS - 1]
    assert skipped and computed_after_warmup
    # Every computed step after the warm-up ends a run of skips: were the accumulator not reset, the
    # next step would compute again at once, and no skip would follow a computed step.
    assert any(s + 1 in skipped for s in computed_after_warmup)


def exact_run() -> tuple[list[torch.Tensor], list[list[torch.Tensor]]]:
    """Inputs and outputs in binary fractions: k = 1, mean|y_1| = 1.5, and at step 2 the predicted
    change is exactly 1 * 0.375 / 1.5 = 0.25."""
    xs = [torch.full((2, 2), v) for v in (0.0, 0.5, 0.875, 1.0)]
    ys = [torch.full((2, 2), v) for v in (1.0, 1.5, 2.0, 2.0)]
    return xs, [ys]


@pytest.mark.parametrize("threshold,skips", [(0.25, False), (0.2500001, True), (0.2499999, False)])
def test_exact_threshold_edge_computes(threshold, skips):
    xs, ys = exact_run()
    cache = build_cache(CacheParams("easycache", threshold=threshold, options={"warmup_steps": 2}), 4, "wan", (COND,))
    decisions, _ = drive(cache, xs, ys)
    assert decisions[COND] == [True, True, not skips, True]


def test_uncond_follows_the_cond_decision_and_reuses_its_own_difference():
    cache = easycache(threshold=0.1)
    decisions, returned = drive(cache, XS, YS)
    assert decisions[COND] == decisions[UNCOND]
    step = decisions[UNCOND].index(False)
    last = max(s for s in range(step) if decisions[UNCOND][s])
    torch.testing.assert_close(returned[UNCOND][step], XS[step] + (YS[1][last] - XS[last]))


def test_uncond_asked_first_is_a_contract_error():
    cache = easycache()
    with pytest.raises(RuntimeError, match="decides once per step on the 'cond' branch"):
        cache.should_compute(0, UNCOND, StepFeatures(timestep=torch.tensor([1.0]), latents=XS[0]))


def test_reset_gives_the_same_run_again():
    cache = easycache(threshold=0.1)
    first = drive(cache, XS, YS)[0]
    cache.reset()
    assert drive(cache, XS, YS)[0] == first
    assert cache.stats.total_computed == sum(first[COND]) * 2


def test_statistic_goes_through_the_installed_reducer():
    """A sequence shard's processes sum their parts: two halves, reduced, give the whole's mean."""
    whole = EasyCache(EasyCacheConfig(), STEPS, (COND,))
    tensor = torch.arange(12.0).reshape(3, 4) - 5
    halves = tensor[:, :2], tensor[:, 2:]
    other = EasyCache(EasyCacheConfig(), STEPS, (COND,))
    other_sums = None

    def all_reduce(sums: torch.Tensor) -> torch.Tensor:
        return sums + other_sums

    other_sums = torch.stack([halves[1].abs().sum(dtype=torch.float64), torch.tensor(6.0, dtype=torch.float64)])
    other.set_statistic_reducer(all_reduce)
    assert other.mean_abs(halves[0]) == pytest.approx(whole.mean_abs(tensor))


def test_forecast_estimator_extrapolates_the_cached_difference():
    cache = easycache(threshold=0.1, estimator="forecast1")
    decisions, returned = drive(cache, XS, YS)
    step = decisions[COND].index(False)
    c1, c2 = [s for s in range(step) if decisions[COND][s]][-2:]
    d1, d2 = YS[0][c1] - XS[c1], YS[0][c2] - XS[c2]
    forecast = d2 + (d2 - d1) * (step - c2) / (c2 - c1)
    torch.testing.assert_close(returned[COND][step], XS[step] + forecast)
    assert cache.stats.estimator == "forecast1"


def test_release_defaults_per_model_and_knob_overrides():
    wan = build_cache(CacheParams("easycache"), STEPS, "wan21_t2v_14b")
    assert (wan.config.threshold, wan.config.warmup_steps) == (0.05, 10)
    other = build_cache(CacheParams("easycache"), STEPS, "my_finetune")
    assert (other.config.threshold, other.config.warmup_steps) == (0.05, 10)
    hunyuan = build_cache(CacheParams("easycache", options={"warmup_steps": 3}), STEPS, "hunyuan_720p", (COND,))
    assert (hunyuan.config.threshold, hunyuan.config.warmup_steps) == (0.025, 3)
    assert EasyCache.skips_whole_model and EasyCache.decides_per_pair


@pytest.mark.parametrize("knobs,message", [
    (dict(threshold=-0.1), "threshold must be a number >= 0"),
    (dict(options={"warmup_steps": 2.5}), "warmup_steps must be a whole number"),
    (dict(options={"warmup_steps": True}), "warmup_steps must be a whole number"),
    (dict(max_skip_steps=3), "easycache has no 'max_skip_steps' setting"),
    (dict(options={"k": 1.0}), "unknown easycache option(s) ['k']"),
    (dict(preset="fast"), "easycache has no presets"),
])
def test_bad_settings_are_one_line(knobs, message):
    with pytest.raises(CacheConfigError) as exc:
        build_cache(CacheParams("easycache", **knobs), STEPS, "wan21_t2v_1.3b")
    assert message in str(exc.value) and "\n" not in str(exc.value)


def test_speedup_is_refused_naming_the_strategies_that_take_one():
    with pytest.raises(CacheConfigError) as exc:
        build_cache(CacheParams("easycache", speedup=2.0), STEPS, "wan21_t2v_1.3b")
    assert exc.value.param == "cache_speedup"
    assert "easycache cannot be tuned to a speedup" in str(exc.value)
    tunable = str(exc.value).split("or with --cache ")[1].split(" / ")  # check_speedup_strategy's wording too
    assert {"even", "magcache", "teacache"} <= set(tunable)  # other tests may register more
    assert "easycache" not in tunable and "planner" not in tunable


def test_no_skip_reason_names_the_threshold_or_the_warmup():
    cache = easycache(threshold=0.0)
    drive(cache, XS, YS)
    reason = cache.no_skip_reason()
    assert "not below the threshold 0" in reason and "raise --cache-threshold to" in reason
    short = easycache(warmup_steps=10, steps=11)
    drive(short, XS, YS)
    assert "lower warmup_steps" in short.no_skip_reason()
    skipping = easycache(threshold=0.1)
    drive(skipping, XS, YS)
    assert skipping.no_skip_reason() is None
