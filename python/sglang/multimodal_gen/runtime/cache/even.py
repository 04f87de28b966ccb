"""Even skipping: run the blocks on every ``interval``-th step after a warm-up, no calibration.

The free alternative every cache must beat at equal passes (with running fewer steps), and the
shortest complete example of a strategy: a config dataclass, a plan known up front, and
``meet_budget`` for ``--cache-speedup``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Sequence

from sglang.multimodal_gen.runtime.cache.branches import COND, UNCOND
from sglang.multimodal_gen.runtime.cache.registry import register_cache
from sglang.multimodal_gen.runtime.cache.strategy import StepFeatures, TimestepCache
from sglang.multimodal_gen.runtime.cache.validation import CacheConfigError, is_number, is_whole


@dataclass
class EvenCacheConfig:
    r"""
    Configuration of even skipping for one request.

    Args:
        interval (`int`, defaults to `2`):
            After the warm-up, run the blocks on every `interval`-th step and reuse (or forecast)
            in between. Higher is faster and less faithful; `1` never skips.
        retention_ratio (`float`, defaults to `0.2`):
            Fraction of the first denoising steps that always run the blocks, rounded half up (10
            of 50 at 0.2): the early steps shape the layout. Lower is faster. In `[0, 1]`.
    """

    interval: int = 2
    retention_ratio: float = 0.2

    def __post_init__(self) -> None:
        if not is_whole(self.interval, minimum=1):
            raise CacheConfigError(f"even interval must be a whole number >= 1 (1 never skips), got {self.interval!r}")
        self.interval = int(self.interval)
        if not (is_number(self.retention_ratio) and 0.0 <= self.retention_ratio <= 1.0):
            raise CacheConfigError(f"even retention_ratio must be in [0, 1], got {self.retention_ratio!r}")
        self.retention_ratio = float(self.retention_ratio)


def even_steps(num_steps: int, warmup: int, passes: int) -> list[int]:
    """``passes`` computed steps: the first ``warmup`` (at least step 0), the rest evenly spread
    over the remaining steps, the first of them right after the warm-up."""
    warmup = max(1, min(warmup, passes, num_steps))
    spread = passes - warmup
    rest = num_steps - warmup
    return list(range(warmup)) + [warmup + math.floor(i * rest / spread) for i in range(spread)]


@register_cache
class EvenCache(TimestepCache):
    """A fixed plan: warm-up steps, then every ``interval``-th step (or exactly a budget's passes)."""

    name: ClassVar[str] = "even"
    config_class: ClassVar[type] = EvenCacheConfig

    def __init__(
        self,
        config: EvenCacheConfig,
        num_inference_steps: int,
        branches: Sequence[str] = (COND, UNCOND),
        calibrate: bool = False,
    ) -> None:
        super().__init__(config, num_inference_steps, branches, calibrate)
        self.warmup_steps = int(config.retention_ratio * num_inference_steps + 0.5)
        warmup = max(1, self.warmup_steps)
        computed = set(range(warmup)) | set(range(warmup, num_inference_steps, config.interval))
        self._mask = [step in computed for step in range(num_inference_steps)]

    def meet_budget(self, passes: int, estimator: str | None = None, blend_alpha: float | None = None) -> None:
        """Exactly ``passes`` steps: the warm-up (shortened if the budget is smaller), then evenly spread."""
        computed = set(even_steps(self.num_inference_steps, self.warmup_steps, passes))
        self._mask = [step in computed for step in range(self.num_inference_steps)]

    def _decide(self, step: int, branch: str, features: StepFeatures) -> bool:
        return self._mask[step]

    def plan(self) -> dict[str, list[bool]]:
        return {b: list(self._mask) for b in self.branches}
