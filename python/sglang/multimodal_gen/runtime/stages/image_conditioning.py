"""Wan2.1 image to video: the first frame as the transformer's image embedding and condition channels."""

from __future__ import annotations

import logging
import math

import torch
from PIL import Image

from sglang.multimodal_gen.runtime.pipelines.base import PipelineStage, Req, VideoGeometry
from sglang.multimodal_gen.runtime.utils.image_io import load_image

logger = logging.getLogger(__name__)

# Aspect ratios this far apart (relative) are worth a warning: the frame is visibly stretched.
_STRETCH_WARNING = 0.01


class WanImageConditioningStage(PipelineStage):
    """What diffusers' ``WanImageToVideoPipeline`` makes of the image, for every CFG branch.

    - ``encoder_hidden_states_image``: the CLIP vision model's hidden states one layer before the
      last (``hidden_states[-2]``, 257 tokens for ViT-H/14) of the image as its processor resizes
      and crops it, in the model dtype. The unconditional branch gets the same embedding, as
      there: guidance contrasts the prompts, not the image.
    - ``condition``: the first frame stretched to the request's height and width (diffusers'
      ``VideoProcessor.preprocess``: no crop, no padding), followed by ``num_frames - 1`` black
      frames (zeros in [-1, 1]), encoded by the VAE (the mode of its posterior) and normalised
      with the VAE's latent mean and std, after a 4-channel mask that is 1 on the first latent
      frame and 0 elsewhere. The adapter puts these 20 channels after the 16 noise channels at
      every step; the scheduler never sees them.

    Args:
        image_processor: The folder's ``CLIPImageProcessor``.
        image_encoder: The folder's ``CLIPVisionModel`` (run in the dtype it was loaded in).
        vae: The Wan VAE (fp32, as the decoding stage runs it).
        device: Where the model runs.
        dtype: The transformer's compute dtype, which both inputs take (diffusers casts them to
            ``transformer.dtype``).
        geometry: The size strides, for the size a warning suggests.
    """

    name = "image_conditioning"

    def __init__(self, image_processor, image_encoder, vae, device: torch.device, dtype: torch.dtype,
                 geometry: VideoGeometry) -> None:
        from diffusers.video_processor import VideoProcessor

        self.image_processor = image_processor
        self.image_encoder = image_encoder
        self.vae = vae
        self.device = device
        self.dtype = dtype
        self.geometry = geometry
        self.spatial_stride = vae.config.scale_factor_spatial
        self.temporal_stride = vae.config.scale_factor_temporal
        self.video_processor = VideoProcessor(vae_scale_factor=self.spatial_stride)
        z_dim = vae.config.z_dim
        self.latents_mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1)
        self.inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1)

    def __call__(self, req: Req) -> Req:
        params = req.params
        image = load_image(params.image)
        self._warn_if_stretched(image, params.height, params.width)
        inputs = {
            "encoder_hidden_states_image": self.encode_image(image),
            "condition": self.encode_condition(image, params.height, params.width, params.num_frames),
        }
        for branch in req.prompt_embeds:
            req.conditioning[branch] = {**req.conditioning.get(branch, {}), **inputs}
        return req

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """The CLIP embedding ``(1, tokens, hidden)`` of the image as its processor prepares it."""
        encoder_param = next(self.image_encoder.parameters())
        pixels = self.image_processor(images=image, return_tensors="pt").pixel_values.to(encoder_param.device)
        hidden_states = self.image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states
        return hidden_states[-2].to(self.device, self.dtype)

    def encode_condition(self, image: Image.Image, height: int, width: int, num_frames: int) -> torch.Tensor:
        """The mask and the normalised VAE latents of the conditioning video, ``(1, 4 + z, latent
        frames, height / 8, width / 8)`` in the model dtype."""
        vae_param = next(self.vae.parameters())
        first = self.video_processor.preprocess(image, height=height, width=width)  # (1, 3, H, W) in [-1, 1]
        first = first.to(vae_param.device, torch.float32).unsqueeze(2)
        video = torch.cat([first, first.new_zeros(1, 3, num_frames - 1, height, width)], dim=2)
        latents = self.vae.encode(video.to(vae_param.dtype)).latent_dist.mode()
        latents = latents.to(self.device, torch.float32)
        latents = (latents - self.latents_mean.to(latents.device)) * self.inverse_std.to(latents.device)
        mask = torch.zeros(1, self.temporal_stride, *latents.shape[2:], device=latents.device)
        # diffusers builds it per pixel frame, the first repeated once per temporal stride, then
        # folds each stride of frames into the channels: the first latent frame (the image alone)
        # is all ones, every later one (frames to be made) all zeros.
        mask[:, :, 0] = 1.0
        return torch.cat([mask, latents], dim=1).to(self.dtype)

    def _warn_if_stretched(self, image: Image.Image, height: int, width: int) -> None:
        """One warning when the image's aspect ratio is not the video's, with a size that has it."""
        image_ratio, video_ratio = image.height / image.width, height / width
        if abs(image_ratio / video_ratio - 1) <= _STRETCH_WARNING:
            return
        multiple = self.geometry.spatial_multiple
        area = height * width
        fit_height = max(multiple, round(math.sqrt(area * image_ratio)) // multiple * multiple)
        fit_width = max(multiple, round(math.sqrt(area / image_ratio)) // multiple * multiple)
        logger.warning(
            "the image is %dx%d (width x height) and the video %dx%d: the first frame is stretched to the video's "
            "size, as diffusers' WanImageToVideoPipeline does; for the image's aspect ratio at about the same area "
            "ask for --height %d --width %d", image.width, image.height, width, height, fit_height, fit_width)
