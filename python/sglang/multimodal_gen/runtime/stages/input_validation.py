"""First stage: check a request against the model's constraints and build its timestep cache."""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

from sglang.multimodal_gen.configs.models import IMAGE_REQUIRED, NO_IMAGE
from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.errors import InvalidRequestError
from sglang.multimodal_gen.runtime.cache import build_cache
from sglang.multimodal_gen.runtime.cache.branches import COND, UNCOND
from sglang.multimodal_gen.runtime.cache.registry import get_cache_class, registered_caches
from sglang.multimodal_gen.runtime.cache.strategy import speedup_refusal, takes_a_budget
from sglang.multimodal_gen.runtime.pipelines.base import PipelineStage, Req, VideoGeometry
from sglang.multimodal_gen.runtime.utils.image_io import check_image


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
        expert_schedule: A Wan2.2 two-expert model: the expert of every step of a request of ``n``
            steps (its cache keeps one instance per expert, ``cache/experts.py``); such a model
            takes ``guidance_scale_2`` (the low-noise expert's), one-transformer models refuse it.
        image_input: Whether a request gives a first frame (``SamplingParams.image``):
            ``ModelInfo.image_input``; a text-to-video model refuses an image.
    """

    name = "input_validation"

    def __init__(
        self,
        defaults: dict[str, Any],
        geometry: VideoGeometry,
        cache_model_key: str | Callable[[SamplingParams], str],
        cfg: bool = True,
        expert_schedule: Callable[[int], list[str]] | None = None,
        image_input: str = NO_IMAGE,
    ) -> None:
        self.defaults = defaults
        self.image_input = image_input
        self.geometry = geometry
        self.cache_model_key = cache_model_key
        self.cfg = cfg
        self.expert_schedule = expert_schedule
        self.two_experts = expert_schedule is not None

    def __call__(self, req: Req) -> Req:
        params = req.params
        check_image_for_model(params.image, self.image_input)
        if not self.two_experts and params.guidance_scale_2 is not None:
            raise InvalidRequestError(
                "guidance_scale_2 sets the low-noise expert's guidance of a Wan2.2 two-expert model; this model "
                "has one transformer, so drop it and use guidance_scale", param="guidance_scale_2")
        if self.two_experts and params.guidance_scale is not None and params.guidance_scale_2 is None:
            params = dataclasses.replace(params, guidance_scale_2=params.guidance_scale)  # diffusers' rule
        params = params.with_defaults(self.defaults)
        if params.negative_prompt is None:
            params.negative_prompt = ""
        check_model_free(params)
        # None if neither the request nor the model's defaults set them: check_model_free skips those.
        _require_int(params.num_inference_steps, "num_inference_steps", minimum=1)
        _require_int(params.fps, "fps", minimum=1)
        _require_guidance_scale(params.guidance_scale)
        if self.two_experts:
            _require_guidance_scale(params.guidance_scale_2, "guidance_scale_2")
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
        experts = self.expert_schedule(params.num_inference_steps) if self.expert_schedule is not None else None
        req.cache = build_cache(params.cache, params.num_inference_steps, model_key, branches, calibrate=req.calibrate,
                                experts=experts)
        req.params = params
        return req


# torch.Generator.manual_seed takes at most an unsigned 64-bit seed.
MAX_SEED = 2**64 - 1


def check_prompt(prompt: object) -> None:
    """Model-independent, so callers can refuse an empty or undecodable prompt before loading any weights."""
    if not isinstance(prompt, str) or not prompt.strip():
        raise InvalidRequestError("the prompt is empty; pass a non-empty prompt", param="prompt")
    _require_utf8(prompt, "prompt")


def check_image_for_model(image: object, image_input: str) -> None:
    """An image-to-video model needs the first frame, a text-to-video model takes none (``image_input``:
    ``ModelInfo.image_input``): one line either way, before any model work (the CLI asks it before
    loading the model too)."""
    if image_input == IMAGE_REQUIRED and image is None:
        raise InvalidRequestError(
            "this image-to-video model makes a video from a first frame: pass the image (--image PATH on the "
            "command line)", param="image")
    if image_input == NO_IMAGE and image is not None:
        raise InvalidRequestError(
            "this model makes videos from text alone and takes no image; drop the image, or load an "
            "image-to-video model (Wan2.1 I2V, Wan2.2 I2V-A14B or TI2V-5B)", param="image")


def check_negative_prompt(negative_prompt: object) -> None:
    """``None`` or text the tokenizer can take; model-independent like :func:`check_prompt`."""
    if negative_prompt is None:
        return
    if not isinstance(negative_prompt, str):
        raise InvalidRequestError(
            f"negative_prompt must be a string, got {negative_prompt!r}", param="negative_prompt"
        )
    _require_utf8(negative_prompt, "negative_prompt")


def check_model_free(params: SamplingParams) -> None:
    """The checks that need no model, on the fields that are set: the CLI runs them before loading
    weights (so a typo costs no load), the stage again once the model's defaults are filled in.

    Sizes and frame counts are left to the stage: what they must be a multiple of is the model's;
    so is whether an image is wanted (:func:`check_image_for_model`), but a path that is no image
    file is refused here.
    """
    check_prompt(params.prompt)
    check_negative_prompt(params.negative_prompt)
    check_image(params.image)
    for name, minimum in (("num_inference_steps", 1), ("fps", 1), ("num_frames", 1)):
        if getattr(params, name) is not None:
            _require_int(getattr(params, name), name, minimum=minimum)
    _require_int(params.seed, "seed", minimum=0, maximum=MAX_SEED)
    if params.guidance_scale is not None:
        _require_guidance_scale(params.guidance_scale)
    if params.guidance_scale_2 is not None:
        _require_guidance_scale(params.guidance_scale_2, "guidance_scale_2")


def check_speedup_strategy(cache: CacheParams) -> None:
    """A speedup asked of a strategy that cannot be tuned to one (EasyCache) is refused from the
    registry alone, before a model loads (``strategy.speedup_refusal``)."""
    if cache.speedup is None or cache.strategy in (None, "none") or cache.strategy not in registered_caches():
        return  # no speedup, the planner, or an unknown name CacheParams refuses
    if not takes_a_budget(get_cache_class(cache.strategy)):
        raise speedup_refusal(cache.strategy)


def _require_utf8(text: str, param: str) -> None:
    """A str can hold what UTF-8 cannot: lone surrogates, from argv bytes that were not UTF-8
    (Python keeps them as U+DC80-U+DCFF) or from "\\udXXX" escapes in JSON. Tokenizers choke on them."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        char = ord(text[exc.start])
        what = (f"the undecodable byte 0x{char - 0xDC00:02x}" if 0xDC80 <= char <= 0xDCFF
                else f"the lone surrogate U+{char:04X}")
        raise InvalidRequestError(
            f"{param} is not valid UTF-8: character {exc.start} is {what}; pass UTF-8 text "
            "(check the encoding of your terminal or file)",
            param=param,
        ) from None


def _require_guidance_scale(value: Any, name: str = "guidance_scale") -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise InvalidRequestError(f"{name} must be a number >= 0, got {value!r}", param=name)


def _require_int(value: Any, name: str, minimum: int, maximum: int | None = None) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise InvalidRequestError(f"{name} must be an integer >= {minimum}, got {value!r}", param=name)
    if maximum is not None and value > maximum:
        raise InvalidRequestError(f"{name} must be at most {maximum}, got {value}", param=name)
