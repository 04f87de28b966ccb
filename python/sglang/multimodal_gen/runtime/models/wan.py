"""Wan DiT adapter around diffusers' WanTransformer3DModel: Wan2.1 T2V and I2V (the image
embedding and the condition channels), the experts of Wan2.2 T2V-A14B, and Wan2.2 TI2V-5B's
transformer with its timestep per token."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from sglang.multimodal_gen.runtime.distributed.sequence_parallel import (
    SequenceShard,
    UlyssesAttention,
    UlyssesExchange,
    gather_sequence,
    local_shard,
)
from sglang.multimodal_gen.runtime.models.base import PER_ITEM, DiTAdapter, DiTStepContext


@dataclass
class WanStepContext(DiTStepContext):
    encoder_hidden_states: torch.Tensor | None = field(default=None, metadata=PER_ITEM)
    rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None
    temb: torch.Tensor | None = field(default=None, metadata=PER_ITEM)
    latent_shape: tuple[int, ...] = ()
    shard: SequenceShard | None = None


class WanUlyssesSelfAttnProcessor:
    """Wan's self-attention (``WanAttnProcessor`` on the diffusers ``WanAttention``'s own weights)
    with the Ulysses head exchange around the attention itself.

    Projections, the q/k RMSNorm across heads and the rotary embedding run on this rank's tokens
    (the rotary slice of their positions, cut in ``embed``); one all-to-all gives q, k and v of the
    whole sequence for ``heads / U`` heads, another brings the output back.
    """

    def __init__(self, exchange: UlyssesExchange, attention_backend=None) -> None:
        self.exchange = exchange
        self._attention_backend = attention_backend  # the stock processor's (``set_attention_backend``)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn

        if encoder_hidden_states is not None or attention_mask is not None or attn.add_k_proj is not None:
            raise ValueError("WanUlyssesSelfAttnProcessor serves Wan's unmasked self-attention only")
        if attn.fused_projections:
            query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
        else:
            query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
        query, key = attn.norm_q(query), attn.norm_k(key)
        query, key, value = (x.unflatten(2, (attn.heads, -1)) for x in (query, key, value))
        if rotary_emb is not None:
            query, key = _wan_rotary(query, *rotary_emb), _wan_rotary(key, *rotary_emb)
        exchange = self.exchange
        out = dispatch_attention_fn(
            exchange.to_heads(query), exchange.to_heads(key), exchange.to_heads(value),
            attn_mask=None, dropout_p=0.0, is_causal=False, backend=self._attention_backend,
        )
        out = exchange.to_tokens(out.type_as(query)).flatten(2, 3)
        return attn.to_out[1](attn.to_out[0](out))


def _wan_rotary(x: torch.Tensor, freqs_cos: torch.Tensor, freqs_sin: torch.Tensor) -> torch.Tensor:
    """Wan's interleaved rotary embedding, as ``WanAttnProcessor`` applies it."""
    x1, x2 = x.unflatten(-1, (-1, 2)).unbind(-1)
    cos, sin = freqs_cos[..., 0::2], freqs_sin[..., 1::2]
    out = torch.empty_like(x)
    out[..., 0::2] = x1 * cos - x2 * sin
    out[..., 1::2] = x1 * sin + x2 * cos
    return out.type_as(x)


