"""What every strategy inherits and never overrides: the calls the denoising stage makes
(``should_compute``, ``store``, ``reuse``), per-branch residuals, stats, the residual estimator,
pair decisions, the pass budget, the cross-rank hooks and calibration recording.

:class:`~sglang.multimodal_gen.runtime.cache.strategy.TimestepCache`, the contract a strategy
implements, subclasses :class:`CacheBookkeeping`; the hooks called here (``_decide``,
``_reset_strategy_state``, ``_observe_computed``, ``_scale_hint``, ``_default_estimator``) and
the class attributes read here (``name``, ``preset_levels``, ``decides_per_pair``) are declared
and documented there.
"""

from __future__ import annotations

import abc
from typing import TYPE_CHECKING, Any, Callable, Mapping, Sequence

import torch

from sglang.multimodal_gen.runtime.cache.branches import COND, UNCOND
from sglang.multimodal_gen.runtime.cache.budget import within_budget
from sglang.multimodal_gen.runtime.cache.estimators import ResidualEstimator, build_estimator
from sglang.multimodal_gen.runtime.cache.recording import CalibrationRecord, CalibrationRecorder
from sglang.multimodal_gen.runtime.cache.reduction import Reducer, TokenStatistics, local_decision
from sglang.multimodal_gen.runtime.cache.stats import BranchStats, CacheStats
from sglang.multimodal_gen.runtime.cache.validation import CacheConfigError

if TYPE_CHECKING:
    from sglang.multimodal_gen.runtime.cache.strategy import StepFeatures


