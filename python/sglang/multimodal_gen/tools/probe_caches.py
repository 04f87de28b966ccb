"""Deliberately naive or broken caches, to show that a benchmark can tell them from a good one.

Not product strategies: they register under ``probe_*`` names only when this module is imported
(by the reference-model benchmark and tests), so the CLI never offers them.

- ``probe_even_skip``: skips ``num_skip`` steps per branch spread evenly after the first
  ``start_step`` steps, ignoring the model: the baseline a calibrated plan must beat.
- ``probe_zero_residual``, ``probe_stale_residual``, ``probe_swapped_residual``: MagCache's plan
  (same knobs, same skipped steps) with a wrong residual on skipped steps: zero, the first one
  ever stored, or the other CFG branch's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Sequence

import numpy as np
import torch

from sglang.multimodal_gen.runtime.cache.base import (
    COND,
    UNCOND,
    CacheConfigError,
    StepFeatures,
    TimestepCache,
    get_cache_class,
    register_cache,
)
from sglang.multimodal_gen.runtime.cache.magcache import MagCache


@dataclass
class EvenSkipConfig:
    """
    Args:
        num_skip (`int`, defaults to `0`): Steps each branch skips.
        start_step (`int`, defaults to `10`): Steps that always run first (MagCache's retention at
            50 steps), so a comparison with MagCache differs only in where the skips fall.
    """

    num_skip: int = 0
    start_step: int = 10

    def __post_init__(self) -> None:
        for name in ("num_skip", "start_step"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise CacheConfigError(f"probe_even_skip {name} must be an integer >= 0, got {value!r}")


def even_skip_plan(num_steps: int, num_skip: int, start_step: int) -> list[bool]:
    """Compute mask (True = run) skipping ``num_skip`` evenly spaced steps in ``(start_step, num_steps)``."""
    candidates = np.arange(max(start_step, 1), num_steps)
    if num_skip > len(candidates):
        raise CacheConfigError(f"cannot skip {num_skip} of the {len(candidates)} steps after step {start_step}")
    plan = [True] * num_steps
    if num_skip:
        picks = np.round(np.linspace(0, len(candidates) - 1, num_skip + 2)[1:-1]).astype(int)
        if len(set(picks.tolist())) < num_skip:
            picks = np.linspace(0, len(candidates) - 1, num_skip).round().astype(int)
        for i in picks:
            plan[int(candidates[i])] = False
    return plan


class EvenSkipCache(TimestepCache):
    name: ClassVar[str] = "probe_even_skip"
    config_class: ClassVar[type] = EvenSkipConfig

    def __init__(
        self, config: EvenSkipConfig, num_inference_steps: int, branches: Sequence[str] = (COND, UNCOND), calibrate: bool = False
    ) -> None:
        super().__init__(config, num_inference_steps, branches, calibrate)
        self._plan = even_skip_plan(num_inference_steps, config.num_skip, config.start_step)

    def _decide(self, step: int, branch: str, features: StepFeatures) -> bool:
        return self._plan[step]

    def plan(self) -> dict[str, list[bool]]:
        return {b: list(self._plan) for b in self.branches}


class ZeroResidualCache(MagCache):
    name: ClassVar[str] = "probe_zero_residual"

    def _scaled_residual(self, step: int, branch: str, residual: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(residual)


class StaleResidualCache(MagCache):
    name: ClassVar[str] = "probe_stale_residual"

    def _reset_strategy_state(self) -> None:
        super()._reset_strategy_state()
        self._first: dict[str, torch.Tensor] = {}

    def store(self, step: int, branch: str, residual: torch.Tensor) -> None:
        super().store(step, branch, residual)
        self._first.setdefault(branch, residual)

    def _scaled_residual(self, step: int, branch: str, residual: torch.Tensor) -> torch.Tensor:
        return self._first[branch]


class SwappedResidualCache(MagCache):
    name: ClassVar[str] = "probe_swapped_residual"

    def _scaled_residual(self, step: int, branch: str, residual: torch.Tensor) -> torch.Tensor:
        other = next((b for b in self.branches if b != branch), branch)
        return self._residual[other] if self._residual[other] is not None else residual


PROBES: tuple[type[TimestepCache], ...] = (EvenSkipCache, ZeroResidualCache, StaleResidualCache, SwappedResidualCache)


def register_probe_caches() -> None:
    """Make the probes available by name (idempotent)."""
    for cls in PROBES:
        try:
            get_cache_class(cls.name)
        except CacheConfigError:
            register_cache(cls)
