"""The timestep-cache contract between the denoising stage and caching strategies.

The denoising stage asks one question per step and CFG branch: run the DiT blocks, or reuse the
cached residual? A strategy answers it from the step index, the branch, the request's step count
and the :class:`StepFeatures` the model adapter exposes. It never sees model internals.

Two class attributes widen the question for strategies that need it (EasyCache): what a skip
covers (``skips_whole_model``: the blocks, or the whole model call) and who decides
(``decides_per_pair``: each branch, or the first branch for all of them). The stage and this base
class implement both, so such a strategy is still one module.
"""

from __future__ import annotations

import abc
import logging
import math
import numbers
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Generic, Mapping, Sequence, TypeVar

import torch

from sglang.multimodal_gen.errors import InvalidRequestError

logger = logging.getLogger(__name__)

_Registered = TypeVar("_Registered")

COND = "cond"
UNCOND = "uncond"


class CacheConfigError(InvalidRequestError):
    """A user-supplied cache setting is invalid; the message says what to change."""


@dataclass
class StepFeatures:
    """What a DiT adapter exposes about one step, for strategies that look at the model input.

    Attributes:
        timestep: The scheduler timestep of this step (shape ``(batch,)``).
        modulated_input: The timestep-modulated input TeaCache compares between steps. Wan: the
            timestep embedding ``temb``; HunyuanVideo: the modulated, normalised input of the first
            double-stream block (it depends on the latent).
        timestep_projection: Wan only: the 6x timestep projection that TeaCache's ret-steps mode
            compares instead of ``modulated_input``. ``None`` for models without one.
        sigma: The scheduler's sigma at this step (``scheduler.sigmas[step]``), filled by the
            denoising stage for the estimators that forecast in sigma. ``None`` when the
            scheduler has no ``sigmas``.
        latents: The latent input of the model call, as the scheduler holds it (before the cast
            to the model dtype). What strategies that skip the whole model call compare between
            steps; for them ``modulated_input`` and ``timestep_projection`` are ``None``, since the
            decision comes before the embedding runs.
    """

    timestep: torch.Tensor
    modulated_input: torch.Tensor | None = None
    timestep_projection: torch.Tensor | None = None
    sigma: float | None = None
    latents: torch.Tensor | None = None


@dataclass
class BranchStats:
    """Which steps of one CFG branch ran the DiT blocks and which reused the cache."""

    computed_steps: list[int] = field(default_factory=list)
    skipped_steps: list[int] = field(default_factory=list)

    @property
    def num_computed(self) -> int:
        return len(self.computed_steps)

    @property
    def num_skipped(self) -> int:
        return len(self.skipped_steps)


def format_steps(steps: Sequence[int]) -> str:
    """Steps as compact ranges, e.g. ``[10, 12, 14, 15, 16]`` -> ``'10,12,14-16'``; ``'none'`` if empty."""
    runs: list[list[int]] = []
    for step in sorted(steps):
        if runs and step == runs[-1][1] + 1:
            runs[-1][1] = step
        else:
            runs.append([step, step])
    return ",".join(f"{a}-{b}" if b > a else str(a) for a, b in runs) or "none"


