"""The guide in docs/caching.md, executed: a new strategy is one class plus one registration."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from conftest import TINY_REQUEST

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.cache import build_cache
from sglang.multimodal_gen.runtime.cache.base import CacheConfigError, StepFeatures, TimestepCache, register_cache


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
