"""Calibration results: what a model's uncached runs measured, saved as JSON and used as presets.

``sglang calibrate`` runs uncached generations with a strategy in calibration mode, averages the
per-step records over prompts, fits TeaCache's polynomial, and saves one file. Strategies read
what they need from it through ``TimestepCache.options_from_calibration`` (MagCache: the
magnitude ratios; TeaCache: the fitted coefficients), so the file replaces the shipped presets.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np

from sglang.multimodal_gen.runtime.cache.budget import StepCosts
from sglang.multimodal_gen.runtime.cache.recording import CalibrationRecord
from sglang.multimodal_gen.runtime.cache.registry import get_cache_class
from sglang.multimodal_gen.runtime.cache.validation import CacheConfigError

if TYPE_CHECKING:
    from sglang.multimodal_gen.configs.cache_params import CacheParams

logger = logging.getLogger(__name__)

FORMAT = "sglang-timestep-cache-calibration"
FORMAT_VERSION = 1
TEACACHE_POLY_DEGREE = 4
# Resampling a curve to a step count this many times larger or smaller than calibrated is coarse.
LARGE_STEP_RATIO = 1.5


@dataclass
class BranchCalibration:
    """One CFG branch's per-step statistics, averaged over the calibration prompts.

    Attributes:
        mag_ratio: Mean over tokens of ``|r_t| / |r_{t-1}|`` (MagCache's curve; step 0 is 1.0).
        mag_ratio_std: Its standard deviation over tokens, averaged over prompts.
        cosine_distance: Mean ``1 - cos(r_t, r_{t-1})`` over tokens.
        input_change: Relative L1 change of the modulated input (TeaCache's indicator).
        output_change: Relative L1 change of the block residual.
        output_gram: The budget planner's data: the model outputs' inner products
            ``output_gram[t][d] = <v_t, v_{t-d}>`` within the calibration window, each prompt's
            divided by its mean ``|v_t|^2`` before averaging (so every prompt weighs the same).
            Empty in files written before it.
        gram: What files written before ``output_gram`` recorded for the planner instead: the same
            products of the block residuals. Still planned from, with the estimator the file
            measured; empty in newer files.
    """

    mag_ratio: list[float]
    mag_ratio_std: list[float]
    cosine_distance: list[float]
    input_change: list[float]
    output_change: list[float]
    output_gram: list[list[float]] = field(default_factory=list)
    gram: list[list[float]] = field(default_factory=list)


@dataclass
class CalibrationResult:
    """A saved calibration: enough provenance to refuse a file for another model, plus the arrays."""

    model: str
    model_family: str
    num_inference_steps: int
    dtype: str
    device: str
    num_prompts: int
    seed: int
    guidance_scale: float
    size: list[int]
    branches: dict[str, BranchCalibration]
    teacache_coefficients: list[float] = field(default_factory=list)
    #: The ``blend`` estimator's least-squares alpha for a one-step skip, fitted on the calibration
    #: prompts; ``None`` in files written before it existed or when the residuals never changed.
    blend_alpha: float | None = None
    #: The scheduler's sigma at each calibration step and after the last (``num_inference_steps +
    #: 1`` values; the planner weighs each step's error by its sigma step). Empty when unknown.
    sigmas: list[float] = field(default_factory=list)
    #: The planner's data at further step counts (``sglang calibrate --planner-steps``), each
    #: ``{"num_inference_steps": n, "sigmas": [...], "output_gram": {branch: rows}}`` (older files:
    #: ``"gram"`` and ``"estimator"``): the outputs move differently at another spacing, so a
    #: request plans from the table nearest its step count.
    planner_tables: list[dict[str, Any]] = field(default_factory=list)
    #: Older files only: the planner's estimator per speedup (``{"1.5": "forecast1", ...}``) that
    #: ``sglang calibrate`` measured for their block-residual ``gram``. Newer files need none: the
    #: planner fits its forecast weights from ``output_gram``.
    planner_estimator: dict[str, str] = field(default_factory=dict)
    #: What a step costs outside the part a cache skips (``StepCosts.to_dict``: fractions of one
    #: branch's model call, and the device they were measured on), from a short uncached run at
    #: the calibration's size: what ``--cache-speedup`` counts to make its budget a time budget.
    #: Empty in files written before it.
    skipped_step_cost: dict[str, Any] = field(default_factory=dict)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_records(
        cls, runs: Sequence[Mapping[str, CalibrationRecord]], **provenance: Any
    ) -> "CalibrationResult":
        """Average per-prompt records (one mapping branch -> record per prompt) and fit TeaCache."""
        if not runs:
            raise ValueError("calibration needs at least one run")
        branches: dict[str, BranchCalibration] = {}
        for branch in runs[0]:
            stats = {
                name.name: np.mean([getattr(run[branch], name.name) for run in runs], axis=0).tolist()
                for name in dataclasses.fields(BranchCalibration) if name.name not in ("gram", "output_gram")
            }
            branches[branch] = BranchCalibration(
                **stats, output_gram=average_gram([run[branch].output_gram for run in runs]))
        sigmas = [s for s in next(iter(runs[0].values())).sigma]
        sigmas = [*sigmas, 0.0] if sigmas and all(s is not None for s in sigmas) else []
        result = cls(branches=branches, num_prompts=len(runs), sigmas=sigmas, **provenance)
        result.teacache_coefficients = fit_teacache_polynomial(*result.teacache_pairs())
        result.blend_alpha = fit_blend_alpha(runs)
        return result

    def add_planner_table(self, runs: Sequence[Mapping[str, CalibrationRecord]], num_inference_steps: int) -> None:
        """Keep the planner's data of calibration runs at another step count."""
        sigmas = list(next(iter(runs[0].values())).sigma)
        self.planner_tables.append({
            "num_inference_steps": num_inference_steps,
            "sigmas": [*sigmas, 0.0] if sigmas and all(s is not None for s in sigmas) else [],
            "output_gram": {branch: average_gram([run[branch].output_gram for run in runs]) for branch in runs[0]},
        })

    def nearest_planner_table(self, num_inference_steps: int) -> dict[str, Any] | None:
        """The planner's table nearest ``num_inference_steps`` (by ratio), None without any:
        ``num_inference_steps``, ``sigmas``, ``gram`` per branch, ``gram_of`` (``"outputs"``, or
        ``"blocks"`` in older files, which also carry their measured ``estimator``)."""
        tables = []
        for table in self.planner_tables:
            if table.get("output_gram"):
                tables.append({**table, "gram": table["output_gram"], "gram_of": "outputs"})
            elif table.get("gram"):
                tables.append({**table, "gram_of": "blocks"})
        own = {"num_inference_steps": self.num_inference_steps, "sigmas": self.sigmas}
        if self.branches and all(b.output_gram for b in self.branches.values()):
            tables.append({**own, "gram": {name: b.output_gram for name, b in self.branches.items()},
                           "gram_of": "outputs"})
        elif self.branches and all(b.gram for b in self.branches.values()):
            tables.append({**own, "gram": {name: b.gram for name, b in self.branches.items()},
                           "gram_of": "blocks", "estimator": self.planner_estimator})
        if not tables:
            return None
        return min(tables, key=lambda t: abs(math.log(t["num_inference_steps"] / num_inference_steps)))

    def planner_table(self, num_inference_steps: int) -> tuple[dict[str, list[list[float]]], list[float]] | None:
        """The planner's (gram per branch, sigmas) nearest ``num_inference_steps`` (by ratio), or None."""
        table = self.nearest_planner_table(num_inference_steps)
        return None if table is None else (table["gram"], table["sigmas"])

    def teacache_pairs(self) -> tuple[np.ndarray, np.ndarray]:
        """(indicator change, output change) of every branch, first step left out (no previous)."""
        x = np.concatenate([b.input_change[1:] for b in self.branches.values()])
        y = np.concatenate([b.output_change[1:] for b in self.branches.values()])
        return x, y

    # ------------------------------------------------------------------ use
    def step_costs(self) -> StepCosts | None:
        """The recorded step costs, or ``None`` when the file has none (or unreadable ones)."""
        if not self.skipped_step_cost:
            return None
        try:
            return StepCosts.from_dict(self.skipped_step_cost)
        except CacheConfigError:
            logger.warning("calibration's skipped_step_cost %r is not valid; measuring instead", self.skipped_step_cost)
            return None

    def check_model(self, model_family: str) -> None:
        if model_family != self.model_family:
            raise CacheConfigError(
                f"calibration file is for a {self.model_family} model, not {model_family}; "
                "calibrate this model with `sglang calibrate`",
                param="cache_calibration",
            )

    def resampled_far(self, num_inference_steps: int, recorded_steps: int | None = None) -> bool:
        """Whether data recorded at ``recorded_steps`` (default: this calibration's step count) is
        resampled by more than ``LARGE_STEP_RATIO`` either way for ``num_inference_steps``."""
        ratio = num_inference_steps / (recorded_steps or self.num_inference_steps)
        return ratio > LARGE_STEP_RATIO or ratio < 1 / LARGE_STEP_RATIO

    # ------------------------------------------------------------------ files
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": FORMAT_VERSION, **dataclasses.asdict(self)}

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_dict(), indent=1) + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> "CalibrationResult":
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise CacheConfigError(f"calibration file {path} does not exist", param="cache_calibration") from None
        except (json.JSONDecodeError, UnicodeDecodeError, IsADirectoryError):
            raise CacheConfigError(f"{path} is not a calibration file (not JSON)", param="cache_calibration") from None
        except OSError as exc:
            raise CacheConfigError(f"cannot read calibration file {path}: {exc.strerror or exc}",
                                   param="cache_calibration") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise CacheConfigError(
                f"{path} is not a calibration file written by `sglang calibrate`", param="cache_calibration"
            )
        try:
            body = {k: v for k, v in data.items() if k not in ("format", "version")}
            body["branches"] = {name: BranchCalibration(**b) for name, b in body["branches"].items()}
            result = cls(**body)
        except (KeyError, TypeError, AttributeError) as exc:
            raise CacheConfigError(f"calibration file {path} is damaged ({exc})", param="cache_calibration") from None
        for name, branch in result.branches.items():
            if len(branch.mag_ratio) != result.num_inference_steps:
                raise CacheConfigError(
                    f"calibration file {path}: branch {name} has {len(branch.mag_ratio)} ratios for "
                    f"{result.num_inference_steps} steps", param="cache_calibration",
                )
        return result


def average_gram(grams: Sequence[Sequence[Sequence[float]]]) -> list[list[float]]:
    """Row by row mean of per-prompt inner products, each divided by its mean ``|r_t|^2`` first."""
    if not grams or not grams[0]:
        return []
    scaled = []
    for gram in grams:
        norm = float(np.mean([row[0] for row in gram])) or 1.0
        scaled.append([np.asarray(row, dtype=np.float64) / norm for row in gram])
    return [np.mean([g[t] for g in scaled], axis=0).tolist() for t in range(len(scaled[0]))]


def fit_blend_alpha(runs: Sequence[Mapping[str, CalibrationRecord]]) -> float | None:
    """The ``alpha`` minimising ``sum |r_t - (r_{t-1} + alpha (r_{t-1} - r_{t-2}))|^2`` over every
    step, branch and prompt: the blend of reuse and the first-order forecast that best predicts a
    step skipped right after two computed ones. ``None`` when no residual ever changed."""
    numerator = sum(sum(record.blend_numerator) for run in runs for record in run.values())
    denominator = sum(sum(record.blend_denominator) for run in runs for record in run.values())
    if not denominator > 0 or not math.isfinite(numerator / denominator):
        return None
    return float(numerator / denominator)


def fit_teacache_polynomial(x: np.ndarray, y: np.ndarray, degree: int = TEACACHE_POLY_DEGREE) -> list[float]:
    """Least-squares polynomial (highest power first) mapping indicator change to output change."""
    finite = np.isfinite(x) & np.isfinite(y)
    x, y = np.asarray(x)[finite], np.asarray(y)[finite]
    if len(x) <= degree or np.ptp(x) == 0:
        return []
    coefficients = np.polyfit(x, y, degree)
    return [float(c) for c in coefficients if math.isfinite(c)] if np.all(np.isfinite(coefficients)) else []


def polynomial_fit_error(coefficients: Sequence[float], x: np.ndarray, y: np.ndarray) -> float:
    """Mean squared error of a TeaCache polynomial on recorded (indicator, output) change pairs."""
    return float(np.mean((np.polyval(coefficients, x) - y) ** 2))


def plot_magnitude_ratios(result: CalibrationResult, path: str | Path) -> Path:
    """PNG of the magnitude ratio per branch with a +-1 std band (over tokens)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    steps = np.arange(result.num_inference_steps)
    for name, branch in result.branches.items():
        mean, std = np.asarray(branch.mag_ratio), np.asarray(branch.mag_ratio_std)
        ax.plot(steps, mean, label=f"{name}", linewidth=1.6)
        ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
    ax.axhline(1.0, color="gray", linewidth=0.8, linestyle=":")
    ax.set_xlabel("denoising step")
    ax.set_ylabel("|r_t| / |r_{t-1}|")
    ax.set_title(
        f"magnitude ratio of the block residual: {Path(result.model).name}, "
        f"{result.num_inference_steps} steps, {result.num_prompts} prompts",
        fontsize=9,
    )
    ax.legend()
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    plt.close(fig)
    return path


def apply_calibration(
    params: "CacheParams", calibration_file: str | Path, model_family: str, num_inference_steps: int
) -> "CacheParams":
    """``params`` with the calibration's options for its strategy; the user's own options win.

    Warns when the calibration was made at a step count far from the request's, unless the request
    takes nothing from it (strategies that need no calibration, such as EasyCache)."""
    calibration = load_calibration(calibration_file)
    calibration.check_model(model_family)
    strategy = get_cache_class(params.strategy)
    supplied = strategy.options_from_calibration(calibration, num_inference_steps)
    takes_alpha = params.estimator == "blend" and params.blend_alpha is None and calibration.blend_alpha is not None
    recorded = strategy.calibrated_steps(calibration, num_inference_steps) if supplied else calibration.num_inference_steps
    if (supplied or takes_alpha) and calibration.resampled_far(num_inference_steps, recorded):
        _warn_resampled_once(str(calibration_file), recorded, num_inference_steps)
    params = dataclasses.replace(params, options={**supplied, **params.options}, calibration_file=str(calibration_file))
    if takes_alpha:
        params = dataclasses.replace(params, blend_alpha=calibration.blend_alpha)  # the user's own alpha wins
    return params


def load_calibration(path: str | Path) -> CalibrationResult:
    """``CalibrationResult.load``, parsed once per file version: a server applies the same file to
    every cached request, at validation and again at generation."""
    try:
        stat = Path(path).stat()
    except OSError:
        return CalibrationResult.load(path)  # raises the user-facing error for a missing file
    return _load_version(str(Path(path).resolve()), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=32)
def _load_version(path: str, mtime_ns: int, size: int) -> CalibrationResult:
    return CalibrationResult.load(path)


@functools.lru_cache(maxsize=256)
def _warn_resampled_once(path: str, calibrated_steps: int, requested_steps: int) -> None:
    logger.warning(
        "calibration %s was made at %d steps and is resampled to %d; recalibrate at this step count "
        "for reliable skipping", path, calibrated_steps, requested_steps,
    )
