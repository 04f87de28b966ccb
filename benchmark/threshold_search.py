"""The threshold at which a strategy that takes no budget (EasyCache) makes a given pass count.

Such a strategy decides while it runs, so its passes depend on the prompt; the frontier compares it
at the setting whose mean passes over a few tuning prompts come nearest each budget, and reports
the passes it really made on the scored prompts.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Mapping, Sequence

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator

LOWEST, HIGHEST = 1e-3, 10.0  # the threshold range searched
ROUNDS = 8  # bisection rounds in log threshold: the last bracket is about 2.7% wide


def mean_passes(gen: DiffGenerator, cache: CacheParams, steps: int, prompts: Sequence[str], seed: int = 0,
                images: Mapping[str, Path] | None = None) -> float:
    """Passes per branch of ``cache``, averaged over ``prompts`` (one seed); ``images``: an
    image-to-video model's first frame per caption."""
    total = 0
    for prompt in prompts:
        result = gen.generate(SamplingParams(prompt=prompt, seed=seed, num_inference_steps=steps, cache=cache,
                                             image=(images or {}).get(prompt)))
        total += result.cache_stats.branches["cond"].num_computed
    return total / len(prompts)


def nearest_threshold(
    gen: DiffGenerator, cache: CacheParams, passes: int, steps: int, prompts: Sequence[str],
    images: Mapping[str, Path] | None = None,
) -> tuple[float, float]:
    """``(threshold, mean passes)``: of the thresholds tried, the one whose mean passes on ``prompts``
    come nearest ``passes`` (ties: the smaller threshold, the more faithful). Passes fall as the
    threshold grows, so the search bisects in log threshold."""
    low, high = math.log(LOWEST), math.log(HIGHEST)
    tried: list[tuple[float, float, float]] = []
    for _ in range(ROUNDS):
        middle = (low + high) / 2
        threshold = float(f"{math.exp(middle):.3g}")
        made = mean_passes(gen, dataclasses.replace(cache, threshold=threshold), steps, prompts, images=images)
        tried.append((abs(made - passes), threshold, made))
        if made > passes:
            low = middle
        elif made < passes:
            high = middle
        else:
            break
    _, threshold, made = min(tried)
    return threshold, made
