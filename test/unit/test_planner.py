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
)
from sglang.multimodal_gen.runtime.cache.estimators import build_estimator, lagrange_weights
from sglang.multimodal_gen.runtime.cache.even import even_steps
from sglang.multimodal_gen.runtime.cache.magcache import joint_magcache_plan, nearest_interp, preset_ratio_table
from sglang.multimodal_gen.runtime.cache.planner import PLANNABLE_ESTIMATORS, GapCosts, best_plan

ESTIMATORS = [("reuse", 0.0), ("forecast1", 0.0), ("forecast1_sigma", 0.0), ("blend", 0.3)]
FEATURES = StepFeatures(timestep=torch.tensor([500.0]))


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


def direct_cost(runs: list[np.ndarray], sigmas: list[float], computed: list[int], estimator: str, alpha: float) -> float:
    """The planner's objective computed from the vectors themselves: per branch and gap,
    ``|sum_k dt_k (e_k - r_k)|`` over the gap's skipped steps, summed over gaps and branches."""
    steps = len(runs[0])
    if not sigmas:
        sigmas = [1.0 - k / steps for k in range(steps + 1)]
    total = 0.0
    for residuals in runs:
        seen: list[int] = []
        gap_error = np.zeros_like(residuals[0])
        for k in range(steps):
            if k in computed:
                total += float(np.linalg.norm(gap_error))
                gap_error = np.zeros_like(residuals[0])
                seen.append(k)
            else:
                estimate = forecast_rule(seen, k, residuals, sigmas, estimator, alpha)
                gap_error += abs(sigmas[k + 1] - sigmas[k]) * (estimate - residuals[k])
        total += float(np.linalg.norm(gap_error))
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


@pytest.mark.parametrize("with_sigmas", [True, False], ids=["sigmas", "no-sigmas"])
@pytest.mark.parametrize("estimator, alpha", ESTIMATORS, ids=[e for e, _ in ESTIMATORS])
@pytest.mark.parametrize("steps, passes, max_skip, seed", [(8, 3, 3, 0), (9, 4, 2, 1), (10, 4, 4, 2), (10, 6, 6, 3)])
def test_best_plan_is_the_brute_force_optimum(steps, passes, max_skip, seed, estimator, alpha, with_sigmas):
    """Two branches with their own residuals; every feasible plan costed directly from the vectors."""
    runs = [residual_walk(steps, seed), residual_walk(steps, seed + 50)]
    sigmas = schedule(steps, seed) if with_sigmas else []
    costs = [GapCosts(gram_of(r, window=steps), sigmas, steps) for r in runs]
    total, plan = best_plan(costs, passes, max_skip, estimator, alpha)
    brute = min(direct_cost(runs, sigmas, p, estimator, alpha) for p in feasible_plans(steps, passes, max_skip))
    assert total == pytest.approx(brute, rel=1e-9)
    assert len(plan) == passes and plan[0] == 0 and plan == sorted(set(plan))
    assert plan in list(feasible_plans(steps, passes, max_skip))
    assert direct_cost(runs, sigmas, plan, estimator, alpha) == pytest.approx(brute, rel=1e-9)
