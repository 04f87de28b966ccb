"""HunyuanVideo text-to-video: validation -> Llama + CLIP text encoding -> latents -> denoising -> VAE decoding.

HunyuanVideo is guidance-distilled: ``guidance_scale`` enters the transformer as an embedding
(``guidance = guidance_scale * 1000``, as diffusers' HunyuanVideoPipeline passes it), so each step
runs one branch ("cond") and a timestep cache keeps one residual.
"""

from __future__ import annotations

import numpy as np
import torch

from sglang.multimodal_gen.configs.models import ModelInfo
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.models.hunyuan import HunyuanDiTAdapter
from sglang.multimodal_gen.runtime.models.loader import load_component
from sglang.multimodal_gen.runtime.pipelines.base import Pipeline, VideoGeometry
from sglang.multimodal_gen.runtime.stages.decoding import HunyuanDecodingStage
from sglang.multimodal_gen.runtime.stages.denoising import DenoisingStage
from sglang.multimodal_gen.runtime.stages.hunyuan_text_encoding import HUNYUAN_PROMPT_TEMPLATE, HunyuanTextEncodingStage
from sglang.multimodal_gen.runtime.stages.input_validation import InputValidationStage
from sglang.multimodal_gen.runtime.stages.latent_preparation import LatentPreparationStage

# The transformer takes guidance as an embedding of guidance_scale * 1000.
EMBEDDED_GUIDANCE_MULTIPLIER = 1000.0
# The published cache presets were calibrated at 544x960 and 720x1280 (MagCache4HunyuanVideo picks
# its ratio curve by the video height); a request gets the one nearer its short side.
_720P_MIN_SHORT_SIDE = (544 + 720) // 2


def hunyuan_cache_model_key(params: SamplingParams) -> str:
    """The cache preset key for a request: by resolution, the nearer of 544p and 720p."""
    return "hunyuan_720p" if min(params.height, params.width) >= _720P_MIN_SHORT_SIDE else "hunyuan_544p"


def hunyuan_sigmas(num_inference_steps: int) -> np.ndarray:
    """The sigma schedule diffusers' HunyuanVideoPipeline hands its scheduler (which then shifts it)."""
    return np.linspace(1.0, 0.0, num_inference_steps + 1)[:-1]


class HunyuanVideoT2VPipeline(Pipeline):
    def __init__(self, model_info: ModelInfo, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(model_info, device, dtype)
        path = model_info.path
        tokenizer = load_component(path, "tokenizer")
        text_encoder = load_component(path, "text_encoder", dtype).to(device)
        tokenizer_2 = load_component(path, "tokenizer_2")
        text_encoder_2 = load_component(path, "text_encoder_2", dtype).to(device)
        transformer = load_component(path, "transformer", dtype).to(device)
        vae = load_component(path, "vae", torch.float32).to(device)
        scheduler = load_component(path, "scheduler")
        self.transformer = transformer
        self.vae = vae

        template = {**HUNYUAN_PROMPT_TEMPLATE, **model_info.pipeline_options.get("prompt_template", {})}
        spatial = vae.spatial_compression_ratio
        temporal = vae.temporal_compression_ratio
        config = transformer.config
        self.geometry = VideoGeometry(spatial_multiple=spatial * config.patch_size, temporal_stride=temporal)
        self.stages = [
            InputValidationStage(
                model_info.sampling_defaults,
                self.geometry,
                model_info.cache_model_key or hunyuan_cache_model_key,
                cfg=False,
            ),
            HunyuanTextEncodingStage(
                tokenizer, text_encoder, tokenizer_2, text_encoder_2, model_info.text_max_length, device, dtype, template
            ),
            LatentPreparationStage(scheduler, config.in_channels, spatial, temporal, device, sigmas=hunyuan_sigmas),
            DenoisingStage(
                HunyuanDiTAdapter(transformer),
                dtype,
                embedded_guidance_scale=EMBEDDED_GUIDANCE_MULTIPLIER,
                timestep_in_latent_dtype=True,
            ),
            HunyuanDecodingStage(vae),
        ]


PIPELINE_CLASS = HunyuanVideoT2VPipeline
