"""Calibration mode: what a cache records per branch and step while it computes every step, for
``sglang calibrate`` to fit and save (magnitude ratios, changes, the blend estimator's terms, the
planner's inner products)."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Sequence

import torch

from sglang.multimodal_gen.runtime.cache.reduction import TokenStatistics


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
        output_gram: ``output_gram[t][d] = <v_t, v_{t-d}>`` for ``d = 0 .. min(t, CALIBRATION_WINDOW)``:
            the inner products of the model's outputs (what a planned skip estimates) within the
            window, from which the budget planner computes the error of any linear estimate of a
            skipped step and fits its forecast weights (``runtime/cache/planner.py``).
        sigma: The scheduler's sigma at each step (``None`` when it has none).
    """

    mag_ratio: list[float] = field(default_factory=list)
    mag_ratio_std: list[float] = field(default_factory=list)
    cosine_distance: list[float] = field(default_factory=list)
    input_change: list[float] = field(default_factory=list)
    output_change: list[float] = field(default_factory=list)
    blend_numerator: list[float] = field(default_factory=list)
    blend_denominator: list[float] = field(default_factory=list)
    output_gram: list[list[float]] = field(default_factory=list)
    sigma: list[float | None] = field(default_factory=list)


#: How many earlier model outputs calibration keeps per branch for the planner's inner products:
#: the longest span (from the older of two computed steps to the last step skipped after them) the
#: planner can cost. Memory: this many outputs per branch (latent-sized: one Wan2.1-1.3B 480p
#: output is about 8.4 MB in fp32).
CALIBRATION_WINDOW = 16


class CalibrationRecorder:
    """Fills one :class:`CalibrationRecord` per branch from the calls of a calibrating cache.

    Every statistic over a sequence shard's tokens goes through ``statistics`` (its reducer is read
    at each call, so one installed after the recorder was made applies). It keeps the last
    ``CALIBRATION_WINDOW + 1`` model outputs per branch for the planner's inner products; those are
    summed locally, since every rank holds the whole output.
    """

    def __init__(self, branches: Sequence[str], statistics: TokenStatistics) -> None:
        self.records: dict[str, CalibrationRecord] = {b: CalibrationRecord() for b in branches}
        self._statistics = statistics
        self._outputs: dict[str, deque[torch.Tensor]] = {b: deque(maxlen=CALIBRATION_WINDOW + 1) for b in branches}
        self._previous: dict[str, deque[torch.Tensor]] = {b: deque(maxlen=2) for b in branches}
        self._last_input: dict[str, torch.Tensor | None] = {b: None for b in branches}
        self._pending_input_change: dict[str, float] = {b: 0.0 for b in branches}

    def record_input(self, branch: str, indicator: torch.Tensor | None) -> None:
        """Note the relative change of the modulated input (TeaCache's indicator), recorded with
        the step's residual."""
        if indicator is None:
            return
        previous = self._last_input[branch]
        self._pending_input_change[branch] = (
            0.0 if previous is None else self._statistics.relative_l1(indicator, previous)
        )
        self._last_input[branch] = indicator

    def record_output(self, branch: str, output: torch.Tensor) -> None:
        """Record the inner products of a step's model output with the earlier ones in the window."""
        window = self._outputs[branch]
        window.appendleft(output.float())
        products = [torch.sum(window[0] * earlier, dtype=torch.float64) for earlier in window]
        self.records[branch].output_gram.append(torch.stack(products).tolist())

    def record_residual(self, branch: str, residual: torch.Tensor, sigma: float | None) -> None:
        """Record a computed step's residual statistics against the previous ones."""
        reduce = self._statistics.reducer
        record = self.records[branch]
        record.sigma.append(sigma)
        # Calibration computes every step, so these are the previous and the older step's residuals.
        earlier = self._previous[branch]
        previous = earlier[0] if earlier else None
        older = earlier[1] if len(earlier) > 1 else None
        earlier.appendleft(residual)
        record.input_change.append(self._pending_input_change[branch])
        if older is None or previous is None:
            record.blend_numerator.append(0.0)
            record.blend_denominator.append(0.0)
        else:
            change, last_change = residual.float() - previous.float(), previous.float() - older.float()
            numerator, denominator = reduce(torch.stack([
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
        mag_ratio, cosine_distance = self._statistics.float32_means([ratio_mean, (1.0 - cosine).mean()], [tokens] * 2)
        record.mag_ratio.append(mag_ratio)
        record.cosine_distance.append(cosine_distance)
        record.mag_ratio_std.append(self._statistics.float32_std(token_ratio, ratio_mean, mag_ratio))
        record.output_change.append(self._statistics.relative_l1(current, prev))
