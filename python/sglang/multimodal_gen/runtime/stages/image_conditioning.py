"""Wan image to video: the first frame as the transformer's image embedding and condition channels
(Wan2.1 I2V, Wan2.2 I2V-A14B), or as the first latent frame itself (Wan2.2 TI2V-5B)."""

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

    The image is first stretched to the request's height and width (diffusers'
    ``VideoProcessor.preprocess``: no crop, no padding) and mapped to [-1, 1]. Then, by kind:

    - Wan2.1 I2V and Wan2.2 I2V-A14B, ``condition``: the frame followed by ``num_frames - 1`` black
      frames (zeros), encoded by the VAE (the mode of its posterior) and normalised with the VAE's
      latent mean and std, after a 4-channel mask that is 1 on the first latent frame and 0
      elsewhere. The adapter puts these 20 channels after the 16 noise channels at every step;
      the scheduler never sees them.
    - Wan2.1 I2V only (a transformer with ``image_dim``), ``encoder_hidden_states_image``: the
      CLIP vision model's hidden states one layer before the last (``hidden_states[-2]``, 257
      tokens for ViT-H/14) of the image as its processor resizes and crops it, in the model
      dtype. The unconditional branch gets the same embedding, as there: guidance contrasts the
      prompts, not the image.
    - Wan2.2 TI2V-5B (``first_frame_only``), ``first_frame_latents``: the frame alone, encoded and
      normalised (one latent frame, fp32). The adapter puts it in place of the first latent
      frame at every step, whose tokens take timestep 0; the decoding stage puts it back over
      what the scheduler made of that frame (``Req.pinned_latents``). A request without an image
      passes through: TI2V-5B makes text to video then.

    Args:
        vae: The Wan VAE (fp32, as the decoding stage runs it).
        device: Where the model runs.
        dtype: The transformer's compute dtype, which the CLIP embedding and the condition take
            (diffusers casts them to ``transformer.dtype``).
        geometry: The size strides, for the size a warning suggests.
        image_processor: The folder's ``CLIPImageProcessor`` (Wan2.1 I2V; else ``None``).
        image_encoder: The folder's ``CLIPVisionModel`` (run in the dtype it was loaded in).
        first_frame_only: Wan2.2 TI2V-5B's image mode (``expand_timesteps``).
    """

    name = "image_conditioning"

    def __init__(self, vae, device: torch.device, dtype: torch.dtype, geometry: VideoGeometry,
                 image_processor=None, image_encoder=None, first_frame_only: bool = False) -> None:
        from diffusers.video_processor import VideoProcessor

        if (image_processor is None) != (image_encoder is None):
            raise ValueError("the CLIP image_processor and image_encoder come together")
        self.image_processor = image_processor
        self.image_encoder = image_encoder
        self.first_frame_only = first_frame_only
        self.vae = vae
        self.device = device
        self.dtype = dtype
        self.geometry = geometry
        self.temporal_stride = vae.config.scale_factor_temporal
        self.video_processor = VideoProcessor(vae_scale_factor=vae.config.scale_factor_spatial)
        z_dim = vae.config.z_dim
        self.latents_mean = torch.tensor(vae.config.latents_mean).view(1, z_dim, 1, 1, 1)
        self.inverse_std = 1.0 / torch.tensor(vae.config.latents_std).view(1, z_dim, 1, 1, 1)

    def __call__(self, req: Req) -> Req:
        params = req.params
        if params.image is None:
            return req  # text to video (TI2V-5B): validation refuses a missing image where one is needed
        image = load_image(params.image)
        self._warn_if_stretched(image, params.height, params.width)
        frame = self.video_processor.preprocess(image, height=params.height, width=params.width)  # (1, 3, H, W)
        inputs = {}
        if self.first_frame_only:
            inputs["first_frame_latents"] = req.pinned_latents = self.encode_video(frame.unsqueeze(2))
        else:
            inputs["condition"] = self.encode_condition(frame, params.num_frames)
        if self.image_encoder is not None:
            inputs["encoder_hidden_states_image"] = self.encode_image(image)
        for branch in req.prompt_embeds:
            req.conditioning[branch] = {**req.conditioning.get(branch, {}), **inputs}
        return req

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        """The CLIP embedding ``(1, tokens, hidden)`` of the image as its processor prepares it."""
        encoder_param = next(self.image_encoder.parameters())
        pixels = self.image_processor(images=image, return_tensors="pt").pixel_values.to(encoder_param.device)
        hidden_states = self.image_encoder(pixel_values=pixels, output_hidden_states=True).hidden_states
        return hidden_states[-2].to(self.device, self.dtype)

    def encode_video(self, video: torch.Tensor) -> torch.Tensor:
        """The VAE latents of ``video`` ``(1, 3, frames, H, W)`` in [-1, 1], normalised, fp32."""
        vae_param = next(self.vae.parameters())
        latents = self.vae.encode(video.to(vae_param.device, vae_param.dtype)).latent_dist.mode()
        latents = latents.to(self.device, torch.float32)
        return (latents - self.latents_mean.to(latents.device)) * self.inverse_std.to(latents.device)

    def encode_condition(self, frame: torch.Tensor, num_frames: int) -> torch.Tensor:
        """The mask and the latents of the frame followed by black frames, ``(1, 4 + z, latent
        frames, height / 8, width / 8)`` in the model dtype."""
        first = frame.to(torch.float32).unsqueeze(2)
        _, channels, _, height, width = first.shape
        latents = self.encode_video(torch.cat([first, first.new_zeros(1, channels, num_frames - 1, height, width)],
                                              dim=2))
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