@dataclass
class CacheStats:
    """Per-request summary of what a strategy cached, in the manner of cache-dit's ``summary()``.

    Besides the strategy's decisions it carries what the denoising stage measured
    (:meth:`record_timing`): the stage's time and the mean time of a DiT blocks pass. They live
    here, not on ``GenerationResult``, because this object is already the one per-request report
    both readers take: the CLI prints :meth:`summary` and the server returns :meth:`to_dict` as
    ``cache_stats``; and the estimate they feed needs the skipped-pass counts kept here. The
    strategy never writes them. ``None`` until recorded (no timing was taken).

    Attributes:
        denoising_seconds: Measured time of the denoising loop, on the passes' clock (CUDA events
            on CUDA) so the two add up; ``timings["denoising"]`` also counts the stage's setup.
        blocks_pass_seconds: Mean measured time of one DiT blocks pass (one branch, one step).
        timed_passes: How many blocks passes were timed (the computed passes of every branch).
        estimator: The residual estimator that made what skipped steps added (``reuse``, ...).
        estimator_history_bytes: The most memory its history of computed residuals held at once,
            all branches together (for ``reuse`` the one cached residual per branch).
    """

    strategy: str
    num_inference_steps: int
    branches: dict[str, BranchStats] = field(default_factory=dict)
    denoising_seconds: float | None = None
    blocks_pass_seconds: float | None = None
    timed_passes: int = 0
    estimator: str = "reuse"
    estimator_history_bytes: int = 0

    @property
    def total_computed(self) -> int:
        return sum(b.num_computed for b in self.branches.values())

    @property
    def total_skipped(self) -> int:
        return sum(b.num_skipped for b in self.branches.values())

    @property
    def pass_reduction(self) -> float:
        """Ideal speedup of the denoising stage: transformer passes uncached / passes made."""
        total = self.total_computed + self.total_skipped
        return total / self.total_computed if self.total_computed else float("inf")

    def summary(self) -> str:
        """One line for the user, e.g. 'magcache: computed 25 of 50 steps per branch (2.00x ...)'."""
        if not self.branches:
            return f"{self.strategy}: no transformer passes recorded"
        computed = {b: s.num_computed for b, s in self.branches.items()}
        if len(set(computed.values())) == 1:
            done = f"computed {next(iter(computed.values()))} of {self.num_inference_steps} steps per branch"
        else:
            parts = ", ".join(f"{b} {n}" for b, n in computed.items())
            done = f"computed {parts} of {self.num_inference_steps} steps"
        return f"{self.strategy}: {done} ({self.pass_reduction:.2f}x fewer transformer passes)"

    def record_timing(self, denoising_seconds: float, pass_seconds: Sequence[float]) -> None:
        """Keep the denoising stage's measured time and its blocks passes' times (their mean)."""
        self.denoising_seconds = denoising_seconds
        self.timed_passes = len(pass_seconds)
        self.blocks_pass_seconds = sum(pass_seconds) / len(pass_seconds) if pass_seconds else None

    @property
    def uncached_estimate_seconds(self) -> float | None:
        """Denoising time had no step been skipped: measured time + skipped passes x mean pass time.

        A skipped step still ran embed, head and the residual add, which stay in the measured time;
        an uncached step would not add the residual, so this overstates by that (small) cost.
        """
        if self.denoising_seconds is None:
            return None
        return self.denoising_seconds + self.total_skipped * (self.blocks_pass_seconds or 0.0)

    @property
    def measured_speedup(self) -> float | None:
        """Uncached estimate / measured denoising time: the speedup the cache gave in practice."""
        estimate = self.uncached_estimate_seconds
        if estimate is None or not self.denoising_seconds:
            return None
        return estimate / self.denoising_seconds

    def timing_line(self) -> str | None:
        """E.g. 'denoising 3.21 s, uncached estimate 6.05 s (1.88x measured)'; None before timing."""
        estimate, speedup = self.uncached_estimate_seconds, self.measured_speedup
        if estimate is None or speedup is None:
            return None
        return f"denoising {self.denoising_seconds:.2f} s, uncached estimate {estimate:.2f} s ({speedup:.2f}x measured)"

    def skipped_line(self) -> str:
        """E.g. 'skipped steps: cond 10,12,14-16 | uncond 10,12,14-16' ('none' for a branch without)."""
        parts = " | ".join(f"{name} {format_steps(s.skipped_steps)}" for name, s in self.branches.items())
        return f"skipped steps: {parts or 'none'}"

    def estimator_line(self) -> str:
        """E.g. 'estimator forecast2_sigma, history 1.50 MiB': what skipped steps added, and its memory."""
        return f"estimator {self.estimator}, history {self.estimator_history_bytes / 2**20:.2f} MiB"

    def to_dict(self) -> dict[str, Any]:
        def rounded(value: float | None, digits: int) -> float | None:
            return None if value is None else round(value, digits)

        return {
            "strategy": self.strategy,
            "num_inference_steps": self.num_inference_steps,
            "pass_reduction": round(self.pass_reduction, 4),
            "denoising_seconds": rounded(self.denoising_seconds, 6),
            "blocks_pass_seconds": rounded(self.blocks_pass_seconds, 6),
            "timed_passes": self.timed_passes,
            "uncached_estimate_seconds": rounded(self.uncached_estimate_seconds, 6),
            "measured_speedup": rounded(self.measured_speedup, 4),
            "estimator": self.estimator,
            "estimator_history_bytes": self.estimator_history_bytes,
            "branches": {
                name: {
                    "computed": s.num_computed,
                    "skipped": s.num_skipped,
                    "computed_steps": list(s.computed_steps),
                    "skipped_steps": list(s.skipped_steps),
                }
                for name, s in self.branches.items()
            },
        }


