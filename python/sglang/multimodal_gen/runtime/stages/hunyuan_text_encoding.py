"""HunyuanVideo's two text encoders: Llama hidden states (prompt template) and the CLIP pooled embedding."""

from __future__ import annotations

import logging
from typing import Any

import torch
from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video import DEFAULT_PROMPT_TEMPLATE

from sglang.multimodal_gen.runtime.cache.branches import COND
from sglang.multimodal_gen.runtime.pipelines.base import PipelineStage, Req

logger = logging.getLogger(__name__)

# The prompt template of HunyuanVideo's text path, taken from its diffusers pipeline so the two
# never drift; its crop_start (95) is the token count of the part before "{}" for the published
# Llama 3 tokenizer, so another tokenizer needs its own (see HunyuanTextEncodingStage).
HUNYUAN_PROMPT_TEMPLATE: dict[str, Any] = dict(DEFAULT_PROMPT_TEMPLATE)
# CLIP's context length; HunyuanVideo pads its pooled-text prompt to it.
CLIP_MAX_LENGTH = 77


class HunyuanTextEncodingStage(PipelineStage):
    """Encodes the prompt into the one branch HunyuanVideo runs ("cond"; its guidance is embedded).

    Llama path: the prompt is wrapped in ``prompt_template``, padded to ``crop_start + max_length``
    tokens, and the hidden states ``hidden_layers_to_skip`` layers before the last are kept, minus
    the template's first ``crop_start`` tokens (the system prompt); the attention mask is cropped
    alike. CLIP path: the pooled output of the prompt padded to 77 tokens. Both as diffusers'
    HunyuanVideoPipeline computes them; the mask and pooled embedding go to ``req.conditioning``.
    """

    name = "text_encoding"

    def __init__(
        self,
        tokenizer,
        text_encoder,
        tokenizer_2,
        text_encoder_2,
        max_length: int,
        device: torch.device,
        dtype: torch.dtype,
        prompt_template: dict[str, Any] | None = None,
        hidden_layers_to_skip: int = 2,
    ) -> None:
        template = {**HUNYUAN_PROMPT_TEMPLATE, **(prompt_template or {})}
        if "{}" not in template["template"]:
            raise ValueError("the HunyuanVideo prompt template must contain '{}' where the prompt goes")
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_2 = text_encoder_2
        self.template = template["template"]
        self.crop_start = int(template["crop_start"])
        self.max_length = max_length
        self.device = device
        self.dtype = dtype
        self.hidden_layers_to_skip = hidden_layers_to_skip

    def encode_llama(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, max_length, hidden) embeddings and their (B, max_length) mask, in the model dtype.

        Batched, so the reference model's training (``tools/train_reference.py``) encodes its
        captions with this very code and trains on what sampling feeds the transformer.
        """
        total = self.crop_start + self.max_length
        tokens = self.tokenizer(
            [self.template.format(prompt) for prompt in prompts],
            max_length=total,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(self.device)
        if bool((mask.sum(dim=1) == total).any()):
            logger.warning("the prompt fills all %d text tokens and may have been truncated", self.max_length)
        hidden_states = self.text_encoder(
            input_ids=tokens.input_ids.to(self.device), attention_mask=mask, output_hidden_states=True
        ).hidden_states
        embeds = hidden_states[-(self.hidden_layers_to_skip + 1)]
        if self.crop_start > 0:
            embeds, mask = embeds[:, self.crop_start :], mask[:, self.crop_start :]
        return embeds.to(self.dtype), mask.to(self.dtype)

    def encode_clip(self, prompts: list[str]) -> torch.Tensor:
        """(B, pooled_dim) pooled CLIP embeddings, in the model dtype."""
        tokens = self.tokenizer_2(
            list(prompts), padding="max_length", max_length=CLIP_MAX_LENGTH, truncation=True, return_tensors="pt"
        )
        pooled = self.text_encoder_2(tokens.input_ids.to(self.device), output_hidden_states=False).pooler_output
        return pooled.to(self.dtype)

    def __call__(self, req: Req) -> Req:
        embeds, mask = self.encode_llama([req.params.prompt])
        req.prompt_embeds = {COND: embeds}
        req.conditioning = {
            COND: {"encoder_attention_mask": mask, "pooled_projections": self.encode_clip([req.params.prompt])}
        }
        return req
