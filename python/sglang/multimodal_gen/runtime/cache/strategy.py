"""The contract of a timestep-caching strategy: what a subclass of :class:`TimestepCache` sets and
overrides, and the :class:`StepFeatures` it decides from.

The denoising stage asks one question per step and CFG branch: run the DiT blocks, or reuse the
cached residual? A strategy answers it in ``_decide`` from the step index, the branch, the
request's step count and the step's features. It never sees model internals. Everything else
(the stage's calls, per-branch residuals, stats, estimators, budgets, calibration recording) the
base class provides (``bookkeeping.py``); a new strategy is a config dataclass, a subclass with
``name``, ``config_class`` and ``_decide``, and ``@register_cache`` (``registry.py``).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import Any, ClassVar, Sequence

import torch

from sglang.multimodal_gen.runtime.cache.bookkeeping import CacheBookkeeping
from sglang.multimodal_gen.runtime.cache.branches import COND, UNCOND
from sglang.multimodal_gen.runtime.cache.registry import get_cache_class, registered_caches
from sglang.multimodal_gen.runtime.cache.validation import CacheConfigError


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


class TimestepCache(CacheBookkeeping):
    """Base class of every timestep-caching strategy: implement :meth:`_decide`, override the rest
    when needed, register with ``register_cache``.

    Built per request as ``cls(config, num_inference_steps, branches, calibrate)`` (a subclass that
    precomputes a plan overrides ``__init__`` and calls ``super().__init__`` with these first).
    The base keeps per-branch state, so the cond and uncond branches never mix, and resets it at
    the start of every request. Helpers a strategy may call: ``self.mean_abs`` and
    ``self.relative_l1`` (statistics over tokens that agree across the processes of a sharded
    sequence), ``self.enforce_pass_budget`` (hold the run to a budget), ``self.preset_level``
    (the request's ``--cache-preset``), and ``self.config``, ``self.num_inference_steps``,
    ``self.branches``, ``self.stats``.
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
    #: With ``skips_whole_model``: whether what is stored is the model output minus its latent
    #: input (EasyCache's rule; a skip adds it to the step's latents) or the output itself.
    skip_relative_to_input: ClassVar[bool] = True
    #: One decision per step, taken on the first branch (cond) and followed by the others.
    decides_per_pair: ClassVar[bool] = False
    #: The config fields that carry a model's data, which its presets or a calibration supply
    #: (MagCache's ``mag_ratios``, TeaCache's ``coefficients``, the planner's ``gram``). A model no
    #: preset covers (Wan2.2) refuses the strategy unless a calibration or these options are given.
    model_data_options: ClassVar[tuple[str, ...]] = ()

    @abc.abstractmethod
    def _decide(self, step: int, branch: str, features: StepFeatures) -> bool:
        """Strategy logic: True to run the blocks. Only called outside calibration mode (and with
        ``decides_per_pair`` only for the first branch). A branch with no stored residual yet
        computes whatever this returns."""

    def _reset_strategy_state(self) -> None:
        """Reset subclass accumulators; called by ``reset`` (and so by ``__init__``)."""

    def _observe_computed(self, step: int, branch: str, residual: torch.Tensor) -> None:
        """Learn from a computed step (what ``store`` got); outside calibration mode only.
        EasyCache measures its rate of change here. The default learns nothing."""

    def _scale_hint(self, step: int, branch: str) -> float:
        """The strategy's predicted ``|r_step| / |r_cached|`` for a skipped step; the ``scale``
        estimator multiplies the cached residual by it. MagCache: its accumulated ratio."""
        return 1.0

    def _default_estimator(self, requested: str | None) -> str:
        """The estimator to use given the request's choice (``None`` when it made none).

        Strategies whose own config implies one (MagCache's ``scale_residual``) override this and
        refuse a conflicting choice."""
        return requested or "reuse"

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

    @classmethod
    def from_params(
        cls,
        params: Any,
        num_inference_steps: int,
        model_key: str | None,
        branches: Sequence[str] = (COND, UNCOND),
        calibrate: bool = False,
    ) -> TimestepCache:
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
    def options_from_calibration(cls, calibration: Any, num_inference_steps: int | None = None) -> dict[str, Any]:
        """Config options a ``CalibrationResult`` supplies in place of the shipped presets, for a
        request of ``num_inference_steps`` (``None``: unknown)."""
        return {}

    @classmethod
    def calibrated_steps(cls, calibration: Any, num_inference_steps: int) -> int:
        """The step count at which the data :meth:`options_from_calibration` takes for such a request
        was recorded; a request far from it is told to recalibrate. Default: the calibration's own
        (the planner's tables at further step counts override it)."""
        return calibration.num_inference_steps

    def meet_budget(self, passes: int, estimator: str | None = None, blend_alpha: float | None = None) -> None:
        """Make exactly ``passes`` blocks passes per branch (``--cache-speedup``), or refuse in one line.

        Called by ``build_cache`` before the request's estimator is applied; ``estimator`` and
        ``blend_alpha`` are the request's choice (``None``: not chosen), for strategies that plan
        around it (the planner). Strategies that can be tuned to a budget override this; the
        default refuses.
        """
        raise speedup_refusal(self.name)


def takes_a_budget(cls: type[TimestepCache]) -> bool:
    """Whether the strategy can be tuned to a speedup (it overrides :meth:`TimestepCache.meet_budget`)."""
    return cls.meet_budget is not TimestepCache.meet_budget


def speedup_refusal(name: str) -> CacheConfigError:
    """The one wording of "strategy ``name`` cannot be tuned to a speedup", naming those that can:
    raised by :meth:`TimestepCache.meet_budget` and, before a model loads, by the CLI and server
    (``input_validation.check_speedup_strategy``). Worded with the CLI's flags, which the server
    turns into its request fields."""
    tunable = [n for n in registered_caches() if takes_a_budget(get_cache_class(n))
               and get_cache_class(n).default_speedup is None]
    return CacheConfigError(
        f"{name} cannot be tuned to a speedup; use --cache-speedup without --cache (the planner), "
        f"or with --cache {' / '.join(tunable)}", param="cache_speedup",
    )
