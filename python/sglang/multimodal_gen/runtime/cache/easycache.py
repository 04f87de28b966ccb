"""EasyCache: skip whole model calls while the output is predicted to change little (Zhou et al., 2025).

Calibration-free. On computed steps it measures how fast the model output changes relative to
its latent input, ``k = mean|y_t - y_c| / mean|x_t - x_c|`` (``c`` the previous computed step).
On every later step it predicts the output's relative change from the input's change alone,
``k * mean|x_t - x_{t-1}| / mean|y_c|``, and accumulates it; while the sum stays under the
threshold the model call is skipped and the cached ``y_c - x_c`` is added to the new latents.

Parity with the release code (H-EmbodVis/EasyCache, ``easycache_forward`` in
EasyCache4Wan2.1/easycache_generate.py and EasyCache4HunyuanVideo/easycache_sample_video.py):

- Model level: the decision comes before the embedding and a skip skips embed, blocks and head
  (``skips_whole_model``); what is cached is the model output minus its latent input.
- One decision per step, taken on the cond call; the uncond call follows it and reuses its own
  cached difference (``decides_per_pair``). The rate ``k`` and the accumulator are the cond
  branch's.
- The first ``warmup_steps`` denoising steps and the last step always compute and reset the
  accumulator (Wan: ``ret_steps = 10*2`` and ``cutoff_steps = 2*steps - 2`` over interleaved
  cond/uncond calls; HunyuanVideo: 5 and ``steps - 1``).
- Skip while ``accumulated < threshold`` (strict); a computed step resets it to 0. Until ``k`` is
  known (two computed steps) every step computes.
- The previous input is replaced on every step, computed or skipped; ``x_c`` and ``y_c`` only on
  computed steps.
- Defaults per model as the release scripts run them: Wan ``thresh 0.05``, ``ret_steps 10``;
  HunyuanVideo ``thresh 0.025``, ``ret_steps 5``.

Not in the release: a request's state starts empty (the release keeps ``k`` on the model class
between videos of one process); an input that did not change keeps the previous ``k`` rather than
dividing by zero; what a skipped step adds can come from a forecasting estimator
(``--cache-estimator``), ``reuse`` being the release's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from sglang.multimodal_gen.runtime.cache.registry import register_cache
from sglang.multimodal_gen.runtime.cache.strategy import StepFeatures, TimestepCache
from sglang.multimodal_gen.runtime.cache.validation import (
    CacheConfigError,
    is_number,
    is_whole,
    n_steps,
    threshold_above,
)

@dataclass
class EasyCacheConfig:
    r"""
    Configuration of [EasyCache](https://github.com/H-EmbodVis/EasyCache) for one request.

    Args:
        threshold (`float`, defaults to the model's release value: Wan `0.05`, HunyuanVideo `0.025`):
            Budget for the predicted relative output change accumulated over consecutive skipped
            steps. Higher skips more (faster, less faithful); `0` never skips. The release suggests
            0.1 for about 2x and 0.2 for about 3x on Wan2.1; on another model or step count, try a
            value and read the summary's pass count.
        warmup_steps (`int`, defaults to the model's release value: Wan `10`, HunyuanVideo `5`):
            The first denoising steps always run the model (they also measure the rate of change
            the predictions use). Lower is faster and riskier; counted in denoising steps, so it
            does not scale with the step count. The last step always runs too.
    """

    threshold: float = 0.05
    warmup_steps: int = 10

    def __post_init__(self) -> None:
        if not (is_number(self.threshold) and self.threshold >= 0):
            raise CacheConfigError(f"easycache threshold must be a number >= 0 (0 never skips), got {self.threshold!r}")
        self.threshold = float(self.threshold)
        if not is_whole(self.warmup_steps):
            raise CacheConfigError(f"easycache warmup_steps must be a whole number >= 0, got {self.warmup_steps!r}")
        self.warmup_steps = int(self.warmup_steps)


# Below this mean|y_c| is zero: a prediction divides by it.
_TINY = 1e-30

#: The release scripts' settings per model family (the model key's prefix).
RELEASE_DEFAULTS: dict[str, dict[str, float | int]] = {
    "wan": {"threshold": 0.05, "warmup_steps": 10},
    "hunyuan": {"threshold": 0.025, "warmup_steps": 5},
}


def release_defaults(model_key: str | None) -> dict[str, float | int]:
    """The release's settings for a model key; Wan's for keys of other models (its general script)."""
    key = (model_key or "").strip().lower()
    return dict(RELEASE_DEFAULTS["hunyuan" if key.startswith("hunyuan") else "wan"])


@register_cache
class EasyCache(TimestepCache):
    """Runs the model when the accumulated predicted output change reaches the threshold."""

    name: ClassVar[str] = "easycache"
    config_class: ClassVar[type] = EasyCacheConfig
    skips_whole_model: ClassVar[bool] = True
    decides_per_pair: ClassVar[bool] = True

    @classmethod
    def model_defaults(cls, model_key: str | None) -> dict[str, float | int]:
        return release_defaults(model_key)

    def _reset_strategy_state(self) -> None:
        self._accumulated = 0.0
        self._rate: float | None = None  # k
        self._previous_input: torch.Tensor | None = None  # x_{t-1}, replaced every step
        self._input: torch.Tensor | None = None  # x_t of the step being decided
        self._computed_input: torch.Tensor | None = None  # x_c
        self._computed_output: torch.Tensor | None = None  # y_c
        self._computed_output_mean_abs = 0.0  # mean|y_c|
        self._smallest_change: float | None = None

    def in_window(self, step: int) -> bool:
        """Whether ``step`` always computes: the warm-up or the last step."""
        return step < self.config.warmup_steps or step >= self.num_inference_steps - 1

    def _decide(self, step: int, branch: str, features: StepFeatures) -> bool:
        latents = features.latents
        if latents is None:
            raise RuntimeError("easycache needs StepFeatures.latents: the latent input of the model call")
        previous, self._previous_input = self._previous_input, latents.detach()
        self._input = self._previous_input
        if self.in_window(step):
            self._accumulated = 0.0
            return True
        if previous is None or self._computed_output is None or self._rate is None:
            return True
        (input_change,) = self.mean_abs(latents - previous)
        change = self._rate * input_change / max(self._computed_output_mean_abs, _TINY)
        if self._smallest_change is None or change < self._smallest_change:
            self._smallest_change = change
        self._accumulated += change
        if self._accumulated < self.config.threshold:
            return False
        self._accumulated = 0.0
        return True

    def _observe_computed(self, step: int, branch: str, residual: torch.Tensor) -> None:
        """On the first branch: the output ``x_t + residual``, the rate ``k`` against the previous
        computed step, and ``mean|y_t|`` for the next predictions (one statistic call)."""
        if branch != self.branches[0]:
            return
        inputs = self._input.float()
        output = inputs + residual.float()
        if self._computed_output is None:
            (self._computed_output_mean_abs,) = self.mean_abs(output)
        else:
            output_change, input_change, self._computed_output_mean_abs = self.mean_abs(
                output - self._computed_output, inputs - self._computed_input.float(), output
            )
            if input_change > 0:
                self._rate = output_change / input_change
        self._computed_input, self._computed_output = self._input, output

    def no_skip_reason(self) -> str | None:
        """Known after the run: the smallest predicted change against the threshold, or the windows."""
        stats = self.stats
        finished = stats.total_computed == self.num_inference_steps * len(self.branches)
        if self.calibrate or not finished:
            return None
        head = f"easycache skipped no step at {self.num_inference_steps} steps"
        if self._smallest_change is None:
            return (f"{head}: the warm-up ({n_steps(self.config.warmup_steps)}), the last step and the two computed "
                    "steps the rate of change needs leave no step to skip; lower warmup_steps in --cache-params, "
                    "or use more steps")
        return (f"{head}: the smallest predicted change of a step was {self._smallest_change:.3g}, not below the "
                f"threshold {self.config.threshold:g}; raise --cache-threshold to "
                f"{threshold_above(self._smallest_change):g} or more")
