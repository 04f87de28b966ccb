"""Seeded initial noise in latent space, and a fresh scheduler with this request's timesteps."""

from __future__ import annotations

import copy
from typing import Callable, Sequence

import torch

from sglang.multimodal_gen.runtime.pipelines.base import PipelineStage, Req


class LatentPreparationStage(PipelineStage):
    """Draws the noise on the CPU from the request's seed, so a seed means the same video anywhere.

    ``sigmas``, when given, maps the step count to the sigma schedule handed to the scheduler, for
    pipelines that set one explicitly (HunyuanVideo: ``linspace(1, 0, steps + 1)[:-1]``); otherwise
    the scheduler spaces its own timesteps (Wan).
    """

    name = "latent_preparation"

    def __init__(
        self,
        scheduler,
        latent_channels: int,
        spatial_stride: int,
        temporal_stride: int,
        device: torch.device,
        sigmas: Callable[[int], Sequence[float]] | None = None,
    ) -> None:
        self.scheduler = scheduler
        self.sigmas = sigmas
        self.latent_channels = latent_channels
        self.spatial_stride = spatial_stride
        self.temporal_stride = temporal_stride
        self.device = device

    def __call__(self, req: Req) -> Req:
        params = req.params
        shape = (
            1,
            self.latent_channels,
            (params.num_frames - 1) // self.temporal_stride + 1,
            params.height // self.spatial_stride,
            params.width // self.spatial_stride,
        )
        generator = torch.Generator(device="cpu").manual_seed(params.seed)
        req.latents = torch.randn(shape, generator=generator, dtype=torch.float32).to(self.device)
        req.scheduler = copy.deepcopy(self.scheduler)
        if self.sigmas is None:
            req.scheduler.set_timesteps(params.num_inference_steps, device=self.device)
        else:
            req.scheduler.set_timesteps(sigmas=self.sigmas(params.num_inference_steps), device=self.device)
        req.scheduler.set_begin_index(0)
        req.timesteps = req.scheduler.timesteps
        return req
