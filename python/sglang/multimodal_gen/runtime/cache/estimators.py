"""What a skipped step adds: residual estimators.

A decision strategy (MagCache, TeaCache, ...) says *when* to run the DiT blocks; an estimator
says *what* a skipped step adds to the block input. The two compose freely: the request's
``TimestepCache`` owns one estimator, feeds it every computed residual (``observe``) and asks it
on every skipped step (``estimate``). State is kept per CFG branch and holds only the last
computed residuals the estimator's order needs (``history``), with their step index and the
scheduler's sigma at that step.

Registered estimators (``--cache-estimator NAME``):

- ``reuse``: the last computed residual as is (the release code of MagCache and TeaCache).
- ``scale``: the last residual times the strategy's scale hint; MagCache's hint is the product
  of its calibrated ratios since the last computed step (its ``scale_residual``), other
  strategies hint ``1.0``, which makes it ``reuse``.
- ``forecast1`` / ``forecast2``: extrapolate the last 2 / 3 computed residuals (linear /
  quadratic Lagrange polynomial) to this step, in step index.
- ``forecast1_sigma`` / ``forecast2_sigma``: the same in the scheduler's sigma of each step.
- ``blend``: ``reuse + alpha * (forecast1 - reuse)``; ``alpha`` 0 is ``reuse``, 1 ``forecast1``
  (0.5 unless set, or fitted by ``sglang calibrate`` and taken from the calibration file in use).
- ``fitted``: ``r_i + c_k (r_i - r_h)`` on the last two computed residuals with a weight per
  branch and skipped step that the budget planner fits to its calibration (least squares over
  the recorded outputs); the planner's own, without a weight it reuses.

A forecast without enough history (or with two points at the same coordinate) falls back to the
next lower order, down to ``reuse``. Forecast arithmetic is done in fp32 and the result returned
in the residual's dtype; ``reuse`` returns the stored tensor itself and ``scale`` multiplies it
by the hint exactly as MagCache did before estimators existed, so both stay bit-identical.
"""

from __future__ import annotations

import abc
import math
import numbers
from collections import deque
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from sglang.multimodal_gen.runtime.cache.registry import NameRegistry
from sglang.multimodal_gen.runtime.cache.validation import CacheConfigError

DEFAULT_ESTIMATOR = "reuse"


@dataclass(frozen=True)
class HistoryPoint:
    """One computed residual of a branch, with where it was computed."""

    step: int
    sigma: float | None
    residual: torch.Tensor


class ResidualEstimator(abc.ABC):
    """Base class: per-branch history of the last computed residuals and the estimate from it.

    Subclasses set ``name`` and ``history`` (how many computed residuals per branch they need)
    and implement :meth:`_estimate`. Register them with :func:`register_estimator`.
    """

    name: ClassVar[str] = ""
    #: The most computed residuals per branch the estimate uses; older ones are dropped.
    history: ClassVar[int] = 1

    def __init__(self, branches: Sequence[str]) -> None:
        self.branches: tuple[str, ...] = tuple(branches)
        self.reset()

    def reset(self) -> None:
        """Forget every branch's history (the cache calls it at the start of each request)."""
        self._history: dict[str, deque[HistoryPoint]] = {b: deque(maxlen=self.history) for b in self.branches}

    def observe(self, branch: str, step: int, sigma: float | None, residual: torch.Tensor) -> None:
        """Remember the residual ``blocks(h) - h`` that ``branch`` computed at ``step`` (sigma ``sigma``)."""
        self._history[branch].append(HistoryPoint(step, sigma, residual))

    def estimate(self, branch: str, step: int, sigma: float | None, scale: float = 1.0) -> torch.Tensor:
        """The residual to add on a skipped ``step`` of ``branch``; ``scale`` is the strategy's hint."""
        points = list(self._history[branch])
        if not points:
            raise RuntimeError(f"{self.name} estimator: no computed residual of branch {branch!r} before step {step}")
        return self._estimate(points, step, sigma, scale)

    @abc.abstractmethod
    def _estimate(self, points: list[HistoryPoint], step: int, sigma: float | None, scale: float) -> torch.Tensor:
        """The estimate from ``points`` (oldest first, at least one)."""

    def history_bytes(self) -> int:
        """Memory held by the history now, over all branches (a tensor held twice counts once)."""
        seen: dict[int, int] = {}
        for points in self._history.values():
            for point in points:
                seen[id(point.residual)] = point.residual.numel() * point.residual.element_size()
        return sum(seen.values())


