"""MagCache: skip DiT steps whose residual magnitude barely changes (Ma et al., 2025).

The ratio ``|r_t| / |r_{t-1}|`` of consecutive block residuals follows a model-specific curve that
hardly depends on the prompt, so it is calibrated once and shipped. Per CFG branch, after the
retention steps, each step multiplies an accumulated ratio by its own ratio and adds
``|1 - accumulated ratio|`` to an accumulated error; the step reuses the cached residual while the
error stays under the threshold and at most K steps were skipped, otherwise it runs the blocks and
resets the accumulators. Nothing depends on the latents, so the whole plan is known up front.

Parity with the release code (Zehong-Ma/MagCache, MagCache4Wan2.1/magcache_generate.py,
``magcache_forward``) and diffusers' ``hooks/mag_cache.py``:

- Comparison: the Wan release skips while ``err < threshold`` (strict); its HunyuanVideo script and
  diffusers use ``<=``. We use ``<`` (the Wan release), so ``threshold=0`` never skips. The two only
  differ when the accumulated error equals the threshold exactly.
- Retention: ``int(retention_ratio * steps + 0.5)`` denoising steps of this request, as diffusers
  does. The Wan release counts ``cnt >= int(2 * steps * retention_ratio)`` over the interleaved
  cond/uncond calls, which gives exactly this for the cond branch but ``floor(retention_ratio *
  steps)`` for the uncond branch, so when the fractional part of ``retention_ratio * steps`` is
  at least 0.5 the release's uncond branch starts caching one step earlier (never at 50 steps with
  0.2). The HunyuanVideo release uses ``int(retention_ratio * steps)``.
- Last steps: neither release has a cutoff; ``end_steps`` (default 0) adds one when wanted.
- Ratios are resampled to the request's step count with the release's ``nearest_interp``
  (numpy round-half-to-even, like diffusers' ``torch.round``), per branch.
- A skipped step adds the cached residual as is (release, diffusers: the ``reuse`` estimator);
  ``scale_residual`` (the ``scale`` estimator) multiplies it by the accumulated ratio instead.
- diffusers refuses to skip before any residual exists (the first step): so do we.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any, ClassVar, Sequence

import numpy as np

from sglang.multimodal_gen.runtime.cache.branches import COND, UNCOND
from sglang.multimodal_gen.runtime.cache.registry import register_cache
from sglang.multimodal_gen.runtime.cache.strategy import StepFeatures, TimestepCache
from sglang.multimodal_gen.runtime.cache.validation import (
    CacheConfigError,
    is_number,
    is_whole,
    n_steps,
    threshold_above,
)

if TYPE_CHECKING:
    from sglang.multimodal_gen.configs.cache_params import CacheParams

logger = logging.getLogger(__name__)


@dataclass
class MagCacheConfig:
    r"""
    Configuration of [MagCache](https://github.com/Zehong-Ma/MagCache) for one request.

    Args:
        mag_ratios (`dict[str, list[float]]`):
            Calibrated magnitude ratios per CFG branch (`"cond"`, `"uncond"`), one per denoising
            step of the calibration run, the first being the `1.0` padding. Resampled to the
            request's step count. Shipped for Wan2.1 and HunyuanVideo; obtain them for other
            models with `sglang calibrate`. Not needed in calibration mode.
        threshold (`float`, defaults to `0.12`):
            Budget for the accumulated error `sum |1 - accumulated ratio|` over consecutive skipped
            steps. Higher skips more (faster, less faithful); `0` never skips.
        max_skip_steps (`int`, defaults to `2`):
            K: the most consecutive steps a branch may skip. Higher is faster.
        retention_ratio (`float`, defaults to `0.2`):
            Fraction of the first denoising steps that always run the blocks, rounded half up
            (`int(ratio * steps + 0.5)`, 10 of 50 at 0.2). Lower is faster.
        sqrt_ratios (`bool`, defaults to `False`):
            Use `ratios ** 0.5`, a smoothing the MagCache paper's Wan2.1 runs used (the release
            code leaves it commented out). Smaller deviations from 1, so more steps are skipped.
        scale_residual (`bool`, defaults to `False`):
            On a skipped step, multiply the cached residual by the product of the (unsmoothed)
            ratios since the last computed step, its predicted magnitude change, instead of
            reusing it as is as the release code does. The same as `--cache-estimator scale`
            (kept for old settings); any other estimator together with it is refused.
        sync_branches (`bool`, defaults to `True`):
            Plan the CFG branches together: a step reuses the cache only when every branch may
            skip it, so cond and uncond are always both fresh or both cached. With separate plans
            (the release code's per-branch accumulators) calibrated curves can put the branches
            one step apart, and guidance amplifies a fresh-minus-stale mismatch: measured 4-5 dB
            PSNR lost at equal passes on the built-in model (docs/benchmarks.md). Where the
            branches' own plans agree (the published Wan2.1 curves) both settings give the same plan.
        end_steps (`int`, defaults to `0`):
            The last steps that always run the blocks. The release code has no such cutoff;
            the final steps refine detail and are costly to skip on some models.
    """

    mag_ratios: dict[str, list[float]] = field(default_factory=dict)
    threshold: float = 0.12
    max_skip_steps: int = 2
    retention_ratio: float = 0.2
    sqrt_ratios: bool = False
    scale_residual: bool = False
    sync_branches: bool = True
    end_steps: int = 0

    def __post_init__(self) -> None:
        if not is_number(self.threshold) or not math.isfinite(self.threshold) or self.threshold < 0:
            raise CacheConfigError(
                f"magcache threshold must be a number >= 0 (higher skips more), got {self.threshold!r}"
            )
        if not is_whole(self.max_skip_steps):
            raise CacheConfigError(
                f"magcache max_skip_steps (K) must be a whole number >= 0, got {self.max_skip_steps!r}"
            )
        if not is_number(self.retention_ratio) or not 0.0 <= self.retention_ratio <= 1.0:
            raise CacheConfigError(f"magcache retention_ratio must be in [0, 1], got {self.retention_ratio!r}")
        if not is_whole(self.end_steps):
            raise CacheConfigError(f"magcache end_steps must be a whole number >= 0, got {self.end_steps!r}")
        for name in ("sqrt_ratios", "scale_residual", "sync_branches"):
            if not isinstance(getattr(self, name), bool):
                raise CacheConfigError(f"magcache {name} must be true or false, got {getattr(self, name)!r}")
        self.threshold = float(self.threshold)
        self.retention_ratio = float(self.retention_ratio)
        self.max_skip_steps = int(self.max_skip_steps)
        self.end_steps = int(self.end_steps)
        self.mag_ratios = _check_ratios(self.mag_ratios)


def nearest_interp(src: Sequence[float], target_length: int) -> np.ndarray:
    """Resample a ratio curve to ``target_length`` steps exactly as the MagCache release does."""
    src = np.asarray(src, dtype=np.float64)
    if target_length == 1:
        return src[-1:]
    scale = (len(src) - 1) / (target_length - 1)
    return src[np.round(np.arange(target_length) * scale).astype(int)]


def magcache_plan(
    ratios: Sequence[float], threshold: float, max_skip_steps: int, retention_steps: int, end_steps: int = 0
) -> list[bool]:
    """One branch's compute mask (True = run the blocks); ``ratios`` has one entry per step."""
    return joint_magcache_plan([ratios], threshold, max_skip_steps, retention_steps, end_steps)


def joint_magcache_plan(
    branch_ratios: Sequence[Sequence[float]],
    threshold: float,
    max_skip_steps: int,
    retention_steps: int,
    end_steps: int = 0,
) -> list[bool]:
    """One compute mask shared by several branches, each with its own ratios and accumulators.

    A step is skipped only when every branch may skip it, and a computed step resets every
    branch's accumulators. Where the branches' own plans agree (as for the published Wan2.1
    curves) this is exactly each branch's release plan; with one branch it is that branch's plan.
    """
    num_steps = len(branch_ratios[0])
    plan: list[bool] = []
    acc = [[1.0, 0, 0.0] for _ in branch_ratios]  # accumulated ratio, steps, error per branch
    for step in range(num_steps):
        skip = False
        if retention_steps <= step < num_steps - end_steps:
            skip = step > 0  # diffusers: never skip before a residual exists (step 0 with retention 0).
            for state, ratios in zip(acc, branch_ratios):
                state[0] *= float(ratios[step])
                state[1] += 1
                state[2] += abs(1.0 - state[0])
                skip = skip and state[2] < threshold and state[1] <= max_skip_steps
            if not skip:
                acc = [[1.0, 0, 0.0] for _ in branch_ratios]
        plan.append(not skip)
    return plan


def residual_scales(plan: Sequence[bool], ratios: Sequence[float]) -> list[float]:
    """Predicted ``|r_step| / |r_cached|`` per step: the product of the ratios since the last computed step."""
    scales: list[float] = []
    acc = 1.0
    for compute, ratio in zip(plan, ratios):
        acc = 1.0 if compute else acc * float(ratio)
        scales.append(acc)
    return scales


@register_cache
class MagCache(TimestepCache):
    """Magnitude-aware cache: a deterministic per-branch plan computed when the request starts."""

    name: ClassVar[str] = "magcache"
    config_class: ClassVar[type] = MagCacheConfig
    preset_levels: ClassVar[tuple[str, ...]] = ("default", "fast")
    model_data_options: ClassVar[tuple[str, ...]] = ("mag_ratios",)

    def __init__(
        self,
        config: MagCacheConfig,
        num_inference_steps: int,
        branches: Sequence[str] = (COND, UNCOND),
        calibrate: bool = False,
    ) -> None:
        super().__init__(config, num_inference_steps, branches, calibrate)
        missing = [b for b in self.branches if b not in config.mag_ratios]
        if missing and not calibrate:
            raise CacheConfigError(
                f"magcache has no magnitude ratios for CFG branch(es) {missing} of this request "
                f"(it has {sorted(config.mag_ratios) or 'none'}); pass them in --cache-params as "
                '{"mag_ratios": {"cond": [...], "uncond": [...]}} or run `sglang calibrate`'
            )
        self._build_plans()

    def _build_plans(self) -> None:
        """Every branch's compute mask and residual scales from the current config."""
        config, num_inference_steps, calibrate = self.config, self.num_inference_steps, self.calibrate
        self.retention_steps = int(config.retention_ratio * num_inference_steps + 0.5)
        self._ratios: dict[str, np.ndarray] = {}
        self._plan: dict[str, list[bool]] = {}
        self._scale: dict[str, list[float]] = {}
        raw: dict[str, np.ndarray] = {}
        for branch in self.branches:
            if calibrate or branch not in config.mag_ratios:
                self._plan[branch] = [True] * num_inference_steps
                self._scale[branch] = [1.0] * num_inference_steps
                continue
            raw[branch] = nearest_interp(config.mag_ratios[branch], num_inference_steps)
            self._ratios[branch] = np.sqrt(raw[branch]) if config.sqrt_ratios else raw[branch]
        groups = [list(raw)] if config.sync_branches else [[b] for b in raw]
        for group in filter(None, groups):
            plan = joint_magcache_plan(
                [self._ratios[b] for b in group],
                config.threshold, config.max_skip_steps, self.retention_steps, config.end_steps,
            )
            for branch in group:
                self._plan[branch] = list(plan)
                # The scale predicts the real magnitude, so it uses the ratios as calibrated, never their root.
                self._scale[branch] = residual_scales(plan, raw[branch])
        logger.debug("magcache plan: %s", {b: sum(p) for b, p in self._plan.items()})

    def _decide(self, step: int, branch: str, features: StepFeatures) -> bool:
        return self._plan[branch][step]

    def _passes(self) -> int:
        """The most computed steps of any branch under the current plan."""
        return max(sum(plan) for plan in self._plan.values())

    def meet_budget(self, passes: int, estimator: str | None = None, blend_alpha: float | None = None) -> None:
        """The smallest threshold that brings every branch down to exactly ``passes`` computed steps.

        Raises K (``max_skip_steps``) when no threshold reaches the budget at the configured K, and
        says in one line when no setting gives exactly ``passes``.
        """
        start = self.config
        nearest: set[int] = set()
        for skips in range(start.max_skip_steps, self.num_inference_steps):
            self.config = dataclasses.replace(start, threshold=MAX_TUNED_THRESHOLD, max_skip_steps=skips)
            self._build_plans()
            if self._passes() > passes:
                continue  # even an unbounded threshold runs more steps: allow longer gaps
            low, high = 0.0, MAX_TUNED_THRESHOLD  # passes(low) > budget >= passes(high)
            for _ in range(60):
                middle = (low + high) / 2
                self.config = dataclasses.replace(start, threshold=middle, max_skip_steps=skips)
                self._build_plans()
                low, high = (middle, high) if self._passes() > passes else (low, middle)
            self.config = dataclasses.replace(start, threshold=high, max_skip_steps=skips)
            self._build_plans()
            if all(sum(plan) == passes for plan in self._plan.values()):
                if skips != start.max_skip_steps:
                    logger.info("magcache: max_skip_steps raised from %d to %d to reach %d passes",
                                start.max_skip_steps, skips, passes)
                logger.info("magcache: threshold %.4g for %d of %d steps", high, passes, self.num_inference_steps)
                self.reset()
                return
            nearest.add(self._passes())
            break
        self.config = start
        self._build_plans()
        raise CacheConfigError(
            f"magcache cannot run exactly {passes} of {self.num_inference_steps} steps per branch with these "
            f"ratios (its thresholds give {sorted(nearest) or 'more'}); use --cache-speedup without --cache "
            "for the planner, or set --cache-threshold yourself", param="cache_speedup",
        )

    def _scale_hint(self, step: int, branch: str) -> float:
        """The product of the calibrated ratios since the last computed step (the ``scale`` estimator's factor)."""
        return self._scale[branch][step]

    def _default_estimator(self, requested: str | None) -> str:
        """``scale_residual: true`` is the ``scale`` estimator under its old name."""
        if not self.config.scale_residual:
            return super()._default_estimator(requested)
        if requested not in (None, "scale"):
            raise CacheConfigError(
                f"magcache scale_residual: true means estimator 'scale', but estimator {requested!r} was asked; "
                "drop scale_residual or the estimator"
            )
        return "scale"

    def plan(self) -> dict[str, list[bool]]:
        return {b: list(p) for b, p in self._plan.items()}

    def no_skip_reason(self) -> str | None:
        """Known before the run: which of retention, K or the threshold keeps every step computed."""
        if self.calibrate or not self._ratios or not all(all(p) for p in self._plan.values()):
            return None
        cfg, steps = self.config, self.num_inference_steps
        head = f"magcache skips no step at {steps} steps"
        eligible = range(max(self.retention_steps, 1), steps - cfg.end_steps)
        if not eligible:
            covered = [f"{n_steps(self.retention_steps)} of retention" if self.retention_steps else "the first step"]
            if cfg.end_steps:
                covered.append(f"{n_steps(cfg.end_steps)} of end_steps")
            return (f"{head}: {' and '.join(covered)} cover every step; lower --cache-retention-ratio "
                    f"(now {cfg.retention_ratio:g}){' or end_steps' if cfg.end_steps else ''}, or use more steps")
        if cfg.max_skip_steps == 0:
            return f"{head}: max_skip_steps (K) is 0, which never skips; raise --cache-max-skip-steps"
        # Nothing is skipped, so every step starts from reset accumulators: its error is |1 - its ratio|.
        needed = min(self._fresh_error(step) for step in eligible)
        retained = self.retention_steps
        after = f"after the {n_steps(retained)} of retention" if retained > 1 else "after the first"
        reason = (f"{head}: the accumulated error reaches the threshold {cfg.threshold:g} at every step {after} "
                  f"(smallest {needed:.3g}); raise --cache-threshold to {threshold_above(needed):g} or more")
        early = range(1, min(self.retention_steps, steps - cfg.end_steps))
        if early and min(self._fresh_error(step) for step in early) < cfg.threshold:
            reason += f", or lower --cache-retention-ratio (now {cfg.retention_ratio:g})"
        return reason

    def _fresh_error(self, step: int) -> float:
        """The error of ``step`` right after a computed step: what skipping it needs under the threshold."""
        groups = [list(self._ratios)] if self.config.sync_branches else [[b] for b in self._ratios]
        return min(max(abs(1.0 - float(self._ratios[b][step])) for b in group) for group in groups)

    @classmethod
    def preset_model_keys(cls) -> list[str]:
        return sorted(preset_ratio_table())

    @classmethod
    def options_from_calibration(cls, calibration: Any, num_inference_steps: int | None = None) -> dict[str, Any]:
        return {"mag_ratios": {name: list(b.mag_ratio) for name, b in calibration.branches.items()}}

    @classmethod
    def from_params(
        cls,
        params: "CacheParams",
        num_inference_steps: int,
        model_key: str | None,
        branches: Sequence[str] = (COND, UNCOND),
        calibrate: bool = False,
    ) -> "MagCache":
        """Resolve the preset of ``model_key`` at level ``params.preset``, overlay the user's knobs."""
        level = cls.preset_level(params)
        key = resolve_model_key(model_key)
        overrides = params.knob_overrides()
        kwargs: dict[str, Any] = dict(_LEVELS.get(key, {}).get(level) or _LEVELS["*"][level])
        if key in preset_ratio_table():
            kwargs["mag_ratios"] = preset_ratio_table()[key]
        elif "mag_ratios" not in overrides and not calibrate:
            raise CacheConfigError(
                f"magcache has no shipped ratios for model {model_key!r} "
                f"(known: {', '.join(sorted(preset_ratio_table()))}); "
                'pass {"mag_ratios": {"cond": [...], "uncond": [...]}} in --cache-params or run `sglang calibrate`'
            )
        kwargs.update(overrides)
        try:
            config = MagCacheConfig(**kwargs)
        except TypeError as exc:
            raise CacheConfigError(f"invalid magcache settings: {exc}") from None
        return cls(config, num_inference_steps, branches, calibrate)


#: The largest threshold ``meet_budget`` tries: far above any accumulated error a plan meets.
MAX_TUNED_THRESHOLD = 1e6


# --------------------------------------------------------------------------- presets
# Levels: "default" = release CLI defaults (E012K2R02); "fast" = the README command of each model.
# HunyuanVideo's README lists E012K4R02 and E024K6R02; its release script hard-codes the latter.
_DEFAULT = {"threshold": 0.12, "max_skip_steps": 2, "retention_ratio": 0.2}
_E024K6 = {"threshold": 0.24, "max_skip_steps": 6, "retention_ratio": 0.2}
_LEVELS: dict[str, dict[str, dict[str, Any]]] = {
    "*": {"default": _DEFAULT, "fast": _E024K6},
    "wan21_t2v_1.3b": {"fast": {"threshold": 0.12, "max_skip_steps": 4, "retention_ratio": 0.2}},
}
# Other names a pipeline may use for the same published curve.
MODEL_KEY_ALIASES: dict[str, str] = {"hunyuan": "hunyuan_720p"}


def resolve_model_key(model_key: str | None) -> str:
    key = (model_key or "").strip().lower()
    return MODEL_KEY_ALIASES.get(key, key)


@functools.lru_cache(maxsize=None)
def preset_ratio_table() -> dict[str, dict[str, list[float]]]:
    """Published ratio curves per model key and branch, read from the shipped JSON on first use.

    Wan2.1 arrays interleave ``[cond, uncond, cond, uncond, ...]``; HunyuanVideo has one curve
    (embedded guidance, no CFG branch).
    """
    data = resources.files("sglang.multimodal_gen.configs").joinpath("data/published_cache_params.json")
    published = json.loads(data.read_text(encoding="utf-8"))["magcache"]
    table: dict[str, dict[str, list[float]]] = {}
    for key, arr in published.items():
        if key.startswith("_"):
            continue
        table[key] = {COND: arr[0::2], UNCOND: arr[1::2]} if key.startswith("wan") else {COND: list(arr)}
    return table


# --------------------------------------------------------------------------- validation helpers
def _check_ratios(mag_ratios: Any) -> dict[str, list[float]]:
    if mag_ratios is None:
        return {}
    if not isinstance(mag_ratios, dict):
        raise CacheConfigError(
            "magcache mag_ratios must map CFG branch -> list of ratios, "
            'e.g. {"cond": [1.0, 1.01, ...], "uncond": [...]}'
        )
    checked: dict[str, list[float]] = {}
    for branch, ratios in mag_ratios.items():
        if isinstance(ratios, (str, bytes)) or not hasattr(ratios, "__len__"):
            raise CacheConfigError(f"magcache mag_ratios[{branch!r}] must be a list of numbers, got {ratios!r}")
        if len(ratios) < 2:
            raise CacheConfigError(
                f"magcache mag_ratios[{branch!r}] has {len(ratios)} value(s); at least 2 are needed to resample "
                "it to the request's steps (calibrate with `sglang calibrate`)"
            )
        values = [float(r) if is_number(r) else float("nan") for r in ratios]
        if not all(math.isfinite(v) and v > 0 for v in values):
            raise CacheConfigError(f"magcache mag_ratios[{branch!r}] must hold positive finite numbers")
        checked[str(branch)] = values
    return checked
