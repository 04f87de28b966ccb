"""Which DiT runs a step: one transformer, or Wan2.2's two experts split at a boundary timestep,
and (``--offload-idle-expert``) which of the two is on the device."""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import torch

from sglang.multimodal_gen.runtime.models.base import DiTAdapter

logger = logging.getLogger(__name__)

HIGH_NOISE, LOW_NOISE = "high_noise", "low_noise"


class ExpertOffload:
    """Keeps the expert that is not running on the host (``--offload-idle-expert``): two 14B
    experts in bf16 take ~56 GB of device memory, one at a time ~28 GB.

    At load only the high-noise expert is on the device (the low-noise one is moved to, or left
    on, the host here). :meth:`enter` makes an expert the one on the device: the denoising stage
    calls it before a request's loop (for its first expert, so a request that follows one which
    ended on the low-noise expert starts with the high-noise one again) and at the step where
    the schedule switches. So each expert crosses once each way per request, the idle one first
    off the device, then the next one on, and the device never holds both.

    The freed device memory stays with PyTorch's caching allocator: the incoming expert has the
    same parameter shapes and takes the same blocks, whereas ``torch.cuda.empty_cache()`` would
    hand them to the driver only for them to be allocated again a moment later.

    Args:
        transformers: Each expert's module, by expert name.
        device: Where the running expert computes.
        host: Where the idle expert waits.
    """

    def __init__(self, transformers: Mapping[str, torch.nn.Module], device: torch.device,
                 host: torch.device = torch.device("cpu")) -> None:
        self.transformers = dict(transformers)
        self.device = device
        self.host = host
        #: Each expert's place, updated move by move (a move that fails leaves the other's right).
        self.on_device = {name: name == HIGH_NOISE for name in self.transformers}
        self._offload(LOW_NOISE)

    def enter(self, expert: str) -> None:
        """Make ``expert`` the one on the device: any other there goes to the host first."""
        for name, there in self.on_device.items():
            if there and name != expert:
                self._offload(name)
        if not self.on_device[expert]:
            self._load(expert)

    def _offload(self, expert: str) -> None:
        logger.debug("moving the %s expert to %s", expert, self.host)
        self.transformers[expert].to(self.host)
        self.on_device[expert] = False

    def _load(self, expert: str) -> None:
        logger.debug("moving the %s expert to %s", expert, self.device)
        self.transformers[expert].to(self.device)
        self.on_device[expert] = True


@dataclass(frozen=True)
class ExpertSwitch:
    """Wan2.2's second expert as diffusers' ``WanPipeline`` runs it: the denoising stage's own
    adapter (``transformer``, the high-noise expert) runs the steps whose timestep is at least
    ``boundary_timestep`` (``boundary_ratio`` times the scheduler's ``num_train_timesteps``) with
    ``guidance_scale``; ``low_noise`` (``transformer_2``) runs the rest with ``guidance_scale_2``.
    With ``offload`` the expert that is not running waits on the host."""

    low_noise: DiTAdapter
    boundary_timestep: float
    offload: ExpertOffload | None = None

    def enter(self, expert: str) -> None:
        """Called by the denoising stage before a request's first step and where the step's expert
        changes: with ``offload``, ``expert`` to the device and the other off it; else nothing."""
        if self.offload is not None:
            self.offload.enter(expert)

    def on_device(self, expert: str) -> bool:
        """Whether ``expert``'s weights are on the device now (always, without ``offload``)."""
        return self.offload is None or self.offload.on_device[expert]

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
