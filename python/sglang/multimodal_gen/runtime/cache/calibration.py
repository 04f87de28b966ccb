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
    #: A model with several experts (Wan2.2 T2V-A14B): each expert's calibration over its own
    #: steps (``num_inference_steps`` of them, sigmas up to the next expert's first), by expert
    #: name; ``branches`` is then empty. Every expert's inner products are divided by the same
    #: per-prompt norm (the whole run's mean ``|v_t|^2``), so their tables share one unit.
    experts: dict[str, "CalibrationResult"] = field(default_factory=dict)
    #: How much an error in the latents grows by the end of the run, against the sigma it enters at
    #: (``ErrorGrowth.to_dict``), measured on a few prompts with one perturbed run each: the planner
    #: weighs each skip's error by it. Empty in files written before it (every step weighs the same).
    #: On a model with several experts each expert carries the whole run's curve.
    error_growth: dict[str, list[float]] = field(default_factory=dict)

    # ------------------------------------------------------------------ building
    @classmethod
    def from_records(
        cls, runs: Sequence[Mapping[str, CalibrationRecord]], output_norms: Sequence[float] | None = None,
        final_sigma: float = 0.0, **provenance: Any
    ) -> "CalibrationResult":
        """Average per-prompt records (one mapping branch -> record per prompt) and fit TeaCache.

        ``output_norms``: per prompt, what its output inner products are divided by (default: each
        run's own mean ``|v_t|^2``); ``final_sigma``: the sigma after the last recorded step (an
        expert that hands over to another ends at the other's first)."""
        if not runs:
            raise ValueError("calibration needs at least one run")
        branches: dict[str, BranchCalibration] = {}
        for branch in runs[0]:
            stats = {
                name.name: np.mean([getattr(run[branch], name.name) for run in runs], axis=0).tolist()
                for name in dataclasses.fields(BranchCalibration) if name.name not in ("gram", "output_gram")
            }
            branches[branch] = BranchCalibration(
                **stats, output_gram=average_gram([run[branch].output_gram for run in runs], output_norms))
        result = cls(branches=branches, num_prompts=len(runs), sigmas=_with_final_sigma(runs, final_sigma),
                     **provenance)
        result.teacache_coefficients = fit_teacache_polynomial(*result.teacache_pairs())
        result.blend_alpha = fit_blend_alpha(runs)
        return result

    @classmethod
    def from_expert_records(
        cls, runs: Sequence[Mapping[str, Mapping[str, CalibrationRecord]]], **provenance: Any
    ) -> "CalibrationResult":
        """:meth:`from_records` per expert, from per-prompt records ``{expert: {branch: record}}``
        with the experts in the order they run; ``num_inference_steps`` in ``provenance`` is the
        whole run's."""
        experts = list(runs[0])
        norms = whole_run_norms(runs)
        result = cls(branches={}, num_prompts=len(runs), **provenance)
        for index, expert in enumerate(experts):
            own = [run[expert] for run in runs]
            following = _first_sigma([run[experts[index + 1]] for run in runs]) if index + 1 < len(experts) else 0.0
            steps = len(next(iter(own[0].values())).mag_ratio)
            result.experts[expert] = cls.from_records(
                own, norms, following, **{**provenance, "num_inference_steps": steps})
        return result

    def add_planner_table(self, runs: Sequence[Mapping[str, CalibrationRecord]], num_inference_steps: int,
                          output_norms: Sequence[float] | None = None, final_sigma: float = 0.0) -> None:
        """Keep the planner's data of calibration runs at another step count (``output_norms`` and
        ``final_sigma`` as in :meth:`from_records`)."""
        self.planner_tables.append({
            "num_inference_steps": num_inference_steps,
            "sigmas": _with_final_sigma(runs, final_sigma),
            "output_gram": {branch: average_gram([run[branch].output_gram for run in runs], output_norms)
                            for branch in runs[0]},
        })

    def add_expert_planner_tables(self, runs: Sequence[Mapping[str, Mapping[str, CalibrationRecord]]]) -> None:
        """:meth:`add_planner_table` per expert, from runs at another step count."""
        experts = list(runs[0])
        norms = whole_run_norms(runs)
        for index, expert in enumerate(experts):
            own = [run[expert] for run in runs]
            following = _first_sigma([run[experts[index + 1]] for run in runs]) if index + 1 < len(experts) else 0.0
            self.experts[expert].add_planner_table(own, len(next(iter(own[0].values())).mag_ratio), norms, following)

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
            result = cls._from_body(body)
        except (KeyError, TypeError, AttributeError) as exc:
            raise CacheConfigError(f"calibration file {path} is damaged ({exc})", param="cache_calibration") from None
        for part in [result, *result.experts.values()]:
            for name, branch in part.branches.items():
                if len(branch.mag_ratio) != part.num_inference_steps:
                    raise CacheConfigError(
                        f"calibration file {path}: branch {name} has {len(branch.mag_ratio)} ratios for "
                        f"{part.num_inference_steps} steps", param="cache_calibration",
                    )
        return result

    @classmethod
    def _from_body(cls, body: dict[str, Any]) -> "CalibrationResult":
        body = dict(body)
        body["branches"] = {name: BranchCalibration(**b) for name, b in body["branches"].items()}
        body["experts"] = {name: cls._from_body(e) for name, e in body.get("experts", {}).items()}
        return cls(**body)