_ESTIMATORS: NameRegistry[ResidualEstimator] = NameRegistry("cache estimator")


def register_estimator(cls: type[ResidualEstimator]) -> type[ResidualEstimator]:
    """Class decorator: make an estimator available by its ``name`` to ``--cache-estimator``."""
    return _ESTIMATORS.register(cls)


def get_estimator(name: str) -> type[ResidualEstimator]:
    return _ESTIMATORS.get(name)


def registered_estimators() -> list[str]:
    return _ESTIMATORS.names()


def build_estimator(name: str, branches: Sequence[str], **options: Any) -> ResidualEstimator:
    """The estimator ``name`` for ``branches``; ``options`` go to its constructor (e.g. ``alpha``)."""
    return get_estimator(name)(branches, **options)


# --------------------------------------------------------------------------- arithmetic
def lagrange_weights(xs: Sequence[float], x: float) -> list[float]:
    """Weights ``w_i`` with ``p(x) = sum w_i y_i`` for the polynomial through ``(xs[i], y_i)``."""
    weights = []
    for i, xi in enumerate(xs):
        w = 1.0
        for j, xj in enumerate(xs):
            if j != i:
                w *= (x - xj) / (xi - xj)
        weights.append(w)
    return weights


def extrapolate(points: Sequence[HistoryPoint], xs: Sequence[float], x: float) -> torch.Tensor:
    """The Lagrange polynomial through the points' residuals at coordinates ``xs``, evaluated at
    ``x``, in fp32 (weights in double); the caller casts it back to the residual's dtype."""
    out = torch.zeros_like(points[-1].residual, dtype=torch.float32)
    for point, weight in zip(points, lagrange_weights(xs, x)):
        out.add_(point.residual.float(), alpha=weight)
    return out


def _coordinates(points: Sequence[HistoryPoint], step: int, sigma: float | None, in_sigma: bool):
    """The points' coordinates and the target's: sigmas when asked and all known, else step indices."""
    if in_sigma and sigma is not None and all(p.sigma is not None for p in points):
        return [float(p.sigma) for p in points], float(sigma)
    return [float(p.step) for p in points], float(step)


def forecast(points: Sequence[HistoryPoint], order: int, step: int, sigma: float | None, in_sigma: bool) -> torch.Tensor | None:
    """The highest-order forecast up to ``order`` the history allows, in fp32; None when not even
    first order is possible (one point, or points at the same coordinate)."""
    for k in range(order, 0, -1):
        if len(points) < k + 1:
            continue
        used = points[-(k + 1):]
        xs, x = _coordinates(used, step, sigma, in_sigma)
        if len(set(xs)) == len(xs):
            return extrapolate(used, xs, x)
    return None


# --------------------------------------------------------------------------- estimators
@register_estimator
class ReuseEstimator(ResidualEstimator):
    """The last computed residual, as is (the stored tensor itself)."""

    name = "reuse"

    def _estimate(self, points, step, sigma, scale):
        return points[-1].residual


@register_estimator
class ScaleEstimator(ResidualEstimator):
    """The last computed residual times the strategy's scale hint (MagCache: its accumulated ratio)."""

    name = "scale"

    def _estimate(self, points, step, sigma, scale):
        return points[-1].residual * scale  # exactly MagCache's former scale_residual arithmetic


