"""The budget planner and --cache-speedup: optimal plans (brute force against a direct vector
computation), resampled costs, exact pass counts for every strategy that takes a budget, and the
runtime guard that holds TeaCache to it."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.runtime.cache import (
    COND,
    UNCOND,
    BudgetPlanner,
    CacheConfigError,
    EvenCache,
    EvenCacheConfig,
    MagCache,
    MagCacheConfig,
    PlannerConfig,
    StepFeatures,
    TeaCache,
    TeaCacheConfig,
    TimestepCache,
    budget_passes,
    build_cache,
)
from sglang.multimodal_gen.runtime.cache.budget import checked_budget_passes
from sglang.multimodal_gen.runtime.cache.error_growth import ErrorGrowth
from sglang.multimodal_gen.runtime.cache.estimators import build_estimator, lagrange_weights
from sglang.multimodal_gen.runtime.cache.even import even_steps
from sglang.multimodal_gen.runtime.cache.magcache import joint_magcache_plan, nearest_interp, preset_ratio_table
from sglang.multimodal_gen.runtime.cache.planner import (
    GUIDED_FORECAST_MAX_SPACING,
    INTERPOLATION_SPREAD,
    MAX_CHECK_SHARE,
    TRUST_MEMORY,
    TRUST_MEMORY_STEPS,
    TRUSTED_SHARE,
    GapCosts,
    best_plan,
    fitted_blend_alpha,
)

ESTIMATORS = [("reuse", 0.0), ("forecast1", 0.0), ("forecast1_sigma", 0.0), ("blend", 0.3)]


def one_line(exc: pytest.ExceptionInfo) -> str:
    message = str(exc.value)
    assert "\n" not in message, message
    return message


# --------------------------------------------------------------------------- synthetic residuals
def residual_walk(steps: int, seed: int, dim: int = 6) -> np.ndarray:
    """A random walk of small vectors with a drift: residuals that change smoothly but not linearly."""
    rng = np.random.default_rng(seed)
    return np.cumsum(rng.normal(size=(steps, dim)) + 0.3, axis=0)


def gram_of(residuals: np.ndarray, window: int) -> list[list[float]]:
    """``gram[t][d] = <r_t, r_{t-d}>`` for ``d <= min(t, window)``, as calibration records it."""
    return [[float(residuals[t] @ residuals[t - d]) for d in range(min(t, window) + 1)] for t in range(len(residuals))]


def schedule(steps: int, seed: int) -> list[float]:
    """Decreasing sigmas from 1 to 0 (``steps + 1`` values), unevenly spaced like a shifted schedule."""
    rng = np.random.default_rng(seed + 100)
    gaps = rng.uniform(0.5, 2.0, size=steps)
    return (1.0 - np.concatenate([[0.0], np.cumsum(gaps)]) / gaps.sum()).tolist()


def forecast_rule(seen: list[int], k: int, residuals: np.ndarray, sigmas: list[float], estimator: str,
                  alpha: float) -> np.ndarray:
    """The published estimate at skipped step ``k`` from the computed steps ``seen``, in float64:
    reuse the last; forecast1 the line through the last two (in step, or in sigma); blend mixes them."""
    last = residuals[seen[-1]]
    if estimator == "reuse" or len(seen) < 2:
        return last
    h, i = seen[-2:]
    x = (lambda s: sigmas[s]) if estimator == "forecast1_sigma" else float
    weights = lagrange_weights([x(h), x(i)], x(k))
    line = weights[0] * residuals[h] + weights[1] * residuals[i]
    return last + alpha * (line - last) if estimator == "blend" else line


def direct_cost(runs: list[np.ndarray], sigmas: list[float], computed: list[int], estimator: str,
                alpha: float, growth: ErrorGrowth | None = None) -> float:
    """The planner's objective computed from the vectors themselves: per branch and gap,
    ``|G sum_k dt_k (e_k - r_k)|^2`` over the gap's skipped steps (``G``: the growth at the sigma of
    the step the gap ends at; 1 without ``growth``), summed over gaps and branches."""
    steps = len(runs[0])
    if not sigmas:
        sigmas = [1.0 - k / steps for k in range(steps + 1)]
    grown = np.maximum((growth or ErrorGrowth()).at(sigmas), 1.0)
    total = 0.0
    for residuals in runs:
        seen: list[int] = []
        gap_error = np.zeros_like(residuals[0])
        for k in range(steps):
            if k in computed:
                total += float(grown[k] * np.linalg.norm(gap_error)) ** 2
                gap_error = np.zeros_like(residuals[0])
                seen.append(k)
            else:
                estimate = forecast_rule(seen, k, residuals, sigmas, estimator, alpha)
                gap_error += abs(sigmas[k + 1] - sigmas[k]) * (estimate - residuals[k])
        total += float(grown[steps] * np.linalg.norm(gap_error)) ** 2
    return total


def direct_gap(residuals: np.ndarray, sigmas: list[float], h: int | None, i: int, j: int, estimator: str,
               alpha: float, runtime: bool = True) -> float:
    """One gap alone: ``h`` (if any) and ``i`` computed, ``i+1 .. j-1`` skipped; the estimates from
    the runtime's estimator objects, or (``runtime=False``) from :func:`forecast_rule` in float64."""
    steps = len(residuals)
    if not sigmas:
        sigmas = [1.0 - k / steps for k in range(steps + 1)]
    seen = ([h] if h is not None else []) + [i]
    if not runtime:
        return float(np.linalg.norm(sum(abs(sigmas[k + 1] - sigmas[k])
                                        * (forecast_rule(seen, k, residuals, sigmas, estimator, alpha) - residuals[k])
                                        for k in range(i + 1, j))))
    est = build_estimator(estimator, ["b"], **({"alpha": alpha} if estimator == "blend" else {}))
    for p in seen:
        est.observe("b", p, sigmas[p], torch.from_numpy(residuals[p]))
    error = sum(abs(sigmas[k + 1] - sigmas[k]) * (est.estimate("b", k, sigmas[k]).double().numpy() - residuals[k])
                for k in range(i + 1, j))
    return float(np.linalg.norm(error))


