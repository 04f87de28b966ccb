"""User-facing timestep-cache knobs of one request, validated before any model work starts.

`CacheParams` is what the CLI (`--cache-strategy`, `--cache-threshold`, ..., `--cache-params`),
the HTTP server and the offline API fill in. It only names and checks the knobs; the strategy
config (e.g. `MagCacheConfig`) is built from it per request by
`sglang.multimodal_gen.runtime.cache.build_cache`, which also resolves presets for the model.
"""

from __future__ import annotations

import dataclasses
import json
import math
import numbers
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sglang.multimodal_gen.runtime.cache.budget import StepCosts
from sglang.multimodal_gen.runtime.cache.registry import get_cache_class, registered_caches
from sglang.multimodal_gen.runtime.cache.validation import CacheConfigError

# Knobs that have their own field here rather than living in `options`.
TOP_LEVEL_KNOBS = ("threshold", "max_skip_steps", "retention_ratio")
# Knobs of the residual estimator: any strategy takes them, and `--cache-params` may carry them.
ESTIMATOR_KNOBS = ("estimator", "blend_alpha")
# The strategy a speedup without a strategy selects.
PLANNER = "planner"


@dataclass
class CacheParams:
    r"""
    Timestep-cache settings of one request.

    Precedence when the strategy config is built: the named `preset` level of the model, then
    `options`, then the explicit `threshold` / `max_skip_steps` / `retention_ratio` (highest).

    Args:
        strategy (`str`, defaults to `"none"`):
            Which caching strategy decides, per denoising step and CFG branch, whether to run the
            DiT blocks or reuse the cached residual: `"none"` (always run them), `"magcache"` or
            `"teacache"` (or any other registered strategy).
        threshold (`float`, *optional*):
            Error budget accumulated over skipped steps before the blocks must run again. A higher
            threshold skips more steps: faster, lower fidelity. `0` never skips. Unset: the
            preset's value (MagCache release default 0.12; TeaCache per model, e.g. 0.05 for
            Wan2.1 T2V 1.3B "slow").
        max_skip_steps (`int`, *optional*):
            MagCache's K: the most consecutive steps a branch may skip. Higher is faster. Unset:
            the preset's value (release default 2). Strategies without this knob refuse it.
        retention_ratio (`float`, *optional*):
            MagCache: fraction of the first denoising steps that always run the blocks (the
            early steps shape the layout and are costly to skip). Lower is faster. In `[0, 1]`.
            Unset: the preset's value (release default 0.2).
        preset (`str`, *optional*):
            Named level resolved for the request's model, e.g. `"default"` or `"fast"` (TeaCache
            also `"slow"`). Unset means `"default"`.
        options (`dict`, *optional*):
            Every other knob, by name, from `--cache-params` JSON. Keys must be fields of the
            strategy's config dataclass (`MagCacheConfig`, `TeaCacheConfig`), e.g.
            `{"sqrt_ratios": true}` or `{"mag_ratios": {"cond": [...], "uncond": [...]}}`.
        calibration_file (`str`, *optional*):
            Path of a calibration result to use instead of the shipped presets (carried here,
            read by the calibration support).
        estimator (`str`, *optional*):
            What a skipped step adds, independent of the strategy that decides when to skip:
            `"reuse"` (the cached residual as is), `"scale"` (times MagCache's accumulated
            ratio), `"forecast1"`, `"forecast2"`, `"forecast1_sigma"`, `"forecast2_sigma"`,
            `"blend"` or any other registered estimator (docs/caching.md). Unset: `"reuse"`
            (`"scale"` for MagCache with `scale_residual`). `--cache-params` may carry it as
            `"estimator"`; an explicit `--cache-estimator` wins.
        blend_alpha (`float`, *optional*):
            The `blend` estimator's weight of the first-order forecast against reuse (0 = reuse,
            1 = `forecast1`). Unset: the calibration file's fitted `blend_alpha` when one is in
            use and has it, else 0.5. Only with `estimator="blend"`.
        speedup (`float`, *optional*):
            Ask for a speedup of the denoising loop instead of a threshold: as many transformer
            passes per CFG branch as make it that much faster, counting what a skipped step still
            costs (`step_costs`); without step costs `round(steps / speedup)` (at 50 steps: 33, 25,
            20, 17 at 1.5x, 2x, 2.5x, 3x). With strategy `"none"` it selects the budget
            `"planner"`, which picks the steps to run from the model's calibration; with a
            strategy it tunes that strategy's threshold to the budget (or says in one line that it
            cannot). Higher is faster. At least 1.
        step_costs (`StepCosts`, *optional*):
            What a step costs outside the part a skip saves (`runtime/cache/budget.py`): with it a
            speedup is a time budget, with fewer passes than `round(steps / speedup)` where skipped
            steps still cost something. Not a knob: the generator fills it from the calibration
            file (measured on the same kind of device) or from a short uncached run.
        expert_options (`dict[str, dict]`, *optional*):
            On a model with several experts (Wan2.2 T2V-A14B), what a calibration of each expert
            supplies (its ratios, fit or planner table), by expert name; `options` still applies
            to every expert and wins. Not a knob: the generator fills it from the calibration file.
    """

    strategy: str = "none"
    threshold: float | None = None
    max_skip_steps: int | None = None
    retention_ratio: float | None = None
    preset: str | None = None
    options: dict[str, Any] = field(default_factory=dict)
    calibration_file: str | None = None
    estimator: str | None = None
    blend_alpha: float | None = None
    speedup: float | None = None
    step_costs: StepCosts | None = None
    expert_options: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.strategy, str) or not self.strategy:
            raise CacheConfigError(f"cache strategy must be a name such as 'magcache', got {self.strategy!r}")
        self.strategy = self.strategy.strip().lower()
        self.speedup = _check_speedup(self.speedup)
        if isinstance(self.step_costs, dict):
            self.step_costs = StepCosts.from_dict(self.step_costs)
        elif self.step_costs is not None and not isinstance(self.step_costs, StepCosts):
            raise CacheConfigError(f"step_costs must be a JSON object, got {self.step_costs!r}")
        if self.speedup is not None and self.threshold is not None:
            raise CacheConfigError(  # the budget sets the threshold; both would silently drop one
                "give either a cache speedup or a cache threshold, not both: a speedup tunes the threshold itself",
                param="cache_speedup",
            )
        if self.strategy == "none" and self.speedup is not None:
            self.strategy = PLANNER  # a budget without a strategy: the planner meets it
        self.threshold = _check_threshold(self.threshold)
        self.max_skip_steps = _check_max_skip_steps(self.max_skip_steps)
        self.retention_ratio = _check_retention_ratio(self.retention_ratio)
        if self.options is None:
            self.options = {}
        if not isinstance(self.options, dict):
            raise CacheConfigError(
                f"cache options must be a JSON object of knob -> value, got {type(self.options).__name__}"
            )
        self.options = dict(self.options)
        for knob in ESTIMATOR_KNOBS:  # `--cache-params` may carry them; the explicit field wins
            value = self.options.pop(knob, None)
            if getattr(self, knob) is None:
                setattr(self, knob, value)
        self._check_estimator()
        if self.preset is not None and (not isinstance(self.preset, str) or not self.preset.strip()):
            raise CacheConfigError(
                f"cache preset must be a level name such as 'default' or 'fast', got {self.preset!r}"
            )
        if self.preset is not None:
            self.preset = self.preset.strip().lower()
        if self.calibration_file is not None and not isinstance(self.calibration_file, str):
            raise CacheConfigError(f"calibration_file must be a path string, got {self.calibration_file!r}")

        if self.strategy == "none":
            given = [k for k in (*TOP_LEVEL_KNOBS, *ESTIMATOR_KNOBS) if getattr(self, k) is not None]
            given += sorted(self.options)
            if self.calibration_file is not None:  # it would be silently unused
                given.append("calibration_file")
            if given or self.preset is not None:
                raise CacheConfigError(
                    f"cache settings {given or ['preset']} were given but the cache strategy is 'none'; "
                    f"choose a strategy ({', '.join(registered_caches())}) or drop them"
                )
            return
        cls = get_cache_class(self.strategy)  # raises, naming the known strategies
        self._check_against(cls)

    def _check_estimator(self) -> None:
        from sglang.multimodal_gen.runtime.cache.estimators import check_blend_alpha, get_estimator

        if self.estimator is not None:
            name = self.estimator.strip().lower() if isinstance(self.estimator, str) else self.estimator
            get_estimator(name)  # raises, naming the registered estimators
            self.estimator = name
        if self.blend_alpha is not None:
            self.blend_alpha = check_blend_alpha(self.blend_alpha)
            if self.estimator != "blend":
                raise CacheConfigError(
                    f"blend_alpha is a setting of the 'blend' estimator, but the estimator is "
                    f"{self.estimator or 'reuse'!r}; add --cache-estimator blend or drop blend_alpha"
                )
        if self.options.get("scale_residual") is True and self.estimator not in (None, "scale"):
            raise CacheConfigError(  # MagCache's old name of the scale estimator; also checked when it is built
                f"scale_residual: true means estimator 'scale', but estimator {self.estimator!r} was asked; "
                "drop scale_residual or the estimator"
            )

    @property
    def enabled(self) -> bool:
        return self.strategy != "none"

    def _check_against(self, cls: type) -> None:
        config_class = getattr(cls, "config_class", None)
        if config_class is not None:
            valid = [f.name for f in dataclasses.fields(config_class)]
            for knob in TOP_LEVEL_KNOBS:
                if getattr(self, knob) is not None and knob not in valid:
                    raise CacheConfigError(
                        f"{self.strategy} has no '{knob}' setting; its settings are: {', '.join(valid)}"
                    )
            unknown = sorted(set(self.options) - set(valid))
            if unknown:
                raise CacheConfigError(
                    f"unknown {self.strategy} option(s) {unknown} in --cache-params; valid keys are: {', '.join(valid)}"
                )
        levels = getattr(cls, "preset_levels", None)
        if self.preset is not None and not levels:
            raise CacheConfigError(f"{self.strategy} has no presets; drop --cache-preset and set its knobs instead")
        if self.preset is not None and self.preset not in levels:
            raise CacheConfigError(
                f"unknown {self.strategy} preset {self.preset!r}; choose one of: {', '.join(levels)}"
            )

    def knob_overrides(self) -> dict[str, Any]:
        """`options` overlaid with the explicit knobs that are set: what overrides the preset."""
        merged = dict(self.options)
        merged.update({k: getattr(self, k) for k in TOP_LEVEL_KNOBS if getattr(self, k) is not None})
        return merged

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "CacheParams":
        """Build from one flat mapping (e.g. a `--cache-params` file or an HTTP request body).

        Keys naming a field of this class fill it; all other keys go to `options`.
        """
        if not isinstance(data, dict):
            raise CacheConfigError(f"cache params must be a JSON object, got {type(data).__name__}")
        names = {f.name for f in dataclasses.fields(cls)} - {"options"}
        fields = {k: v for k, v in data.items() if k in names}
        options = data.get("options") or {}
        if not isinstance(options, dict):
            raise CacheConfigError(
                f"cache params 'options' must be a JSON object of knob -> value, got {type(options).__name__}; "
                "or put the knobs next to 'strategy' without 'options'"
            )
        options = dict(options)
        options.update({k: v for k, v in data.items() if k not in names and k != "options"})
        return cls(**fields, options=options)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def parse_cache_params_arg(value: str) -> dict[str, Any]:
    """Parse `--cache-params`: an inline JSON object or the path of a `.json` file holding one."""
    if not isinstance(value, str) or not value.strip():
        raise CacheConfigError(
            "--cache-params needs a JSON object such as '{\"sqrt_ratios\": true}' or a .json file path"
        )
    text = value.strip()
    source = "--cache-params"
    if not text.startswith("{"):
        path = Path(text).expanduser()
        if not path.is_file():
            raise CacheConfigError(
                f"--cache-params {value!r} is neither a JSON object (it must start with '{{') "
                "nor an existing .json file"
            )
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise CacheConfigError(f"cannot read --cache-params file {str(path)!r}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise CacheConfigError(
                f"--cache-params file {str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})"
            ) from None
        source = f"--cache-params file {str(path)!r}"
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise CacheConfigError(
            f"{source} is not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno}); "
            "write e.g. '{\"threshold\": 0.12, \"sqrt_ratios\": true}' with double quotes"
        ) from None
    if not isinstance(data, dict):
        raise CacheConfigError(f"{source} must hold a JSON object of knob -> value, got a {type(data).__name__}")
    return data


# --------------------------------------------------------------------------- shared validators
def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_speedup(value: Any) -> float | None:
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(value) or value < 1:
        raise CacheConfigError(
            f"cache speedup must be a number >= 1 (2 = half the transformer passes), got {value!r}", param="cache_speedup"
        )
    return float(value)


def _check_threshold(value: Any) -> float | None:
    if value is None:
        return None
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise CacheConfigError(
            f"cache threshold must be a number >= 0 (0 never skips; higher skips more), got {value!r}"
        )
    return float(value)


def _check_max_skip_steps(value: Any) -> int | None:
    if value is None:
        return None
    if _is_number(value) and float(value).is_integer() and value >= 0:
        return int(value)
    raise CacheConfigError(
        f"max_skip_steps must be a whole number >= 0 (consecutive steps a branch may skip), got {value!r}"
    )


def _check_retention_ratio(value: Any) -> float | None:
    if value is None:
        return None
    if not _is_number(value) or not 0.0 <= value <= 1.0:
        raise CacheConfigError(
            f"retention_ratio must be in [0, 1] (fraction of first steps always computed), got {value!r}"
        )
    return float(value)
