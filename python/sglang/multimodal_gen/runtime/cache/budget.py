"""Pass budgets (``--cache-speedup``): how many blocks passes a speedup asks for, and the rule
that holds a run which decides while running (TeaCache) to exactly that many."""

from __future__ import annotations

import math


def budget_passes(num_inference_steps: int, speedup: float) -> int:
    """``round(steps / speedup)`` (halves up), at least 1: the passes per branch a speedup asks for."""
    return max(1, min(num_inference_steps, math.floor(num_inference_steps / speedup + 0.5)))


def within_budget(compute: bool, step: int, num_inference_steps: int, done: int, passes: int) -> bool:
    """``compute``, unless the ``passes`` are spent (``done`` of them: skip) or every step left
    must run to spend them (compute)."""
    if done >= passes:
        return False
    return compute or passes - done >= num_inference_steps - step
