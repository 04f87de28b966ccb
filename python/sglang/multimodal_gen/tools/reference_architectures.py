"""What differs between the reference models' architectures; the training loop itself is shared.

``tools/train_reference.py`` trains either a tiny Wan2.1 or a tiny HunyuanVideo pipeline on the
same synthetic world with the same phases (VAE, latents, transformer and text encoders). Each
architecture here says how to build and run its parts: the VAE and how its latents are
normalised, the tokenizers and text encoders (encoded exactly as the runtime's text stage does),
the transformer's call, the scheduler's shift the training noise levels follow, and how the
trained parts are saved in the diffusers layout with their ``sglang_config.json``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from sglang.multimodal_gen.tools.synthetic_videos import VIDEO_FRAMES, VIDEO_SIZE
from sglang.multimodal_gen.tools.tiny_models import (
    HUNYUAN_SCHEDULER,
    TINY_HUNYUAN_TRANSFORMER,
    TINY_HUNYUAN_VAE,
    TINY_TEXT_LENGTH,
    TINY_UMT5,
    TINY_WAN_TRANSFORMER,
    TINY_WAN_VAE,
    WAN_SCHEDULER,
    new_hunyuan_text_encoders,
    save_hunyuan_components,
    save_wan_components,
    train_clip_tokenizer,
    train_llama_tokenizer,
    train_tokenizer,
)

# Wan: the test models' transformer, a third wider (4 heads, ffn 384: 1.1M parameters), which
# learned the captions' shapes better than the narrower one given the same training time.
REFERENCE_TRANSFORMER: dict = {**TINY_WAN_TRANSFORMER, "num_attention_heads": 4, "ffn_dim": 384}
REFERENCE_VAE_BASE_DIM = 16

# HunyuanVideo: the same width (4 heads x 32), two double-stream and two single-stream blocks
# (2.0M parameters: every double-stream block carries a second, text, stream).
REFERENCE_HUNYUAN_TRANSFORMER: dict = {
    **TINY_HUNYUAN_TRANSFORMER,
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "mlp_ratio": 3.0,
    "rope_axes_dim": (8, 12, 12),
}
# Prompt tokens after the template's system prompt: the captions take 10, HunyuanVideo's 256
# would make text most of every attention.
HUNYUAN_TEXT_LENGTH = 16


@dataclass
class TextPath:
    """The text encoders and ``encode(modules, captions)``: the transformer's text inputs.

    ``encode`` takes the modules to run, so the EMA copies encode with the same code.
    """

    modules: list[torch.nn.Module]
    encode: Callable[[list[torch.nn.Module], list[str]], dict[str, torch.Tensor]]
    state: dict[str, Any]


class ReferenceArchitecture:
    """What both architectures share: the VAE class is named once and built from ``vae_config``."""

    name: str
    vae_class_name: str

    def vae_config(self, base_dim: int) -> dict[str, Any]:
        raise NotImplementedError

    def new_vae(self, base_dim: int):
        import diffusers

        return getattr(diffusers, self.vae_class_name)(**self.vae_config(base_dim))

    def load_vae(self, folder: Path):
        import diffusers

        return getattr(diffusers, self.vae_class_name).from_pretrained(folder)


class WanArchitecture(ReferenceArchitecture):
    """Wan2.1 T2V: UMT5 text, ``AutoencoderKLWan`` (per-channel latent mean/std), UniPC with shift 3."""

    name = "wan"
    vae_class_name = "AutoencoderKLWan"
    flow_shift: float = WAN_SCHEDULER["flow_shift"]
    guidance_distilled = False
    sampling_defaults = dict(
        num_inference_steps=50, guidance_scale=5.0, height=VIDEO_SIZE, width=VIDEO_SIZE, num_frames=VIDEO_FRAMES, fps=8
    )

    def vae_config(self, base_dim: int) -> dict[str, Any]:
        return {**TINY_WAN_VAE, "base_dim": base_dim}

    def vae_base_dim(self, vae) -> int:
        return vae.config.base_dim

    def reconstruct(self, vae, x: torch.Tensor):
        """The posterior and its mean's reconstruction, unclamped (see :func:`decode_unclamped`)."""
        posterior = vae.encode(x).latent_dist
        return posterior, decode_unclamped(vae, posterior.mode())

    def normalise_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """Per-channel mean and std into the VAE config (``latents_mean`` / ``latents_std``), as Wan's pipeline reads them."""
        mean = latents.mean(dim=(0, 2, 3, 4))
        std = latents.std(dim=(0, 2, 3, 4))
        vae.register_to_config(latents_mean=[round(v, 5) for v in mean.tolist()], latents_std=[round(v, 5) for v in std.tolist()])
        return (latents - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)

    def new_text_path(self, output: Path) -> TextPath:
        from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

        train_tokenizer(output / "tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(output / "tokenizer")
        text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TINY_UMT5))

        def encode(modules: list[torch.nn.Module], captions: list[str]) -> dict[str, torch.Tensor]:
            return {"encoder_hidden_states": encode_umt5(tokenizer, modules[0], captions)}

        return TextPath([text_encoder], encode, {})

    def new_transformer(self, text: TextPath):
        from diffusers import WanTransformer3DModel

        return WanTransformer3DModel(**{**REFERENCE_TRANSFORMER, "text_dim": text.modules[0].config.d_model})

    def predict(self, transformer, xt: torch.Tensor, sigma: torch.Tensor, text: dict, guidance: torch.Tensor | None):
        return transformer(xt, sigma * 1000, text["encoder_hidden_states"], return_dict=False)[0]

    def save(self, output: Path, text: TextPath, transformer, vae) -> None:
        save_wan_components(output, text.modules[0], transformer, vae)
        # The prompt length it was trained with, so our pipeline (and a parity run) pad to it.
        overrides = {"sampling_defaults": self.sampling_defaults, "text_max_length": TINY_TEXT_LENGTH}
        (output / "sglang_config.json").write_text(json.dumps(overrides, indent=2) + "\n")


