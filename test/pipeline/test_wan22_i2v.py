"""Wan2.2 image to video against diffusers' own WanImageToVideoPipeline: a tiny I2V-A14B folder (two
experts of 36 input channels, no image encoder, boundary 0.9) and TI2V-5B's image mode (the first
latent frame pinned to the image's, its tokens at timestep 0), with their defaults and caches."""

from __future__ import annotations

import json
import types

import numpy as np
import pytest
import torch
from PIL import Image

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.models import IMAGE_OPTIONAL, WAN22_I2V_DEFAULTS, read_model_info
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.errors import InvalidRequestError
from sglang.multimodal_gen.runtime.models.experts import HIGH_NOISE, LOW_NOISE
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator, denoising_stage
from sglang.multimodal_gen.runtime.stages.image_conditioning import WanImageConditioningStage

PROMPT = "a red circle moving left on a blue background"
NEGATIVE = "blurry, low quality"
# A14B: 32x48 pixels, 5 frames -> 16 x 2 x 4 x 6 latents. TI2V: 64x96 -> 48 x 2 x 4 x 6, 12 tokens.
# 4 steps of UniPC put two on either side of the 0.9 boundary (timesteps 999, 750, 500, 250).
A14B_REQUEST = dict(height=32, width=48, num_frames=5, num_inference_steps=4, guidance_scale=5.0,
                    guidance_scale_2=3.0)
TI2V_REQUEST = dict(height=64, width=96, num_frames=5, num_inference_steps=3, guidance_scale=5.0)


@pytest.fixture(scope="module")
def tiny_wan22_i2v_dir(tmp_path_factory):
    from sglang.multimodal_gen.tools.tiny_models import build_tiny_wan22_i2v

    return build_tiny_wan22_i2v(tmp_path_factory.mktemp("models") / "tiny-wan22-i2v", seed=0)


@pytest.fixture(scope="module")
def a14b_generators(tiny_wan22_i2v_dir):
    return {dtype: DiffGenerator.from_pretrained(str(tiny_wan22_i2v_dir), device="cpu", dtype=dtype,
                                                 batched_cfg=False)
            for dtype in ("float32", "bfloat16")}


@pytest.fixture(scope="module")
def ti2v_generators(tiny_wan22_ti2v_dir):
    return {dtype: DiffGenerator.from_pretrained(str(tiny_wan22_ti2v_dir), device="cpu", dtype=dtype,
                                                 batched_cfg=False)
            for dtype in ("float32", "bfloat16")}


