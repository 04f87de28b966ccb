"""Wan text-to-video: validation -> T5 text encoding -> latents -> denoising -> VAE decoding.

Wan2.1 runs one transformer; a Wan2.2 T2V-A14B folder two experts (``transformer`` for high noise,
``transformer_2`` for low noise, split at ``boundary_ratio``: ``models/experts.py``); a Wan2.2
TI2V-5B folder one transformer fed a timestep per token (``expand_timesteps``, in the adapter) with
the Wan2.2 VAE (48 latent channels, 16x spatial), whose sizes the stages read from the configs.

Wan2.1 image-to-video (``WanImageToVideoPipeline`` folders): the same stages with the first frame's
conditioning (CLIP embedding, VAE-encoded condition and mask) made after the text's."""

from __future__ import annotations

import functools

import torch

from sglang.multimodal_gen.configs.models import WAN_I2V_PIPELINE, ModelInfo
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.models.experts import HIGH_NOISE, LOW_NOISE, ExpertOffload, ExpertSwitch
from sglang.multimodal_gen.runtime.models.loader import load_component
from sglang.multimodal_gen.runtime.models.wan import WanDiTAdapter
from sglang.multimodal_gen.runtime.pipelines.base import Pipeline, VideoGeometry
from sglang.multimodal_gen.runtime.stages.decoding import WanDecodingStage
from sglang.multimodal_gen.runtime.stages.denoising import DenoisingStage
from sglang.multimodal_gen.runtime.stages.image_conditioning import WanImageConditioningStage
from sglang.multimodal_gen.runtime.stages.input_validation import InputValidationStage
from sglang.multimodal_gen.runtime.stages.latent_preparation import LatentPreparationStage
from sglang.multimodal_gen.runtime.stages.text_encoding import T5TextEncodingStage

# Transformer width -> published cache preset key (MagCache ratios, TeaCache coefficients).
_WAN_PRESET_BY_WIDTH = {1536: "wan21_t2v_1.3b", 5120: "wan21_t2v_14b"}


def wan_cache_model_key(transformer_config) -> str:
    """The preset key for a Wan transformer: by width; small custom models fall back to 1.3B's."""
    width = transformer_config.num_attention_heads * transformer_config.attention_head_dim
    return _WAN_PRESET_BY_WIDTH.get(width, "wan21_t2v_1.3b")


# The published I2V presets (MagCache ratios, TeaCache coefficients) are the 14B 480P and 720P
# checkpoints', calibrated at 480x832 and 720x1280: a request gets the one nearer its short side.
_I2V_720P_MIN_SHORT_SIDE = (480 + 720) // 2


def wan_i2v_cache_model_key(params: SamplingParams) -> str:
    """The preset key of a Wan2.1 I2V request: by resolution, the nearer of 480p and 720p (the two
    checkpoints share one layout, so the folder cannot tell them apart)."""
    short_side = min(params.height, params.width)
    return "wan21_i2v_14b_720p" if short_side >= _I2V_720P_MIN_SHORT_SIDE else "wan21_i2v_14b_480p"


def wan_geometry(transformer, vae) -> VideoGeometry:
    """What a Wan video's size must respect: the VAE's spatial stride times the patch, and its
    temporal stride (Wan2.1: 16 pixels and 4k+1 frames; Wan2.2's VAE: 32 pixels)."""
    patch = transformer.config.patch_size
    spatial_multiple = vae.config.scale_factor_spatial * max(patch[1], patch[2])
    return VideoGeometry(spatial_multiple=spatial_multiple, temporal_stride=vae.config.scale_factor_temporal)