def encode_umt5(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    """Batched version of the pipeline's T5 encoding: pad to the tokenizer's length, zero past the end."""
    tokens = tokenizer(
        captions, padding="max_length", max_length=TINY_TEXT_LENGTH, truncation=True, return_tensors="pt"
    )
    hidden = text_encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state
    return hidden * tokens.attention_mask.unsqueeze(-1).to(hidden.dtype)


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """``AutoencoderKLWan.decode`` without its final clamp to [-1, 1], which stalls training.

    Colours near the ends of the range overshoot early on, and the clamp gives them no gradient.
    Same frame-by-frame causal decoding as diffusers' ``_decode`` (no tiling at these sizes).
    """
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    frames = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        frames.append(vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(frames, dim=2)


class HunyuanArchitecture(ReferenceArchitecture):
    """HunyuanVideo T2V: Llama + CLIP text, ``AutoencoderKLHunyuanVideo`` (one scaling factor),
    flow-matching Euler with shift 7, guidance as an embedding (distilled, see train_reference)."""

    name = "hunyuan"
    vae_class_name = "AutoencoderKLHunyuanVideo"
    flow_shift: float = HUNYUAN_SCHEDULER["shift"]
    guidance_distilled = True
    # Embedded guidance 2, not the published 6: at 6 this small student overshoots (its frames lose
    # every colour the reader knows), while 1.5-3 keep what guidance 1 gets (docs/reference-model.md).
    sampling_defaults = dict(
        num_inference_steps=50, guidance_scale=2.0, height=VIDEO_SIZE, width=VIDEO_SIZE, num_frames=VIDEO_FRAMES, fps=8
    )

    def vae_config(self, base_dim: int) -> dict[str, Any]:
        """Channels (base/2, base, 2 base, 2 base): 8x spatial, 4x temporal, 16 latent channels."""
        return {**TINY_HUNYUAN_VAE, "block_out_channels": (base_dim // 2, base_dim, 2 * base_dim, 2 * base_dim)}

    def vae_base_dim(self, vae) -> int:
        return vae.config.block_out_channels[1]

    def reconstruct(self, vae, x: torch.Tensor):
        """diffusers' own encode and decode (temporal tiles past 16 frames included); it does not clamp."""
        posterior = vae.encode(x).latent_dist
        return posterior, vae.decode(posterior.mode()).sample

    def normalise_latents(self, vae, latents: torch.Tensor) -> torch.Tensor:
        """One ``scaling_factor`` (1 / std), the only normalisation HunyuanVideo's pipeline applies."""
        scale = round(1.0 / latents.std().item(), 5)
        vae.register_to_config(scaling_factor=scale)
        return latents * scale

    def new_text_path(self, output: Path) -> TextPath:
        from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE
        from transformers import CLIPTokenizer, PreTrainedTokenizerFast

        from sglang.multimodal_gen.runtime.stages.hunyuan_text_encoding import HunyuanTextEncodingStage

        crop_start = train_llama_tokenizer(output / "tokenizer", DEFAULT_PROMPT_TEMPLATE["template"], HUNYUAN_TEXT_LENGTH)
        train_clip_tokenizer(output / "tokenizer_2")
        llama_tok = PreTrainedTokenizerFast.from_pretrained(output / "tokenizer")
        clip_tok = CLIPTokenizer.from_pretrained(output / "tokenizer_2")
        llama, clip = new_hunyuan_text_encoders(llama_tok, clip_tok)

        def encode(modules: list[torch.nn.Module], captions: list[str]) -> dict[str, torch.Tensor]:
            # The runtime's own text stage, batched: training sees what sampling feeds the transformer.
            stage = HunyuanTextEncodingStage(llama_tok, modules[0], clip_tok, modules[1], HUNYUAN_TEXT_LENGTH,
                                             torch.device("cpu"), torch.float32, {"crop_start": crop_start})
            embeds, mask = stage.encode_llama(captions)
            return {"encoder_hidden_states": embeds, "encoder_attention_mask": mask,
                    "pooled_projections": stage.encode_clip(captions)}

        return TextPath([llama, clip], encode, {"crop_start": crop_start})

    def new_transformer(self, text: TextPath):
        from diffusers import HunyuanVideoTransformer3DModel

        llama, clip = text.modules
        return HunyuanVideoTransformer3DModel(**{**REFERENCE_HUNYUAN_TRANSFORMER, "text_embed_dim": llama.config.hidden_size,
                                                 "pooled_projection_dim": clip.config.hidden_size})

    def predict(self, transformer, xt: torch.Tensor, sigma: torch.Tensor, text: dict, guidance: torch.Tensor | None):
        """``guidance`` is the guidance scale per sample; the model embeds ``1000 x`` it, as the pipeline passes it."""
        if guidance is None:
            guidance = torch.ones_like(sigma)
        return transformer(xt, sigma * 1000, guidance=guidance * 1000, return_dict=False, **text)[0]

    def save(self, output: Path, text: TextPath, transformer, vae) -> None:
        save_hunyuan_components(output, *text.modules, transformer, vae)
        overrides = {
            "sampling_defaults": self.sampling_defaults,
            "text_max_length": HUNYUAN_TEXT_LENGTH,
            "pipeline_options": {"prompt_template": {"crop_start": text.state["crop_start"]}},
        }
        (output / "sglang_config.json").write_text(json.dumps(overrides, indent=2) + "\n")


ARCHITECTURES: dict[str, ReferenceArchitecture] = {"wan": WanArchitecture(), "hunyuan": HunyuanArchitecture()}
