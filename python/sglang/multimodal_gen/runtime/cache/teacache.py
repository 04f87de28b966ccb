"""TeaCache: skip DiT steps while the timestep-modulated input barely changes (Liu et al., 2024).

Per CFG branch, each step measures the relative L1 change of an indicator tensor (the model's
timestep-modulated input) against the previous step's, maps it through a model-specific
polynomial fitted to the output change, and accumulates it. The step reuses the cached residual
while the sum stays under the threshold; otherwise it runs the blocks and resets the sum.

Parity with the release code (ali-vilab/TeaCache, TeaCache4Wan2.1/teacache_generate.py and
TeaCache4HunyuanVideo/teacache_sample_video.py, ``teacache_forward``):

- Skip while ``accumulated < threshold`` (strict); compute and reset otherwise.
- The previous indicator is replaced on every step, computed or skipped, warm-up included.
- Wan2.1, default mode: indicator ``e`` (our ``modulated_input``), first step and last step always
  computed (``ret_steps = 1*2``, ``cutoff_steps = 2*steps - 2`` over interleaved cond/uncond calls).
  ``use_ret_steps`` mode: indicator ``e0`` (our ``timestep_projection``), first 5 steps computed,
  no cutoff (``ret_steps = 5*2``, ``cutoff_steps = 2*steps``). Windows and the accumulator are per
  branch. HunyuanVideo: modulated input of the first double block, first and last step computed.
- Warm-up and end windows are counted in denoising steps of this request, so they do not depend
  on how many CFG branches the request has.
- Not in the release: at a step count other than the one the polynomial and threshold were fitted
  at (``calibration_steps``: 50 for the presets, 40 for the image-to-video ones) the threshold is scaled by
  ``calibration_steps / steps``; at that step count itself nothing changes.

On Wan2.1 both indicators depend on the timestep only, so TeaCache's decisions there follow the
schedule, not the latents.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from dataclasses import dataclass
from importlib import resources
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np
import torch

from sglang.multimodal_gen.runtime.cache.branches import COND, UNCOND
from sglang.multimodal_gen.runtime.cache.registry import register_cache
from sglang.multimodal_gen.runtime.cache.strategy import StepFeatures, TimestepCache
from sglang.multimodal_gen.runtime.cache.validation import CacheConfigError, is_number, threshold_above

if TYPE_CHECKING:
    from sglang.multimodal_gen.configs.cache_params import CacheParams

logger = logging.getLogger(__name__)

INDICATORS = ("modulated_input", "timestep_projection")


@dataclass
class TeaCacheConfig:
    r"""
    Configuration of [TeaCache](https://github.com/ali-vilab/TeaCache) for one request.

    Args:
        coefficients (`list[float]`):
            Polynomial (numpy `poly1d` order, highest power first) mapping the indicator's relative
            L1 change to the expected change of the model output. Fitted per model and indicator;
            shipped for Wan2.1 and HunyuanVideo. Not needed in calibration mode.
        threshold (`float`, defaults to `0.1`):
            Budget for the accumulated rescaled change over consecutive skipped steps. Higher skips
            more (faster, less faithful); `0` never skips. Its scale depends on `coefficients`,
            so use the model's presets (e.g. Wan2.1 T2V 1.3B: 0.05 slow, 0.08 fast).
        indicator (`str`, defaults to `"modulated_input"`):
            Which `StepFeatures` tensor is compared between steps: `"modulated_input"` (TeaCache's
            default mode; Wan: the timestep embedding) or `"timestep_projection"` (Wan only: the 6x
            timestep projection of TeaCache's `use_ret_steps` mode). Presets pick the matching
            coefficients and windows.
        warmup_steps (`int`, defaults to `1`):
            The first denoising steps that always run the blocks (default mode 1, `use_ret_steps`
            mode 5). Lower is faster.
        end_steps (`int`, defaults to `1`):
            The last denoising steps that always run the blocks (default mode 1, `use_ret_steps`
            mode 0). Lower is faster.
        calibration_steps (`int`, *optional*):
            The step count `coefficients` and `threshold` were fitted and tuned at: 50 for the
            published text-to-video presets, 40 for Wan2.1's image-to-video ones (the release's
            defaults), a calibration file's own `num_inference_steps`. A request with
            another step count compares the accumulated change with
            `threshold * calibration_steps / num_inference_steps`: each of its steps spans that
            many calibration steps, so it gets that much more of the budget. At fewer steps than
            calibrated this skips more (faster, less faithful) than the unscaled threshold, which
            with the 50-step presets skips nothing at 20 steps; at more steps it skips less. A
            preset then computes about the same fraction of the steps at any step count (built-in
            model, `slow`: 13 of 20, 21 of 30, 35 of 50). At the calibration's own step count the
            threshold is used as is: the release code's decisions, bit for bit. `None` (also what
            your own `coefficients` without it give) uses the threshold as is at every step count.
            Why this rule and not a rescaled polynomial: docs/caching.md.
        indicator_changes (`dict[str, list[float]]`, *optional*):
            Per CFG branch, the indicator's relative L1 change at each step of the calibration run
            (`calibration_steps` values, the first `0.0`), from `sglang calibrate`. Only used to
            tune the threshold to a `--cache-speedup` budget; without it TeaCache cannot take one.
    """

    coefficients: list[float] | None = None
    threshold: float = 0.1
    indicator: str = "modulated_input"
    warmup_steps: int = 1
    end_steps: int = 1
    calibration_steps: int | None = None
    indicator_changes: dict[str, list[float]] | None = None

    def __post_init__(self) -> None:
        if not is_number(self.threshold) or not math.isfinite(self.threshold) or self.threshold < 0:
            raise CacheConfigError(
                f"teacache threshold must be a number >= 0 (higher skips more), got {self.threshold!r}"
            )
        if self.indicator not in INDICATORS:
            raise CacheConfigError(f"teacache indicator must be one of {', '.join(INDICATORS)}, got {self.indicator!r}")
        for name in ("warmup_steps", "end_steps"):
            value = getattr(self, name)
            if not (is_number(value) and float(value).is_integer() and value >= 0):
                raise CacheConfigError(f"teacache {name} must be a whole number >= 0, got {value!r}")
            setattr(self, name, int(value))
        self.threshold = float(self.threshold)
        if self.calibration_steps is not None:
            value = self.calibration_steps
            if not (is_number(value) and float(value).is_integer() and value >= 1):
                raise CacheConfigError(
                    f"teacache calibration_steps must be a whole number >= 1 (the step count the coefficients "
                    f"were fitted at) or null, got {value!r}"
                )
            self.calibration_steps = int(value)
        if self.coefficients is not None:
            if isinstance(self.coefficients, (str, bytes)) or not hasattr(self.coefficients, "__len__"):
                raise CacheConfigError(f"teacache coefficients must be a list of numbers, got {self.coefficients!r}")
            values = [float(c) if is_number(c) else float("nan") for c in self.coefficients]
            if not values or not all(math.isfinite(v) for v in values):
                raise CacheConfigError(
                    "teacache coefficients must be a non-empty list of finite numbers, highest power first"
                )
            self.coefficients = values


@register_cache
class TeaCache(TimestepCache):
    """Timestep-embedding-aware cache: decides per step from the change of the indicator tensor."""

    name: ClassVar[str] = "teacache"
    config_class: ClassVar[type] = TeaCacheConfig
    preset_levels: ClassVar[tuple[str, ...]] = ("default", "slow", "fast")
    model_data_options: ClassVar[tuple[str, ...]] = ("coefficients",)

    def __init__(
        self,
        config: TeaCacheConfig,
        num_inference_steps: int,
        branches: Sequence[str] = (COND, UNCOND),
        calibrate: bool = False,
    ) -> None:
        if config.coefficients is None and not calibrate:
            raise CacheConfigError(
                "teacache needs the rescaling polynomial of this model; pass "
                '{"coefficients": [...]} in --cache-params (highest power first) or use a model with shipped presets'
            )
        super().__init__(config, num_inference_steps, branches, calibrate)
        #: How many calibration steps one step of this request spans; 1.0 keeps the release rule exactly.
        self.step_ratio = (config.calibration_steps or num_inference_steps) / num_inference_steps
        #: The budget this request's accumulated change is compared with.
        self.threshold = config.threshold * self.step_ratio  # exact when the ratio is 1.0

    def _reset_strategy_state(self) -> None:
        self._previous: dict[str, torch.Tensor | None] = {b: None for b in self.branches}
        self._accumulated: dict[str, float] = {b: 0.0 for b in self.branches}
        # The smallest rescaled change of one step, over branches: what a threshold must exceed to skip.
        self._smallest_change: float | None = None

    def _decide(self, step: int, branch: str, features: StepFeatures) -> bool:
        indicator = getattr(features, self.config.indicator)
        if indicator is None:
            raise CacheConfigError(
                f"teacache indicator {self.config.indicator!r} is not exposed by this model; "
                f"set the teacache option indicator to one of {', '.join(INDICATORS)} that it provides"
            )
        previous, self._previous[branch] = self._previous[branch], indicator.detach()
        in_window = step < self.config.warmup_steps or step >= self.num_inference_steps - self.config.end_steps
        if in_window or previous is None:
            self._accumulated[branch] = 0.0
            return True
        change = float(np.polyval(self.config.coefficients, self.relative_l1(indicator, previous)))
        if self._smallest_change is None or change < self._smallest_change:
            self._smallest_change = change
        self._accumulated[branch] += change
        if self._accumulated[branch] < self.threshold:
            return False
        self._accumulated[branch] = 0.0
        return True

    def meet_budget(self, passes: int, estimator: str | None = None, blend_alpha: float | None = None) -> None:
        """Tune the threshold so the calibrated indicator changes, replayed through the rule, give
        ``passes`` computed steps per branch; the run itself is then held to exactly ``passes``
        (``enforce_pass_budget``), since its own changes differ a little from the calibration's."""
        changes = self.config.indicator_changes
        if not changes or any(b not in changes for b in self.branches) or self.config.coefficients is None:
            raise CacheConfigError(
                "teacache can be tuned to a speedup only with a calibration of this model's indicator changes; "
                "run `sglang calibrate` and pass the file with --cache-calibration, or use --cache-speedup without "
                "--cache (the planner)", param="cache_speedup",
            )
        replays = {b: [float(np.polyval(self.config.coefficients, x)) for x in self._replayed_changes(changes[b])]
                   for b in self.branches}

        def most_passes(threshold: float) -> int:
            return max(teacache_passes(r, threshold, self.config.warmup_steps, self.config.end_steps)
                       for r in replays.values())

        low, high = 0.0, 1.0
        while most_passes(high) > passes and high < 1e6:
            low, high = high, high * 4
        for _ in range(60):
            middle = (low + high) / 2
            low, high = (middle, high) if most_passes(middle) > passes else (low, middle)
        self.threshold = high
        self.config = dataclasses.replace(self.config, threshold=high / self.step_ratio)
        self.enforce_pass_budget(passes)
        logger.info("teacache: threshold %.4g for %d of %d steps (calibrated replay: %d)", self.config.threshold,
                    passes, self.num_inference_steps, most_passes(high))

    def _replayed_changes(self, calibrated: Sequence[float]) -> list[float]:
        """The calibration's per-step changes resampled to this request: each request step spans
        ``calibration_steps / steps`` calibration steps, whose changes add up."""
        cumulative = np.concatenate([[0.0], np.cumsum(np.asarray(calibrated[1:], dtype=np.float64))])
        positions = np.arange(self.num_inference_steps) * len(calibrated) / self.num_inference_steps
        at = np.interp(positions, np.arange(len(cumulative)), cumulative)
        return [0.0, *np.diff(at).tolist()]

    def no_skip_reason(self) -> str | None:
        """Known after the run: the threshold against the smallest rescaled change seen, or the windows."""
        stats = self.stats
        finished = stats.total_computed == self.num_inference_steps * len(self.branches)
        if self.calibrate or not finished:
            return None
        cfg = self.config
        head = f"teacache skipped no step at {self.num_inference_steps} steps"
        if self._smallest_change is None:
            return (f"{head}: warmup_steps ({cfg.warmup_steps}) and end_steps ({cfg.end_steps}) cover every step; "
                    "lower them in --cache-params, or use more steps")
        smallest, r = self._smallest_change, self.step_ratio
        suggestion = threshold_above(smallest / r)
        while suggestion * r <= smallest:  # guard the float product at an exact two-digit edge
            suggestion = threshold_above(suggestion)
        threshold = f"{cfg.threshold:g}" if r == 1.0 else (
            f"{self.threshold:.3g} ({cfg.threshold:g} scaled by {cfg.calibration_steps}/{self.num_inference_steps} "
            "calibration/request steps)"
        )
        return (f"{head}: the smallest rescaled change of a step was {smallest:.3g}, not below the threshold "
                f"{threshold}; raise --cache-threshold to {suggestion:g} or more")

    @classmethod
    def preset_model_keys(cls) -> list[str]:
        return sorted(preset_table())

    @classmethod
    def options_from_calibration(cls, calibration: Any, num_inference_steps: int | None = None) -> dict[str, Any]:
        """The polynomial fitted on the modulated input's change (the indicator calibration records)."""
        if not calibration.teacache_coefficients:
            return {}
        return {
            "coefficients": list(calibration.teacache_coefficients),
            "indicator": "modulated_input",
            "calibration_steps": calibration.num_inference_steps,
            "indicator_changes": {name: list(b.input_change) for name, b in calibration.branches.items()},
        }

    @classmethod
    def from_params(
        cls,
        params: "CacheParams",
        num_inference_steps: int,
        model_key: str | None,
        branches: Sequence[str] = (COND, UNCOND),
        calibrate: bool = False,
    ) -> "TeaCache":
        """Resolve the preset of ``model_key`` for the requested indicator and level, overlay the knobs."""
        level = cls.preset_level(params)
        overrides = params.knob_overrides()
        indicator = overrides.get("indicator", "modulated_input")
        if indicator not in INDICATORS:
            raise CacheConfigError(f"teacache indicator must be one of {', '.join(INDICATORS)}, got {indicator!r}")
        warmup, end = _WINDOWS[indicator]
        kwargs: dict[str, Any] = {"indicator": indicator, "warmup_steps": warmup, "end_steps": end}
        key = resolve_model_key(model_key)
        preset = preset_table().get(key, {}).get(indicator)
        if preset is not None:
            kwargs["coefficients"] = preset["coefficients"]
            kwargs["threshold"] = preset[level]
            kwargs["calibration_steps"] = preset_calibration_steps(key)
        elif key in preset_table() and "coefficients" not in overrides:
            raise CacheConfigError(
                f"teacache has no published coefficients for model {model_key!r} with indicator {indicator!r} "
                f"(it has {', '.join(preset_table()[key])}); pass coefficients in --cache-params"
            )
        elif "coefficients" not in overrides and not calibrate:
            raise CacheConfigError(
                f"teacache has no shipped coefficients for model {model_key!r} "
                f"(known: {', '.join(sorted(preset_table()))}); "
                'pass {"coefficients": [...]} in --cache-params'
            )
        elif level != "default" and "threshold" not in overrides:
            raise CacheConfigError(
                f"teacache has no published {level!r} threshold for model {model_key!r}; set the threshold explicitly"
            )
        if "coefficients" in overrides and "calibration_steps" not in overrides:
            kwargs["calibration_steps"] = None  # the step count of the user's own polynomial is unknown
        kwargs.update(overrides)
        try:
            config = TeaCacheConfig(**kwargs)
        except TypeError as exc:
            raise CacheConfigError(f"invalid teacache settings: {exc}") from None
        return cls(config, num_inference_steps, branches, calibrate)