class _Forecast(ResidualEstimator):
    order: ClassVar[int] = 1
    in_sigma: ClassVar[bool] = False

    def _estimate(self, points, step, sigma, scale):
        result = forecast(points, self.order, step, sigma, self.in_sigma)
        last = points[-1].residual
        return last if result is None else result.to(last.dtype)


@register_estimator
class Forecast1(_Forecast):
    """Linear extrapolation through the last 2 computed residuals, in step index."""

    name, history, order = "forecast1", 2, 1


@register_estimator
class Forecast2(_Forecast):
    """Quadratic extrapolation through the last 3 computed residuals, in step index."""

    name, history, order = "forecast2", 3, 2


@register_estimator
class Forecast1Sigma(_Forecast):
    """Linear extrapolation through the last 2 computed residuals, in the scheduler's sigma."""

    name, history, order, in_sigma = "forecast1_sigma", 2, 1, True


@register_estimator
class Forecast2Sigma(_Forecast):
    """Quadratic extrapolation through the last 3 computed residuals, in the scheduler's sigma."""

    name, history, order, in_sigma = "forecast2_sigma", 3, 2, True


DEFAULT_BLEND_ALPHA = 0.5


def check_blend_alpha(alpha: Any) -> float:
    if not isinstance(alpha, numbers.Real) or isinstance(alpha, bool) or not math.isfinite(alpha):
        raise CacheConfigError(
            f"blend_alpha must be a finite number (0 = reuse, 1 = forecast1), got {alpha!r}"
        )
    return float(alpha)


@register_estimator
class BlendEstimator(ResidualEstimator):
    """``reuse + alpha * (forecast1 - reuse)`` in step index: 0 is reuse, 1 is forecast1."""

    name, history = "blend", 2

    def __init__(self, branches: Sequence[str], alpha: float = DEFAULT_BLEND_ALPHA) -> None:
        self.alpha = check_blend_alpha(alpha)
        super().__init__(branches)

    def _estimate(self, points, step, sigma, scale):
        last = points[-1].residual
        first_order = forecast(points, 1, step, sigma, in_sigma=False)
        if first_order is None:
            return last
        reused = last.float()
        return (reused + self.alpha * (first_order - reused)).to(last.dtype)


@register_estimator
class FittedEstimator(ResidualEstimator):
    """``r_i + c_k (r_i - r_h)`` with the weight ``c_k`` per branch and skipped step that the
    planner fitted (``weights``); a step without one reuses. Arithmetic in fp32, as forecasts."""

    name, history = "fitted", 2

    def __init__(self, branches: Sequence[str], weights: dict[str, dict[int, float]] | None = None) -> None:
        if weights is None:
            raise CacheConfigError(
                "the fitted estimator takes its weights from the budget planner's calibration; use it with "
                "--cache-speedup (the planner), or choose another estimator", param="cache_estimator")
        self.weights = {b: dict(w) for b, w in weights.items()}
        super().__init__(branches)

    def reset(self) -> None:
        super().reset()
        #: Per branch, the share of each weight to apply (1: as fitted, 0: reuse); the planner lowers
        #: it where the request's own computed steps show the fitted forecast overshooting. A 0-dim
        #: tensor once the planner has checked, so that applying it reads nothing back to the host.
        self.trust: dict[str, float | torch.Tensor] = {b: 1.0 for b in self.branches}

    def estimate(self, branch: str, step: int, sigma: float | None, scale: float = 1.0) -> torch.Tensor:
        """The planner's weight for this branch and step, times the branch's trust, takes the place
        of a strategy's hint."""
        weight = self.weights.get(branch, {}).get(step, 0.0)
        points = list(self._history[branch])
        if weight == 0.0 or len(points) < 2:
            return super().estimate(branch, step, sigma, 0.0)
        last = points[-1].residual
        reused = last.float()
        return (reused + (weight * self.trust[branch]) * (reused - points[-2].residual.float())).to(last.dtype)

    def _estimate(self, points, step, sigma, weight):
        return points[-1].residual  # reached without a weight or a second point: reuse
