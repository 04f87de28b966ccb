"""Caching a model whose steps run on more than one transformer (Wan2.2's two experts).

Skipping across the switch between experts is what produces mosaic artifacts: a residual of the
high-noise expert added on a step of the low-noise one is the output of another network. So a
request on such a model gets one strategy instance per expert (:class:`ExpertCaches`), each
built for that expert's steps only, with that expert's calibration: no state, residual or
forecast crosses the switch, and each expert's first step is computed because its instance has
nothing stored yet. Strategies know nothing of this; they see a run of ``n_e`` steps.

A budget (``--cache-speedup``) is one budget over the whole run: :func:`split_budget` gives
each expert its passes, in proportion to its steps; within its share each expert's instance
plans (or tunes its threshold) as for one transformer.
"""

from __future__ import annotations

import math
from typing import Any, Callable, Mapping, Sequence

import torch

from sglang.multimodal_gen.runtime.cache.stats import BranchStats, CacheStats
from sglang.multimodal_gen.runtime.cache.strategy import StepFeatures, TimestepCache
from sglang.multimodal_gen.runtime.cache.validation import CacheConfigError


def expert_segments(schedule: Sequence[str]) -> dict[str, range]:
    """Each expert's steps, which must be one contiguous run (Wan2.2: high noise, then low)."""
    segments: dict[str, range] = {}
    start = 0
    for step in range(1, len(schedule) + 1):
        if step == len(schedule) or schedule[step] != schedule[start]:
            if schedule[start] in segments:
                raise ValueError(f"expert {schedule[start]!r} runs two separate stretches of steps")
            segments[schedule[start]] = range(start, step)
            start = step
    return segments


class ExpertCaches:
    """One request's caching on a several-transformer model: a strategy instance per expert,
    driven by the denoising stage exactly as one instance is (same calls, global step indices).

    Args:
        caches: Each expert's instance, built for its own number of steps.
        schedule: The expert of every step of the request.
    """

    def __init__(self, caches: Mapping[str, TimestepCache], schedule: Sequence[str]) -> None:
        self.segments = expert_segments(schedule)
        if set(self.segments) != set(caches):
            raise ValueError(f"caches for {sorted(caches)}, but the schedule runs {sorted(self.segments)}")
        for expert, cache in caches.items():
            if cache.num_inference_steps != len(self.segments[expert]):
                raise ValueError(f"the {expert} cache was built for {cache.num_inference_steps} steps, "
                                 f"the expert runs {len(self.segments[expert])}")
        self.caches = dict(caches)
        self.schedule = list(schedule)
        first = next(iter(self.caches.values()))
        self.name = first.name
        self.branches = first.branches
        self.calibrate = first.calibrate
        self.skips_whole_model = first.skips_whole_model
        self.skip_relative_to_input = first.skip_relative_to_input
        self.decides_per_pair = first.decides_per_pair
        self.num_inference_steps = len(self.schedule)
        self.asked_speedup: float | None = None
        self.reset()

    def reset(self) -> None:
        for cache in self.caches.values():
            cache.reset()
        self._stats = CacheStats(strategy=self.name, num_inference_steps=self.num_inference_steps,
                                 branches={b: BranchStats() for b in self.branches},
                                 asked_speedup=self.asked_speedup, step_experts=list(self.schedule))

    # ------------------------------------------------------------------ the stage's calls
    def should_compute(self, step: int, branch: str, features: StepFeatures) -> bool:
        cache, local = self._at(step)
        compute = cache.should_compute(local, branch, features)
        stats = self._stats.branches[branch]
        (stats.computed_steps if compute else stats.skipped_steps).append(step)
        return compute

    def store(self, step: int, branch: str, residual: torch.Tensor) -> None:
        cache, local = self._at(step)
        cache.store(local, branch, residual)

    def reuse(self, step: int, branch: str) -> torch.Tensor:
        cache, local = self._at(step)
        return cache.reuse(local, branch)

    def record_output(self, step: int, branch: str, output: torch.Tensor) -> None:
        cache, local = self._at(step)
        cache.record_output(local, branch, output)

    def plan(self) -> dict[str, list[bool]] | None:
        """The experts' plans end to end, when every expert's is known up front."""
        plans = {expert: cache.plan() for expert, cache in self.caches.items()}
        if any(p is None for p in plans.values()):
            return None
        ordered = sorted(self.segments, key=lambda e: self.segments[e].start)
        return {b: [done for expert in ordered for done in plans[expert][b]] for b in self.branches}

    def no_skip_reason(self) -> str | None:
        """A reason only when no expert skips anything, in each expert's words."""
        reasons = {expert: cache.no_skip_reason() for expert, cache in self.caches.items()}
        if not all(reasons.values()):
            return None
        return "; ".join(f"{expert.replace('_', '-')} expert: {reason}" for expert, reason in reasons.items())

    # ------------------------------------------------------------------ other ranks
    def set_statistic_reducer(self, reducer: Callable) -> None:
        for cache in self.caches.values():
            cache.set_statistic_reducer(reducer)

    def set_decision_exchange(self, exchange: Callable[[int, bool | None], bool | None]) -> None:
        for cache in self.caches.values():
            cache.set_decision_exchange(exchange)

    # ------------------------------------------------------------------ reporting
    @property
    def stats(self) -> CacheStats:
        """The request's stats over the whole run (the stage records its timing here), with the
        estimator and its history as the experts' instances report them."""
        experts = list(self.caches.values())
        self._stats.estimator = experts[0].stats.estimator
        self._stats.estimator_history_bytes = sum(c.stats.estimator_history_bytes for c in experts)
        return self._stats

    def calibration_records(self) -> dict[str, Mapping[str, Any]]:
        """Per expert, its instance's records (its steps only)."""
        return {expert: cache.calibration_records() for expert, cache in self.caches.items()}

    def _at(self, step: int) -> tuple[TimestepCache, int]:
        if not 0 <= step < self.num_inference_steps:
            raise IndexError(f"{self.name}: step {step} outside [0, {self.num_inference_steps})")
        expert = self.schedule[step]
        return self.caches[expert], step - self.segments[expert].start