class CacheBookkeeping(abc.ABC):
    """One request's caching state, kept per CFG branch, and the calls that drive it.

    One instance serves one request: it is built with that request's real step count and keeps
    all state in per-branch mappings, so two requests never share state and the cond/uncond
    branches never mix. The denoising stage calls, per step and branch, exactly one of

        ``should_compute`` -> True  -> blocks run -> ``store(step, branch, residual)``
        ``should_compute`` -> False -> ``reuse(step, branch)`` is added to the block input.

    What a skipped step adds is the request's residual estimator's (``runtime/cache/estimators.py``,
    ``reuse`` unless :meth:`use_estimator` chose another): ``store`` feeds it, ``reuse`` asks it,
    passing the strategy's ``_scale_hint``.

    Args:
        config: The strategy's config dataclass instance (``None`` for a strategy without one).
        num_inference_steps: The request's real step count.
        branches: The CFG branches the denoising stage will ask about, in the order it asks.
        calibrate: Never skip; record what ``sglang calibrate`` needs (:meth:`calibration_records`).
    """

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
        #: The ``--cache-speedup`` the request asked for (its summary shows it beside the measured one).
        self.asked_speedup: float | None = None
        self._statistics = TokenStatistics()
        self._decision_exchange: Callable[[int, bool | None], bool | None] = local_decision
        self._estimator = self._build_estimator(None, {})
        self.reset()

    @classmethod
    def preset_level(cls, params: Any) -> str:
        """The request's named preset level (``default`` when unset), checked against ``preset_levels``."""
        level = params.preset or "default"
        if level not in cls.preset_levels:
            raise CacheConfigError(
                f"unknown {cls.name} preset {level!r}; choose one of: {', '.join(cls.preset_levels)}", param="cache_preset"
            )
        return level

    # ----------------------------------------------------------------------------- lifecycle
    def reset(self) -> None:
        """Forget everything: residuals, accumulators, stats and calibration records."""
        self._residual: dict[str, torch.Tensor | None] = {b: None for b in self.branches}
        self._stats = CacheStats(
            strategy=self.name,
            num_inference_steps=self.num_inference_steps,
            branches={b: BranchStats() for b in self.branches},
            asked_speedup=self.asked_speedup,
        )
        self._recorder = CalibrationRecorder(self.branches, self._statistics)
        self._sigma: dict[str, tuple[int, float | None]] = {}
        self._pair_decision: tuple[int, bool] | None = None
        self._estimator.reset()
        self._stats.estimator = self._estimator.name
        self._reset_strategy_state()

    # ----------------------------------------------------------------------------- estimator
    def use_estimator(self, name: str | None, **options: Any) -> None:
        """Choose what a skipped step adds (``None``: the strategy's default); forgets all state.

        ``options`` go to the estimator (e.g. ``alpha`` of ``blend``). Called by ``build_cache``
        with the request's ``CacheParams.estimator``.
        """
        self._estimator = self._build_estimator(name, options)
        self.reset()

    @property
    def estimator(self) -> ResidualEstimator:
        """The request's residual estimator."""
        return self._estimator

    def _build_estimator(self, requested: str | None, options: Mapping[str, Any]) -> ResidualEstimator:
        return build_estimator(self._default_estimator(requested), self.branches, **options)

    # ----------------------------------------------------------------------------- the stage's calls
    def should_compute(self, step: int, branch: str, features: StepFeatures) -> bool:
        """Decide whether ``branch`` must run the DiT blocks (or, with ``skips_whole_model``, the
        model) at ``step``. Called once per step and branch."""
        self._check(step, branch)
        self._sigma[branch] = (step, features.sigma)
        if self.calibrate:
            self._recorder.record_input(branch, features.modulated_input)
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
                done = self._stats.branches[branch].num_computed
                compute = within_budget(compute, step, self.num_inference_steps, done, self._pass_budget)
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
            self._recorder.record_residual(branch, residual, self._sigma_at(step, branch))
        self._residual[branch] = residual
        self._estimator.observe(branch, step, self._sigma_at(step, branch), residual)
        self._stats.estimator_history_bytes = max(self._stats.estimator_history_bytes, self._estimator.history_bytes())
        if not self.calibrate:
            self._observe_computed(step, branch, residual)

    def record_output(self, step: int, branch: str, output: torch.Tensor) -> None:
        """In calibration mode, note ``branch``'s model output at ``step`` (the planner's data); the
        stage calls it for every branch and step. Otherwise nothing."""
        if self.calibrate:
            self._check(step, branch)
            self._recorder.record_output(branch, output)

    def reuse(self, step: int, branch: str) -> torch.Tensor:
        """The residual to add to the block input on a skipped step: the estimator's estimate."""
        self._check(step, branch)
        residual = self._residual[branch]
        if residual is None:
            raise RuntimeError(f"{self.name}: reuse() at step {step} before any residual of branch {branch!r}")
        return self._scaled_residual(step, branch, residual)

    def _scaled_residual(self, step: int, branch: str, residual: torch.Tensor) -> torch.Tensor:
        """What ``reuse`` returns; ``residual`` is the last stored one. Asks the estimator; a
        strategy may override it to bypass estimators altogether (the probes in ``tools/`` do)."""
        return self._estimator.estimate(branch, step, self._sigma_at(step, branch), self._scale_hint(step, branch))

    # ----------------------------------------------------------------------------- other ranks
    def set_statistic_reducer(self, reducer: Reducer) -> None:
        """Where the sums of every statistic over tokens go before they are divided (:meth:`mean_abs`,
        :meth:`relative_l1`, the calibration records): a multi-process run installs one that
        all-reduces them over a sequence shard's processes, or broadcasts them from the rank that
        holds the first branch, so every process takes the same decision."""
        self._statistics.reducer = reducer

    @property
    def _statistic_reducer(self) -> Reducer:
        """The installed reducer (the sequence-parallel tests run their own statistics through it)."""
        return self._statistics.reducer

    def set_decision_exchange(self, exchange: Callable[[int, bool | None], bool | None]) -> None:
        """For a strategy that ``decides_per_pair`` when its branches run on different ranks:
        ``exchange(step, decision)`` is called with the first branch's decision where that branch
        runs (it sends it), and with ``None`` where only a later branch runs (it returns the
        decision taken on the other rank). The single-process exchange sends nothing and has
        nothing to receive."""
        self._decision_exchange = exchange

    # ----------------------------------------------------------------------------- for strategies
    def mean_abs(self, *tensors: torch.Tensor) -> list[float]:
        """The mean absolute value of each tensor, over all of it wherever its parts are held: each
        process's float32 ``abs().mean()``, combined over the processes in one host sync
        (``reduction.py``). In one process it is that mean as is."""
        return self._statistics.mean_abs(*tensors)

    def relative_l1(self, current: torch.Tensor, previous: torch.Tensor) -> float:
        """TeaCache's ``mean|current - previous| / mean|previous|``, over all tokens wherever held;
        in one process the release's bit for bit."""
        return self._statistics.relative_l1(current, previous)

    def enforce_pass_budget(self, passes: int) -> None:
        """From now on every request of this instance makes exactly ``passes`` blocks passes per
        branch, whatever ``_decide`` says: for strategies that decide while running (TeaCache), whose
        tuned threshold lands near the budget but not always on it."""
        self._pass_budget = passes

    # ----------------------------------------------------------------------------- reporting
    @property
    def stats(self) -> CacheStats:
        return self._stats

    def calibration_records(self) -> Mapping[str, CalibrationRecord]:
        """Per-branch measurements from a calibration run (empty lists otherwise)."""
        return self._recorder.records

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