@dataclass
class CalibrationRecord:
    """Per-step measurements taken in calibration mode, for ``sglang calibrate`` to fit and save.

    All lists are indexed by denoising step; entries for steps without a previous residual or
    input (the first step) hold the neutral values ``1.0`` (ratios) and ``0.0`` (changes).

    Attributes:
        mag_ratio: Mean over tokens of ``|r_t| / |r_{t-1}|``, the MagCache magnitude ratio.
        mag_ratio_std: Its standard deviation over tokens.
        cosine_distance: Mean over tokens of ``1 - cos(r_t, r_{t-1})``.
        input_change: Relative L1 change of the modulated input (TeaCache's indicator).
        output_change: Relative L1 change of the block residual (what reusing it gets wrong).
        blend_numerator: ``<r_t - r_{t-1}, r_{t-1} - r_{t-2}>``, and
        blend_denominator: ``|r_{t-1} - r_{t-2}|^2`` (``0.0`` before step 2): summed over steps,
            branches and prompts their ratio is the least-squares ``alpha`` of the ``blend``
            estimator for a one-step skip (``sglang calibrate`` saves it as ``blend_alpha``).
        gram: ``gram[t][d] = <r_t, r_{t-d}>`` for ``d = 0 .. min(t, CALIBRATION_WINDOW)``: the
            residuals' inner products within the window, from which the budget planner computes
            the error of any linear estimate of a skipped step (``runtime/cache/planner.py``).
        sigma: The scheduler's sigma at each step (``None`` when it has none).
    """

    mag_ratio: list[float] = field(default_factory=list)
    mag_ratio_std: list[float] = field(default_factory=list)
    cosine_distance: list[float] = field(default_factory=list)
    input_change: list[float] = field(default_factory=list)
    output_change: list[float] = field(default_factory=list)
    blend_numerator: list[float] = field(default_factory=list)
    blend_denominator: list[float] = field(default_factory=list)
    gram: list[list[float]] = field(default_factory=list)
    sigma: list[float | None] = field(default_factory=list)


#: How many earlier residuals calibration keeps per branch for the planner's inner products: the
#: longest span (from the older of two computed steps to the last step skipped after them) the
#: planner can cost. Memory: this many residuals per branch (one Wan2.1-1.3B 480p residual is
#: about 200 MB in fp32).
CALIBRATION_WINDOW = 16


def is_number(value: Any) -> bool:
    """A real number that is not a bool (JSON's ``true`` is not a threshold)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_whole(value: Any, minimum: int = 0) -> bool:
    """A whole number (``3`` or ``3.0``) of at least ``minimum``: what config counts take."""
    return is_number(value) and float(value).is_integer() and value >= minimum


def budget_passes(num_inference_steps: int, speedup: float) -> int:
    """``round(steps / speedup)`` (halves up), at least 1: the passes per branch a speedup asks for."""
    return max(1, min(num_inference_steps, math.floor(num_inference_steps / speedup + 0.5)))


def threshold_above(value: float) -> float:
    """The smallest two-significant-digit threshold strictly above ``value``: what to suggest to
    a user whose threshold never let a step skip (skipping needs ``accumulated < threshold``)."""
    if value < 0:
        return 0.0
    if value == 0:
        return 0.01
    quantum = 10.0 ** (math.floor(math.log10(value)) - 1)
    suggestion = round(math.floor(value / quantum + 1) * quantum, 12)
    return suggestion if suggestion > value else round(suggestion + quantum, 12)


def n_steps(count: int) -> str:
    """'1 step', '4 steps': step counts in user-facing messages."""
    return f"{count} step" if count == 1 else f"{count} steps"


def local_statistic(sums: torch.Tensor) -> torch.Tensor:
    """The statistic reducer of a single process: this process holds every tensor whole."""
    return sums


def local_decision(step: int, decision: bool | None) -> bool | None:
    """The decision exchange of a single process: every branch's decision is taken here."""
    return decision


def _to_float32(value: float) -> float:
    """``value`` rounded to float32, as a Python float (what ``.item()`` of a float32 tensor gives)."""
    return torch.tensor(value, dtype=torch.float32).item()


