"""Encode the prompt (cond branch) and negative prompt (uncond branch) with the T5 encoder."""

from __future__ import annotations

import html
import re

import torch

from sglang.multimodal_gen.runtime.cache.branches import COND, UNCOND
from sglang.multimodal_gen.runtime.pipelines.base import PipelineStage, Req


def clean_prompt(text: str) -> str:
    """The cleaning Wan's reference pipeline applies: unescape HTML, collapse whitespace."""
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


class T5TextEncodingStage(PipelineStage):
    """Wan's text path: pad to ``max_length``, encode, zero the embeddings past each prompt's end."""

    name = "text_encoding"

    def __init__(self, tokenizer, text_encoder, max_length: int, device: torch.device, dtype: torch.dtype) -> None:
        self.tokenizer = tokenizer
        self.text_encoder = text_encoder
        self.max_length = max_length
        self.device = device
        self.dtype = dtype

    def encode(self, prompt: str) -> torch.Tensor:
        tokens = self.tokenizer(
            [clean_prompt(prompt)],
            padding="max_length",
            max_length=self.max_length,
            truncation=True,
            add_special_tokens=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        mask = tokens.attention_mask.to(self.device)
        hidden = self.text_encoder(tokens.input_ids.to(self.device), mask).last_hidden_state
        length = int(mask.sum())
        hidden[:, length:] = 0
        return hidden.to(self.dtype)

    def __call__(self, req: Req) -> Req:
        req.prompt_embeds = {COND: self.encode(req.params.prompt)}
        if req.params.guidance_scale > 1.0:
            req.prompt_embeds[UNCOND] = self.encode(req.params.negative_prompt)
        return req