class WanT2VPipeline(Pipeline):
    """``offload_idle_expert`` (a two-expert folder): ``transformer_2`` stays on the host at load
    and the two experts trade places at the switch (:class:`ExpertOffload`), so the device holds
    one expert's weights, not both."""

    def __init__(self, model_info: ModelInfo, device: torch.device, dtype: torch.dtype,
                 offload_idle_expert: bool = False) -> None:
        super().__init__(model_info, device, dtype)
        path = model_info.path
        tokenizer = load_component(path, "tokenizer")
        text_encoder = load_component(path, "text_encoder", dtype).to(device)
        transformer = load_component(path, "transformer", dtype).to(device)
        vae = load_component(path, "vae", torch.float32).to(device)
        scheduler = load_component(path, "scheduler")
        self.transformer = transformer
        self.vae = vae
        experts = None
        if model_info.two_experts:  # Wan2.2 T2V-A14B: transformer_2 is the low-noise expert
            self.transformer_2 = load_component(path, "transformer_2", dtype)
            offload = None
            if offload_idle_expert:
                offload = ExpertOffload({HIGH_NOISE: transformer, LOW_NOISE: self.transformer_2}, device)
            else:
                self.transformer_2.to(device)
            boundary = model_info.boundary_ratio * scheduler.config.num_train_timesteps
            experts = ExpertSwitch(WanDiTAdapter(self.transformer_2, model_info.expand_timesteps), boundary, offload)
            # Asked at validation and again by the generator per request: the same few step counts.
            schedules = functools.lru_cache(maxsize=32)(lambda n: tuple(experts.schedule_for(scheduler, n)))
            self.expert_schedule = lambda n: list(schedules(n))

        self.geometry = wan_geometry(transformer, vae)
        spatial, temporal = vae.config.scale_factor_spatial, vae.config.scale_factor_temporal
        self.stages = [
            InputValidationStage(
                model_info.sampling_defaults,
                self.geometry,
                model_info.cache_model_key or wan_cache_model_key(transformer.config),
                expert_schedule=self.expert_schedule,
            ),
            T5TextEncodingStage(tokenizer, text_encoder, model_info.text_max_length, device, dtype),
            LatentPreparationStage(scheduler, transformer.config.in_channels, spatial, temporal, device),
            DenoisingStage(WanDiTAdapter(transformer, model_info.expand_timesteps), dtype, experts=experts),
            WanDecodingStage(vae),
        ]


class WanI2VPipeline(Pipeline):
    """Wan2.1 image to video, as diffusers' ``WanImageToVideoPipeline`` runs it: the first frame's
    CLIP embedding and VAE-encoded condition (:class:`WanImageConditioningStage`) enter the
    transformer at every step beside the prompt and the noise latents. The image encoder runs in
    fp32 like the VAE (the Wan2.1 I2V model card loads both so); text encoder and transformer in
    ``dtype``."""

    def __init__(self, model_info: ModelInfo, device: torch.device, dtype: torch.dtype) -> None:
        super().__init__(model_info, device, dtype)
        path = model_info.path
        tokenizer = load_component(path, "tokenizer")
        text_encoder = load_component(path, "text_encoder", dtype).to(device)
        image_processor = load_component(path, "image_processor")
        image_encoder = load_component(path, "image_encoder", torch.float32).to(device)
        transformer = load_component(path, "transformer", dtype).to(device)
        vae = load_component(path, "vae", torch.float32).to(device)
        scheduler = load_component(path, "scheduler")
        self.transformer = transformer
        self.vae = vae
        self.image_encoder = image_encoder

        self.geometry = wan_geometry(transformer, vae)
        spatial, temporal = vae.config.scale_factor_spatial, vae.config.scale_factor_temporal
        self.stages = [
            InputValidationStage(
                model_info.sampling_defaults,
                self.geometry,
                model_info.cache_model_key or wan_i2v_cache_model_key,
                image_to_video=True,
            ),
            T5TextEncodingStage(tokenizer, text_encoder, model_info.text_max_length, device, dtype),
            WanImageConditioningStage(image_processor, image_encoder, vae, device, dtype, self.geometry),
            # The noise has the VAE's channels; the transformer takes 20 more (mask and condition).
            LatentPreparationStage(scheduler, vae.config.z_dim, spatial, temporal, device),
            DenoisingStage(WanDiTAdapter(transformer), dtype),
            WanDecodingStage(vae),
        ]


PIPELINE_CLASS = WanT2VPipeline
#: The pipeline of each model_index.json ``_class_name`` of the family (PIPELINE_CLASS otherwise).
PIPELINE_CLASSES: dict[str, type[Pipeline]] = {"WanPipeline": WanT2VPipeline, WAN_I2V_PIPELINE: WanI2VPipeline}