class TimestepCache(abc.ABC):
    """Base class of every timestep-caching strategy.

    One instance serves one request: it is built with that request's real step count and keeps
    all state in per-branch mappings, so two requests never share state and the cond/uncond
    branches never mix. The denoising stage calls, per step and branch, exactly one of

        ``should_compute`` -> True  -> blocks run -> ``store(step, branch, residual)``
        ``should_compute`` -> False -> ``reuse(step, branch)`` is added to the block input.

    What a skipped step adds is the request's residual estimator's (``runtime/cache/estimators.py``,
    ``reuse`` unless :meth:`use_estimator` chose another): ``store`` feeds it, ``reuse`` asks it,
    passing the strategy's :meth:`_scale_hint`.

    Subclasses implement :meth:`_decide` (and may override :meth:`_reset_strategy_state`,
    :meth:`_scale_hint`, :meth:`_default_estimator` and :meth:`plan`). Register them with
    :func:`register_cache`.
    """

    name: ClassVar[str] = ""
    #: The strategy's config dataclass; its fields are the valid ``--cache-params`` keys.
    config_class: ClassVar[type | None] = None
    #: Named levels ``--cache-preset`` may take (strategies with model presets override this).
    preset_levels: ClassVar[tuple[str, ...]] = ()
    #: The speedup a strategy that always works to a budget (the planner) takes without ``--cache-speedup``.
    default_speedup: ClassVar[float | None] = None
    #: A skip covers the whole model call (embed, blocks and head), not only the blocks: what is
    #: stored and reused is the model output minus its latent input.
    skips_whole_model: ClassVar[bool] = False
    #: One decision per step, taken on the first branch (cond) and followed by the others.
    decides_per_pair: ClassVar[bool] = False

    def __init__(
        self,
        config: Any,
        num_inference_steps: int,
        branches: Sequence[str] = (COND, UNCOND),
        calibrate: bool = False,
    ) -> None:
        if num_inference_steps < 1:
            raise CacheConfigError(f"num_inference_steps must be at least 1, got {num_inference_steps}")
        if not branches or len(set(branches)) != len(branches):
            raise CacheConfigError(f"branches must be distinct names, got {list(branches)}")
        self.config = config
        self.num_inference_steps = num_inference_steps
        self.branches: tuple[str, ...] = tuple(branches)
        self.calibrate = calibrate
        self._pass_budget: int | None = None
        self._statistic_reducer: Callable[[torch.Tensor], torch.Tensor] = local_statistic
        self._decision_exchange: Callable[[int, bool | None], bool | None] = local_decision
        self._estimator = self._build_estimator(None, {})
        self.reset()

    @classmethod
    def from_params(
        cls,
        params: Any,
        num_inference_steps: int,
        model_key: str | None,
        branches: Sequence[str] = (COND, UNCOND),
        calibrate: bool = False,
    ) -> "TimestepCache":
        """Build the request's instance from its ``CacheParams``.

        The default builds ``config_class`` from :meth:`model_defaults` overlaid with the request's
        knobs; strategies with named per-model presets (MagCache, TeaCache) override it.
        """
        if cls.config_class is None:
            return cls(None, num_inference_steps, branches, calibrate)
        config = cls.config_class(**{**cls.model_defaults(model_key), **params.knob_overrides()})
        return cls(config, num_inference_steps, branches, calibrate)

    @classmethod
    def model_defaults(cls, model_key: str | None) -> dict[str, Any]:
        """Config values for the model ``model_key`` that replace the dataclass defaults (EasyCache:
        the release's threshold per model); the request's knobs still win. Default: none."""
        return {}

    @classmethod
    def preset_level(cls, params: Any) -> str:
        """The request's named preset level (``default`` when unset), checked against ``preset_levels``."""
        level = params.preset or "default"
        if level not in cls.preset_levels:
            raise CacheConfigError(
                f"unknown {cls.name} preset {level!r}; choose one of: {', '.join(cls.preset_levels)}", param="cache_preset"
            )
        return level

    @classmethod
    def options_from_calibration(cls, calibration: Any, num_inference_steps: int | None = None) -> dict[str, Any]:
        """Config options a ``CalibrationResult`` supplies in place of the shipped presets, for a
        request of ``num_inference_steps`` (``None``: unknown)."""
        return {}

    # ----------------------------------------------------------------------------- lifecycle
    def reset(self) -> None:
        """Forget everything: residuals, accumulators, stats and calibration records."""
        self._residual: dict[str, torch.Tensor | None] = {b: None for b in self.branches}
        self._last_input: dict[str, torch.Tensor | None] = {b: None for b in self.branches}
        self._pending_input_change: dict[str, float] = {b: 0.0 for b in self.branches}
        self._stats = CacheStats(
            strategy=self.name,
            num_inference_steps=self.num_inference_steps,
            branches={b: BranchStats() for b in self.branches},
        )
        self._calibration: dict[str, CalibrationRecord] = {b: CalibrationRecord() for b in self.branches}
        self._sigma: dict[str, tuple[int, float | None]] = {}
        self._window: dict[str, deque[torch.Tensor]] = {  # calibration only
            b: deque(maxlen=CALIBRATION_WINDOW + 1) for b in self.branches
        }
        self._pair_decision: tuple[int, bool] | None = None
        self._estimator.reset()
        self._stats.estimator = self._estimator.name
        self._reset_strategy_state()

    def _reset_strategy_state(self) -> None:
        """Reset subclass accumulators; called by :meth:`reset` (and so by ``__init__``)."""

    # ----------------------------------------------------------------------------- estimator
    def use_estimator(self, name: str | None, **options: Any) -> None:
        """Choose what a skipped step adds (``None``: the strategy's default); forgets all state.

        ``options`` go to the estimator (e.g. ``alpha`` of ``blend``). Called by ``build_cache``
        with the request's ``CacheParams.estimator``.
        """
        self._estimator = self._build_estimator(name, options)
        self.reset()

    @property
    def estimator(self):
        """The request's residual estimator (a ``ResidualEstimator``)."""
        return self._estimator

    def _default_estimator(self, requested: str | None) -> str:
        """The estimator to use given the request's choice (``None`` when it made none).

        Strategies whose own config implies one (MagCache's ``scale_residual``) override this and
        refuse a conflicting choice."""
        return requested or "reuse"

    def _build_estimator(self, requested: str | None, options: Mapping[str, Any]):
        from sglang.multimodal_gen.runtime.cache.estimators import build_estimator

        return build_estimator(self._default_estimator(requested), self.branches, **options)

    def _scale_hint(self, step: int, branch: str) -> float:
        """The strategy's predicted ``|r_step| / |r_cached|`` for a skipped step; the ``scale``
        estimator multiplies the cached residual by it. MagCache: its accumulated ratio."""
        return 1.0

    # ----------------------------------------------------------------------------- the contract
    def should_compute(self, step: int, branch: str, features: StepFeatures) -> bool:
        """Decide whether ``branch`` must run the DiT blocks (or, with ``skips_whole_model``, the
        model) at ``step``. Called once per step and branch."""
        self._check(step, branch)
        self._sigma[branch] = (step, features.sigma)
        if self.calibrate:
            self._record_input(branch, features)
            compute = True
        elif self.decides_per_pair and branch != self.branches[0]:
            if self._pair_decision is None or self._pair_decision[0] != step:
                decision = self._decision_exchange(step, None)  # taken on another rank
                if decision is not None:
                    self._pair_decision = (step, decision)
            compute = self._follow_pair_decision(step, branch)
        else:
            compute = self._decide(step, branch, features)
            if self._residual[branch] is None:
                compute = True
            elif self._pass_budget is not None:
                compute = self._within_budget(step, branch, compute)
            self._pair_decision = (step, compute)
            if self.decides_per_pair:
                self._decision_exchange(step, compute)
        stats = self._stats.branches[branch]
        (stats.computed_steps if compute else stats.skipped_steps).append(step)
        return compute

    def store(self, step: int, branch: str, residual: torch.Tensor) -> None:
        """Keep what a computed step's skip would replace for later reuse: the block residual
        ``blocks(h) - h``, or with ``skips_whole_model`` the model output minus its latent input."""
        self._check(step, branch)
        if self.calibrate:
            self._record_residual(step, branch, residual)
        self._residual[branch] = residual
        self._estimator.observe(branch, step, self._sigma_at(step, branch), residual)
        self._stats.estimator_history_bytes = max(self._stats.estimator_history_bytes, self._estimator.history_bytes())
        if not self.calibrate:
            self._observe_computed(step, branch, residual)

    def reuse(self, step: int, branch: str) -> torch.Tensor:
        """The residual to add to the block input on a skipped step: the estimator's estimate."""
        self._check(step, branch)
        residual = self._residual[branch]
        if residual is None:
            raise RuntimeError(f"{self.name}: reuse() at step {step} before any residual of branch {branch!r}")
        return self._scaled_residual(step, branch, residual)

    @abc.abstractmethod
    def _decide(self, step: int, branch: str, features: StepFeatures) -> bool:
        """Strategy logic: True to run the blocks. Only called outside calibration mode (and with
        ``decides_per_pair`` only for the first branch)."""

    def _observe_computed(self, step: int, branch: str, residual: torch.Tensor) -> None:
        """Learn from a computed step (what ``store`` got); outside calibration mode only.
        EasyCache measures its rate of change here. The default learns nothing."""

    # ----------------------------------------------------------------------------- statistics
    def set_statistic_reducer(self, reducer: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """Where the sums of every statistic over tokens go before they are divided (:meth:`mean_abs`,
        :meth:`relative_l1`, the calibration records): a multi-process run installs one that
        all-reduces them over a sequence shard's processes, or broadcasts them from the rank that
        holds the first branch, so every process takes the same decision."""
        self._statistic_reducer = reducer

    def set_decision_exchange(self, exchange: Callable[[int, bool | None], bool | None]) -> None:
        """For a strategy that ``decides_per_pair`` when its branches run on different ranks:
        ``exchange(step, decision)`` is called with the first branch's decision where that branch
        runs (it sends it), and with ``None`` where only a later branch runs (it returns the
        decision taken on the other rank). The single-process exchange sends nothing and has
        nothing to receive."""
        self._decision_exchange = exchange

    def mean_abs(self, *tensors: torch.Tensor) -> list[float]:
        """The mean absolute value of each tensor, over all of it wherever its parts are held.

        The one statistic of latents and outputs a decision needs: each process's float32
        ``abs().mean()`` (as the release code takes it), combined over the processes by
        :meth:`_float32_means` in one host sync. In one process it is that mean as is.
        """
        return self._float32_means([t.detach().float().abs().mean() for t in tensors], [t.numel() for t in tensors])

    def relative_l1(self, current: torch.Tensor, previous: torch.Tensor) -> float:
        """TeaCache's ``mean|current - previous| / mean|previous|``, over all tokens wherever held.

        The two means are taken per process in float32, as the release's ``teacache_forward`` does,
        and combined over the processes by :meth:`_float32_means`: in one process the result is
        the release's bit for bit; over a sequence shard's processes it is the whole sequence's.
        """
        previous = previous.float()
        change, scale = self._float32_means(
            [(current.float() - previous).abs().mean(), previous.abs().mean()], [previous.numel()] * 2
        )
        scale_tensor = torch.tensor(scale, dtype=torch.float32).clamp_min(1e-12)
        return (torch.tensor(change, dtype=torch.float32) / scale_tensor).item()

    def _float32_means(self, means: Sequence[torch.Tensor], counts: Sequence[int]) -> list[float]:
        """Per-process float32 means, ``means[i]`` over ``counts[i]`` elements -> the means over
        every process: the one place a statistic over tokens meets the installed reducer.

        Each mean goes through the reducer as a sum, ``mean x count`` in float64, with its count
        (one host sync), and is divided back after and rounded to float32. In one process the
        round trip returns each float32 mean exactly (``mean x count`` is exact in float64 below
        2**29 elements and rounds back to the same float32 beyond); a process holding no element
        adds nothing (its mean would be nan).
        """
        local = torch.stack(list(means)).double()
        n = torch.tensor([float(c) for c in counts], dtype=torch.float64, device=local.device)
        local = torch.where(n > 0, local * n, torch.zeros_like(local))
        reduced = self._statistic_reducer(torch.cat([local, n])).tolist()
        k = len(counts)
        return [_to_float32(total / c) if c else 0.0 for total, c in zip(reduced[:k], reduced[k:])]

    def _scaled_residual(self, step: int, branch: str, residual: torch.Tensor) -> torch.Tensor:
        """What ``reuse`` returns; ``residual`` is the last stored one. Asks the estimator; a
        strategy may override it to bypass estimators altogether (the probes in ``tools/`` do)."""
        return self._estimator.estimate(branch, step, self._sigma_at(step, branch), self._scale_hint(step, branch))

    def meet_budget(self, passes: int, estimator: str | None = None, blend_alpha: float | None = None) -> None:
        """Make exactly ``passes`` blocks passes per branch (``--cache-speedup``), or refuse in one line.

        Called by ``build_cache`` before the request's estimator is applied; ``estimator`` and
        ``blend_alpha`` are the request's choice (``None``: not chosen), for strategies that plan
        around it (the planner). Strategies that can be tuned to a budget override this; the
        default refuses.
        """
        tunable = [n for n in registered_caches() if get_cache_class(n).meet_budget is not TimestepCache.meet_budget
                   and get_cache_class(n).default_speedup is None]
        raise CacheConfigError(
            f"{self.name} cannot be tuned to a speedup; use --cache-speedup without --cache (the planner), "
            f"or with {', '.join(tunable)}", param="cache_speedup",
        )

    def enforce_pass_budget(self, passes: int) -> None:
        """From now on every request of this instance makes exactly ``passes`` blocks passes per
        branch, whatever ``_decide`` says: for strategies that decide while running (TeaCache), whose
        tuned threshold lands near the budget but not always on it."""
        self._pass_budget = passes

    def _within_budget(self, step: int, branch: str, compute: bool) -> bool:
        """``compute``, unless the budget is spent (skip) or every step left must run to spend it."""
        done = self._stats.branches[branch].num_computed
        if done >= self._pass_budget:
            return False
        return compute or self._pass_budget - done >= self.num_inference_steps - step

    def plan(self) -> dict[str, list[bool]] | None:
        """The whole per-branch compute mask (True = run the blocks), if it is known up front.

        Deterministic strategies (MagCache) return it; input-dependent ones (TeaCache) return None.
        """
        return None

    def no_skip_reason(self) -> str | None:
        """Why this request skips no step at all, naming the knob to change; ``None`` otherwise.

        A cache that silently computes every step looks like a broken one. Strategies with a plan
        (:meth:`plan`) answer before the run; the others once the run is over. The default knows
        nothing and returns ``None``.
        """
        return None

    # ----------------------------------------------------------------------------- reporting
    @property
    def stats(self) -> CacheStats:
        return self._stats

    def calibration_records(self) -> Mapping[str, CalibrationRecord]:
        """Per-branch measurements from a calibration run (empty lists otherwise)."""
        return self._calibration

    # ----------------------------------------------------------------------------- internals
    def _follow_pair_decision(self, step: int, branch: str) -> bool:
        """The first branch's decision at ``step``, for another branch of a per-pair strategy."""
        if self._pair_decision is None or self._pair_decision[0] != step:
            raise RuntimeError(
                f"{self.name} decides once per step on the {self.branches[0]!r} branch; "
                f"ask it before {branch!r} at step {step}"
            )
        return self._pair_decision[1] or self._residual[branch] is None

    def _check(self, step: int, branch: str) -> None:
        if branch not in self._residual:
            raise KeyError(f"{self.name}: unknown CFG branch {branch!r}; this request has {list(self.branches)}")
        if not 0 <= step < self.num_inference_steps:
            raise IndexError(f"{self.name}: step {step} outside [0, {self.num_inference_steps})")

    def _sigma_at(self, step: int, branch: str) -> float | None:
        """The sigma ``should_compute`` saw for this step and branch (``None`` if it saw none)."""
        seen_step, sigma = self._sigma.get(branch, (None, None))
        return sigma if seen_step == step else None

    def _record_input(self, branch: str, features: StepFeatures) -> None:
        indicator = features.modulated_input
        if indicator is None:
            return
        previous = self._last_input[branch]
        self._pending_input_change[branch] = 0.0 if previous is None else self.relative_l1(indicator, previous)
        self._last_input[branch] = indicator

    def _record_residual(self, step: int, branch: str, residual: torch.Tensor) -> None:
        record = self._calibration[branch]
        window = self._window[branch]
        window.appendleft(residual)
        current = residual.float()
        products = [torch.sum(current * earlier.float(), dtype=torch.float64) for earlier in window]
        # Sums over tokens: through the reducer (summed over a sequence shard's processes), one host sync.
        record.gram.append(self._statistic_reducer(torch.stack(products)).tolist())
        record.sigma.append(self._sigma_at(step, branch))
        # Calibration computes every step, so the window holds the previous and older residuals too.
        previous = window[1] if len(window) > 1 else None
        older = window[2] if len(window) > 2 else None
        record.input_change.append(self._pending_input_change[branch])
        if older is None or previous is None:
            record.blend_numerator.append(0.0)
            record.blend_denominator.append(0.0)
        else:
            change, last_change = residual.float() - previous.float(), previous.float() - older.float()
            numerator, denominator = self._statistic_reducer(torch.stack([
                torch.sum(change * last_change, dtype=torch.float64),
                torch.sum(last_change * last_change, dtype=torch.float64),
            ])).tolist()
            record.blend_numerator.append(numerator)
            record.blend_denominator.append(denominator)
        if previous is None:
            record.mag_ratio.append(1.0)
            record.mag_ratio_std.append(0.0)
            record.cosine_distance.append(0.0)
            record.output_change.append(0.0)
            return
        current, prev = residual.float(), previous.float()
        token_ratio = current.norm(dim=-1) / prev.norm(dim=-1).clamp_min(1e-8)
        cosine = torch.nn.functional.cosine_similarity(current, prev, dim=-1)
        tokens = token_ratio.numel()
        ratio_mean = token_ratio.mean()
        mag_ratio, cosine_distance = self._float32_means([ratio_mean, (1.0 - cosine).mean()], [tokens] * 2)
        record.mag_ratio.append(mag_ratio)
        record.cosine_distance.append(cosine_distance)
        record.mag_ratio_std.append(self._float32_std(token_ratio, ratio_mean, mag_ratio))
        record.output_change.append(self.relative_l1(current, prev))

    def _float32_std(self, values: torch.Tensor, local_mean: torch.Tensor, mean: float) -> float:
        """The standard deviation (unbiased) of ``values`` over every process, given the mean over
        every process: each process's squared deviations from it, from its own float32 std and
        mean (Chan et al.'s parallel rule), summed by the reducer. In one process the correction
        term is 0 and the result is ``values.std()`` bit for bit (0.0 for fewer than 2 values)."""
        n = values.numel()
        squares = torch.zeros((), dtype=torch.float64, device=values.device)
        if n > 1:
            squares = values.std().double() ** 2 * (n - 1)
        if n > 0:
            squares = squares + n * (local_mean.double() - mean) ** 2
        count = torch.tensor(float(n), dtype=torch.float64, device=values.device)
        total, total_n = self._statistic_reducer(torch.stack([squares, count])).tolist()
        return _to_float32(math.sqrt(total / (total_n - 1))) if total_n > 1 else 0.0


class NameRegistry(Generic[_Registered]):
    """Classes by their ``name``, so a strategy or an estimator is one file plus a decorator.

    Args:
        kind: What the classes are, for messages ("cache strategy", "cache estimator").
        also_accepted: Names the user may give that mean "no class" (``none`` for strategies),
            listed in the unknown-name message.
    """

    def __init__(self, kind: str, also_accepted: Sequence[str] = ()) -> None:
        self.kind = kind
        self.also_accepted = tuple(also_accepted)
        self._classes: dict[str, type[_Registered]] = {}

    def register(self, cls: type[_Registered]) -> type[_Registered]:
        """Class decorator: make ``cls`` available by its ``name`` to the CLI, server and configs."""
        if not cls.name:
            raise TypeError(f"{cls.__qualname__} needs a non-empty `name` to be registered")
        if cls.name in self._classes and self._classes[cls.name] is not cls:
            raise TypeError(f"a {self.kind} named {cls.name!r} is already registered")
        self._classes[cls.name] = cls
        return cls

    def unregister(self, name: str) -> None:
        """Forget ``name`` (tests that register a class for their own use undo it with this)."""
        self._classes.pop(name, None)

    def get(self, name: Any) -> type[_Registered]:
        """The class registered as ``name``, or one line listing the choices."""
        try:
            return self._classes[name]
        except (KeyError, TypeError):
            known = ", ".join([*self.also_accepted, *self.names()])
            raise CacheConfigError(f"unknown {self.kind} {name!r}; choose one of: {known}") from None

    def names(self) -> list[str]:
        return sorted(self._classes)


_REGISTRY: NameRegistry[TimestepCache] = NameRegistry("cache strategy", also_accepted=("none",))


def register_cache(cls: type[TimestepCache]) -> type[TimestepCache]:
    """Class decorator: make a strategy available by its ``name`` to the CLI, server and registry."""
    return _REGISTRY.register(cls)


def get_cache_class(name: str) -> type[TimestepCache]:
    return _REGISTRY.get(name)


def registered_caches() -> list[str]:
    return _REGISTRY.names()
