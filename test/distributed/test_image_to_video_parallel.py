"""Image to video on two processes gives the one-process video: Wan2.1 I2V with CFG parallel (each
rank conditions its branch on the same image, encoded on that rank) and Wan2.2 TI2V-5B's image
mode under Ulysses (the per-token timesteps, zero on the image's tokens, sharded with the tokens).
Two requests with different images in a row never share one."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator

PROMPT = "a red circle moving left on a blue background"


def _image(seed: int) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _params(image: Image.Image, **size) -> SamplingParams:
    return SamplingParams(prompt=PROMPT, negative_prompt="blurry", seed=5, guidance_scale=4.0, image=image,
                          num_frames=5, num_inference_steps=3, **size)


@pytest.fixture(scope="module")
def ti2v_4heads_dir(tmp_path_factory):
    """The tiny TI2V folder with 4 heads (Ulysses over 2 ranks needs an even count)."""
    from sglang.multimodal_gen.tools.tiny_models import build_tiny_wan22_ti2v

    return build_tiny_wan22_ti2v(tmp_path_factory.mktemp("models") / "tiny-ti2v-4heads", seed=0,
                                 transformer_config={"num_attention_heads": 4, "attention_head_dim": 16})


@pytest.mark.parametrize("case", ["wan21_i2v_cfg", "ti2v_image_ulysses"])
def test_two_processes_make_the_one_process_video_from_an_image(request, case):
    if case == "wan21_i2v_cfg":
        folder, parallel, size = request.getfixturevalue("tiny_wan21_i2v_dir"), dict(enable_cfg_parallel=True), \
            dict(height=32, width=48)
    else:
        folder, parallel, size = request.getfixturevalue("ti2v_4heads_dir"), dict(ulysses_degree=2), \
            dict(height=64, width=96)
    single = DiffGenerator.from_pretrained(str(folder), device="cpu", batched_cfg=False)
    references = [single.generate(_params(_image(seed), **size)) for seed in (1, 2)]
    group = DiffGenerator.from_pretrained(str(folder), device="cpu", num_gpus=2, dist_timeout_s=60, **parallel)
    try:
        ours = [group.generate(_params(_image(seed), **size)) for seed in (1, 2)]
    finally:
        group.close()
    for result, reference in zip(ours, references):
        if case == "wan21_i2v_cfg":
            assert torch.equal(result.latents, reference.latents)
        else:  # Ulysses sums attention in another order
            torch.testing.assert_close(result.latents, reference.latents, atol=1e-5, rtol=1e-5)
    assert not torch.equal(ours[0].latents, ours[1].latents)