def _image(seed: int, size: tuple[int, int] = (56, 40)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _diffusers(folder, dtype: str, image: Image.Image, seed: int, request: dict) -> tuple[torch.Tensor, np.ndarray]:
    """diffusers' WanImageToVideoPipeline on the folder (VAE in fp32, as ours): the latents it
    decodes (after TI2V's final blend) and its frames."""
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline
    from diffusers.pipelines.wan import pipeline_wan_i2v

    vae = AutoencoderKLWan.from_pretrained(folder / "vae", dtype=torch.float32)
    pipe = WanImageToVideoPipeline.from_pretrained(folder, vae=vae, dtype=getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    decoded = {}
    original_decode = pipe.vae.decode

    def keep_latents(latents, *args, **kwargs):
        decoded["latents"] = latents
        return original_decode(latents, *args, **kwargs)

    pipe.vae.decode = keep_latents
    with pytest.MonkeyPatch.context() as patch:  # its prompt cleaning calls ftfy unchecked; ASCII is unchanged
        patch.setattr(pipeline_wan_i2v, "ftfy", types.SimpleNamespace(fix_text=lambda text: text), raising=False)
        frames = pipe(image=image, prompt=PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(seed),
                      max_sequence_length=read_model_info(folder).text_max_length, output_type="np",
                      **request).frames[0]
    return decoded["latents"], frames


def _normalised(latents: torch.Tensor, vae_config) -> torch.Tensor:
    """Decoder-side latents back to the normalised ones our result holds."""
    mean = torch.tensor(vae_config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(vae_config.latents_std).view(1, -1, 1, 1, 1)
    return (latents.float() - mean) / std


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_a14b_i2v_equals_diffusers(tiny_wan22_i2v_dir, a14b_generators, dtype):
    """Two experts fed the condition channels and no image embedding, each with its guidance, as
    diffusers runs Wan2.2 I2V-A14B: frames equal in fp32 and in bf16 (1e-5 is below half a bf16 ulp)."""
    image = _image(0)
    _, reference = _diffusers(tiny_wan22_i2v_dir, dtype, image, 3, A14B_REQUEST)
    generator = a14b_generators[dtype]
    ours = generator.generate(SamplingParams(prompt=PROMPT, negative_prompt=NEGATIVE, seed=3, image=image,
                                             **A14B_REQUEST))
    assert generator.pipeline.expert_schedule(4) == [HIGH_NOISE, HIGH_NOISE, LOW_NOISE, LOW_NOISE]
    assert not hasattr(generator.pipeline, "image_encoder")
    np.testing.assert_allclose(ours.frames, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ti2v_image_mode_equals_diffusers(tiny_wan22_ti2v_dir, ti2v_generators, dtype):
    """TI2V-5B given an image, against WanImageToVideoPipeline loaded from the same folder: the
    latents it decodes (the first frame put back to the image's) and the frames."""
    image = _image(1)
    reference_latents, reference_frames = _diffusers(tiny_wan22_ti2v_dir, dtype, image, 4, TI2V_REQUEST)
    generator = ti2v_generators[dtype]
    ours = generator.generate(SamplingParams(prompt=PROMPT, negative_prompt=NEGATIVE, seed=4, image=image,
                                             **TI2V_REQUEST))
    vae_config = generator.pipeline.vae.config
    torch.testing.assert_close(ours.latents, _normalised(reference_latents, vae_config), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.frames, reference_frames, rtol=1e-5, atol=1e-5)


def test_ti2v_holds_the_first_latent_frame_at_timestep_zero(ti2v_generators):
    """Every pass sees the image's latents as the first latent frame, whose 6 tokens (of 12) take
    timestep 0; the result's first latent frame is the image's exactly; without an image the
    same generator makes text to video again."""
    generator = ti2v_generators["float32"]
    stage = denoising_stage(generator.pipeline)
    transformer = stage.adapter.transformer
    conditioning = next(s for s in generator.pipeline.stages if isinstance(s, WanImageConditioningStage))
    request = dict(TI2V_REQUEST, guidance_scale=1.0)
    inputs, timesteps = [], []
    hooks = [transformer.patch_embedding.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone())),
             transformer.condition_embedder.timesteps_proj.register_forward_pre_hook(
                 lambda m, args: timesteps.append(args[0].clone()))]
    image = _image(2)
    try:
        result = generator.generate(SamplingParams(prompt=PROMPT, seed=5, image=image, **request))
    finally:
        for hook in hooks:
            hook.remove()
    frame = conditioning.video_processor.preprocess(image, height=64, width=96).unsqueeze(2)
    image_latents = conditioning.encode_video(frame)
    assert len(inputs) == 3 and all(torch.equal(x[:, :, :1], image_latents) for x in inputs)
    assert [t[:6].tolist() for t in timesteps] == [[0.0] * 6] * 3
    assert all(bool((t[6:] == t[6]).all()) and t[6] > 0 for t in timesteps)
    torch.testing.assert_close(result.latents[:, :, :1], image_latents, rtol=0, atol=0)
    text_only = generator.generate(SamplingParams(prompt=PROMPT, seed=5, **request))
    assert not torch.equal(text_only.latents[:, :, :1], image_latents)


def test_ti2v_time_embedding_inputs_are_zero_on_the_image_tokens(ti2v_generators):
    """The adapter's timestep per token: zero on the first latent frame's tokens, the step's elsewhere."""
    adapter = denoising_stage(ti2v_generators["float32"].pipeline).adapter
    per_token = adapter.token_timesteps(torch.tensor([750.0, 500.0]), (2, 48, 2, 4, 6), still_frames=1)
    assert per_token.tolist() == [[0.0] * 6 + [750.0] * 6, [0.0] * 6 + [500.0] * 6]


def test_the_folders_defaults_and_image_rules(tiny_wan22_i2v_dir, tiny_wan22_ti2v_dir, a14b_generators,
                                              ti2v_generators):
    """I2V-A14B takes the release's i2v_A14B defaults and needs an image; TI2V-5B takes one or not."""
    a14b = read_model_info(tiny_wan22_i2v_dir)
    assert a14b.image_to_video and a14b.two_experts and a14b.boundary_ratio == 0.9
    assert a14b.sampling_defaults == WAN22_I2V_DEFAULTS
    resolved = a14b_generators["float32"].validate(SamplingParams(prompt=PROMPT, image=_image(0)))
    assert (resolved.num_inference_steps, resolved.guidance_scale, resolved.guidance_scale_2,
            resolved.height, resolved.width) == (40, 3.5, 3.5, 720, 1280)
    with pytest.raises(InvalidRequestError, match="makes a video from a first frame"):
        a14b_generators["float32"].validate(SamplingParams(prompt=PROMPT))
    assert read_model_info(tiny_wan22_ti2v_dir).image_input == IMAGE_OPTIONAL
    ti2v = ti2v_generators["float32"]
    assert ti2v.validate(SamplingParams(prompt=PROMPT)).image is None
    assert ti2v.validate(SamplingParams(prompt=PROMPT, image=_image(0))).image is not None


def test_caches_run_per_expert_on_a14b_i2v(a14b_generators):
    """EasyCache on I2V-A14B: a strategy per expert, each computing its first step."""
    params = SamplingParams(prompt=PROMPT, seed=6, image=_image(0), cache=CacheParams(
        strategy="easycache", threshold=0.5, options={"warmup_steps": 1}), **{**A14B_REQUEST, "num_inference_steps": 8})
    result = a14b_generators["float32"].generate(params)
    experts = result.cache_stats.experts()
    assert set(experts) == {HIGH_NOISE, LOW_NOISE}
    assert result.cache_stats.total_skipped >= 1 and np.isfinite(result.frames).all()


def test_calibrating_a14b_i2v_and_ti2v_from_prompts_files(tiny_wan22_i2v_dir, tiny_wan22_ti2v_dir, tmp_path):
    """`sglang calibrate` on I2V-A14B records per expert from IMAGE_PATH<TAB>caption lines, and the
    file drives a planner speedup; on TI2V-5B caption lines and image lines mix."""
    from sglang.cli.main import main

    _image(3).save(tmp_path / "first.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(f"first.png\t{PROMPT}\n")
    out = tmp_path / "a14b.json"
    size = ["--height", "32", "--width", "48", "--num-frames", "5", "--num-inference-steps", "8"]
    assert main(["calibrate", "--model-path", str(tiny_wan22_i2v_dir), "--prompts-file", str(prompts),
                 "--output", str(out), *size]) == 0
    calibration = json.loads(out.read_text())
    assert set(calibration["experts"]) == {HIGH_NOISE, LOW_NOISE}
    generator = DiffGenerator.from_pretrained(str(tiny_wan22_i2v_dir), device="cpu", cache_calibration=str(out))
    result = generator.generate(SamplingParams(prompt=PROMPT, image=_image(4), cache=CacheParams(
        strategy="planner", speedup=2.0), **{**A14B_REQUEST, "num_inference_steps": 8}))
    assert result.cache_stats.total_skipped >= 4
    prompts.write_text(f"first.png\t{PROMPT}\n{PROMPT}\n")
    assert main(["calibrate", "--model-path", str(tiny_wan22_ti2v_dir), "--prompts-file", str(prompts),
                 "--output", str(tmp_path / "ti2v.json"), "--height", "64", "--width", "96", "--num-frames", "5",
                 "--num-inference-steps", "4"]) == 0
