"""HunyuanVideo DiT adapter around diffusers' HunyuanVideoTransformer3DModel (T2V; no image conditioning)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

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
class HunyuanStepContext(DiTStepContext):
    encoder_hidden_states: torch.Tensor | None = field(default=None, metadata=PER_ITEM)
    attention_mask: torch.Tensor | None = field(default=None, metadata=PER_ITEM)
    rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None
    temb: torch.Tensor | None = field(default=None, metadata=PER_ITEM)
    latent_shape: tuple[int, ...] = ()
    shard: SequenceShard | None = None


class HunyuanUlyssesAttnProcessor:
    """HunyuanVideo's joint attention (``HunyuanVideoAttnProcessor2_0`` on the diffusers
    ``Attention``'s own weights) with the Ulysses head exchange, for double- and single-stream blocks.

    The image tokens of this rank's shard are projected, normalised and rotated (their own rotary
    slice), then one all-to-all per q, k, v gives the whole image sequence for ``heads / U`` heads.
    The text tokens, replicated on every rank, are projected whole and this rank's heads of them
    are appended after the image tokens: the joint sequence ``[image, text]`` and its key mask are
    exactly one process's, for a slice of the heads. The image output goes back by all-to-all; the
    text output, every rank holding its heads, is gathered over heads so the text stream stays
    replicated.
    """

    def __init__(self, exchange: UlyssesExchange, attention_backend=None) -> None:
        self.exchange = exchange
        self._attention_backend = attention_backend  # the stock processor's (``set_attention_backend``)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None):
        from diffusers.models.attention_dispatch import dispatch_attention_fn
        from diffusers.models.embeddings import apply_rotary_emb

        if encoder_hidden_states is None:
            raise ValueError("HunyuanUlyssesAttnProcessor serves HunyuanVideo's joint image + text attention")

        def heads(x: torch.Tensor) -> torch.Tensor:
            return x.unflatten(2, (attn.heads, -1))

        def normed(x: torch.Tensor, norm) -> torch.Tensor:
            return x if norm is None else norm(x)

        query = normed(heads(attn.to_q(hidden_states)), attn.norm_q)
        key = normed(heads(attn.to_k(hidden_states)), attn.norm_k)
        value = heads(attn.to_v(hidden_states))
        if image_rotary_emb is not None:
            query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
            key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
        text = encoder_hidden_states
        if attn.add_q_proj is None:  # single-stream: text and image share the projections
            text_q = normed(heads(attn.to_q(text)), attn.norm_q)
            text_k = normed(heads(attn.to_k(text)), attn.norm_k)
            text_v = heads(attn.to_v(text))
        else:
            text_q = normed(heads(attn.add_q_proj(text)), attn.norm_added_q)
            text_k = normed(heads(attn.add_k_proj(text)), attn.norm_added_k)
            text_v = heads(attn.add_v_proj(text))
        exchange = self.exchange
        query, key, value = (
            torch.cat([exchange.to_heads(image), exchange.head_slice(words)], dim=1)
            for image, words in ((query, text_q), (key, text_k), (value, text_v))
        )
        out = dispatch_attention_fn(
            query, key, value, attn_mask=attention_mask, dropout_p=0.0, is_causal=False,
            backend=self._attention_backend,
        ).to(query.dtype)
        image_len = exchange.shard.seq_len
        image_out = exchange.to_tokens(out[:, :image_len]).flatten(2, 3)
        text_out = exchange.gather_heads(out[:, image_len:]).flatten(2, 3)
        if getattr(attn, "to_out", None) is not None:
            image_out = attn.to_out[1](attn.to_out[0](image_out))
        if getattr(attn, "to_add_out", None) is not None:
            text_out = attn.to_add_out(text_out)
        return image_out, text_out


class HunyuanDiTAdapter(DiTAdapter):
    """Splits ``HunyuanVideoTransformer3DModel.forward`` into embed / blocks / head, step for step the same.

    ``blocks`` runs the double-stream blocks, then the single-stream blocks, and returns the image
    tokens only: the text stream is rebuilt from the prompt every step, so a cached residual is the
    change of the image tokens (as TeaCache4HunyuanVideo and MagCache4HunyuanVideo store it).

    ``modulated_input`` is TeaCache's HunyuanVideo indicator: the first double-stream block's
    ``norm1`` output, its timestep-modulated, normalised image input. Unlike Wan's indicator it
    depends on the latent, so TeaCache's decisions on this model follow the content.

    Under Ulysses sequence parallelism (the sp group of ``parallel_state`` has more than one rank)
    ``embed`` returns this rank's shard of the image tokens, with the rotary slice of their
    positions and ``modulated_input`` of its real (unpadded) tokens; the text stream stays whole on
    every rank; ``blocks`` runs with :class:`HunyuanUlyssesAttnProcessor` in every block and
    ``head`` gathers the projected tokens, so every rank returns the whole prediction.
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        super().__init__(transformer)
        condition = transformer.config.image_condition_type
        if condition is not None:
            raise ValueError(
                f"HunyuanDiTAdapter runs text-to-video transformers; this one has image_condition_type={condition!r}"
            )
        attentions = [b.attn for b in (*transformer.transformer_blocks, *transformer.single_transformer_blocks)]
        self._ulysses = UlyssesAttention(attentions, HunyuanUlyssesAttnProcessor,
                                         transformer.config.num_attention_heads, "this HunyuanVideo transformer")

    @property
    def _exchange(self) -> UlyssesExchange | None:
        return self._ulysses.exchange

    def block_modules(self) -> list[torch.nn.Module]:
        model = self.transformer
        return [*model.transformer_blocks, *model.single_transformer_blocks]

    def request_constants(
        self,
        latents: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        **kwargs,
    ) -> dict[str, Any]:
        """The rotary table (latent shape only), the projected pooled prompt and the guidance
        embedding (``time_text_embed``'s parts that do not see the timestep). The token refiner
        takes the timestep, so the text stream is rebuilt every step."""
        model = self.transformer
        self._check_inputs(model, pooled_projections, guidance)
        embedder = model.time_text_embed
        constants: dict[str, Any] = {
            "rotary_emb": model.rope(latents),
            "pooled_text": embedder.text_embedder(pooled_projections),
        }
        if embedder.guidance_embedder is not None:
            guidance_proj = embedder.time_proj(guidance).to(dtype=pooled_projections.dtype)
            constants["guidance_emb"] = embedder.guidance_embedder(guidance_proj)
        return constants

    @staticmethod
    def _check_inputs(model: torch.nn.Module, pooled_projections: torch.Tensor | None,
                      guidance: torch.Tensor | None) -> None:
        if pooled_projections is None:
            raise ValueError("HunyuanVideo needs pooled_projections (the CLIP pooled prompt embedding)")
        if guidance is None and model.config.guidance_embeds:
            raise ValueError("this HunyuanVideo transformer is guidance-distilled; pass guidance_scale * 1000")

    def embed(
        self,
        latents: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor | None = None,
        pooled_projections: torch.Tensor | None = None,
        guidance: torch.Tensor | None = None,
        rotary_emb: tuple[torch.Tensor, torch.Tensor] | None = None,
        pooled_text: torch.Tensor | None = None,
        guidance_emb: torch.Tensor | None = None,
        **kwargs,
    ) -> tuple[torch.Tensor, HunyuanStepContext]:
        """Patch embed, RoPE, time + guidance + pooled-text conditioning, the token refiner, the joint mask.

        Args:
            encoder_attention_mask: (batch, text_len) mask of the Llama tokens (1 = real token).
            pooled_projections: (batch, pooled_dim) CLIP pooled prompt embedding.
            guidance: (batch,) embedded guidance, ``guidance_scale * 1000`` as the model was distilled.
            rotary_emb, pooled_text, guidance_emb: :meth:`request_constants`, computed here when
                not given.
        """
        model = self.transformer
        if timestep.ndim != 1:
            raise ValueError("HunyuanDiTAdapter takes one timestep per batch item")
        self._check_inputs(model, pooled_projections, guidance)
        batch = latents.shape[0]
        if encoder_attention_mask is None:
            encoder_attention_mask = torch.ones(encoder_hidden_states.shape[:2], device=latents.device)

        self._ulysses.follow_sp_group()
        if rotary_emb is None:
            rotary_emb = model.rope(latents)
        if pooled_text is None:
            temb, _ = model.time_text_embed(timestep, pooled_projections, guidance)
        else:
            temb = self._conditioning(timestep, pooled_projections.dtype, pooled_text, guidance_emb)
        hidden = model.x_embedder(latents)
        encoder_hidden_states = model.context_embedder(encoder_hidden_states, timestep, encoder_attention_mask)

        # Joint [image, text] key mask: every image token, then each prompt's real text tokens.
        image_len, text_len = hidden.shape[1], encoder_hidden_states.shape[1]
        valid = image_len + encoder_attention_mask.sum(dim=1, dtype=torch.int)
        positions = torch.arange(image_len + text_len, device=hidden.device).unsqueeze(0)
        attention_mask = (positions < valid.unsqueeze(1)).view(batch, 1, 1, -1)

        shard = None
        if self._exchange is not None:  # this rank's real image tokens, their rotary rows; the mask stays whole
            shard = local_shard(image_len, self._exchange.group)
            hidden = shard.take(hidden, dim=1)  # the padding lives inside blocks
            rotary_emb = tuple(shard.shard(freqs, dim=0) for freqs in rotary_emb)
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
            shard=shard,
        )
        return hidden, ctx

    def _conditioning(self, timestep: torch.Tensor, dtype: torch.dtype, pooled_text: torch.Tensor,
                      guidance_emb: torch.Tensor | None) -> torch.Tensor:
        """``HunyuanVideoConditionEmbedding.forward`` (T2V) with its text and guidance parts given:
        the same operations, added in the same order."""
        embedder = self.transformer.time_text_embed
        timesteps_emb = embedder.timestep_embedder(embedder.time_proj(timestep).to(dtype=dtype))
        if guidance_emb is None:
            return timesteps_emb + pooled_text
        return timesteps_emb + guidance_emb + pooled_text

    def blocks(self, hidden_states: torch.Tensor, ctx: HunyuanStepContext) -> torch.Tensor:
        model = self.transformer
        text = ctx.encoder_hidden_states
        blocks = (*model.transformer_blocks, *model.single_transformer_blocks)
        if ctx.shard is None:
            for block in blocks:
                hidden_states, text = block(hidden_states, text, ctx.temb, ctx.attention_mask, ctx.rotary_emb)
            return hidden_states
        hidden_states = ctx.shard.pad(hidden_states, dim=1)
        with self._exchange.sequence(ctx.shard):
            for block in blocks:
                hidden_states, text = block(hidden_states, text, ctx.temb, ctx.attention_mask, ctx.rotary_emb)
        return ctx.shard.unpad(hidden_states, dim=1)

    def head(self, hidden_states: torch.Tensor, ctx: HunyuanStepContext) -> torch.Tensor:
        model = self.transformer
        batch, (_, _, frames, height, width) = hidden_states.shape[0], ctx.latent_shape
        p, p_t = model.config.patch_size, model.config.patch_size_t
        hidden_states = model.proj_out(model.norm_out(hidden_states, ctx.temb))
        if ctx.shard is not None:  # gathered after the projection: patch volume x channels per token, not dim
            hidden_states = gather_sequence(hidden_states, ctx.shard, self._exchange.group)
        hidden_states = hidden_states.reshape(batch, frames // p_t, height // p, width // p, -1, p_t, p, p)
        hidden_states = hidden_states.permute(0, 4, 1, 5, 2, 6, 3, 7)
        return hidden_states.flatten(6, 7).flatten(4, 5).flatten(2, 3)
