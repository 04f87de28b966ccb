"""The frontier's threshold search for a strategy without a budget (EasyCache), on a real pipeline:
the threshold it returns makes the passes it reports, and those are the nearest it found."""

from __future__ import annotations

import sys

from conftest import REPO, TINY_REQUEST

sys.path.insert(0, str(REPO / "benchmark"))

import threshold_search  # noqa: E402

from sglang.multimodal_gen.configs.cache_params import CacheParams  # noqa: E402
from sglang.multimodal_gen.configs.sampling_params import SamplingParams  # noqa: E402

STEPS = 12
PROMPTS = ["a red circle", "a blue square moving up"]


def test_nearest_threshold_makes_the_passes_it_reports(wan_generator, monkeypatch):
    request = {k: v for k, v in TINY_REQUEST.items() if k != "num_inference_steps"}
    generate = wan_generator.generate
    monkeypatch.setattr(wan_generator, "generate",
                        lambda params: generate(SamplingParams(**{**params.__dict__, **request})))
    cache = CacheParams("easycache", options={"warmup_steps": 2})
    threshold, made = threshold_search.nearest_threshold(wan_generator, cache, 8, STEPS, PROMPTS)
    again = threshold_search.mean_passes(wan_generator, CacheParams("easycache", threshold=threshold,
                                                                    options={"warmup_steps": 2}), STEPS, PROMPTS)
    assert again == made
    assert abs(made - 8) <= 1
    never = threshold_search.mean_passes(wan_generator, CacheParams("easycache", threshold=0.0,
                                                                    options={"warmup_steps": 2}), STEPS, PROMPTS)
    assert never == STEPS
