"""The guides in docs/caching.md, executed: a new strategy (one that skips the blocks, or one that
skips whole model calls), or a new estimator, is one class plus one registration."""

from __future__ import annotations

import re
import sys
import types
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY_REQUEST

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.cache import build_cache
from sglang.multimodal_gen.runtime.cache.base import CacheConfigError
from sglang.multimodal_gen.runtime.cache.estimators import _ESTIMATORS, ResidualEstimator, register_estimator

DOCS = REPO / "docs" / "caching.md"


def import_guide_file(path: str) -> types.ModuleType:
    """Import the docs/caching.md code block that starts with ``# <path>`` as a module: the guide's
    strategy is defined and registered exactly as a reader would write it."""
    for block in re.findall(r"```python\n(.*?)```", DOCS.read_text(), re.S):
        if block.startswith(f"# {path}\n"):
            module = types.ModuleType(f"caching_guide_{Path(path).stem}")
            sys.modules[module.__name__] = module  # dataclasses look their module up
            exec(compile(block, f"{DOCS} ({path})", "exec"), module.__dict__)
            return module
    raise AssertionError(f"docs/caching.md has no code block for {path}")


EveryNthCache = import_guide_file("runtime/cache/every_nth.py").EveryNthCache
LatentDriftCache = import_guide_file("runtime/cache/latent_drift.py").LatentDriftCache


def test_new_strategy_runs_by_name_through_the_pipeline(wan_generator):
    params = SamplingParams(
        prompt="a red circle", seed=0, cache=CacheParams(strategy="every_nth", options={"interval": 3}), **TINY_REQUEST
    )
    result = wan_generator.generate(params)
    stats = result.cache_stats
    assert stats.strategy == EveryNthCache.name == "every_nth"
    assert stats.branches["cond"].computed_steps == [0, 1, 2, 5] == stats.branches["uncond"].computed_steps
    uncached = wan_generator.generate(SamplingParams(prompt="a red circle", seed=0, **TINY_REQUEST))
    assert not torch.equal(result.latents, uncached.latents)


@pytest.mark.parametrize("options, message", [({"interval": 0}, "interval must be >= 1"), ({"speed": 2}, "valid keys")])
def test_new_strategy_options_are_validated_by_its_config(options, message):
    with pytest.raises(CacheConfigError, match=message):
        build_cache(CacheParams(strategy="every_nth", options=options), 6, None)


def test_whole_model_strategy_skips_every_model_part_for_both_branches(wan_generator):
    """The guide's second class: one decision per step for both branches, and a skipped step runs
    no part of the model (embed included) and predicts the latents plus the cached difference."""
    stage = next(s for s in wan_generator.pipeline.stages if s.name == "denoising")
    embeds: list[int] = []
    original_embed = stage.adapter.embed
    stage.adapter.embed = lambda *args, **kwargs: embeds.append(1) or original_embed(*args, **kwargs)
    try:
        cache = CacheParams(strategy="latent_drift", options={"max_drift": 0.5})
        result = wan_generator.generate(SamplingParams(prompt="a red circle", seed=0, cache=cache, **TINY_REQUEST))
    finally:
        stage.adapter.embed = original_embed
    stats = result.cache_stats
    assert stats.strategy == LatentDriftCache.name and stats.total_skipped > 0
    assert stats.branches["cond"].skipped_steps == stats.branches["uncond"].skipped_steps
    assert len(embeds) == stats.total_computed


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
