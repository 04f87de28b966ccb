"""The guides in docs/caching.md, executed: a new strategy, or a new estimator, is one class plus one
registration."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import TINY_REQUEST

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.cache import build_cache
from sglang.multimodal_gen.runtime.cache.base import CacheConfigError, StepFeatures, TimestepCache, register_cache
from sglang.multimodal_gen.runtime.cache.estimators import _ESTIMATORS, ResidualEstimator, register_estimator


@dataclass
class EveryNthConfig:
    """Run the blocks on every ``interval``-th step after ``warmup_steps``; reuse otherwise.

    Args:
        interval: Run the blocks once every this many steps. Higher skips more.
        warmup_steps: The first steps that always run the blocks.
    """

    interval: int = 2
    warmup_steps: int = 2

    def __post_init__(self) -> None:
        if self.interval < 1:
            raise CacheConfigError(f"every_nth interval must be >= 1, got {self.interval}")


@register_cache
class EveryNthCache(TimestepCache):
    name = "every_nth"
    config_class = EveryNthConfig

    def _decide(self, step: int, branch: str, features: StepFeatures) -> bool:
        return step < self.config.warmup_steps or (step - self.config.warmup_steps) % self.config.interval == 0


def test_new_strategy_runs_by_name_through_the_pipeline(wan_generator):
    params = SamplingParams(
        prompt="a red circle", seed=0, cache=CacheParams(strategy="every_nth", options={"interval": 3}), **TINY_REQUEST
    )
    result = wan_generator.generate(params)
    stats = result.cache_stats
    assert stats.strategy == "every_nth"
    assert stats.branches["cond"].computed_steps == [0, 1, 2, 5] == stats.branches["uncond"].computed_steps
    uncached = wan_generator.generate(SamplingParams(prompt="a red circle", seed=0, **TINY_REQUEST))
    assert not torch.equal(result.latents, uncached.latents)


@pytest.mark.parametrize("options, message", [({"interval": 0}, "interval must be >= 1"), ({"speed": 2}, "valid keys")])
def test_new_strategy_options_are_validated_by_its_config(options, message):
    with pytest.raises(CacheConfigError, match=message):
        build_cache(CacheParams(strategy="every_nth", options=options), 6, None)


class HalfwayEstimator(ResidualEstimator):
    """The mean of the last two computed residuals (the last one alone until there are two)."""

    name = "halfway"
    history = 2

    def _estimate(self, points, step, sigma, scale):
        last = points[-1].residual
        return last if len(points) < 2 else ((points[0].residual.float() + last.float()) / 2).to(last.dtype)


@pytest.fixture
def halfway():
    """The guide's ``@register_estimator``, undone afterwards so other tests see the shipped list."""
    register_estimator(HalfwayEstimator)
    yield HalfwayEstimator
    _ESTIMATORS.unregister(HalfwayEstimator.name)


def test_new_estimator_runs_by_name_with_any_strategy(wan_generator, halfway):
    assert "halfway" in str(pytest.raises(CacheConfigError, CacheParams, strategy="magcache", estimator="nope").value)
    for strategy, options in (("every_nth", {"interval": 3}), ("teacache", {"threshold": 1.0, "coefficients": [1.0, 0.0]})):
        cache = CacheParams(strategy=strategy, estimator="halfway", options=options)
        result = wan_generator.generate(SamplingParams(prompt="a red circle", seed=0, cache=cache, **TINY_REQUEST))
        assert result.cache_stats.estimator == "halfway" and result.cache_stats.total_skipped > 0
        reused = wan_generator.generate(SamplingParams(prompt="a red circle", seed=0, **TINY_REQUEST,
                                                       cache=CacheParams(strategy=strategy, options=options)))
        assert not torch.equal(result.latents, reused.latents), strategy
