"""Which DiT runs a step: one transformer, or Wan2.2's two experts split at a boundary timestep."""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, Sequence

from sglang.multimodal_gen.runtime.models.base import DiTAdapter

HIGH_NOISE, LOW_NOISE = "high_noise", "low_noise"


@dataclass(frozen=True)
class ExpertSwitch:
    """Wan2.2's second expert as diffusers' ``WanPipeline`` runs it: the denoising stage's own
    adapter (``transformer``, the high-noise expert) runs the steps whose timestep is at least
    ``boundary_timestep`` (``boundary_ratio`` times the scheduler's ``num_train_timesteps``) with
    ``guidance_scale``; ``low_noise`` (``transformer_2``) runs the rest with ``guidance_scale_2``."""

    low_noise: DiTAdapter
    boundary_timestep: float

    def schedule(self, timesteps: Sequence[float]) -> list[str]:
        """The expert of every step, decided before the loop (one read of the timesteps)."""
        return [HIGH_NOISE if t >= self.boundary_timestep else LOW_NOISE for t in timesteps]

    def schedule_for(self, scheduler: Any, num_inference_steps: int) -> list[str]:
        """The schedule of a request of ``num_inference_steps`` before it runs (its cache is built
        at validation): the timesteps of a copy of the pipeline's scheduler, set as the latent
        preparation sets them."""
        scheduler = copy.deepcopy(scheduler)
        scheduler.set_timesteps(num_inference_steps)
        return self.schedule(scheduler.timesteps.tolist())
