"""Per-request sampling parameters, with model-specific defaults filled in at request time."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from sglang.multimodal_gen.configs.cache_params import CacheParams


@dataclass
class SamplingParams:
    """What one generation asks for. ``None`` fields take the model's defaults (see configs/models.py).

    Attributes:
        prompt: The text to generate a video of; must not be empty.
        negative_prompt: Text the unconditional CFG branch is conditioned on ("" if not given).
        num_inference_steps: Denoising steps; more is slower and usually sharper.
        guidance_scale: Classifier-free guidance weight; values <= 1 disable the uncond branch.
        guidance_scale_2: Wan2.2 two-expert models only: the low-noise expert's guidance weight
            (unset: the model's default pair when ``guidance_scale`` is unset too, else
            ``guidance_scale``, as diffusers' WanPipeline does). Whether the uncond branch runs
            follows ``guidance_scale`` alone, as there.
        seed: Seed of the initial noise; the same seed and settings give the same video.
        height, width: Output size in pixels; multiples of the VAE stride times the patch size.
        num_frames: Output frames; the Wan VAE takes 4k+1 frames.
        fps: Frames per second written into the mp4.
        output_path: Where to save (.mp4, or .npy for lossless float frames); None keeps it in memory.
        cache: Timestep-cache choice for this request (strategy none by default).
        image: Image-to-video models only: the first frame, a PIL image or a path to one (the CLI's
            ``--image``; the server's ``input_reference``, decoded). ``None`` for text to video.
    """

    prompt: str = ""
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    guidance_scale_2: float | None = None
    seed: int = 0
    height: int | None = None
    width: int | None = None
    num_frames: int | None = None
    fps: int | None = None
    output_path: str | None = None
    cache: CacheParams = field(default_factory=CacheParams)
    image: Any = None

    def with_defaults(self, defaults: dict[str, Any]) -> "SamplingParams":
        """A copy whose unset fields take ``defaults`` (the model's sampling defaults)."""
        filled = {
            f.name: defaults[f.name]
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is None and f.name in defaults
        }
        return dataclasses.replace(self, **filled)
