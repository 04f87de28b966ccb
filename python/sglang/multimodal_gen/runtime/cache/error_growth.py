"""How much an error in the latents grows by the end of the run: the budget planner's weight per step.

A skipped step leaves an error in the latents, and the rest of the run carries it to the video.
The planner's gap cost (``planner.py``) measures the error where it is made; what the video shows is
that error after the remaining steps, which can grow it many times over: on the hard-world model
an error in the latents at high noise ends up to 38x larger in the final latents, one at the last
step about 1.1x (the steps at high noise decide where things are, and a small error there moves
them).
Without this weight the planner took skips at high noise as cheap as skips near the end, and its
worst held-out samples lost to plain steps (docs/benchmarks.md, "Where an error grows").

``sglang calibrate`` measures the growth on a few of its prompts at the cost of one more run each
(denoising only): the calibration run traces its latents after every step (:class:`LatentProbe`), a second
run of the same request adds a small random perturbation after the first step and traces again,
and the distance between the two traces at each step says how much of it is left at the end
(:func:`growth_from_traces`). After a step or two the perturbation lies along the directions the
flow amplifies most, so the curve is the growth of the errors that matter, a bound for the rest.
It is kept against sigma (:class:`ErrorGrowth`), so planner tables at other step counts use it too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from sglang.multimodal_gen.runtime.cache.validation import CacheConfigError, is_number

#: The perturbation's size against the latents' norm: above bf16's rounding (so a bf16 model sees
#: it), small enough that the two runs stay on the same path.
PERTURBATION_SIZE = 1e-2
#: The latents' entries a trace keeps per step (a fixed random subset): enough for the distance of
#: two traces, a few hundred kilobytes at any video size.
TRACED_ENTRIES = 1 << 16
#: The step after which the probe perturbs the latents: the first, so the growth of every later step
#: is measured.
PERTURBED_STEP = 0


@dataclass
class LatentProbe:
    """Traces a request's latents after every denoising step, and perturbs them once if asked.

    The denoising stage calls :meth:`after_step` with each step's new latents and continues from
    what it returns; on several processes every rank gets the same probe and adds the same
    perturbation (it is drawn from ``seed``), so the ranks stay in step.

    Args:
        perturb: Add a random perturbation of relative size ``PERTURBATION_SIZE`` after step
            ``PERTURBED_STEP``; else only trace.
        seed: Draws the traced entries and the perturbation.
    """

    perturb: bool = False
    seed: int = 0
    trace: list[torch.Tensor] = field(default_factory=list)
    #: The sigma of each traced step's input (None where the scheduler has none).
    sigmas: list[float | None] = field(default_factory=list)
    _entries: torch.Tensor | None = field(default=None, init=False, repr=False)

    def after_step(self, step: int, sigma: float | None, latents: torch.Tensor) -> torch.Tensor:
        """Trace (and maybe perturb) the latents step ``step`` (at ``sigma``) made."""
        self.sigmas.append(sigma)
        if self.perturb and step == PERTURBED_STEP:
            generator = torch.Generator().manual_seed(self.seed + 1)
            noise = torch.randn(latents.shape, generator=generator, dtype=torch.float32)
            scale = PERTURBATION_SIZE * latents.float().norm().item() / max(noise.norm().item(), 1e-30)
            latents = (latents.float() + (noise * scale).to(latents.device)).to(latents.dtype)
        flat = latents.detach().reshape(-1)
        if self._entries is None or self._entries.device != flat.device:
            generator = torch.Generator().manual_seed(self.seed)
            self._entries = torch.randperm(flat.numel(), generator=generator)[:TRACED_ENTRIES].to(flat.device)
        self.trace.append(flat[self._entries].float().cpu())
        return latents

    def run_sigmas(self) -> list[float]:
        """The sigma at each traced step and after the last (0); 1 down to 0 where the scheduler
        has none, as the planner then assumes."""
        steps = len(self.sigmas)
        if steps and all(s is not None for s in self.sigmas):
            return [float(s) for s in self.sigmas] + [0.0]
        return [1.0 - k / steps for k in range(steps + 1)]


def growth_from_traces(reference: Sequence[torch.Tensor], perturbed: Sequence[torch.Tensor]) -> list[float]:
    """Per step ``k`` of ``n``, and ``k = n`` for the final latents: how many times larger an error
    in the latents entering step ``k`` is at the end. From the distance of the two traces after
    each step; the first steps after the perturbation, before it has settled on the directions the
    flow keeps, take the first settled step's value."""
    if len(reference) != len(perturbed) or not reference:
        raise ValueError("the traces must cover the same steps")
    distances = [float((a - b).norm()) for a, b in zip(reference, perturbed)]
    final = distances[-1]
    steps = len(distances)
    growth = [1.0] * (steps + 1)
    first_settled = PERTURBED_STEP + 2  # entering it: after the perturbed step and one more
    for k in range(first_settled, steps + 1):
        before = distances[k - 1]
        growth[k] = final / before if before > 0 else 1.0
    for k in range(min(first_settled, steps + 1)):
        growth[k] = growth[min(first_settled, steps)]
    return growth


@dataclass(frozen=True)
class ErrorGrowth:
    """An error's growth to the end of the run, against the sigma at which it enters the latents
    (root mean square over the probed prompts). Empty: no growth (every step weighs the same)."""

    sigmas: tuple[float, ...] = ()
    growth: tuple[float, ...] = ()

    def __post_init__(self) -> None:
        if len(self.sigmas) != len(self.growth):
            raise CacheConfigError(f"error growth needs one value per sigma, got {len(self.growth)} for "
                                   f"{len(self.sigmas)}")
        if not all(is_number(v) and math.isfinite(v) and v >= 0 for v in (*self.sigmas, *self.growth)):
            raise CacheConfigError("error growth sigmas and values must be finite non-negative numbers")

    @classmethod
    def from_runs(cls, sigmas: Sequence[float], curves: Sequence[Sequence[float]]) -> "ErrorGrowth":
        """The root mean square of per-prompt curves (:func:`growth_from_traces`) at ``sigmas``."""
        squares = np.mean([np.asarray(curve, dtype=np.float64) ** 2 for curve in curves], axis=0)
        return cls(tuple(float(s) for s in sigmas), tuple(float(v) for v in np.sqrt(squares)))

    def at(self, sigmas: Sequence[float]) -> np.ndarray:
        """The growth at each of ``sigmas`` (linear between the measured ones, the end values beyond)."""
        if not self.sigmas:
            return np.ones(len(sigmas))
        order = np.argsort(self.sigmas)
        return np.interp(np.asarray(sigmas, dtype=np.float64), np.asarray(self.sigmas)[order],
                         np.asarray(self.growth)[order])

    def to_dict(self) -> dict[str, Any]:
        return {"sigmas": [round(s, 6) for s in self.sigmas], "growth": [round(g, 4) for g in self.growth]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> "ErrorGrowth":
        if not data:
            return cls()
        if not isinstance(data, Mapping) or not all(isinstance(data.get(k), list) for k in ("sigmas", "growth")):
            raise CacheConfigError(f"error growth must hold lists 'sigmas' and 'growth', got {data!r}")
        return cls(tuple(data["sigmas"]), tuple(data["growth"]))
