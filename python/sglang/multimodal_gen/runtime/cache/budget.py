"""Pass budgets (``--cache-speedup``): how many blocks passes a speedup asks for, and the rule
that holds a run which decides while running (TeaCache) to exactly that many."""

from __future__ import annotations

import math

from sglang.multimodal_gen.runtime.cache.validation import CacheConfigError

#: How far short of the speedup asked for the pass reduction a budget gives may fall.
BUDGET_TOLERANCE = 0.05


def budget_passes(num_inference_steps: int, speedup: float) -> int:
    """``round(steps / speedup)`` (halves up), at least 1: the passes per branch a speedup asks for."""
    return max(1, min(num_inference_steps, math.floor(num_inference_steps / speedup + 0.5)))


def checked_budget_passes(num_inference_steps: int, speedup: float) -> int:
    """:func:`budget_passes`, or one line when they fall more than ``BUDGET_TOLERANCE`` short of the
    speedup (2x at 3 steps would otherwise run 1.5x and say nothing). A few more than asked for
    (3x at 10 steps: 3 passes, 3.33x) run: the time asked for is kept."""
    passes = budget_passes(num_inference_steps, speedup)
    if num_inference_steps / passes >= speedup * (1 - BUDGET_TOLERANCE):
        return passes
    nearest = sorted({max(1, min(num_inference_steps, n)) for n in (math.floor(num_inference_steps / speedup),
                                                                    math.ceil(num_inference_steps / speedup))},
                     reverse=True)
    offers = " or ".join(f"{num_inference_steps / n:.2f}x ({n} of {num_inference_steps})" for n in nearest)
    raise CacheConfigError(
        f"--cache-speedup {speedup:g} cannot be met at {num_inference_steps} steps: whole passes per branch "
        f"give {offers}; ask for one of those or run more steps", param="cache_speedup")


def within_budget(compute: bool, step: int, num_inference_steps: int, done: int, passes: int) -> bool:
    """``compute``, unless the ``passes`` are spent (``done`` of them: skip) or every step left
    must run to spend them (compute)."""
    if done >= passes:
        return False
    return compute or passes - done >= num_inference_steps - step
