"""A pipeline is a list of stages run in order over one request object (``Req``)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch

from sglang.multimodal_gen.configs.models import ModelInfo
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.cache.budget import StepCosts
from sglang.multimodal_gen.runtime.cache.error_growth import LatentProbe
from sglang.multimodal_gen.runtime.cache.stats import CacheStats
from sglang.multimodal_gen.runtime.cache.strategy import TimestepCache

logger = logging.getLogger(__name__)

# ``progress(done, total)``: called with 0 before the first denoising step and after each step;
# an exception raised from it ends the generation there (the server's cancellation uses this).
ProgressCallback = Callable[[int, int], None]


@dataclass(frozen=True)
class VideoGeometry:
    """The strides a request's size must respect: VAE compression times the DiT patch size."""

    spatial_multiple: int
    temporal_stride: int


@dataclass
class Req:
    """The state of one generation as it moves through the stages.

    ``prompt_embeds`` maps each CFG branch to its text embeddings; ``conditioning`` maps a branch to
    any further model inputs (attention masks, pooled embeddings, embedded guidance, an image's
    embedding and latents) that the denoising stage passes to the adapter's ``embed`` as keyword
    arguments.
    """

    params: SamplingParams
    progress: ProgressCallback | None = None
    show_progress_bar: bool = False
    cache: TimestepCache | None = None
    calibrate: bool = False
    prompt_embeds: dict[str, torch.Tensor] = field(default_factory=dict)
    conditioning: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    scheduler: Any = None
    timesteps: torch.Tensor | None = None
    latents: torch.Tensor | None = None
    frames: np.ndarray | None = None
    timings: dict[str, float] = field(default_factory=dict)
    #: What a step costs outside the blocks, measured by an uncached denoising loop (else None).
    step_costs: StepCosts | None = None
    #: Latents the video's first latent frames are held to (Wan2.2 TI2V-5B's image): decoding
    #: puts them back over what the scheduler made of those frames.
    pinned_latents: torch.Tensor | None = None
    #: Sees (and may perturb) the latents after every denoising step: ``sglang calibrate``'s
    #: measurement of how an error grows (``cache/error_growth.py``); None for every other request.
    probe: LatentProbe | None = None


@dataclass
class GenerationResult:
    """What a generation returns: frames (F, H, W, 3) float32 in [0, 1], latents, timings, cache stats."""

    params: SamplingParams
    frames: np.ndarray
    latents: torch.Tensor
    timings: dict[str, float]
    cache_stats: CacheStats | None
    cache: TimestepCache | None = None
    output_path: str | None = None
    #: With several processes: each rank's report (rank, cfg/sp rank, computed and skipped steps).
    rank_reports: list[dict[str, Any]] | None = None
    #: An uncached run's step costs (``StepCosts``): what ``--cache-speedup`` plans with.
    step_costs: StepCosts | None = None


class PipelineStage:
    """One step of the data path. Subclasses validate what they read and fill what they produce."""

    name: str = "stage"

    def __call__(self, req: Req) -> Req:
        raise NotImplementedError


class Pipeline:
    """Runs its stages in order, timing each."""

    def __init__(self, model_info: ModelInfo, device: torch.device, dtype: torch.dtype) -> None:
        self.model_info = model_info
        self.device = device
        self.dtype = dtype
        self.stages: list[PipelineStage] = []
        self.geometry: VideoGeometry | None = None
        #: On a model with several experts, the expert of every step of a request of ``n`` steps
        #: (its calibration and cache are kept per expert); ``None`` for one transformer.
        self.expert_schedule: Callable[[int], list[str]] | None = None

    def validate(self, params: SamplingParams, calibrate: bool = False) -> Req:
        """Run only the first stage (input validation): raises on bad input, cheap, no model work."""
        return self.stages[0](Req(params=params, calibrate=calibrate))

    def run(
        self,
        params: SamplingParams,
        progress: ProgressCallback | None = None,
        show_progress_bar: bool = False,
        calibrate: bool = False,
        stop_after: str | None = None,
        probe: LatentProbe | None = None,
    ) -> GenerationResult:
        """Run every stage (or those up to the one named ``stop_after``: the worker ranks of a
        multi-process request stop after denoising, since rank 0 alone decodes and saves)."""
        req = Req(params=params, progress=progress, show_progress_bar=show_progress_bar, calibrate=calibrate,
                  probe=probe)
        for stage in self.stages:
            if stop_after is not None and req.timings and list(req.timings)[-1] == stop_after:
                break
            start = time.perf_counter()
            with torch.inference_mode():
                req = stage(req)
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            req.timings[stage.name] = time.perf_counter() - start
            logger.debug("stage %s took %.3fs", stage.name, req.timings[stage.name])
        return GenerationResult(
            params=req.params,
            frames=req.frames,
            latents=req.latents,
            timings=req.timings,
            cache_stats=req.cache.stats if req.cache is not None else None,
            cache=req.cache,
            step_costs=req.step_costs,
        )
