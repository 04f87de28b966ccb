"""Which DiT runs a step: one transformer, or Wan2.2's two experts split at a boundary timestep."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

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
