"""Wan: validation -> T5 text encoding -> [first frame] -> latents -> denoising -> VAE decoding.

One pipeline for every Wan folder diffusers' ``WanPipeline`` and ``WanImageToVideoPipeline`` run:
Wan2.1 runs one transformer; Wan2.2 A14B folders two experts (``transformer`` for high noise,
``transformer_2`` for low noise, split at ``boundary_ratio``: ``models/experts.py``); a Wan2.2
TI2V-5B folder one transformer fed a timestep per token (``expand_timesteps``, in the adapter) with
the Wan2.2 VAE (48 latent channels, 16x spatial), whose sizes the stages read from the configs.
Image to video (``ModelInfo.image_input``) adds the first frame's conditioning after the text's:
Wan2.1 I2V's CLIP embedding and condition channels, Wan2.2 I2V-A14B's condition channels, TI2V-5B's
pinned first latent frame (:class:`WanImageConditioningStage`).
"""

from __future__ import annotations

import functools

import torch

from sglang.multimodal_gen.configs.models import NO_IMAGE, ModelInfo
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


class WanPipeline(Pipeline):
    """The VAE and, for Wan2.1 I2V, the CLIP image encoder run in fp32 (the Wan model cards load
    both so); text encoder and transformers in ``dtype``.

    ``offload_idle_expert`` (a two-expert folder): ``transformer_2`` stays on the host at load and
    the two experts trade places at the switch (:class:`ExpertOffload`), so the device holds one
    expert's weights, not both."""

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
        experts = self._load_low_noise_expert(scheduler, offload_idle_expert) if model_info.two_experts else None
        self.geometry = wan_geometry(transformer, vae)
        spatial, temporal = vae.config.scale_factor_spatial, vae.config.scale_factor_temporal
        if model_info.cache_model_key:
            cache_model_key = model_info.cache_model_key
        elif model_info.image_to_video and not model_info.two_experts:
            cache_model_key = wan_i2v_cache_model_key
        else:
            cache_model_key = wan_cache_model_key(transformer.config)
        self.stages = [
            InputValidationStage(model_info.sampling_defaults, self.geometry, cache_model_key,
                                 expert_schedule=self.expert_schedule, image_input=model_info.image_input),
            T5TextEncodingStage(tokenizer, text_encoder, model_info.text_max_length, device, dtype),
        ]
        if model_info.image_input != NO_IMAGE:
            self.stages.append(self._image_conditioning_stage())
        self.stages += [
            # The noise has the VAE's channels (an I2V transformer takes 20 more: mask and condition).
            LatentPreparationStage(scheduler, vae.config.z_dim, spatial, temporal, device),
            DenoisingStage(WanDiTAdapter(transformer, model_info.expand_timesteps), dtype, experts=experts),
            WanDecodingStage(vae),
        ]

    def _load_low_noise_expert(self, scheduler, offload_idle_expert: bool) -> ExpertSwitch:
        """``transformer_2`` and the switch at ``boundary_ratio`` (Wan2.2 A14B)."""
        model_info = self.model_info
        self.transformer_2 = load_component(model_info.path, "transformer_2", self.dtype)
        offload = None
        if offload_idle_expert:
            offload = ExpertOffload({HIGH_NOISE: self.transformer, LOW_NOISE: self.transformer_2}, self.device)
        else:
            self.transformer_2.to(self.device)
        boundary = model_info.boundary_ratio * scheduler.config.num_train_timesteps
        experts = ExpertSwitch(WanDiTAdapter(self.transformer_2, model_info.expand_timesteps), boundary, offload)
        # Asked at validation and again by the generator per request: the same few step counts.
        schedules = functools.lru_cache(maxsize=32)(lambda n: tuple(experts.schedule_for(scheduler, n)))
        self.expert_schedule = lambda n: list(schedules(n))
        return experts

    def _image_conditioning_stage(self) -> WanImageConditioningStage:
        """The first frame's stage; with the CLIP image encoder where the transformer takes its
        embedding (Wan2.1 I2V)."""
        path = self.model_info.path
        image_processor = image_encoder = None
        if self.transformer.config.image_dim is not None:  # Wan2.1 I2V; Wan2.2's take the frame as latents only
            image_processor = load_component(path, "image_processor")
            image_encoder = self.image_encoder = load_component(path, "image_encoder", torch.float32).to(self.device)
        return WanImageConditioningStage(self.vae, self.device, self.dtype, self.geometry, image_processor,
                                         image_encoder, first_frame_only=self.model_info.expand_timesteps)


PIPELINE_CLASS = WanPipeline
