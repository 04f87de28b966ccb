"""Budgets (``--cache-speedup``): how many transformer passes a speedup asks for once what a
skipped step still costs is counted, and the rule that holds a run which decides while running
(TeaCache) to exactly that many."""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from sglang.multimodal_gen.runtime.cache.validation import CacheConfigError, is_number

#: How far short of the speedup asked for the predicted speedup of a budget may fall.
BUDGET_TOLERANCE = 0.05
#: How far beyond it one pass fewer may go when the nearest pass count falls short.
BUDGET_OVERSHOOT = 0.25


@dataclass(frozen=True)
class StepCosts:
    """What a denoising step costs outside the part a cache skips, each as a fraction of one CFG
    branch's model call (embed, blocks and head), measured on an uncached run.

    A skipped step is not free: guidance and the scheduler step run whatever the cache does, and a
    strategy that skips only the blocks still runs embed and head. On a 4-block model those take
    a fifth of a step, so counting passes alone delivered 1.6-1.9x when 2x was asked.

    Attributes:
        embed_and_head: The model call's time outside the blocks.
        step_tail: Guidance and the scheduler step, once per step.
        device: What they were measured on (``cpu``, or the CUDA device's name).
    """

    embed_and_head: float
    step_tail: float
    device: str = ""

    def skipped_step_cost(self, branches: int, whole_model: bool) -> float:
        """A step that skips every one of ``branches`` (run one after another in this process) as a
        fraction of a computed step: the step tail, plus embed and head per branch unless the skip
        covers the whole model call."""
        skipped = self.step_tail + (0.0 if whole_model else branches * self.embed_and_head)
        return min(1.0, skipped / (branches + self.step_tail))

    def to_dict(self) -> dict[str, Any]:
        return {"device": self.device, "embed_and_head": round(self.embed_and_head, 5),
                "step_tail": round(self.step_tail, 5)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "StepCosts":
        values = {name: data.get(name) for name in ("embed_and_head", "step_tail")}
        if not all(is_number(v) and 0 <= v < math.inf for v in values.values()):
            raise CacheConfigError(f"step costs must be non-negative numbers, got {dict(data)!r}")
        return cls(float(values["embed_and_head"]), float(values["step_tail"]), str(data.get("device", "")))

    @classmethod
    def from_timing(cls, step_seconds: Sequence[float], step_passes: Sequence[Sequence[float]],
                    step_rest: Sequence[Sequence[float]], device: str) -> "StepCosts":
        """From an uncached run's timing (``PassTiming``): per step, its time, the blocks pass of each
        branch and the model's work outside them (embed, head; per branch). Medians over steps, so
        a step that compiled or warmed a kernel does not count."""
        rows = [(total, passes, rest) for total, passes, rest in zip(step_seconds, step_passes, step_rest) if passes]
        if not rows:
            raise ValueError("the run timed no blocks pass")
        call = statistics.median([(sum(passes) + sum(rest)) / len(passes) for _, passes, rest in rows])
        if not call > 0:
            raise ValueError("the model calls took no measurable time")
        outside = statistics.median([sum(rest) / len(passes) for _, passes, rest in rows])
        tail = statistics.median([total - sum(passes) - sum(rest) for total, passes, rest in rows])
        return cls(max(0.0, outside / call), max(0.0, tail / call), device)


#: Skipped steps counted as free: ``--cache-speedup X`` then asks for ``round(N / X)`` passes. What
#: comparisons at equal passes (calibration's estimator choice, the frontier's ``--budget passes``)
#: give a request in place of the measured costs.
PASSES_ONLY = StepCosts(embed_and_head=0.0, step_tail=0.0, device="")


def budget_passes(num_inference_steps: int, speedup: float, skipped_step_cost: float = 0.0) -> int:
    """The passes per branch that make the denoising loop ``speedup`` times faster, rounded to the
    nearest (halves up), at least 1: with ``P`` of ``N`` steps computed and a skipped step costing
    ``c`` of a computed one, the loop takes ``P + (N - P) c`` steps' time, so ``P = N (1/X - c) /
    (1 - c)``. ``c = 0`` counts passes only: ``round(N / X)``."""
    c = min(max(skipped_step_cost, 0.0), 0.999)
    exact = num_inference_steps * (1.0 / speedup - c) / (1.0 - c)
    return max(1, min(num_inference_steps, math.floor(exact + 0.5 + 1e-9)))  # a float just under a half


def predicted_speedup(num_inference_steps: int, passes: int, skipped_step_cost: float = 0.0) -> float:
    """The denoising loop's speedup with ``passes`` of ``num_inference_steps`` steps computed."""
    return num_inference_steps / (passes + (num_inference_steps - passes) * skipped_step_cost)


def checked_budget_passes(num_inference_steps: int, speedup: float, skipped_step_cost: float = 0.0) -> int:
    """:func:`budget_passes`, or, where they fall more than ``BUDGET_TOLERANCE`` short of the
    speedup, one pass fewer if that overshoots by at most ``BUDGET_OVERSHOOT`` (a few steps with a
    skipped step that costs something: 2x at 10 steps runs 4 passes, 2.26x, where 5 would give
    1.87x); else one line (2x at 3 steps would otherwise run 1.5x, or 3x, and say nothing). A
    little more than asked for (3x at 10 steps: 3 passes, 3.33x) runs: the time asked for is kept."""
    passes = budget_passes(num_inference_steps, speedup, skipped_step_cost)
    if predicted_speedup(num_inference_steps, passes, skipped_step_cost) >= speedup * (1 - BUDGET_TOLERANCE):
        return passes
    if passes > 1 and predicted_speedup(num_inference_steps, passes - 1, skipped_step_cost) <= speedup * (
            1 + BUDGET_OVERSHOOT):
        return passes - 1
    if passes == 1:
        fastest = predicted_speedup(num_inference_steps, 1, skipped_step_cost)
        cost = f" (a skipped step still costs {skipped_step_cost:.0%} of a computed one)" if skipped_step_cost else ""
        raise CacheConfigError(
            f"--cache-speedup {speedup:g} cannot be met at {num_inference_steps} steps: one pass per branch "
            f"gives {fastest:.2f}x{cost}; ask for less or run more steps", param="cache_speedup")
    offers = " or ".join(f"{predicted_speedup(num_inference_steps, n, skipped_step_cost):.2f}x "
                         f"({n} of {num_inference_steps})" for n in (passes, passes - 1))
    raise CacheConfigError(
        f"--cache-speedup {speedup:g} cannot be met at {num_inference_steps} steps: whole passes per branch "
        f"give {offers}; ask for one of those or run more steps", param="cache_speedup")


def within_budget(compute: bool, step: int, num_inference_steps: int, done: int, passes: int) -> bool:
    """``compute``, unless the ``passes`` are spent (``done`` of them: skip) or every step left
    must run to spend them (compute)."""
    if done >= passes:
        return False
    return compute or passes - done >= num_inference_steps - step