def teacache_passes(changes: Sequence[float], threshold: float, warmup_steps: int, end_steps: int) -> int:
    """Computed steps of TeaCache's rule over per-step rescaled indicator changes (the polynomial
    already applied), step 0 always computed."""
    steps, computed, accumulated = len(changes), 0, 0.0
    for step, change in enumerate(changes):
        if step == 0 or step < warmup_steps or step >= steps - end_steps:
            computed, accumulated = computed + 1, 0.0
            continue
        accumulated += change
        if accumulated < threshold:
            continue
        computed, accumulated = computed + 1, 0.0
    return computed


# --------------------------------------------------------------------------- presets
# The step count the published polynomials and thresholds were fitted and tuned at: the release
# scripts' defaults (Wan2.1's generate.py: sample_steps 50 for text to video, 40 for image to
# video; HunyuanVideo infer_steps 50).
PRESET_CALIBRATION_STEPS = 50
I2V_PRESET_CALIBRATION_STEPS = 40


def preset_calibration_steps(model_key: str) -> int:
    """The step count a preset's threshold was tuned at (the request's is scaled from it)."""
    return I2V_PRESET_CALIBRATION_STEPS if "_i2v_" in model_key else PRESET_CALIBRATION_STEPS
# (warmup_steps, end_steps) of each release mode, in denoising steps.
_WINDOWS = {"modulated_input": (1, 1), "timestep_projection": (5, 0)}
# model key -> indicator -> (coefficient key in the shipped JSON, slow threshold, fast threshold).
# Thresholds: the Slow/Fast columns of the TeaCache4Wan2.1 README's use_ret_steps tables;
# HunyuanVideo: its release script (0.1 for 1.6x, 0.15 for 2.1x). "default" is "slow".
_PRESET_SOURCES: dict[str, dict[str, tuple[str, float, float]]] = {
    "wan21_t2v_1.3b": {
        "modulated_input": ("t2v_1.3B_default", 0.05, 0.08),
        "timestep_projection": ("t2v_1.3B_use_ret_steps", 0.05, 0.10),
    },
    "wan21_t2v_14b": {
        "modulated_input": ("t2v_14B_default", 0.14, 0.20),
        "timestep_projection": ("t2v_14B_use_ret_steps", 0.10, 0.20),
    },
    "wan21_i2v_14b_480p": {
        "modulated_input": ("i2v_480P_default", 0.13, 0.26),
        "timestep_projection": ("i2v_480P_use_ret_steps", 0.20, 0.30),
    },
    "wan21_i2v_14b_720p": {
        "modulated_input": ("i2v_720P_default", 0.20, 0.30),
        "timestep_projection": ("i2v_720P_use_ret_steps", 0.20, 0.30),
    },
    "hunyuan": {"modulated_input": ("hunyuanvideo", 0.10, 0.15)},
}
# The TeaCache polynomial of HunyuanVideo does not depend on the resolution.
MODEL_KEY_ALIASES: dict[str, str] = {"hunyuan_544p": "hunyuan", "hunyuan_720p": "hunyuan"}


def resolve_model_key(model_key: str | None) -> str:
    key = (model_key or "").strip().lower()
    return MODEL_KEY_ALIASES.get(key, key)


@functools.lru_cache(maxsize=None)
def preset_table() -> dict[str, dict[str, dict[str, Any]]]:
    """model key -> indicator -> {coefficients, default, slow, fast}, read from the shipped JSON."""
    data = resources.files("sglang.multimodal_gen.configs").joinpath("data/published_cache_params.json")
    published = json.loads(data.read_text(encoding="utf-8"))
    # JSON keys carry notes in parentheses, e.g. "t2v_1.3B_default(e, ret=1 step, ...)".
    coefficients = {k.split("(")[0]: v for k, v in published["teacache_wan21"].items() if not k.startswith("_")}
    coefficients["hunyuanvideo"] = published["teacache_hunyuanvideo"]["coefficients"]
    return {
        key: {
            indicator: {"coefficients": coefficients[name], "default": slow, "slow": slow, "fast": fast}
            for indicator, (name, slow, fast) in modes.items()
        }
        for key, modes in _PRESET_SOURCES.items()
    }

