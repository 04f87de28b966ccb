"""Our Wan pipeline and adapter against diffusers' own WanPipeline and transformer forward."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_REQUEST

from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.models.wan import WanDiTAdapter

PROMPT = "a red circle moving left on a blue background"
NEGATIVE = "blurry, low quality"


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_wan_dir):
    from diffusers import WanPipeline

    pipe = WanPipeline.from_pretrained(tiny_wan_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_run(pipe, seed: int, output_type: str):
    return pipe(
        prompt=PROMPT,
        negative_prompt=NEGATIVE,
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
        **TINY_REQUEST,
    ).frames


def test_latents_and_frames_match_diffusers_wan_pipeline(wan_generator, diffusers_pipe):
    params = SamplingParams(prompt=PROMPT, negative_prompt=NEGATIVE, seed=7, **TINY_REQUEST)
    ours = wan_generator.generate(params)

    reference_latents = _diffusers_run(diffusers_pipe, seed=7, output_type="latent")
    assert ours.latents.shape == reference_latents.shape == (1, 16, 2, 8, 6)
    torch.testing.assert_close(ours.latents, reference_latents, rtol=1e-5, atol=1e-5)

    reference_frames = _diffusers_run(diffusers_pipe, seed=7, output_type="np")[0]
    assert ours.frames.shape == reference_frames.shape == (5, 64, 48, 3)
    np.testing.assert_allclose(ours.frames, reference_frames, atol=1e-5)


def test_different_seed_gives_different_latents(wan_generator):
    a = wan_generator.generate(SamplingParams(prompt=PROMPT, seed=1, **TINY_REQUEST)).latents
    b = wan_generator.generate(SamplingParams(prompt=PROMPT, seed=2, **TINY_REQUEST)).latents
    assert not torch.allclose(a, b)


def test_adapter_embed_blocks_head_equals_transformer_forward(wan_generator):
    transformer = wan_generator.pipeline.transformer
    adapter = WanDiTAdapter(transformer)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 3, 8, 6, generator=gen)
    timestep = torch.tensor([999.0, 421.0])
    text = torch.randn(2, 11, transformer.config.text_dim, generator=gen)
    with torch.no_grad():
        expected = transformer(latents, timestep, text, return_dict=False)[0]
        hidden, ctx = adapter.embed(latents, timestep, text)
        blocks_out = adapter.blocks(hidden, ctx)
        ours = adapter.head(blocks_out, ctx)
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    # The residual is what a cache stores: it must be a real change of the hidden states.
    assert (blocks_out - hidden).abs().mean() > 1e-3
    assert ctx.modulated_input.shape == (2, transformer.config.num_attention_heads * transformer.config.attention_head_dim)
