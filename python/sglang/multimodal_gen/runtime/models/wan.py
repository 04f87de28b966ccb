"""Wan2.1 DiT adapter around diffusers' WanTransformer3DModel (T2V; no image conditioning)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sglang.multimodal_gen.runtime.models.base import DiTAdapter, DiTStepContext


@dataclass
class WanStepContext(DiTStepContext):
    encoder_hidden_states: torch.Tensor | None = None
    rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None
    temb: torch.Tensor | None = None
    latent_shape: tuple[int, ...] = ()


class WanDiTAdapter(DiTAdapter):
    """Splits ``WanTransformer3DModel.forward`` into embed / blocks / head, step for step the same.

    TeaCache indicators (as in TeaCache4Wan2.1): ``modulated_input`` is the timestep embedding
    ``temb``; ``timestep_projection`` is its 6x projection ``e0`` used by the ret-steps mode.
    """

    def embed(
        self, latents: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, **kwargs
    ) -> tuple[torch.Tensor, WanStepContext]:
        model = self.transformer
        if timestep.ndim != 1:
            raise ValueError("WanDiTAdapter takes one timestep per batch item (Wan2.1 T2V)")
        rotary_emb = model.rope(latents)
        hidden = model.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()
        temb, timestep_proj, encoder_hidden_states, _ = model.condition_embedder(
            timestep, encoder_hidden_states, None, timestep_seq_len=None
        )
        ctx = WanStepContext(
            timestep=timestep,
            modulated_input=temb,
            timestep_projection=timestep_proj,
            encoder_hidden_states=encoder_hidden_states,
            rotary_emb=rotary_emb,
            temb=temb,
            latent_shape=tuple(latents.shape),
        )
        return hidden, ctx

    def blocks(self, hidden_states: torch.Tensor, ctx: WanStepContext) -> torch.Tensor:
        block_modulation = ctx.timestep_projection.unflatten(1, (6, -1))
        for block in self.transformer.blocks:
            hidden_states = block(hidden_states, ctx.encoder_hidden_states, block_modulation, ctx.rotary_emb)
        return hidden_states

    def head(self, hidden_states: torch.Tensor, ctx: WanStepContext) -> torch.Tensor:
        model = self.transformer
        batch, _, frames, height, width = ctx.latent_shape
        p_t, p_h, p_w = model.config.patch_size
        shift, scale = (model.scale_shift_table.to(ctx.temb.device) + ctx.temb.unsqueeze(1)).chunk(2, dim=1)
        hidden_states = (model.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        hidden_states = model.proj_out(hidden_states)
        hidden_states = hidden_states.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
        hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)
