"""Timestep caching: the registered strategies and `build_cache`.

The contract a strategy implements is `strategy.py` (a `TimestepCache` subclass with `name`,
`config_class` and `_decide`, registered with `@register_cache` from `registry.py`). Adding a
strategy is that module plus one import line below, which registers it. See docs/caching.md.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import TYPE_CHECKING, Sequence

from sglang.multimodal_gen.runtime.cache.branches import COND, UNCOND
from sglang.multimodal_gen.runtime.cache.budget import budget_passes, checked_budget_passes
from sglang.multimodal_gen.runtime.cache.recording import CalibrationRecord
from sglang.multimodal_gen.runtime.cache.registry import get_cache_class, register_cache, registered_caches
from sglang.multimodal_gen.runtime.cache.stats import BranchStats, CacheStats
from sglang.multimodal_gen.runtime.cache.strategy import StepFeatures, TimestepCache
from sglang.multimodal_gen.runtime.cache.validation import CacheConfigError
from sglang.multimodal_gen.runtime.cache.estimators import (
    ResidualEstimator,
    get_estimator,
    register_estimator,
    registered_estimators,
)
from sglang.multimodal_gen.runtime.cache.experts import (
    ExpertCaches,
    expert_segments,
    gives_model_data,
    presetless_refusal,
    split_budget,
)
from sglang.multimodal_gen.runtime.cache.easycache import EasyCache, EasyCacheConfig
from sglang.multimodal_gen.runtime.cache.even import EvenCache, EvenCacheConfig
from sglang.multimodal_gen.runtime.cache.magcache import MagCache, MagCacheConfig
from sglang.multimodal_gen.runtime.cache.planner import BudgetPlanner, PlannerConfig
from sglang.multimodal_gen.runtime.cache.teacache import TeaCache, TeaCacheConfig

if TYPE_CHECKING:
    from sglang.multimodal_gen.configs.cache_params import CacheParams

logger = logging.getLogger(__name__)

# The strategy that records calibration data when the request itself asks for no caching.
CALIBRATION_STRATEGY = "magcache"


def build_cache(
    params: "CacheParams",
    num_inference_steps: int,
    model_key: str | None,
    branches: Sequence[str] = (COND, UNCOND),
    calibrate: bool = False,
    experts: Sequence[str] | None = None,
) -> TimestepCache | ExpertCaches | None:
    """The per-request strategy instance, or None when the request uses no cache.

    Args:
        params: The request's validated cache settings.
        num_inference_steps: The request's real step count (ratios are resampled to it).
        model_key: Which shipped presets apply, e.g. ``"wan21_t2v_1.3b"`` or ``"hunyuan_720p"``.
            Other keys work when ``params.options`` carries the model's ratios / coefficients.
        branches: The CFG branches the denoising stage will ask about (``("cond",)`` without CFG).
        calibrate: Never skip; record what ``sglang calibrate`` needs. With strategy ``"none"``
            this uses MagCache, whose records hold the magnitude ratios.
        experts: On a model with several experts, the expert of every step: the request then
            gets one instance per expert (:class:`ExpertCaches`, ``experts.py``), each with its
            expert's calibration (``params.expert_options``) and its share of the budget.
    """
    if params.strategy == "none":
        if not calibrate:
            return None
        params = dataclasses.replace(params, strategy=CALIBRATION_STRATEGY)
    cls = get_cache_class(params.strategy)
    speedup = params.speedup if params.speedup is not None else cls.default_speedup
    if calibrate:
        speedup = None
    skipped_cost = 0.0 if params.step_costs is None else params.step_costs.skipped_step_cost(
        len(branches), cls.skips_whole_model)
    passes = None if speedup is None else checked_budget_passes(num_inference_steps, speedup, skipped_cost)
    if experts is None or len(set(experts)) < 2:
        cache = cls.from_params(params, num_inference_steps, model_key, tuple(branches), calibrate)
        if passes is not None:
            cache.meet_budget(passes, params.estimator, params.blend_alpha)
        _use_request_estimator(cache, params)
    else:
        if not calibrate and not params.expert_options and not gives_model_data(cls, params.options):
            raise presetless_refusal(f"--cache {cls.name}", several_experts=True)
        caches = {
            expert: cls.from_params(
                dataclasses.replace(params, options={**params.expert_options.get(expert, {}), **params.options}),
                len(steps), model_key, tuple(branches), calibrate)
            for expert, steps in expert_segments(experts).items()
        }
        if passes is not None:
            shares = split_budget({expert: c.num_inference_steps for expert, c in caches.items()}, passes)
            for expert, expert_cache in caches.items():
                expert_cache.meet_budget(shares[expert], params.estimator, params.blend_alpha)
        for expert_cache in caches.values():
            _use_request_estimator(expert_cache, params)
        cache = ExpertCaches(caches, experts)
    cache.asked_speedup = speedup
    cache.reset()
    logger.debug("built %s for %s (%d steps, branches %s, calibrate=%s)", cls.name, model_key,
                 num_inference_steps, list(branches), calibrate)
    return cache


def _use_request_estimator(cache: TimestepCache, params: "CacheParams") -> None:
    if params.estimator is not None or params.blend_alpha is not None:
        options = {} if params.blend_alpha is None else {"alpha": params.blend_alpha}
        cache.use_estimator(params.estimator, **options)


def preset_model_keys(strategy: str) -> list[str]:
    """Model keys with shipped presets for ``strategy`` (aliases not included)."""
    lister = getattr(get_cache_class(strategy), "preset_model_keys", None)
    return sorted(lister()) if lister is not None else []


__all__ = [
    "COND",
    "UNCOND",
    "BranchStats",
    "BudgetPlanner",
    "CacheConfigError",
    "CacheStats",
    "CalibrationRecord",
    "EasyCache",
    "EasyCacheConfig",
    "EvenCache",
    "EvenCacheConfig",
    "ExpertCaches",
    "MagCache",
    "MagCacheConfig",
    "PlannerConfig",
    "ResidualEstimator",
    "StepFeatures",
    "TeaCache",
    "TeaCacheConfig",
    "TimestepCache",
    "budget_passes",
    "build_cache",
    "get_cache_class",
    "get_estimator",
    "preset_model_keys",
    "register_cache",
    "register_estimator",
    "registered_caches",
    "registered_estimators",
]
