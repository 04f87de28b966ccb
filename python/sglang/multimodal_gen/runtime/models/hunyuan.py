"""HunyuanVideo DiT adapter around diffusers' HunyuanVideoTransformer3DModel (T2V; no image conditioning)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang.multimodal_gen.runtime.models.base import DiTAdapter, DiTStepContext


@dataclass
class HunyuanStepContext(DiTStepContext):
    encoder_hidden_states: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None
    rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None
    temb: torch.Tensor | None = None
    latent_shape: tuple[int, ...] = ()


class HunyuanDiTAdapter(DiTAdapter):
    """Splits ``HunyuanVideoTransformer3DModel.forward`` into embed / blocks / head, step for step the same.

    ``blocks`` runs the double-stream blocks, then the single-stream blocks, and returns the image
    tokens only: the text stream is rebuilt from the prompt every step, so a cached residual is the
    change of the image tokens (as TeaCache4HunyuanVideo and MagCache4HunyuanVideo store it).

    ``modulated_input`` is TeaCache's HunyuanVideo indicator: the first double-stream block's
    ``norm1`` output, its timestep-modulated, normalised image input. Unlike Wan's indicator it
    depends on the latent, so TeaCache's decisions on this model follow the content.
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__(transformer)
        condition = transformer.config.image_condition_type
        if condition is not None:
            raise ValueError(
                f"HunyuanDiTAdapter runs text-to-video transformers; this one has image_condition_type={condition!r}"
            )

    def embed(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, HunyuanStepContext]:
        """Patch embed, RoPE, time + guidance + pooled-text conditioning, the token refiner, the joint mask.

        Args:
            encoder_attention_mask: (batch, text_len) mask of the Llama tokens (1 = real token).
            pooled_projections: (batch, pooled_dim) CLIP pooled prompt embedding.
            guidance: (batch,) embedded guidance, ``guidance_scale * 1000`` as the model was distilled.
        """
        model = self.transformer
        if timestep.ndim != 1:
            raise ValueError("HunyuanDiTAdapter takes one timestep per batch item")
        if pooled_projections is None:
            raise ValueError("HunyuanVideo needs pooled_projections (the CLIP pooled prompt embedding)")
        if guidance is None and model.config.guidance_embeds:
            raise ValueError("this HunyuanVideo transformer is guidance-distilled; pass guidance_scale * 1000")
        batch = latents.shape[0]
        if encoder_attention_mask is None:
            encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2], device=latents.device)

        rotary_emb = model.rope(latents)
        temb, _ = model.time_text_embed(timestep, pooled_projections, guidance)
        hidden = model.x_embedder(latents)
        encoder_hidden_states = model.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask)

        # Joint [image, text] key mask: every image token, then each prompt's real text tokens.
        image_len, text_len = hidden.shape[1], encoder_hidden_states.shape[1]
        valid = image_len + encoder_attention_mask.sum(dim=1, dtype=torch.int)
        positions = torch.arange(image_len + text_len, device=hidden.device).unsqueeze(0)
        attention_mask = (positions < valid.unsqueeze(1)).view(batch, 1, 1, -1)

        modulated_input = None
        if len(model.transformer_blocks):
            modulated_input = model.transformer_blocks[0].norm1(hidden, emb=temb)[0]
        ctx = HunyuanStepContext(
            timestep=timestep,
            modulated_input=modulated_input,
            encoder_hidden_states=encoder_hidden_states,
            attention_mask=attention_mask,
            rotary_emb=rotary_emb,
            temb=temb,
            latent_shape=tuple(latents.shape),
        )
        return hidden, ctx

    def blocks(self, hidden_states: torch.Tensor, ctx: HunyuanStepContext) -> torch.Tensor:
        model = self.transformer
        text = ctx.encoder_hidden_states
        for block in (*model.transformer_blocks, *model.single_transformer_blocks):
            hidden_states, text = block(hidden_states, text, ctx.temb, ctx.attention_mask, ctx.rotary_emb)
        return hidden_states

    def head(self, hidden_states: torch.Tensor, ctx: HunyuanStepContext) -> torch.Tensor:
        model = self.transformer
        batch, _, frames, height, width = ctx.latent_shape
        p, p_t = model.config.patch_size, model.config.patch_size_t
        hidden_states = model.proj_out(model.norm_out(hidden_states, ctx.temb))
        hidden_states = hidden_states.reshape(batch, frames // p_t, height // p, width // p, -1, p_t, p, p)
        hidden_states = hidden_states.permute(0, 4, 1, 5, 2, 6, 3, 7)
        return hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)