def feasible_plans(steps: int, passes: int, max_skip: int):
    """Every computed-step set with step 0, exactly ``passes`` steps and no run of skips over ``max_skip``."""
    for rest in itertools.combinations(range(1, steps), passes - 1):
        plan = [0, *rest]
        bounds = [*plan, steps]
        if all(b - a - 1 <= max_skip for a, b in zip(bounds, bounds[1:])):
            yield plan


# --------------------------------------------------------------------------- costs and optimality
@pytest.mark.parametrize("with_sigmas", [True, False], ids=["sigmas", "no-sigmas"])
@pytest.mark.parametrize("estimator, alpha", ESTIMATORS, ids=[e for e, _ in ESTIMATORS])
def test_gap_cost_equals_the_direct_vector_computation(estimator, alpha, with_sigmas):
    """At the calibration's own step count the quadratic form is the vectors' norm, exactly."""
    steps = 9
    residuals = residual_walk(steps, seed=1)
    sigmas = schedule(steps, 1) if with_sigmas else []
    costs = GapCosts(gram_of(residuals, window=steps), sigmas, steps)
    for h, i, j in [(None, 0, 3), (0, 2, 5), (1, 4, 9), (3, 4, 8), (0, 1, 9), (2, 5, 6), (None, 0, 9)]:
        got = costs.gap(h, i, j, estimator, alpha)
        exact = direct_gap(residuals, sigmas, h, i, j, estimator, alpha, runtime=False)
        assert got == pytest.approx(exact, rel=1e-9, abs=1e-12), (h, i, j)
        # The runtime's estimators (fp32 forecasts) add what the cost says they add.
        assert got == pytest.approx(direct_gap(residuals, sigmas, h, i, j, estimator, alpha), rel=1e-5), (h, i, j)
    assert costs.gap(0, 3, 4, estimator, alpha) == 0.0  # nothing skipped


#: An error's growth falling from 9x at pure noise to 1x at the end, and shrinking a little just
#: before it (which the planner counts as 1), measured at fewer sigmas than the schedules have (so
#: the planner interpolates).
STEEP_GROWTH = ErrorGrowth(sigmas=(0.0, 0.1, 0.25, 0.5, 0.75, 1.0), growth=(1.0, 0.8, 1.5, 3.0, 6.0, 9.0))


@pytest.mark.parametrize("growth", [None, STEEP_GROWTH], ids=["no-growth", "steep-growth"])
@pytest.mark.parametrize("with_sigmas", [True, False], ids=["sigmas", "no-sigmas"])
@pytest.mark.parametrize("estimator, alpha", ESTIMATORS, ids=[e for e, _ in ESTIMATORS])
@pytest.mark.parametrize("steps, passes, max_skip, seed", [(8, 3, 3, 0), (9, 4, 2, 1), (10, 4, 4, 2), (10, 6, 6, 3)])
def test_best_plan_is_the_brute_force_optimum(steps, passes, max_skip, seed, estimator, alpha, with_sigmas, growth):
    """Two branches with their own residuals; every feasible plan costed directly from the vectors."""
    runs = [residual_walk(steps, seed), residual_walk(steps, seed + 50)]
    sigmas = schedule(steps, seed) if with_sigmas else []
    costs = [GapCosts(gram_of(r, window=steps), sigmas, steps, growth) for r in runs]
    total, plan = best_plan(costs, passes, max_skip, estimator, alpha)
    brute = min(direct_cost(runs, sigmas, p, estimator, alpha, growth) for p in feasible_plans(steps, passes, max_skip))
    assert total == pytest.approx(brute, rel=1e-9)
    assert len(plan) == passes and plan[0] == 0 and plan == sorted(set(plan))
    assert plan in list(feasible_plans(steps, passes, max_skip))
    assert direct_cost(runs, sigmas, plan, estimator, alpha, growth) == pytest.approx(brute, rel=1e-9)


def test_a_gap_costs_its_error_times_the_growth_where_it_ends():
    """The growth at the sigma of the step after the gap multiplies the gap's error; a gap to the
    end takes the growth at the last sigma (1: the error is in the video as it is)."""
    steps = 10
    residuals = residual_walk(steps, seed=4)
    sigmas = schedule(steps, 4)
    flat = GapCosts(gram_of(residuals, steps), sigmas, steps)
    grown = GapCosts(gram_of(residuals, steps), sigmas, steps, STEEP_GROWTH)
    for h, i, j in [(None, 0, 3), (1, 2, 5), (4, 6, 10)]:
        expected = max(1.0, float(np.interp(sigmas[j], STEEP_GROWTH.sigmas, STEEP_GROWTH.growth)))
        assert grown.gap(h, i, j, "forecast1") == pytest.approx(expected * flat.gap(h, i, j, "forecast1"), rel=1e-12)
    assert grown.gap(4, 6, 10, "reuse") == pytest.approx(flat.gap(4, 6, 10, "reuse"))
    # A flow that shrinks errors is weighed as one that keeps them.
    shrinking = GapCosts(gram_of(residuals, steps), sigmas, steps, ErrorGrowth(sigmas=(0.0, 1.0), growth=(1.0, 0.2)))
    assert shrinking.gap(1, 2, 5, "forecast1") == pytest.approx(flat.gap(1, 2, 5, "forecast1"), rel=1e-12)


