"""Every decision strategy with every residual estimator on the tiny Wan pipeline: each runs and
skips the same steps, ``reuse`` is today's output bit for bit, and a forecast changes it."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_REQUEST

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.cache import registered_estimators

PROMPT = "a green square moving up on a black background"
STRATEGIES = {
    "magcache": dict(threshold=0.3, max_skip_steps=3, retention_ratio=0.2),
    "teacache": dict(threshold=1.0, options={"coefficients": [1.0, 0.0]}),
}


def _run(generator, strategy: str, **estimator):
    knobs = STRATEGIES[strategy]
    cache = CacheParams(strategy=strategy, **knobs, **estimator)
    params = SamplingParams(prompt=PROMPT, negative_prompt="blurry", seed=3, cache=cache,
                            **{**TINY_REQUEST, "num_inference_steps": 12})
    return generator.generate(params)


@pytest.mark.parametrize("strategy", sorted(STRATEGIES))
def test_every_estimator_composes_with_the_strategy(wan_generator, strategy):
    today = _run(wan_generator, strategy)  # no estimator chosen: the behaviour before estimators
    assert today.cache_stats.total_skipped > 0 and today.cache_stats.estimator == "reuse"
    skips = {b: s.skipped_steps for b, s in today.cache_stats.branches.items()}
    outputs = {}
    for name in registered_estimators():
        if name == "fitted":
            continue  # the planner's own: refused with other strategies (test_estimators.py)
        result = _run(wan_generator, strategy, estimator=name)
        stats = result.cache_stats
        assert stats.estimator == name and stats.estimator_history_bytes > 0
        assert {b: s.skipped_steps for b, s in stats.branches.items()} == skips, name
        assert torch.isfinite(result.latents).all(), name
        outputs[name] = result.latents
    assert torch.equal(outputs["reuse"], today.latents)
    for name in ("forecast1", "forecast2", "forecast1_sigma", "forecast2_sigma", "blend"):
        assert not torch.equal(outputs[name], today.latents), name
    assert not torch.equal(outputs["forecast1"], outputs["forecast1_sigma"])  # sigma spacing is not uniform
    # MagCache hints its accumulated ratio; TeaCache hints 1.0, so its `scale` is `reuse`.
    assert torch.equal(outputs["scale"], today.latents) == (strategy == "teacache")


def test_magcache_scale_residual_is_the_scale_estimator(wan_generator):
    knobs = {**STRATEGIES["magcache"], "options": {"scale_residual": True}}
    params = SamplingParams(prompt=PROMPT, negative_prompt="blurry", seed=3,
                            cache=CacheParams(strategy="magcache", **knobs),
                            **{**TINY_REQUEST, "num_inference_steps": 12})
    legacy = wan_generator.generate(params)
    assert legacy.cache_stats.estimator == "scale"
    assert torch.equal(legacy.latents, _run(wan_generator, "magcache", estimator="scale").latents)