def average_gram(grams: Sequence[Sequence[Sequence[float]]], norms: Sequence[float] | None = None) -> list[list[float]]:
    """Row by row mean of per-prompt inner products, each divided by its mean ``|r_t|^2`` first
    (or by the given per-prompt ``norms``)."""
    if not grams or not grams[0]:
        return []
    scaled = []
    for index, gram in enumerate(grams):
        norm = (norms[index] if norms is not None else float(np.mean([row[0] for row in gram]))) or 1.0
        scaled.append([np.asarray(row, dtype=np.float64) / norm for row in gram])
    return [np.mean([g[t] for g in scaled], axis=0).tolist() for t in range(len(scaled[0]))]


def whole_run_norms(runs: Sequence[Mapping[str, Mapping[str, CalibrationRecord]]]) -> list[float]:
    """Per prompt, the mean ``|v_t|^2`` of the model outputs over every expert's steps and branch."""
    norms = []
    for run in runs:
        squares = [row[0] for records in run.values() for record in records.values() for row in record.output_gram]
        norms.append(float(np.mean(squares)) if squares else 1.0)
    return norms


def _with_final_sigma(runs: Sequence[Mapping[str, CalibrationRecord]], final_sigma: float) -> list[float]:
    """The recorded sigmas and the one after the last step; empty where the scheduler has none."""
    sigmas = list(next(iter(runs[0].values())).sigma)
    return [*sigmas, final_sigma] if sigmas and all(s is not None for s in sigmas) else []


def _first_sigma(runs: Sequence[Mapping[str, CalibrationRecord]]) -> float:
    """The first recorded sigma of the next expert, where the one before it ends (0 if unknown)."""
    sigmas = next(iter(runs[0].values())).sigma
    return float(sigmas[0]) if sigmas and sigmas[0] is not None else 0.0


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
    """PNG of the magnitude ratio per branch with a +-1 std band (over tokens); per expert, with a
    dashed line where they switch, on a model with several."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6), dpi=110)
    parts = list(result.experts.items()) if result.experts else [("", result)]
    start = 0
    for expert, part in parts:
        steps = start + np.arange(part.num_inference_steps)
        if start:
            ax.axvline(start - 0.5, color="gray", linewidth=0.8, linestyle="--")
        for name, branch in part.branches.items():
            mean, std = np.asarray(branch.mag_ratio), np.asarray(branch.mag_ratio_std)
            ax.plot(steps, mean, label=f"{expert} {name}".strip(), linewidth=1.6)
            ax.fill_between(steps, mean - std, mean + std, alpha=0.2)
        start += part.num_inference_steps
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
    params: "CacheParams", calibration_file: str | Path, model_family: str, num_inference_steps: int,
    expert_steps: Mapping[str, int] | None = None,
) -> "CacheParams":
    """``params`` with the calibration's options for its strategy; the user's own options win.

    Warns when the calibration was made at a step count far from the request's, unless the request
    takes nothing from it (strategies that need no calibration, such as EasyCache). On a model
    with several experts (``expert_steps``: each expert's steps in this request) each expert's
    calibration goes to ``params.expert_options``; a file of the other kind is refused."""
    calibration = load_calibration(calibration_file)
    calibration.check_model(model_family)
    strategy = get_cache_class(params.strategy)
    if bool(expert_steps) != bool(calibration.experts):
        has = "several experts" if calibration.experts else "one transformer"
        raise CacheConfigError(
            f"calibration file {calibration_file} was made on a model with {has}, unlike this one; "
            "calibrate this model with `sglang calibrate`", param="cache_calibration")
    if expert_steps:
        if set(expert_steps) != set(calibration.experts):
            raise CacheConfigError(
                f"calibration file {calibration_file} calibrates experts {sorted(calibration.experts)}, this model "
                f"runs {sorted(expert_steps)}; calibrate this model with `sglang calibrate`", param="cache_calibration")
        supplied_per_expert = {}
        for expert, steps in expert_steps.items():
            part = calibration.experts[expert]
            supplied_per_expert[expert] = strategy.options_from_calibration(part, steps)
            recorded = strategy.calibrated_steps(part, steps) if supplied_per_expert[expert] else part.num_inference_steps
            if supplied_per_expert[expert] and part.resampled_far(steps, recorded):
                _warn_resampled_once(f"{calibration_file} ({expert})", recorded, steps)
        return dataclasses.replace(params, expert_options=supplied_per_expert, calibration_file=str(calibration_file))
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