def test_a_steep_growth_moves_the_computed_steps_towards_high_noise():
    """Where an error made early grows most, the plan computes more of the early steps than it
    does without the growth, for the same budget."""
    steps, passes = 24, 10
    runs = [residual_walk(steps, seed) for seed in (5, 6)]
    sigmas = [1.0 - k / steps for k in range(steps + 1)]
    steep = ErrorGrowth(sigmas=(0.0, 0.5, 1.0), growth=(1.0, 1.0, 30.0))
    early = [sum(1 for step in best_plan([GapCosts(gram_of(r, steps), sigmas, steps, growth) for r in runs], passes,
                                         6, "forecast1")[1] if step < steps // 2)
             for growth in (None, steep)]
    assert early[1] > early[0]


# --------------------------------------------------------------------------- resampling and the window
def test_resampling_to_a_divisor_uses_the_calibration_steps_themselves():
    """Request step k of 5 sits at calibration step 2k of 10: its costs are the sub-sampled run's."""
    residuals, sigmas = residual_walk(10, seed=4), schedule(10, 4)
    resampled = GapCosts(gram_of(residuals, window=10), sigmas, 5)
    sub = GapCosts(gram_of(residuals[::2], window=5), sigmas[::2], 5)
    expected = residuals[::2] @ residuals[::2].T
    assert np.allclose(resampled.inner, expected, rtol=1e-12)
    assert np.allclose(resampled.sigmas, sigmas[::2]) and np.allclose(resampled.dt, np.abs(np.diff(sigmas[::2])))
    for estimator, alpha in ESTIMATORS:
        for h, i, j in [(None, 0, 2), (0, 1, 4), (1, 2, 5), (0, 2, 5)]:
            assert resampled.gap(h, i, j, estimator, alpha) == pytest.approx(sub.gap(h, i, j, estimator, alpha),
                                                                             rel=1e-9)


def test_resampling_between_steps_interpolates_the_residuals():
    """At 4 of 10 steps, request steps sit at 0, 2.5, 5, 7.5: the halfway residuals' inner products."""
    residuals = residual_walk(10, seed=5)
    costs = GapCosts(gram_of(residuals, window=10), [], 4)
    at = np.stack([residuals[0], (residuals[2] + residuals[3]) / 2, residuals[5], (residuals[7] + residuals[8]) / 2])
    assert np.allclose(costs.inner, at @ at.T, rtol=1e-12)
    assert np.allclose(costs.dt, 0.25)  # no sigmas: equal weights


def test_steps_past_the_last_recorded_one_are_always_computed():
    """At 20 of 10 steps, request step 19 sits at calibration position 9.5, past the last recorded
    output: its outputs are unknown (not the last one's again, which made skipping it look free and
    cost the HunyuanVideo model 17 dB at 100 steps), so every plan computes it; step 18 (position 9)
    is known."""
    residuals = residual_walk(10, seed=8)
    costs = GapCosts(gram_of(residuals, window=10), schedule(10, 8), 20)
    assert np.isnan(costs.inner[19]).all() and np.isfinite(costs.inner[18, :19]).all()
    assert math.isinf(costs.gap(17, 18, 20, "reuse")) and math.isfinite(costs.gap(16, 17, 19, "reuse"))
    for passes in (2, 7, 10):
        total, plan = best_plan([costs], passes, 18, "fitted")
        assert math.isfinite(total) and plan[-1] == 19 and len(plan) == passes
    assert best_plan([costs], 1, 19, "reuse") == (math.inf, [])


def test_finer_than_the_table_an_interpolated_output_has_its_own_spread():
    """At 20 of 10 steps, odd request steps sit halfway between recorded ones: their squared norm
    gains ``INTERPOLATION_SPREAD / 4`` of the squared change between the two, nothing else does;
    coarser than the table (4 of 10 steps) the interpolation is taken as is."""
    residuals = residual_walk(10, seed=9)
    finer = GapCosts(gram_of(residuals, window=10), [], 20)
    for p in range(19):
        low, frac = divmod(p, 2)
        point = (residuals[low] + residuals[low + 1]) / 2 if frac else residuals[low]
        spread = INTERPOLATION_SPREAD * 0.25 * np.sum((residuals[low + 1] - residuals[low]) ** 2) if frac else 0.0
        assert finer.inner[p, p] == pytest.approx(point @ point + spread, rel=1e-9)
        for q in range(p + 1, 19):
            low_q, frac_q = divmod(q, 2)
            other = (residuals[low_q] + residuals[low_q + 1]) / 2 if frac_q else residuals[low_q]
            assert finer.inner[p, q] == pytest.approx(point @ other, rel=1e-9)
    coarser = GapCosts(gram_of(residuals, window=10), [], 4)
    at = np.stack([residuals[0], (residuals[2] + residuals[3]) / 2, residuals[5], (residuals[7] + residuals[8]) / 2])
    assert np.allclose(coarser.inner, at @ at.T, rtol=1e-12)


def test_gaps_beyond_the_window_are_never_costed_or_planned():
    """A gap's span runs from its older computed step to its last skipped one; past the window it is inf."""
    steps, window = 12, 4
    residuals = residual_walk(steps, seed=6)
    gram = gram_of(residuals, window)
    assert [len(row) for row in gram] == [min(t, window) + 1 for t in range(steps)]
    costs = GapCosts(gram, schedule(steps, 6), steps)
    for h, i, j in [(None, 0, 5), (None, 0, 6), (0, 2, 5), (0, 2, 6), (3, 5, 8), (3, 5, 9), (1, 2, 7)]:
        span = (j - 1) - (i if h is None else h)
        assert math.isinf(costs.gap(h, i, j, "forecast1")) == (span > window), (h, i, j)
        assert math.isinf(costs.gap(h, i, j, "reuse")) == (j - 1 - i > window)  # reuse never looks at h
    # 4 passes cannot cover 12 steps when each forecast gap may span only 4 (from its older computed step).
    assert best_plan([costs], 4, 6, "forecast1") == (math.inf, [])
    for passes in (5, 6, 8):
        total, plan = best_plan([costs], passes, 6, "forecast1")
        assert math.isfinite(total) and len(plan) == passes
        bounds = [*plan, steps]
        assert all((b - 1) - (bounds[n - 1] if n else a) <= window for n, (a, b) in enumerate(zip(bounds, bounds[1:])))
    # Two passes would need a span of 10: no plan fits the window.
    assert best_plan([costs], 2, 10, "forecast1") == (math.inf, [])


@pytest.mark.parametrize("steps", [7, 12, 20])
def test_best_plan_has_exactly_the_budget_and_starts_at_zero(steps):
    residuals = residual_walk(steps, seed=steps)
    costs = [GapCosts(gram_of(residuals, steps), schedule(steps, steps), steps)]
    for max_skip in (1, 3, 6):
        least = math.ceil(steps / (max_skip + 1))
        for passes in range(1, steps + 1):
            total, plan = best_plan(costs, passes, max_skip, "blend", 0.5)
            if passes < least:
                assert (total, plan) == (math.inf, []), (passes, max_skip)
                continue
            assert len(plan) == passes and plan[0] == 0 and plan == sorted(set(plan)), (passes, max_skip)
            bounds = [*plan, steps]
            assert max(b - a - 1 for a, b in zip(bounds, bounds[1:])) <= max_skip
    assert best_plan(costs, steps, 0, "reuse") == (0.0, list(range(steps)))


def planner(steps: int = 20, max_skip_steps: int = 6, seed: int = 7, **config) -> BudgetPlanner:
    grams = {b: gram_of(residual_walk(30, seed + n), 16) for n, b in enumerate((COND, UNCOND))}
    return BudgetPlanner(PlannerConfig(gram=grams, sigmas=schedule(30, seed), max_skip_steps=max_skip_steps,
                                       **config), steps)


def test_planner_refuses_a_budget_its_max_skip_steps_cannot_reach():
    cache = planner(steps=20, max_skip_steps=1)
    with pytest.raises(CacheConfigError) as exc:
        cache.meet_budget(9)
    assert "cannot run 9 of 20 steps" in one_line(exc) and "at least 10 passes" in str(exc.value)
    assert exc.value.param == "cache_speedup"
    cache.meet_budget(10)
    assert all(sum(mask) == 10 for mask in cache.plan().values())


def test_planner_plans_for_the_fitted_estimator_and_hands_it_the_weights_of_its_plan():
    """Unnamed on a table of model outputs, the estimator is ``fitted``: the plan minimises its
    cost, and each later step's weight (a skipped step's estimate, a computed step's check) is the
    least-squares one on the plan's last two computed steps before it (0, reuse, after the first
    computed step alone), per branch."""
    cache = planner(steps=25)
    cache.meet_budget(13)  # computed steps 1/13 of the schedule apart: close enough to forecast under guidance
    plan = cache.plan()
    assert plan[COND] == plan[UNCOND] and sum(plan[COND]) == 13 and plan[COND][0]
    costs = [GapCosts(cache.config.gram[b], cache.config.sigmas, 25) for b in (COND, UNCOND)]
    total, steps = best_plan(costs, 13, 6, "fitted")
    assert cache.estimator.name == "fitted" and plan[COND] == [s in steps for s in range(25)]
    assert cache.predicted_error == pytest.approx(total)
    for branch, cost in zip((COND, UNCOND), costs):
        expected, previous = {}, None
        for last, upcoming in zip(steps, [*steps[1:], 25]):
            expected.update({k: cost.fitted_weight(previous, last, k) for k in range(last + 1, min(upcoming + 1, 25))})
            previous = last
        assert cache.estimator.weights[branch] == pytest.approx(expected)
        assert len(expected) == 24 and any(w != 0 for w in expected.values())
    named = planner(steps=25)
    named.meet_budget(13, estimator="fitted")  # named, as build_cache applies it afterwards: the same weights
    named.use_estimator("fitted")
    assert named.estimator.weights == cache.estimator.weights


@pytest.mark.parametrize("passes, forecasts", [(12, True), (11, False), (5, False)])
def test_under_guidance_the_planner_forecasts_only_where_its_computed_steps_lie_close(passes, forecasts):
    """Two CFG branches and sigmas from 1 to 0: the fitted forecast while the computed steps lie at
    most ``GUIDED_FORECAST_MAX_SPACING`` (1/12) apart on average, 12 passes exactly at the limit;
    wider, an unnamed estimator is reuse, planned for reuse. A named fitted estimator, and a model
    with one branch, forecast at any spacing."""
    assert GUIDED_FORECAST_MAX_SPACING == pytest.approx(1 / 12)
    grams = {b: gram_of(residual_walk(30, 7 + n), 16) for n, b in enumerate((COND, UNCOND))}
    cache = BudgetPlanner(PlannerConfig(gram=grams), 30)  # no sigmas: 1 to 0 in equal steps
    cache.meet_budget(passes)
    costs = [GapCosts(grams[b], [], 30) for b in (COND, UNCOND)]
    chosen = "fitted" if forecasts else "reuse"
    assert cache.estimator.name == chosen
    assert cache.predicted_error == pytest.approx(best_plan(costs, passes, 6, chosen)[0])
    named = BudgetPlanner(PlannerConfig(gram=grams), 30)
    named.meet_budget(passes, estimator="fitted")
    named.use_estimator("fitted")
    assert named.estimator.name == "fitted"
    assert named.predicted_error == pytest.approx(best_plan(costs, passes, 6, "fitted")[0])
    unguided = BudgetPlanner(PlannerConfig(gram={COND: grams[COND]}), 30, branches=(COND,))
    unguided.meet_budget(passes)
    assert unguided.estimator.name == "fitted"


def run_with_outputs(cache: BudgetPlanner, outputs: np.ndarray) -> tuple[dict[int, np.ndarray], list[dict[str, float]]]:
    """Drive ``cache`` with ``outputs[step]`` as every branch's model output; what each skipped step of
    the cond branch added, and the estimator's trust after every step."""
    added, trust = {}, []
    for step in range(cache.num_inference_steps):
        for branch in cache.branches:
            if cache.should_compute(step, branch, StepFeatures(timestep=torch.tensor([float(step)]))):
                cache.store(step, branch, torch.tensor(outputs[step], dtype=torch.float32))
            elif branch == COND:
                added[step] = cache.reuse(step, branch).numpy()
            else:
                cache.reuse(step, branch)
        trust.append(dict(cache.estimator.trust))
    return added, trust


def checked_trust(weights: dict[int, float], computed: list[int], outputs: np.ndarray) -> dict[int, float]:
    """The trust rule written out: at each computed step ``j`` after two computed ``h < i``, the share
    ``<v_j - v_i, d> / (c_j |d|^2)`` with ``d = v_i - v_h``, clipped to [0, MAX_CHECK_SHARE], is
    blended into a running share (from 1) keeping ``TRUST_MEMORY ** (TRUST_MEMORY_STEPS / N)`` of it
    at ``N`` steps; the trust is the running share over ``TRUSTED_SHARE``, at most 1. The trust in
    force at every step after the first."""
    trust, running = {}, 1.0
    memory = TRUST_MEMORY ** (TRUST_MEMORY_STEPS / len(outputs))
    for step in range(computed[0] + 1, len(outputs)):
        if step in computed and computed.index(step) >= 2:
            h, i = computed[computed.index(step) - 2: computed.index(step)]
            d = outputs[i] - outputs[h]
            share = float(np.dot(outputs[step] - outputs[i], d) / (weights[step] * np.dot(d, d)))
            running = memory * running + (1 - memory) * min(max(share, 0.0), MAX_CHECK_SHARE)
        trust[step] = min(running / TRUSTED_SHARE, 1.0)
    return trust


def outputs_following(weights: dict[int, float], computed: list[int], sign: float, seed: int) -> np.ndarray:
    """Random outputs, except that each computed step after the second moves from the one before by
    ``sign`` times the fitted forecast ``c_j (v_i - v_h)``: the weights borne out (1) or reversed (-1)."""
    outputs = np.random.default_rng(seed).normal(size=(25, 6))
    for n in range(2, len(computed)):
        h, i, j = computed[n - 2: n + 1]
        outputs[j] = outputs[i] + sign * weights[j] * (outputs[i] - outputs[h])
    return outputs


def test_the_fitted_weights_are_checked_on_every_computed_step():
    """Each computed step tests the fitted forecast the plan's weight makes for it; the trust follows
    :func:`checked_trust`, and a skipped step adds ``v_i + trust c_k (v_i - v_h)``. Outputs that move
    as the weights forecast keep the trust at 1; outputs that move the other way take it toward 0
    (reuse) by the step count's memory at each check; ``check_forecast=False`` keeps the weights as fitted."""
    cache = planner(steps=25)
    cache.meet_budget(13)
    computed = [s for s, run in enumerate(cache.plan()[COND]) if run]
    weights = dict(cache.estimator.weights[COND])
    checks = len(computed) - 2
    walk = np.cumsum(np.random.default_rng(5).normal(size=(25, 6)), axis=0)
    borne_out, reversed_ = (outputs_following(weights, computed, sign, seed=6) for sign in (1.0, -1.0))
    for outputs in (walk, borne_out, reversed_):
        cache.reset()
        added, trust = run_with_outputs(cache, outputs)
        expected = checked_trust(weights, computed, outputs)
        assert [t[COND] for t in trust[1:]] == pytest.approx([expected[s] for s in range(1, 25)], rel=1e-4)  # fp32 outputs
        for step, estimate in added.items():
            h, i = ([None] + [c for c in computed if c < step])[-2:]
            c = 0.0 if h is None else weights[step] * expected[step]
            np.testing.assert_allclose(estimate, outputs[i] + c * (outputs[i] - outputs[h or 0]), rtol=1e-5, atol=1e-6)
        if outputs is borne_out:
            assert all(t[COND] == pytest.approx(1.0, rel=1e-4) for t in trust)
        if outputs is reversed_:
            memory = TRUST_MEMORY ** (TRUST_MEMORY_STEPS / 25)  # twice as fast as at 50 steps
            assert trust[-1][COND] == pytest.approx(memory ** checks / TRUSTED_SHARE) and trust[-1][COND] < 0.1
    unchecked = planner(steps=25, check_forecast=False)
    unchecked.meet_budget(13)
    _, trust = run_with_outputs(unchecked, reversed_)
    assert all(t == {COND: 1.0, UNCOND: 1.0} for t in trust)


def test_check_forecast_must_be_a_bool():
    with pytest.raises(CacheConfigError, match="planner check_forecast must be true or false, got 'yes'"):
        planner(check_forecast="yes")


def test_fitted_weight_is_least_squares_over_the_recorded_outputs():
    """On vectors whose inner products are the gram, ``c`` minimises ``|v_k - v_i - c (v_i - v_h)|``;
    outputs on a line give the first-order forecast's ``(k - i) / (i - h)``."""
    rng = np.random.default_rng(3)
    outputs = rng.normal(size=(12, 20))
    cost = GapCosts(gram_of(outputs, 16), [], 12)
    for h, i, k in [(2, 4, 5), (0, 1, 7), (5, 8, 11)]:
        change = outputs[i] - outputs[h]
        expected = float(np.dot(outputs[k] - outputs[i], change) / np.dot(change, change))
        assert cost.fitted_weight(h, i, k) == pytest.approx(expected, rel=1e-9)
    line = np.stack([outputs[0] + 0.2 * t * outputs[1] for t in range(12)])
    straight = GapCosts(gram_of(line, 16), [], 12)
    assert straight.fitted_weight(3, 5, 8) == pytest.approx(1.5) and straight.fitted_weight(None, 5, 8) == 0.0
    assert straight.gap(3, 5, 9, "fitted") == pytest.approx(0.0, abs=1e-6)
    still = GapCosts([[1.0]] + [[1.0, 1.0]] * 11, [], 12)  # no change between h and i: reuse
    assert still.fitted_weight(3, 4, 6) == 0.0


def test_planner_plans_for_the_estimator_it_uses_and_the_same_plan_on_every_branch():
    cache = planner(steps=25, gram_of="blocks")
    cache.meet_budget(10)
    plan = cache.plan()
    assert plan[COND] == plan[UNCOND] and sum(plan[COND]) == 10 and plan[COND][0]
    costs = [GapCosts(cache.config.gram[b], cache.config.sigmas, 25) for b in (COND, UNCOND)]
    # Unnamed on an older block-residual table, blend at the alpha fitted at the request's own step count.
    assert cache.estimator.name == "blend" and cache.estimator.alpha == pytest.approx(fitted_blend_alpha(costs))
    total, steps = best_plan(costs, 10, 6, "blend", cache.estimator.alpha)
    assert cache.predicted_error == pytest.approx(total) and plan[COND] == [s in steps for s in range(25)]
    named = planner(steps=25)
    named.meet_budget(10, estimator="reuse")
    assert named.estimator.name == "reuse"  # build_cache applies the request's estimator afterwards
    assert named.predicted_error == pytest.approx(best_plan(costs, 10, 6, "reuse")[0])
    with pytest.raises(CacheConfigError) as exc:
        planner().meet_budget(10, estimator="forecast2")
    assert exc.value.param == "cache_estimator" and "cannot cost estimator 'forecast2'" in one_line(exc)


def test_planner_without_calibration_names_the_missing_branches():
    with pytest.raises(CacheConfigError) as exc:
        BudgetPlanner(PlannerConfig(gram={COND: [[1.0]]}), 10)
    assert exc.value.param == "cache_calibration" and "['uncond']" in one_line(exc)


# --------------------------------------------------------------------------- budgets
@pytest.mark.parametrize("steps, speedup, passes", [
    (50, 1.5, 33), (50, 2, 25), (50, 2.5, 20), (50, 3, 17), (25, 2, 13), (5, 2, 3), (30, 4, 8), (20, 1, 20),
    (3, 100, 1), (1, 7.5, 1), (20, 3, 7), (30, 2.5, 12),
])
def test_budget_passes_rounds_half_up_and_never_below_one(steps, speedup, passes):
    assert budget_passes(steps, speedup) == passes


def test_even_steps_spreads_the_rest_after_the_warmup():
    assert even_steps(20, 4, 10) == [0, 1, 2, 3, 4, 6, 9, 12, 14, 17]  # 4 + floor(i * 16 / 6)
    assert even_steps(10, 0, 5) == [0, 1, 3, 5, 7]  # step 0 is always run
    assert even_steps(10, 6, 3) == [0, 1, 2]  # a budget below the warm-up shortens it
    assert even_steps(8, 2, 8) == list(range(8))
    for steps, warmup, passes in itertools.product((20, 30, 50), (0, 4, 10), (1, 7, 13, 20)):
        plan = even_steps(steps, warmup, passes)
        assert len(plan) == passes and plan == sorted(set(plan)) and plan[0] == 0 and plan[-1] < steps


@pytest.mark.parametrize("steps", [20, 30, 50])
def test_even_cache_plan_and_budget(steps):
    cache = EvenCache(EvenCacheConfig(interval=2, retention_ratio=0.2), steps)
    warmup = int(0.2 * steps + 0.5)
    assert cache.plan()[COND] == [s < warmup or (s - warmup) % 2 == 0 for s in range(steps)]
    for speedup in (1.5, 2, 2.5, 3):
        passes = budget_passes(steps, speedup)
        cache.meet_budget(passes)
        plan = cache.plan()
        assert plan[COND] == plan[UNCOND] and sum(plan[COND]) == passes, speedup
        assert plan[COND][:warmup] == [True] * warmup


@pytest.mark.parametrize("bad", [0.5, 0, -2, float("nan"), float("inf"), "2", True])
def test_cache_params_refuse_a_bad_speedup_in_one_line(bad):
    with pytest.raises(CacheConfigError) as exc:
        CacheParams(speedup=bad)
    assert exc.value.param == "cache_speedup" and "cache speedup must be a number >= 1" in one_line(exc)


def test_speedup_alone_selects_the_planner():
    assert CacheParams(speedup=2).strategy == "planner" and CacheParams(speedup=1).speedup == 1.0
    assert CacheParams(strategy="magcache", speedup=3).strategy == "magcache"
    assert CacheParams().strategy == "none" and CacheParams().speedup is None


# --------------------------------------------------------------------------- MagCache and TeaCache to a budget
WAN13 = preset_ratio_table()["wan21_t2v_1.3b"]


@pytest.mark.parametrize("steps", [20, 30, 50])
@pytest.mark.parametrize("speedup", [1.5, 2, 2.5, 3])
def test_magcache_meets_the_budget_with_the_release_rule(steps, speedup):
    """Measured on the published Wan2.1 1.3B ratios: every case is reached exactly (K raised from 2
    to 3-5 at 2.5x and 3x), and the plan is the release rule's at the tuned threshold and K."""
    passes = budget_passes(steps, speedup)
    cache = MagCache(MagCacheConfig(mag_ratios=WAN13), steps)
    cache.meet_budget(passes)
    plan = cache.plan()
    assert sum(plan[COND]) == passes and sum(plan[UNCOND]) == passes
    config = cache.config
    assert config.max_skip_steps >= 2 and 0 < config.threshold < 1e6
    ratios = [nearest_interp(WAN13[b], steps) for b in (COND, UNCOND)]
    assert plan[COND] == joint_magcache_plan(ratios, config.threshold, config.max_skip_steps,
                                             int(0.2 * steps + 0.5), config.end_steps)
    fresh = MagCache(MagCacheConfig(mag_ratios=WAN13, threshold=config.threshold,
                                    max_skip_steps=config.max_skip_steps), steps)
    assert fresh.plan() == plan


def test_magcache_refuses_a_budget_below_its_retention_in_one_line():
    """20% retention at 20 steps runs steps 0-3 whatever the threshold: 3 passes cannot be met."""
    cache = MagCache(MagCacheConfig(mag_ratios=WAN13), 20)
    before = cache.plan()
    with pytest.raises(CacheConfigError) as exc:
        cache.meet_budget(3)
    assert exc.value.param == "cache_speedup" and "magcache cannot run exactly 3 of 20 steps" in one_line(exc)
    assert cache.plan() == before and cache.config.threshold == MagCacheConfig(mag_ratios=WAN13).threshold


def indicator_walk(steps: int, seed: int) -> list[torch.Tensor]:
    """A modulated input that changes 1-10% per step, more towards the end."""
    g = torch.Generator().manual_seed(seed)
    x = [torch.randn(1, 16, generator=g) + 3.0]
    for t in range(1, steps):
        x.append(x[-1] + torch.randn(1, 16, generator=g) * (0.03 + 0.2 * t / steps))
    return x


def calibrated_changes(steps: int, seed: int) -> list[float]:
    walk = indicator_walk(steps, seed)
    return [0.0] + [float(((b - a).abs().mean() / a.abs().mean())) for a, b in zip(walk, walk[1:])]


def drive(cache: TimestepCache, inputs: dict[str, list[torch.Tensor]] | None = None) -> dict[str, list[int]]:
    """Run ``cache`` like the denoising stage; the computed steps per branch."""
    for step in range(cache.num_inference_steps):
        for branch in cache.branches:
            feats = StepFeatures(timestep=torch.tensor([float(step)]),
                                 modulated_input=None if inputs is None else inputs[branch][step])
            if cache.should_compute(step, branch, feats):
                cache.store(step, branch, torch.full((1, 4), float(step)))
            else:
                cache.reuse(step, branch)
    return {b: s.computed_steps for b, s in cache.stats.branches.items()}


def test_teacache_refuses_a_budget_without_calibrated_indicator_changes():
    cache = TeaCache(TeaCacheConfig(coefficients=[1.0, 0.0]), 20)
    with pytest.raises(CacheConfigError) as exc:
        cache.meet_budget(10)
    assert exc.value.param == "cache_speedup" and "sglang calibrate" in one_line(exc)
    partial = TeaCache(TeaCacheConfig(coefficients=[1.0, 0.0], indicator_changes={COND: [0.0] * 20}), 20)
    with pytest.raises(CacheConfigError):
        partial.meet_budget(10)


@pytest.mark.parametrize("scale", [0.2, 1.0], ids=["run-skips-more", "run-skips-less"])
@pytest.mark.parametrize("steps", [20, 30])
def test_teacache_run_makes_exactly_the_budget(steps, scale):
    """The threshold is tuned on the calibration's changes; the run's own changes differ (another
    walk, and scaled calibrated changes), so left alone it runs more or fewer steps than the budget,
    and enforce_pass_budget holds it to the budget either way."""
    changes = {COND: [scale * c for c in calibrated_changes(50, seed=1)],
               UNCOND: [scale * c for c in calibrated_changes(50, seed=2)]}
    inputs = {COND: indicator_walk(steps, seed=3), UNCOND: indicator_walk(steps, seed=4)}
    unguarded = []
    for speedup in (1.5, 2, 3, 5):
        passes = budget_passes(steps, speedup)
        cache = TeaCache(TeaCacheConfig(coefficients=[2.0, 0.0], indicator_changes=changes, calibration_steps=50),
                         steps)
        cache.meet_budget(passes)
        computed = drive(cache, inputs)
        assert {b: len(s) for b, s in computed.items()} == {COND: passes, UNCOND: passes}, speedup
        assert computed[COND][0] == 0
        # A second request on the same instance is held to the budget too.
        cache.reset()
        assert {b: len(s) for b, s in drive(cache, inputs).items()} == {COND: passes, UNCOND: passes}
        free = TeaCache(cache.config, steps)  # the tuned threshold without the guard
        unguarded.extend(len(s) - passes for s in drive(free, inputs).values())
    assert all(d > 0 for d in unguarded) if scale < 1 else all(d < 0 for d in unguarded), unguarded


# --------------------------------------------------------------------------- the runtime guard
class Fixed(TimestepCache):
    """Decides from a given mask (not registered: a test double of a run-time strategy)."""

    name = "fixed-test"

    def __init__(self, mask: list[bool]) -> None:
        self.mask = mask
        super().__init__(None, len(mask), (COND,))

    def _decide(self, step, branch, features):
        return self.mask[step]


@pytest.mark.parametrize("mask, budget, computed", [
    ([True] * 6, 2, [0, 1]),  # budget spent -> every later step skips, even those the strategy runs
    ([True] * 6, 6, [0, 1, 2, 3, 4, 5]),
    ([False] * 6, 4, [0, 3, 4, 5]),  # steps left == budget left -> compute from step 3 on
    ([False] * 6, 1, [0]),  # step 0 has no residual and runs; that spends it
    ([True, False, False, True, False, False], 3, [0, 3, 5]),  # 1 left at the last step: run it
    ([True, False, True, False, True, True], 3, [0, 2, 4]),  # spent at step 4: step 5 skips
    ([True, False, False, False, False, True], 2, [0, 5]),
])
def test_within_budget_guard_edges(mask, budget, computed):
    cache = Fixed(mask)
    cache.enforce_pass_budget(budget)
    assert drive(cache)[COND] == computed
    assert len(computed) == budget


def test_a_strategy_without_meet_budget_refuses_a_speedup_in_one_line():
    with pytest.raises(CacheConfigError) as exc:
        Fixed([True] * 4).meet_budget(2)
    assert exc.value.param == "cache_speedup" and "fixed-test cannot be tuned to a speedup" in one_line(exc)


def test_planner_refusal_counts_the_window_too():
    """3 request steps of a 50-step calibration with window 16 sit ~17 calibration steps apart, so no
    gap can be costed: only 3 of 3 passes can be planned, and the refusal must say so (it used to
    say "needs at least 1 passes" from max_skip_steps alone)."""
    grams = {b: gram_of(residual_walk(50, n), 16) for n, b in enumerate((COND, UNCOND))}
    cache = BudgetPlanner(PlannerConfig(gram=grams, sigmas=schedule(50, 0)), 3)
    with pytest.raises(CacheConfigError) as exc:
        cache.meet_budget(2)
    assert "cannot run 2 of 3 steps" in one_line(exc) and "at least 3 passes" in str(exc.value)
    cache.meet_budget(3)
    assert cache.plan()[COND] == [True] * 3


def test_fitted_blend_alpha_is_the_least_squares_alpha_of_the_residuals_themselves():
    """At the calibration's own step count the alpha fitted from inner products is the one fitted
    directly on the residuals: argmin sum |r_t - r_{t-1} - alpha (r_{t-1} - r_{t-2})|^2 over both branches."""
    walks = [residual_walk(12, 3), residual_walk(12, 4)]
    costs = [GapCosts(gram_of(w, 16), schedule(12, 3), 12) for w in walks]
    change = np.concatenate([w[2:] - w[1:-1] for w in walks])
    last_change = np.concatenate([w[1:-1] - w[:-2] for w in walks])
    expected = float(np.sum(change * last_change) / np.sum(last_change * last_change))
    assert fitted_blend_alpha(costs) == pytest.approx(expected, rel=1e-9)
    still = [GapCosts(gram_of(np.ones((6, 3)), 16), [], 6)]  # residuals that never change: no fit
    assert fitted_blend_alpha(still) == 0.5


def test_planner_falls_back_to_reuse_when_the_forecast_base_leaves_the_window():
    """6 steps from a 30-step calibration: a window of 16 calibration steps spans 3.2 request steps,
    so no 2-pass plan can cost blend's forecast from step 0, but reuse's gaps fit."""
    cache = planner(steps=6, gram_of="blocks")
    cache.meet_budget(2)
    assert cache.estimator.name == "reuse" and sum(cache.plan()[COND]) == 2
    with pytest.raises(CacheConfigError):  # named, the estimator is kept and the budget refused
        planner(steps=6).meet_budget(2, estimator="blend")
    # fitted weighs a base outside the window 0: it reuses there (one branch: under guidance, computed
    # steps this far apart take reuse outright)
    one_branch = planner(steps=6).config
    fitted = BudgetPlanner(PlannerConfig(gram={COND: one_branch.gram[COND]}, sigmas=one_branch.sigmas), 6,
                           branches=(COND,))
    fitted.meet_budget(2)
    assert fitted.estimator.name == "fitted" and sum(fitted.plan()[COND]) == 2
    assert set(fitted.estimator.weights[COND].values()) == {0.0}


def test_the_planner_reuses_where_the_residual_turns_back():
    """Residual changes that reverse step after step fit a negative alpha: extrapolating them is
    worse than reusing, so an unnamed estimator becomes reuse (the built-in model at 20 steps)."""
    zigzag = np.cumsum([(1.0 if t % 2 else -0.6) * np.ones(4) + 0.01 * t for t in range(20)], axis=0)
    grams = {b: gram_of(zigzag + n, 16) for n, b in enumerate((COND, UNCOND))}
    cache = BudgetPlanner(PlannerConfig(gram=grams, gram_of="blocks", sigmas=schedule(20, 1)), 20)
    costs = [GapCosts(grams[b], schedule(20, 1), 20) for b in (COND, UNCOND)]
    assert fitted_blend_alpha(costs) < 0
    cache.meet_budget(10)
    assert cache.estimator.name == "reuse"
    assert cache.predicted_error == pytest.approx(best_plan(costs, 10, 6, "reuse")[0])


def test_the_planner_takes_the_estimator_calibration_measured_at_the_nearest_speedup():
    """Older calibration files measured an estimator per speedup for their block-residual table."""
    measured = {"1.5": "forecast1", "2": "blend", "3": "reuse"}
    grams = {b: gram_of(residual_walk(30, 7 + n), 16) for n, b in enumerate((COND, UNCOND))}
    for passes, expected in [(20, "forecast1"), (17, "blend"), (15, "blend"), (13, "blend"), (12, "reuse"), (10, "reuse"), (8, "reuse")]:
        cache = BudgetPlanner(PlannerConfig(gram=grams, gram_of="blocks", sigmas=schedule(30, 7), measured_estimator=measured), 30)
        cache.meet_budget(passes)
        assert cache.estimator.name == expected, (passes, 30 / passes)
    named = BudgetPlanner(PlannerConfig(gram=grams, gram_of="blocks", sigmas=schedule(30, 7), measured_estimator=measured), 30)
    named.meet_budget(10, estimator="forecast1")  # a request's own estimator wins; build_cache applies it
    assert named.predicted_error == pytest.approx(best_plan(
        [GapCosts(grams[b], schedule(30, 7), 30) for b in (COND, UNCOND)], 10, 6, "forecast1")[0])


@pytest.mark.parametrize("measured", ["reuse", {"2": "forecast2"}, {"fast": "reuse"}, {"0.5": "reuse"}])
def test_planner_refuses_a_malformed_measured_estimator(measured):
    with pytest.raises(CacheConfigError) as exc:
        PlannerConfig(gram={}, measured_estimator=measured)
    assert "measured_estimator" in one_line(exc)


def test_a_speedup_and_a_threshold_together_are_refused_in_one_line():
    """The budget tunes the threshold, so a threshold of the user's own would be silently dropped."""
    for strategy in ("magcache", "teacache", "none"):
        with pytest.raises(CacheConfigError) as exc:
            CacheParams(strategy=strategy, speedup=2, threshold=0.3)
        assert exc.value.param == "cache_speedup" and "not both" in one_line(exc)


@pytest.mark.parametrize("steps, speedup, passes",
                         [(50, 3, 17), (20, 3, 7), (25, 2, 13), (12, 3, 4), (6, 1.5, 4), (10, 3, 3), (16, 2.5, 6)])
def test_a_budget_within_five_percent_is_met(steps, speedup, passes):
    """20 steps at 3x: 7 passes give 2.86x, 4.8% short, and run; 10 at 3x: 3 passes, 3.33x, faster than asked."""
    assert checked_budget_passes(steps, speedup) == passes


@pytest.mark.parametrize("steps, speedup, offers", [
    (3, 2, "1.50x (2 of 3) or 3.00x (1 of 3)"),
    (4, 2.5, "2.00x (2 of 4) or 4.00x (1 of 4)"),
    (8, 3, "2.67x (3 of 8) or 4.00x (2 of 8)"),
])
def test_a_budget_no_pass_count_meets_is_one_line_naming_the_nearest(steps, speedup, offers):
    with pytest.raises(CacheConfigError) as refused:
        build_cache(CacheParams(strategy="even", speedup=speedup), steps, None, (COND,))
    assert refused.value.param == "cache_speedup"
    assert one_line(refused) == (f"--cache-speedup {speedup:g} cannot be met at {steps} steps: whole passes "
                                       f"per branch give {offers}; ask for one of those or run more steps")
