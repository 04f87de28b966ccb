"""The budget planner: the steps to run for a given number of transformer passes, chosen offline.

``--cache-speedup X`` asks for the passes per CFG branch that make the denoising loop X times
faster (``budget.py``). The planner picks which steps run by dynamic programming over costs
measured at calibration, in the spirit of LeMiCa and DPCache: ``sglang calibrate`` keeps the
inner products of the uncached runs' model outputs within a window (``BranchCalibration.output_gram``),
and from them the error of any linear estimate of a skipped step's output is a quadratic form.
The plan is deterministic, so every CFG branch (and every rank) agrees by construction.

A planned skip covers the whole model call (embed, blocks and head), so it costs only guidance
and the scheduler step, and what it adds is an estimate of the model output itself. (Files
written before 2026-12-07 hold the block residuals' products instead, ``gram_of = "blocks"``: a
proxy the planner still plans from, with the estimator such a file measured.)

The cost of a gap. Steps ``i+1 .. j-1`` are skipped after computed steps ``h < i``; the estimator
adds ``e_k = r_i + c_k (r_i - r_h)`` at step ``k`` (``c_k = 0`` for ``reuse``, ``(k-i)/(i-h)`` for
``forecast1``, the same in sigma for ``forecast1_sigma``, ``alpha (k-i)/(i-h)`` for ``blend``, and
for ``fitted`` the least-squares ``c_k`` over the calibration runs, ``GapCosts.fitted_weight``).
What the gap moves the latent by, against the uncached run, is about ``E = sum_k dt_k (e_k -
r_k)`` with ``dt_k`` the scheduler's sigma step: errors within a gap are summed before the norm
because they are correlated (a stale residual is wrong the same way on consecutive steps), which
a per-step summed cost misses and which is why, in an early experiment, it stopped predicting the
final error beyond 2x. Different gaps, separated by a computed step, add in
quadrature (``|E|^2``, as independent errors do), over branches too: measured against adding their
norms (the triangle bound), this kept a better worst case on both trained models at 1.5x and
2x. What the video shows is each gap's error after the rest of the run has carried it: the
gap's cost is multiplied by the growth of an error entering the latents where the gap ends
(``error_growth.py``, measured by ``sglang calibrate``; up to 38x at high noise and about 1.1x at
the last step on the hard-world model; a growth below 1 counts as 1), without which the planner took skips at high
noise for cheap. The plan minimises that total for exactly the requested passes, with at most
``max_skip_steps`` skipped in a row.

Which estimator: ``fitted``, unless the request names one. Its weight for each skipped step is
what the recorded outputs did at that distance from the plan's last two computed steps (about the
first-order forecast's ``(k-i)/(i-h)`` where the outputs move steadily, damped where they turn),
so a calibration needs no generations beyond its uncached runs. Before it, ``sglang calibrate``
ran every candidate estimator on its prompts at each speedup to choose one (about 12 planned
generations per prompt): the cost model ranked the plans of one estimator but a fixed estimator
was right at some speedups and fell apart at others. The fitted weights beat those measured
choices on the built-in Wan model at every speedup and on the hard-world and HunyuanVideo models
from 2x, and lose 2-3 dB to them at 1.5x there (docs/benchmarks.md, "Calibration that costs what
it records"). A request whose flow turns unlike the calibration's (another guidance, step count or
caption) is caught on its own computed steps: each tests the forecast its weight makes for it, and
where the steps stop bearing the weights out they are scaled toward ``reuse``
(``BudgetPlanner._observe_computed``, ``check_forecast``). Under classifier-free guidance it
forecasts only where the computed steps lie close: with two branches and computed steps more than
``GUIDED_FORECAST_MAX_SPACING`` (1/12 of the schedule) apart on average, an unnamed estimator is
``reuse``. The guidance term ``cond - uncond``, which the guidance scale multiplies, moves far
faster than either branch's output (a median 48% of itself over 2 steps at 20 steps on the
built-in Wan model, the cond output 8%: ``benchmark/guidance_term.py``), and on both Wan models
``reuse`` on its own plan beat the checked forecast at that spacing, on training and held-out
captions alike; with guidance off the forecast won at the same spacings (docs/benchmarks.md,
"The planner off its calibration").

Step counts other than the calibration's are planned on resampled costs: request step ``k`` of
``N`` sits at calibration position ``k * N_cal / N`` (the same fraction of the schedule), and a
residual between calibration steps is taken as the linear interpolation of its neighbours, whose
inner products follow from the recorded ones. Gaps whose span leaves the calibration window are
not considered, nor are skips of request steps past the last recorded one (more steps than the
table: their outputs are unknown). Finer than the table, each interpolated output also gets a
spread of its own (``INTERPOLATION_SPREAD``): it is not known to lie on the straight line between
the recorded outputs around it, and taking it so made forecasting between them look free.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from collections import deque
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Mapping, Sequence

import numpy as np
import torch

from sglang.multimodal_gen.runtime.cache.branches import COND, UNCOND
from sglang.multimodal_gen.runtime.cache.error_growth import ErrorGrowth
from sglang.multimodal_gen.runtime.cache.estimators import DEFAULT_BLEND_ALPHA, FittedEstimator, ResidualEstimator
from sglang.multimodal_gen.runtime.cache.registry import register_cache
from sglang.multimodal_gen.runtime.cache.strategy import StepFeatures, TimestepCache
from sglang.multimodal_gen.runtime.cache.validation import CacheConfigError, is_number, is_whole

if TYPE_CHECKING:
    from sglang.multimodal_gen.configs.cache_params import CacheParams

logger = logging.getLogger(__name__)

#: Estimators whose estimate is linear in the last two computed residuals, which the planner can cost.
PLANNABLE_ESTIMATORS = ("reuse", "forecast1", "forecast1_sigma", "blend", "fitted")
#: What a calibration's inner products are of: the model outputs (what a planned skip estimates), or,
#: in files written before those were recorded, the block residuals (a proxy).
GRAM_KINDS = ("outputs", "blocks")
#: The speedup of ``--cache planner`` without ``--cache-speedup``.
DEFAULT_SPEEDUP = 2.0
#: What skipped steps add when the request names no estimator and the calibration recorded the
#: outputs' inner products: the forecast weighted per skipped step by least squares over them.
DEFAULT_ESTIMATOR = "fitted"
#: The same for an older calibration of block residuals that measured no estimator (and whose
#: fitted alpha is positive): on both trained models blend never fell apart, where the pure
#: first-order forecast did from 2.5x (docs/benchmarks.md).
BLOCKS_DEFAULT_ESTIMATOR = "blend"
#: The check of the fitted weights (``check_forecast``): how much of the running share the earlier
#: computed steps bore out is kept at each new one, at ``TRUST_MEMORY_STEPS`` steps (0.75: about the
#: last four checks count). At ``N`` steps it is ``TRUST_MEMORY ** (TRUST_MEMORY_STEPS / N)``, so the
#: share forgets at the same pace along the schedule whatever the step count: at 20 steps, where
#: each check spans 2.5 times as much of the flow, a turn is caught within the few checks there are.
TRUST_MEMORY = 0.75
TRUST_MEMORY_STEPS = 50
#: The running share at and above which the weights are applied whole; below it they are scaled by
#: ``share / TRUSTED_SHARE``. A check at distance ``gap + 1`` is harsher than the skipped steps'
#: own forecasts (the first-order path holds for a step or two, then turns); 0.5 is where the
#: fitted forecast stops beating reuse at the check. With 1.0 here the hard-world model's training
#: captions lost 2.2 dB at 50 steps (benchmark/planner_tuning.py --constant TRUSTED_SHARE=1).
TRUSTED_SHARE = 0.5
#: One check counts for at most this share, so that a single far-off step cannot outweigh the rest.
MAX_CHECK_SHARE = 2.0
#: At step counts finer than the table: how far an output between two recorded ones may stray
#: from the straight line between them, as a share of their squared change at its worst (halfway:
#: a quarter of it, a standard deviation of a quarter of the change). The best of 0, 0.25, 0.5 and 1
#: on training captions at 100 steps (benchmark/planner_tuning.py --steps 40 100 --speedups 2 3
#: --constant INTERPOLATION_SPREAD=S, on the three text-to-video models).
INTERPOLATION_SPREAD = 0.25
#: The most steps the planner plans: its dynamic programme takes about 3 s at 200 steps on one CPU
#: core and grows with the square of the step count.
MAX_PLANNED_STEPS = 250
#: Under classifier-free guidance (two branches), the widest mean spacing in sigma of the computed
#: steps at which the planner forecasts (1/12: 12 computed steps over the whole schedule); wider, an
#: unnamed estimator is ``reuse``. On 12 training samples outside the calibration (6 captions x 2
#: seeds: ``benchmark/planner_tuning.py --sample-captions 6 --seeds 11 12 --constant
#: GUIDED_FORECAST_MAX_SPACING=1``) ``reuse`` on its own plan beat the checked forecast in every
#: setting with 10 or 7 computed steps (20 steps at 2x and 3x, 30 at 3x) on both Wan models, by
#: 0.7-4.1 dB; from 13 computed steps the forecast won every setting on the built-in Wan model, by
#: 2.1-14.4 dB. With guidance off (one branch, ``--guidance 1``) the forecast won at 20 and 30 steps,
#: 2x and 3x, by 2.3-15.2 dB on both models, as it does at every spacing on the HunyuanVideo model
#: (embedded guidance, one branch).
GUIDED_FORECAST_MAX_SPACING = 1.0 / 12


@dataclass
class PlannerConfig:
    r"""
    Configuration of the budget planner for one request.

    Args:
        gram (`dict[str, list[list[float]]]`):
            Per CFG branch, the calibration runs' inner products within the window
            (`gram[t][d] = <v_t, v_{t-d}>`), from `sglang calibrate`. The model's calibration file
            supplies them.
        gram_of (`str`, defaults to `"outputs"`):
            What `gram` is of: the model outputs (`"outputs"`), which the `fitted` estimator needs,
            or the block residuals (`"blocks"`, calibration files from before 2026-12-07).
        sigmas (`list[float]`):
            The calibration run's sigma per step and after the last; each step's error is weighed
            by its sigma step. Empty: equal weights.
        measured_estimator (`dict[str, str]`):
            Block-residual tables only: the estimator an older `sglang calibrate` measured best per
            speedup, e.g. `{"1.5": "forecast1", "2": "blend"}` (the file supplies it); a request
            that names none takes the one measured at the nearest speedup. Empty: `blend` where the
            fitted alpha is positive, else `reuse`. Output tables use `fitted` instead.
        error_growth (`dict[str, list[float]]`):
            How much an error in the latents grows by the end of the run, against sigma
            (`ErrorGrowth.to_dict`, measured by `sglang calibrate`): each gap's error is weighed by
            the growth where it enters the latents, so skips at high noise, where an error grows
            most, cost what they do to the video. Empty: no growth (files from before it).
        max_skip_steps (`int`, defaults to `6`):
            The most consecutive steps a plan may skip. Higher lets the planner put more of the
            budget where it matters; long gaps are also costed as such, so it rarely needs a cap.
        check_forecast (`bool`, defaults to `True`):
            With the `fitted` estimator: test the fitted weights on every computed step of the
            request (what they would have forecast for it against what the model gave) and shrink
            them toward `reuse` by the share that held up. Costs two products per computed step;
            guards quality where the request's flow turns unlike the calibration's (other step
            counts, guidance, captions). Off: the weights as fitted.
    """

    gram: dict[str, list[list[float]]] = field(default_factory=dict)
    gram_of: str = "outputs"
    sigmas: list[float] = field(default_factory=list)
    max_skip_steps: int = 6
    measured_estimator: dict[str, str] = field(default_factory=dict)
    error_growth: dict[str, list[float]] = field(default_factory=dict)
    check_forecast: bool = True

    def __post_init__(self) -> None:
        self.growth = ErrorGrowth.from_dict(self.error_growth)
        if not isinstance(self.check_forecast, bool):
            raise CacheConfigError(f"planner check_forecast must be true or false, got {self.check_forecast!r}")
        if not is_whole(self.max_skip_steps):
            raise CacheConfigError(f"planner max_skip_steps must be a whole number >= 0, got {self.max_skip_steps!r}")
        self.max_skip_steps = int(self.max_skip_steps)
        if not isinstance(self.gram, dict) or not all(isinstance(g, list) for g in self.gram.values()):
            raise CacheConfigError("planner gram must map each CFG branch to its calibration rows")
        if self.gram_of not in GRAM_KINDS:
            raise CacheConfigError(f"planner gram_of must be one of {', '.join(GRAM_KINDS)}, got {self.gram_of!r}")
        measured = self.measured_estimator
        if not isinstance(measured, dict) or not all(
                is_number(_as_float(k)) and _as_float(k) >= 1 and v in PLANNABLE_ESTIMATORS for k, v in measured.items()):
            raise CacheConfigError(
                "planner measured_estimator must map speedups (e.g. \"2\") to one of "
                f"{', '.join(PLANNABLE_ESTIMATORS)}, got {measured!r}")


def _as_float(text: Any) -> float | None:
    try:
        return float(text)
    except (TypeError, ValueError):
        return None


# --------------------------------------------------------------------------- costs
class GapCosts:
    """Costs of every gap of a request's schedule, from one branch's calibration inner products.

    Args:
        gram: ``gram[t][d] = <r_t, r_{t-d}>`` at the calibration's step count.
        sigmas: The calibration's sigmas (``len(gram) + 1`` values) or empty.
        num_steps: The request's step count.
        growth: How an error entering the latents at each sigma grows by the end (none: 1; below 1
            counts as 1).
    """

    def __init__(self, gram: Sequence[Sequence[float]], sigmas: Sequence[float], num_steps: int,
                 growth: ErrorGrowth | None = None) -> None:
        self.calibration_steps = len(gram)
        self.num_steps = num_steps
        positions = np.arange(num_steps + 1) * self.calibration_steps / num_steps
        if len(sigmas) == self.calibration_steps + 1:
            self.sigmas = np.interp(positions, np.arange(self.calibration_steps + 1), np.asarray(sigmas, float))
        else:
            self.sigmas = 1.0 - positions / self.calibration_steps
        self.dt = np.abs(np.diff(self.sigmas))
        # Growth, never shrinkage: where the flow shrinks an error (the HunyuanVideo model's curve
        # is 0.2 until its last steps), a skip's error is still weighed at least as it was made,
        # not discounted on the strength of one random direction's fate.
        self.growth = np.maximum((growth or ErrorGrowth()).at(self.sigmas), 1.0)
        self.inner = self._resampled_inner(gram, positions[:num_steps])

    def _resampled_inner(self, gram: Sequence[Sequence[float]], positions: np.ndarray) -> np.ndarray:
        """``<r(x_p), r(x_q)>`` for request steps p, q (NaN where the window does not reach)."""
        last = self.calibration_steps - 1

        def at(a: int, b: int) -> float:
            low, high = min(a, b), max(a, b)
            row = gram[high]
            return row[high - low] if high - low < len(row) else math.nan

        corners = []
        for x in positions:
            if x > last + 1e-9:
                corners.append(None)  # past the last recorded step: unknown, so never skipped
                continue
            low = min(int(math.floor(x)), last)
            frac = min(x - low, 1.0) if low < last else 0.0
            corners.append(((low, 1.0 - frac), (min(low + 1, last), frac)))
        n = len(positions)
        inner = np.full((n, n), math.nan)
        for p in range(n):
            if corners[p] is None:
                continue
            for q in range(p, n):
                if corners[q] is None:
                    break
                value = sum(wa * wb * at(a, b) for a, wa in corners[p] for b, wb in corners[q] if wa and wb)
                if math.isnan(value):
                    break
                inner[p, q] = inner[q, p] = value
        if self.num_steps > self.calibration_steps:
            self._add_interpolation_spread(inner, corners, at)
        return inner

    @staticmethod
    def _add_interpolation_spread(inner: np.ndarray, corners: list, at) -> None:
        """Finer than the table, an output between two recorded ones is not known to lie on the
        straight line between them: its own spread, ``INTERPOLATION_SPREAD * f (1 - f)`` times the
        squared change between them at fraction ``f``, is added to its squared norm (independent
        of everything else, as a Brownian bridge's). Without it, forecasting from interpolated
        outputs looked free and the plan skipped where the real outputs jitter (the HunyuanVideo
        model at 100 steps from its 50-step table: 52 dB against `reuse`'s 74, docs/benchmarks.md)."""
        for p, corner in enumerate(corners):
            if corner is None or not 0.0 < corner[1][1] < 1.0 or math.isnan(inner[p, p]):
                continue
            (low, _), (high, frac) = corner
            change = at(high, high) - 2.0 * at(high, low) + at(low, low)
            inner[p, p] += INTERPOLATION_SPREAD * frac * (1.0 - frac) * max(change, 0.0)

    def gap(self, h: int | None, i: int, j: int, estimator: str, alpha: float = 0.0) -> float:
        """``G_j |sum_k dt_k (e_k - r_k)|`` over the steps ``i < k < j`` skipped after computed
        ``h < i``, with ``G_j`` the growth of an error entering the latents at step ``j``."""
        skipped = range(i + 1, j)
        if not skipped:
            return 0.0
        coefficients: dict[int, float] = {i: 0.0}
        for k in skipped:
            c = self._forecast_weight(h, i, k, estimator, alpha)
            w = self.dt[k]
            coefficients[i] += w * (1.0 + c)
            if c:
                coefficients[h] = coefficients.get(h, 0.0) - w * c
            coefficients[k] = coefficients.get(k, 0.0) - w
        index = list(coefficients)
        vector = np.array([coefficients[p] for p in index])
        block = self.inner[np.ix_(index, index)]
        if np.isnan(block).any():
            return math.inf
        return float(self.growth[j]) * math.sqrt(max(float(vector @ block @ vector), 0.0))

    def fitted_weight(self, h: int | None, i: int, k: int) -> float:
        """The least-squares ``c`` of ``v_k ~ v_i + c (v_i - v_h)`` over the calibration runs: the
        first-order forecast damped (or pushed) to what the recorded outputs did at this
        distance; 0 (reuse) without a second point or where the window does not reach."""
        if h is None:
            return 0.0
        g = self.inner
        spread = g[i, i] - 2.0 * g[i, h] + g[h, h]
        along = g[k, i] - g[k, h] - g[i, i] + g[i, h]
        weight = along / spread if spread > 0 else math.nan
        return weight if math.isfinite(weight) else 0.0

    def _forecast_weight(self, h: int | None, i: int, k: int, estimator: str, alpha: float) -> float:
        if h is None or estimator == "reuse":
            return 0.0
        if estimator == "fitted":
            return self.fitted_weight(h, i, k)
        if estimator == "forecast1_sigma":
            span = self.sigmas[i] - self.sigmas[h]
            return (self.sigmas[k] - self.sigmas[i]) / span if span else 0.0
        weight = (k - i) / (i - h)
        return alpha * weight if estimator == "blend" else weight


def fitted_blend_alpha(costs: Sequence[GapCosts]) -> float:
    """The ``blend`` alpha that best predicts a step skipped right after two computed ones, at the
    request's own step spacing: ``sum <r_t - r_{t-1}, r_{t-1} - r_{t-2}> / sum |r_{t-1} - r_{t-2}|^2``
    over steps and branches, from the resampled inner products. The residual's motion depends on
    the spacing (the same model fits -0.21 from a 20-step calibration and 0.68 from a 50-step one),
    so the 50-step calibration's own alpha would be wrong at 20 steps. 0.5 when undefined."""
    numerator = denominator = 0.0
    for c in costs:
        g = c.inner
        for t in range(2, c.num_steps):
            numerator += g[t, t - 1] - g[t, t - 2] - g[t - 1, t - 1] + g[t - 1, t - 2]
            denominator += g[t - 1, t - 1] - 2 * g[t - 1, t - 2] + g[t - 2, t - 2]
    alpha = numerator / denominator if denominator > 0 else math.nan
    return alpha if math.isfinite(alpha) else DEFAULT_BLEND_ALPHA


def best_plan(
    costs: Sequence[GapCosts], passes: int, max_skip_steps: int, estimator: str, alpha: float = 0.0
) -> tuple[float, list[int]]:
    """The computed steps (step 0 first) minimising the sum of squared gap costs over gaps and
    branches, with exactly ``passes`` of them; ``(inf, [])`` when no plan fits ``max_skip_steps``
    and the window.

    Dynamic programming over states (previous computed step, last computed step): the forecast's
    cost of a gap depends on both.
    """
    n = costs[0].num_steps
    passes = max(1, min(passes, n))

    known: dict[tuple[int | None, int, int], float] = {}

    def cost(h: int | None, i: int, j: int) -> float:
        if (h, i, j) not in known:
            known[(h, i, j)] = sum(c.gap(h, i, j, estimator, alpha) ** 2 for c in costs)
        return known[(h, i, j)]

    # best[(h, i)] = (total, steps) with `len(steps)` computed so far; h = None before two exist.
    best: dict[tuple[int | None, int], tuple[float, list[int]]] = {(None, 0): (0.0, [0])}
    for _ in range(passes - 1):
        following: dict[tuple[int | None, int], tuple[float, list[int]]] = {}
        for (h, i), (total, steps) in best.items():
            for j in range(i + 1, min(i + max_skip_steps + 2, n)):
                candidate = total + cost(h, i, j)
                if candidate < following.get((i, j), (math.inf,))[0]:
                    following[(i, j)] = (candidate, steps + [j])
        best = following
    result: tuple[float, list[int]] = (math.inf, [])
    for (h, i), (total, steps) in best.items():
        if n - 1 - i > max_skip_steps:
            continue
        candidate = total + cost(h, i, n)
        if candidate < result[0]:
            result = (candidate, steps)
    return result


# --------------------------------------------------------------------------- strategy
@register_cache
class BudgetPlanner(TimestepCache):
    """Runs the steps a calibrated plan chose for the request's budget; the same plan on every branch."""

    name: ClassVar[str] = "planner"
    config_class: ClassVar[type] = PlannerConfig
    default_speedup: ClassVar[float | None] = DEFAULT_SPEEDUP
    model_data_options: ClassVar[tuple[str, ...]] = ("gram",)
    # A skipped step costs guidance and the scheduler only, and adds an estimate of the output
    # itself: a flow model's velocity moves less between steps than the output minus the latents.
    skips_whole_model: ClassVar[bool] = True
    skip_relative_to_input: ClassVar[bool] = False

    def __init__(
        self,
        config: PlannerConfig,
        num_inference_steps: int,
        branches: Sequence[str] = (COND, UNCOND),
        calibrate: bool = False,
    ) -> None:
        if num_inference_steps > MAX_PLANNED_STEPS and not calibrate:
            raise CacheConfigError(
                f"the planner plans at most {MAX_PLANNED_STEPS} steps (its search grows with the square of the "
                f"step count), not {num_inference_steps}; use --cache magcache with --cache-speedup instead",
                param="num_inference_steps",
            )
        missing = [b for b in branches if not config.gram.get(b)]
        if missing and not calibrate:
            raise CacheConfigError(
                f"the planner has no calibration for CFG branch(es) {missing} of this model; run `sglang calibrate` "
                "and pass the file with --cache-calibration (or name it in the model folder's sglang_config.json)",
                param="cache_calibration",
            )
        super().__init__(config, num_inference_steps, branches, calibrate)
        self._mask = [True] * num_inference_steps  # until meet_budget plans (build_cache calls it)
        self._weights: dict[str, dict[int, float]] = {}
        self.predicted_error: float | None = None

    def _reset_strategy_state(self) -> None:
        # Per branch: the last two computed outputs (the estimator keeps only the last two including
        # the new one, and the check needs the two before it) and the running share of the fitted
        # forecast that the request's computed steps bore out.
        self._recent: dict[str, deque[torch.Tensor]] = {b: deque(maxlen=2) for b in self.branches}
        self._borne_out: dict[str, float | torch.Tensor] = {b: 1.0 for b in self.branches}
        self._trust_memory = TRUST_MEMORY ** (TRUST_MEMORY_STEPS / self.num_inference_steps)

    def _observe_computed(self, step: int, branch: str, output: torch.Tensor) -> None:
        """Score the fitted weights on this computed step and set the branch's trust in them.

        The forecast ``v_i + c (v_i - v_h)`` the plan's weight ``c`` makes for this step ``j`` from
        the two computed before is compared with the output the model gave: the least-squares share
        of ``c`` that the step bears out, ``<v_j - v_i, c d> / |c d|^2`` with ``d = v_i - v_h``
        (1 where the request moves as the calibration did, 0 where it stays, below 0 where it turns
        back), clipped to [0, MAX_CHECK_SHARE], enters a running share that keeps
        ``TRUST_MEMORY ** (TRUST_MEMORY_STEPS / N)`` of itself at ``N`` steps; the trust is that
        share over ``TRUSTED_SHARE``, at most 1, so a check only ever moves the estimate toward
        ``reuse``. Both products are sums over tokens, reduced over the processes
        of a sharded sequence, so every one gets the same trust; each CFG branch has its own. All
        of it stays on the device (the trust is a tensor the estimate multiplies by): the loop
        reads nothing back.
        """
        estimator = self.estimator
        if not (self.config.check_forecast and isinstance(estimator, FittedEstimator)):
            return  # nothing to check: hold no outputs beyond the estimator's own
        recent = self._recent[branch]
        weight = self._weights.get(branch, {}).get(step, 0.0)
        if weight and len(recent) == 2:
            older, last = recent
            direction = last.float() - older.float()
            moved = output.float() - last.float()
            along, spread = self._statistics.sums([(moved * direction).sum(), (direction * direction).sum()])
            share = (along / (weight * spread)).clamp(0.0, MAX_CHECK_SHARE)
            previous = self._borne_out[branch]
            memory = self._trust_memory
            running = torch.where(spread > 0, memory * previous + (1.0 - memory) * share, previous)
            self._borne_out[branch] = running
            estimator.trust[branch] = (running / TRUSTED_SHARE).clamp(max=1.0).float()
        recent.append(output)

    @classmethod
    def options_from_calibration(cls, calibration: Any, num_inference_steps: int | None = None) -> dict[str, Any]:
        """The inner products and sigmas of the calibration's table nearest the request's step
        count, when the file has any (files from before the planner do not)."""
        table = calibration.nearest_planner_table(num_inference_steps or calibration.num_inference_steps)
        if table is None:
            return {}
        options = {"gram": table["gram"], "gram_of": table["gram_of"], "sigmas": list(table["sigmas"]),
                   "error_growth": dict(calibration.error_growth)}
        if table["gram_of"] == "blocks" and isinstance(table.get("estimator"), dict):
            options["measured_estimator"] = dict(table["estimator"])
        return options

    @classmethod
    def calibrated_steps(cls, calibration: Any, num_inference_steps: int) -> int:
        """The step count of the table the request plans from (``sglang calibrate --planner-steps``
        records tables at further step counts, so a request at one of them is calibrated)."""
        table = calibration.nearest_planner_table(num_inference_steps)
        return calibration.num_inference_steps if table is None else table["num_inference_steps"]

    def meet_budget(self, passes: int, estimator: str | None = None, blend_alpha: float | None = None) -> None:
        """Plan exactly ``passes`` computed steps for the request's estimator and use it; with none
        named, ``fitted`` (an older block-residual table: the estimator it measured at the nearest
        speedup, else blend or reuse by the sign of the fitted alpha). ``blend`` plans at the
        request's alpha, else the one fitted at this step count (:func:`fitted_blend_alpha`)."""
        if estimator is not None and estimator not in PLANNABLE_ESTIMATORS:
            raise CacheConfigError(
                f"the planner cannot cost estimator {estimator!r}; use one of {', '.join(PLANNABLE_ESTIMATORS)}",
                param="cache_estimator",
            )
        if estimator == "fitted" and self.config.gram_of != "outputs":
            raise CacheConfigError(
                "the fitted estimator needs a calibration of the model outputs, and this file predates them; "
                "run `sglang calibrate` again", param="cache_estimator",
            )
        costs = [GapCosts(self.config.gram[b], self.config.sigmas, self.num_inference_steps, self.config.growth)
                 for b in self.branches]
        if blend_alpha is not None:
            alpha = blend_alpha
        elif estimator == "blend":
            alpha = DEFAULT_BLEND_ALPHA  # what the request's own blend estimator (built after this) uses
        else:
            alpha = fitted_blend_alpha(costs)
        # Unnamed on an older table: what calibration measured best; without a measurement, blend while
        # the residual keeps moving the way it moved (alpha > 0), reuse where its changes turn back.
        chosen = estimator or (DEFAULT_ESTIMATOR if self.config.gram_of == "outputs" else None) \
            or self._measured_estimator(passes) or (BLOCKS_DEFAULT_ESTIMATOR if alpha > 0 else "reuse")
        if estimator is None and chosen == "fitted" and self._too_sparse_to_forecast(costs[0], passes):
            chosen = "reuse"
        total, steps = best_plan(costs, passes, self.config.max_skip_steps, chosen, alpha)
        if not steps and estimator is None:
            # Few steps from a long calibration: a forecast's base falls out of the window, reuse's may not.
            chosen = "reuse"
            total, steps = best_plan(costs, passes, self.config.max_skip_steps, chosen, alpha)
        if not steps:
            # The fewest passes that can be planned: max_skip_steps alone would say too few where the
            # calibration window is what stops it (a few steps resampled from a long calibration).
            fewest = next(more for more in range(passes + 1, self.num_inference_steps + 1)
                          if best_plan(costs, more, self.config.max_skip_steps, chosen, alpha)[1])
            raise CacheConfigError(
                f"the planner cannot run {passes} of {self.num_inference_steps} steps: with max_skip_steps "
                f"{self.config.max_skip_steps} and its calibration window it needs at least {fewest} passes; "
                "ask for a smaller speedup or more steps", param="cache_speedup",
            )
        computed = set(steps)
        self._mask = [step in computed for step in range(self.num_inference_steps)]
        self.predicted_error = total
        self._weights = self._fitted_weights(costs, steps) if chosen == "fitted" else {}
        if estimator is None:
            self.use_estimator(chosen, **({"alpha": alpha} if chosen == "blend" else {}))
        logger.info("planner: %d of %d steps with %s (predicted error %.3g)", passes, self.num_inference_steps,
                    chosen, total)

    def _too_sparse_to_forecast(self, costs: GapCosts, passes: int) -> bool:
        """Whether guided computed steps lie too far apart for the fitted forecast (mean sigma spacing
        above ``GUIDED_FORECAST_MAX_SPACING``), where the fast-moving guidance term made `reuse` the
        better estimate on the Wan models. One branch (no guidance) forecasts at any spacing."""
        if len(self.branches) < 2:
            return False
        span = float(costs.sigmas[0] - costs.sigmas[-1])
        return span / max(passes, 1) > GUIDED_FORECAST_MAX_SPACING

    def _build_estimator(self, requested: str | None, options: Mapping[str, Any]) -> ResidualEstimator:
        """``fitted`` takes the plan's weights (the request's own ``use_estimator`` call included)."""
        if requested == "fitted":
            options = {**options, "weights": self._weights}
        return super()._build_estimator(requested, options)

    def _fitted_weights(self, costs: Sequence["GapCosts"], computed: Sequence[int]) -> dict[str, dict[int, float]]:
        """Per branch and step after the first computed one, the fitted forecast weight on the plan's
        last two computed steps before it: what a skipped step adds, and, at a computed step, what
        ``check_forecast`` tests the weights against."""
        weights: dict[str, dict[int, float]] = {b: {} for b in self.branches}
        previous: int | None = None
        last = computed[0]
        following = list(computed[1:]) + [self.num_inference_steps]
        for upcoming in following:
            for k in range(last + 1, min(upcoming + 1, self.num_inference_steps)):
                for branch, cost in zip(self.branches, costs):
                    weights[branch][k] = cost.fitted_weight(previous, last, k)
            previous, last = last, upcoming
        return weights

    def _measured_estimator(self, passes: int) -> str | None:
        """The calibration's measured estimator at the checked speedup nearest this budget's."""
        measured = self.config.measured_estimator
        if not measured:
            return None
        speedup = self.num_inference_steps / passes
        return measured[min(measured, key=lambda key: abs(math.log(float(key) / speedup)))]

    def _decide(self, step: int, branch: str, features: StepFeatures) -> bool:
        return self._mask[step]

    def plan(self) -> dict[str, list[bool]]:
        return {b: list(self._mask) for b in self.branches}


def has_planner_data(calibration: Any) -> bool:
    """Whether a ``CalibrationResult`` carries what the planner needs (for every expert, on a model with several)."""
    if calibration is not None and calibration.experts:
        return all(has_planner_data(part) for part in calibration.experts.values())
    return calibration is not None and calibration.planner_table(calibration.num_inference_steps) is not None


#: The strategy a budget falls back to on a model without a planner calibration.
FALLBACK_STRATEGY = "magcache"


def planner_or_fallback(params: "CacheParams", calibration: Any) -> "CacheParams":
    """The request's planner settings, or, without a planner calibration, MagCache tuned to the
    same budget (its shipped presets), said in one warning line."""
    if has_planner_data(calibration) or params.options.get("gram"):
        return params
    logger.warning(
        "no planner calibration for this model (run `sglang calibrate`); using %s tuned to %gx instead",
        FALLBACK_STRATEGY, params.speedup or DEFAULT_SPEEDUP,
    )
    return dataclasses.replace(params, strategy=FALLBACK_STRATEGY, speedup=params.speedup or DEFAULT_SPEEDUP,
                               options={})