def split_budget(steps: Mapping[str, int], passes: int) -> dict[str, int]:
    """Each expert's share of ``passes`` per branch: in proportion to its steps (largest remainders
    first), at least one each (its first step), at most its steps.

    Splitting by the planner's predicted error instead was measured on ``wan2.2-t2v-tiny`` and
    dropped: the high-noise expert's forecasts look cheap where sigma moves little, so at 3x it got
    3 of its 13 steps, and the videos lost 3.5 dB mean and 1.5 dB worst against this split
    (docs/benchmarks.md, "Two experts")."""
    if passes < len(steps):
        raise CacheConfigError(
            f"{passes} transformer passes cannot be shared by {len(steps)} experts, each of which computes at "
            "least its first step; ask for a smaller --cache-speedup or run more steps", param="cache_speedup")
    return proportional_split(steps, min(passes, sum(steps.values())))


def proportional_split(steps: Mapping[str, int], passes: int) -> dict[str, int]:
    """``passes`` in proportion to each expert's steps, largest remainders first, each in [1, steps]."""
    total = sum(steps.values())
    exact = {e: passes * n / total for e, n in steps.items()}
    share = {e: min(n, max(1, math.floor(exact[e]))) for e, n in steps.items()}
    for expert in sorted(steps, key=lambda e: exact[e] - math.floor(exact[e]), reverse=True):
        if sum(share.values()) >= passes:
            break
        if share[expert] < steps[expert]:
            share[expert] += 1
    while sum(share.values()) > passes:
        expert = max((e for e in share if share[e] > 1), key=lambda e: share[e] - exact[e])
        share[expert] -= 1
    return share


def gives_model_data(strategy: type[TimestepCache], options: Mapping[str, Any]) -> bool:
    """Whether the request's own options carry the data the strategy's presets would (or it needs none)."""
    return not strategy.model_data_options or any(key in options for key in strategy.model_data_options)


def presetless_refusal(asked: str, several_experts: bool) -> CacheConfigError:
    """The one line for a strategy that needs a model's presets or calibration (``asked``: the
    flag, e.g. ``--cache magcache`` or ``--cache-speedup``) on a model no preset covers (Wan2.2,
    ``several_experts`` for T2V-A14B) and no calibration of it given."""
    what = ("a calibration of each expert of this model (no published presets cover a model with several experts)"
            if several_experts else "a calibration of this model (no published presets cover Wan2.2)")
    return CacheConfigError(
        f"{asked} needs {what}: run `sglang calibrate --model-path MODEL` and pass the file with --cache-calibration "
        "(or name it in the folder's sglang_config.json), or use --cache easycache, which needs none",
        param="cache_calibration",
    )