class WanDiTAdapter(DiTAdapter):
    """Splits ``WanTransformer3DModel.forward`` into embed / blocks / head, step for step the same.

    TeaCache indicators (as in TeaCache4Wan2.1): ``modulated_input`` is the timestep embedding
    ``temb``; ``timestep_projection`` is its 6x projection ``e0`` used by the ret-steps mode.

    With ``expand_timesteps`` (Wan2.2 TI2V-5B, as diffusers' ``WanPipeline`` runs it) the
    transformer takes a timestep per token: ``embed`` turns the denoising stage's timestep per
    video into one per token of the patch grid (:meth:`token_timesteps`), so ``temb``, the block
    modulation and the head's shift and scale are per token, shape ``(batch, tokens, ...)``; so
    are the two indicators. ``embed`` also takes such a ``(batch, tokens)`` timestep as it is.

    Wan2.1 I2V (a transformer with ``image_dim``, as diffusers' ``WanImageToVideoPipeline`` feeds
    it): ``embed`` takes ``condition``, the 4 mask + 16 latent channels of the first frame, put
    after the noise latents on the channel axis (``torch.cat([latents, condition], dim=1)``, 36
    channels) before the patch embedding, and ``encoder_hidden_states_image``, the CLIP
    embedding, which goes through ``condition_embedder.image_embedder`` and comes before the
    projected prompt in the cross-attention context, as in ``WanTransformer3DModel.forward``.
    The prediction has the noise latents' 16 channels. Wan2.2 I2V-A14B's experts take the same 36
    channels without an image embedding.

    Wan2.2 TI2V-5B's image mode: ``embed`` takes ``first_frame_latents``, the image's latent
    frame, and puts it in place of the first latent frame (diffusers blends
    ``(1 - mask) * condition + mask * latents`` with a 0/1 mask: the same values), whose tokens
    take timestep 0 (:meth:`token_timesteps`).

    Under Ulysses sequence parallelism (the sp group of ``parallel_state`` has more than one rank)
    ``embed`` returns this rank's shard of the image tokens (and of the rotary embedding),
    ``blocks`` runs with :class:`WanUlyssesSelfAttnProcessor` in every self-attention (the
    cross-attention to the replicated text runs as is, on the shard's queries) and ``head`` gathers
    the projected tokens, so every rank returns the whole prediction.
    """

    def __init__(self, transformer: torch.nn.Module, expand_timesteps: bool = False) -> None:
        super().__init__(transformer)
        self.expand_timesteps = expand_timesteps
        self._ulysses = UlyssesAttention([block.attn1 for block in transformer.blocks], WanUlyssesSelfAttnProcessor,
                                         transformer.config.num_attention_heads, "this Wan transformer")

    @property
    def _exchange(self) -> UlyssesExchange | None:
        return self._ulysses.exchange

    def block_modules(self) -> list[torch.nn.Module]:
        return list(self.transformer.blocks)

    def request_constants(
        self,
        latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_hidden_states_image: torch.Tensor | None = None,
        **kwargs,
    ) -> dict[str, Any]:
        """The rotary table (it depends on the latent shape only) and the projected prompt
        (``condition_embedder.text_embedder``): together about a tenth of a step on small models;
        with an image, its projection too (``condition_embedder.image_embedder``)."""
        model = self.transformer
        constants = {
            "rotary_emb": model.rope(latents),
            "text_states": model.condition_embedder.text_embedder(encoder_hidden_states),
        }
        if encoder_hidden_states_image is not None:
            constants["image_states"] = model.condition_embedder.image_embedder(encoder_hidden_states_image)
        return constants

    def token_timesteps(self, timestep: torch.Tensor, latent_shape: Sequence[int], still_frames: int = 0
                        ) -> torch.Tensor:
        """The timestep of every token, ``(batch, tokens)`` in float32, from one per video: as
        diffusers builds it under ``expand_timesteps``, a mask over the patch grid (latent frames x
        height / p_h x width / p_w) times the step's timestep. The mask is one everywhere but on
        the tokens of the first ``still_frames`` latent frames, which are zero: those of the
        image that TI2V-5B's image mode holds fixed (``WanImageToVideoPipeline``)."""
        _, _, frames, height, width = latent_shape
        p_t, p_h, p_w = self.transformer.config.patch_size
        tokens_per_frame = (height // p_h) * (width // p_w)
        mask = torch.ones(1, (frames // p_t) * tokens_per_frame, dtype=torch.float32, device=timestep.device)
        mask[:, :still_frames * tokens_per_frame] = 0.0
        return mask * timestep[:, None]

    def embed(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        text_states: torch.Tensor | None = None,
        encoder_hidden_states_image: torch.Tensor | None = None,
        image_states: torch.Tensor | None = None,
        condition: torch.Tensor | None = None,
        first_frame_latents: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, WanStepContext]:
        """``rotary_emb``, ``text_states`` and ``image_states``: :meth:`request_constants`, computed
        here when not given. ``timestep``: one per batch item, or with ``expand_timesteps`` one per
        token. ``encoder_hidden_states_image``, ``condition`` and ``first_frame_latents``: image to
        video (class docstring)."""
        model = self.transformer
        per_video = timestep
        if condition is not None:
            latents = torch.cat([latents, condition.to(latents.dtype)], dim=1)
        still_frames = 0
        if first_frame_latents is not None:
            if not self.expand_timesteps:
                raise ValueError("first_frame_latents is TI2V-5B's image mode, a transformer with expand_timesteps")
            still_frames = first_frame_latents.shape[2]
            latents = torch.cat([first_frame_latents.to(latents.dtype), latents[:, :, still_frames:]], dim=2)
        if timestep.ndim != 1 and not (self.expand_timesteps and timestep.ndim == 2):
            raise ValueError("WanDiTAdapter takes one timestep per batch item (one per token only with "
                             "expand_timesteps, Wan2.2 TI2V)")
        if self.expand_timesteps and timestep.ndim == 1:
            timestep = self.token_timesteps(timestep, latents.shape, still_frames)
        self._ulysses.follow_sp_group()
        if rotary_emb is None:
            rotary_emb = model.rope(latents)
        hidden = model.patch_embedding(latents).flatten(2).transpose(1, 2).contiguous()
        shard = None
        if self._exchange is not None:
            shard = local_shard(hidden.shape[1], self._exchange.group)
            # Real tokens only (the padding lives inside blocks), copied out of the whole sequence so
            # every block sees one contiguous layout: a compiled block then traces one graph, not one
            # for the strided first input and another for the contiguous rest.
            hidden = shard.take(hidden, dim=1).contiguous()
            rotary_emb = tuple(shard.shard(freqs, dim=1) for freqs in rotary_emb)
            if timestep.ndim == 2:  # the shard's tokens' timesteps: their embeddings are computed here only
                timestep = shard.take(timestep, dim=1)
        if text_states is None:
            image_input = encoder_hidden_states_image if image_states is None else None
            temb, timestep_proj, encoder_hidden_states, embedded_image = model.condition_embedder(
                timestep.flatten(), encoder_hidden_states, image_input,
                timestep_seq_len=timestep.shape[1] if timestep.ndim == 2 else None,
            )
            image_states = embedded_image if image_states is None else image_states
        else:
            temb, timestep_proj = self._time_embedding(timestep, encoder_hidden_states.dtype)
            encoder_hidden_states = text_states
            if image_states is None and encoder_hidden_states_image is not None:
                image_states = model.condition_embedder.image_embedder(encoder_hidden_states_image)
        if image_states is not None:  # the image's tokens first, then the prompt's
            encoder_hidden_states = torch.cat([image_states, encoder_hidden_states], dim=1)
        ctx = WanStepContext(
            timestep=per_video,
            modulated_input=temb,
            timestep_projection=timestep_proj,
            encoder_hidden_states=encoder_hidden_states,
            rotary_emb=rotary_emb,
            temb=temb,
            latent_shape=tuple(latents.shape),
            shard=shard,
        )
        return hidden, ctx

    def _time_embedding(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """The time half of ``WanTimeTextImageEmbedding.forward`` (``temb``, ``timestep_proj``),
        operation for operation, for steps whose projected prompt was computed once. A timestep
        per token gives them per token, ``(batch, tokens, ...)``."""
        embedder = self.transformer.condition_embedder
        projected = embedder.timesteps_proj(timestep.flatten())
        if timestep.ndim == 2:
            projected = projected.unflatten(0, tuple(timestep.shape))
        embedder_dtype = next(iter(embedder.time_embedder.parameters())).dtype
        if projected.dtype != embedder_dtype and embedder_dtype != torch.int8:
            projected = projected.to(embedder_dtype)
        temb = embedder.time_embedder(projected).to(dtype)  # its type_as(encoder_hidden_states)
        return temb, embedder.time_proj(embedder.act_fn(temb))

    def blocks(self, hidden_states: torch.Tensor, ctx: WanStepContext) -> torch.Tensor:
        # (batch, 6, dim), or per token (batch, tokens, 6, dim): the two layouts the blocks take.
        block_modulation = ctx.timestep_projection.unflatten(-1, (6, -1))
        if ctx.shard is None:
            for block in self.transformer.blocks:
                hidden_states = block(hidden_states, ctx.encoder_hidden_states, block_modulation, ctx.rotary_emb)
            return hidden_states
        hidden_states = ctx.shard.pad(hidden_states, dim=1)
        if block_modulation.ndim == 4:  # per token: padded like the tokens it modulates
            block_modulation = ctx.shard.pad(block_modulation, dim=1)
        with self._exchange.sequence(ctx.shard):
            for block in self.transformer.blocks:
                hidden_states = block(hidden_states, ctx.encoder_hidden_states, block_modulation, ctx.rotary_emb)
        return ctx.shard.unpad(hidden_states, dim=1)

    def head(self, hidden_states: torch.Tensor, ctx: WanStepContext) -> torch.Tensor:
        model = self.transformer
        batch, (_, _, frames, height, width) = hidden_states.shape[0], ctx.latent_shape
        p_t, p_h, p_w = model.config.patch_size
        table = model.scale_shift_table.to(ctx.temb.device)
        if ctx.temb.ndim == 3:  # a timestep per token: a shift and scale per token
            shift, scale = (table.unsqueeze(0) + ctx.temb.unsqueeze(2)).chunk(2, dim=2)
            shift, scale = shift.squeeze(2), scale.squeeze(2)
        else:
            shift, scale = (table + ctx.temb.unsqueeze(1)).chunk(2, dim=1)
        hidden_states = (model.norm_out(hidden_states.float()) * (1 + scale) + shift).type_as(hidden_states)
        hidden_states = model.proj_out(hidden_states)
        if ctx.shard is not None:  # gathered after the projection: patch-size x channels per token, not dim
            hidden_states = gather_sequence(hidden_states, ctx.shard, self._exchange.group)
        hidden_states = hidden_states.reshape(batch, frames // p_t, height // p_h, width // p_w, p_t, p_h, p_w, -1)
        hidden_states = hidden_states.permute(0, 7, 1, 4, 2, 5, 3, 6)
        return hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)
