"""First stage: check a request against the model's constraints and build its timestep cache."""

from __future__ import annotations

from typing import Any, Callable

from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.errors import InvalidRequestError
from sglang.multimodal_gen.runtime.cache import build_cache
from sglang.multimodal_gen.runtime.cache.base import COND, UNCOND
from sglang.multimodal_gen.runtime.pipelines.base import PipelineStage, Req, VideoGeometry


class InputValidationStage(PipelineStage):
    """Fills model defaults, rejects what the model cannot take with one clear message.

    Args:
        defaults: The model's sampling defaults.
        geometry: The strides the video size must respect.
        cache_model_key: The cache preset key, or a function of the (defaulted) request that picks
            it, e.g. by resolution (HunyuanVideo ships 544p and 720p MagCache curves).
        cfg: True (Wan): ``guidance_scale > 1`` adds the uncond branch, conditioned on the negative
            prompt. False for guidance-distilled models (HunyuanVideo): one branch, "cond", the
            guidance being a model input, so a negative prompt has nothing to condition.
    """

    name = "input_validation"

    def __init__(
        self,
        defaults: dict[str, Any],
        geometry: VideoGeometry,
        cache_model_key: str | Callable[[SamplingParams], str],
        cfg: bool = True,
    ) -> None:
        self.defaults = defaults
        self.geometry = geometry
        self.cache_model_key = cache_model_key
        self.cfg = cfg

    def __call__(self, req: Req) -> Req:
        check_prompt(req.params.prompt)
        params = req.params.with_defaults(self.defaults)
        if params.negative_prompt is None:
            params.negative_prompt = ""
        _require_int(params.num_inference_steps, "num_inference_steps", minimum=1)
        _require_int(params.seed, "seed", minimum=0)
        _require_int(params.fps, "fps", minimum=1)
        if not isinstance(params.guidance_scale, (int, float)) or params.guidance_scale < 0:
            raise InvalidRequestError(
                f"guidance_scale must be a number >= 0, got {params.guidance_scale!r}", param="guidance_scale"
            )
        multiple = self.geometry.spatial_multiple
        for name in ("height", "width"):
            value = getattr(params, name)
            _require_int(value, name, minimum=multiple)
            if value % multiple:
                raise InvalidRequestError(
                    f"{name} {value} is not a multiple of {multiple} (VAE stride x patch size); "
                    f"try {max(multiple, round(value / multiple) * multiple)}",
                    param=name,
                )
        stride = self.geometry.temporal_stride
        _require_int(params.num_frames, "num_frames", minimum=1)
        if (params.num_frames - 1) % stride:
            lower = (params.num_frames - 1) // stride * stride + 1
            raise InvalidRequestError(
                f"num_frames {params.num_frames} cannot be taken by the VAE: it must be {stride}k+1 "
                f"(e.g. {lower} or {lower + stride})",
                param="num_frames",
            )
        if not self.cfg and str(params.negative_prompt).strip():
            raise InvalidRequestError(
                "this model uses embedded guidance (no CFG branch), so a negative prompt has no effect; "
                "drop the negative prompt and steer with guidance_scale",
                param="negative_prompt",
            )
        branches = (COND, UNCOND) if self.cfg and params.guidance_scale > 1.0 else (COND,)
        model_key = self.cache_model_key(params) if callable(self.cache_model_key) else self.cache_model_key
        req.cache = build_cache(params.cache, params.num_inference_steps, model_key, branches, calibrate=req.calibrate)
        req.params = params
        return req


def check_prompt(prompt: object) -> None:
    """Model-independent, so callers can refuse an empty prompt before loading any weights."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequestError("the prompt is empty; pass a non-empty prompt", param="prompt")


def _require_int(value: Any, name: str, minimum: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequestError(f"{name} must be an integer >= {minimum}, got {value!r}", param=name)
