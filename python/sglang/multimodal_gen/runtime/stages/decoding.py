"""Decode the final latents with the VAE into frames (F, H, W, 3), float32 in [0, 1]."""

from __future__ import annotations

import torch

from sglang.multimodal_gen.runtime.pipelines.base import PipelineStage, Req


class WanDecodingStage(PipelineStage):
    """Undo Wan's per-channel latent normalisation, decode, map [-1, 1] to [0, 1]. Pinned latents
    (``Req.pinned_latents``, TI2V-5B's image) first replace the frames they cover, as diffusers'
    ``WanImageToVideoPipeline`` does after its loop; the result's latents are those."""

    name = "decoding"

    def __init__(self, vae) -> None:
        self.vae = vae
        z_dim = vae.config.z_dim
        self.latents_mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1)
        self.inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1)

    def __call__(self, req: Req) -> Req:
        if req.pinned_latents is not None:
            pinned = req.pinned_latents.to(req.latents.device, req.latents.dtype)
            req.latents = torch.cat([pinned, req.latents[:, :, pinned.shape[2]:]], dim=2)
        vae_param = next(self.vae.parameters())
        latents = req.latents.to(vae_param.device, vae_param.dtype)
        mean = self.latents_mean.to(latents.device, latents.dtype)
        inverse_std = self.inverse_std.to(latents.device, latents.dtype)
        video = self.vae.decode(latents / inverse_std + mean, return_dict=False)[0]
        frames = (video[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0)
        req.frames = frames.cpu().numpy()
        return req


class HunyuanDecodingStage(PipelineStage):
    """Undo HunyuanVideo's single latent scaling factor, decode, map [-1, 1] to [0, 1]."""

    name = "decoding"

    def __init__(self, vae) -> None:
        self.vae = vae
        self.scaling_factor = vae.config.scaling_factor

    def __call__(self, req: Req) -> Req:
        vae_param = next(self.vae.parameters())
        latents = req.latents.to(vae_param.device, vae_param.dtype) / self.scaling_factor
        video = self.vae.decode(latents, return_dict=False)[0]
        frames = (video[0].float() / 2 + 0.5).clamp(0, 1).permute(1, 2, 3, 0)
        req.frames = frames.cpu().numpy()
        return req
