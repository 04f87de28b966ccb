"""Wan2.1 image to video against diffusers' own WanImageToVideoPipeline on a tiny I2V folder: the
CLIP embedding and the VAE-encoded first frame at every step, an image stretched to the video's
size, the CLI's --image, refusals, caching, and requests that never share their image."""

from __future__ import annotations

import json
import logging
import shutil
import types

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from PIL import Image

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.models import WAN21_I2V_DEFAULTS, read_model_info
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.errors import InvalidRequestError, ModelNotFoundError
from sglang.multimodal_gen.runtime.cache.magcache import preset_ratio_table
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator, denoising_stage
from sglang.multimodal_gen.runtime.pipelines.wan import WanPipeline, wan_i2v_cache_model_key

PROMPT = "a red circle moving left on a blue background"
NEGATIVE = "blurry, low quality"
# 32x48 pixels, 5 frames -> 2 x 4 x 6 latents; the images below are 56x40 (width x height), so
# their aspect ratio (0.71) is not the video's (0.67) and the first frame is stretched.
REQUEST = dict(height=32, width=48, num_frames=5, num_inference_steps=3, guidance_scale=5.0)


def _image(seed: int, size: tuple[int, int] = (56, 40)) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(pixels)


@pytest.fixture(scope="module")
def i2v_generators(tiny_wan21_i2v_dir):
    # Two CFG passes, as diffusers runs them.
    return {dtype: DiffGenerator.from_pretrained(str(tiny_wan21_i2v_dir), device="cpu", dtype=dtype,
                                                 batched_cfg=False)
            for dtype in ("float32", "bfloat16")}


def _diffusers(folder, dtype: str, image: Image.Image, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """diffusers' run as the Wan2.1 I2V model card loads it (VAE and image encoder in fp32): the
    latents after its last step and the decoded frames."""
    from diffusers import AutoencoderKLWan, WanImageToVideoPipeline
    from diffusers.pipelines.wan import pipeline_wan_i2v
    from transformers import CLIPVisionModel

    vae = AutoencoderKLWan.from_pretrained(folder / "vae", dtype=torch.float32)
    encoder = CLIPVisionModel.from_pretrained(folder / "image_encoder", dtype=torch.float32)
    pipe = WanImageToVideoPipeline.from_pretrained(folder, vae=vae, image_encoder=encoder, dtype=getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    final = {}

    def keep_latents(pipeline, step, timestep, tensors):
        final["latents"] = tensors["latents"]
        return tensors

    # Its prompt cleaning calls ftfy without checking that it is installed (WanPipeline checks);
    # ftfy leaves these ASCII prompts as they are.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(pipeline_wan_i2v, "ftfy", types.SimpleNamespace(fix_text=lambda text: text), raising=False)
        frames = pipe(image=image, prompt=PROMPT, negative_prompt=NEGATIVE,
                      generator=torch.Generator().manual_seed(seed),
                      max_sequence_length=read_model_info(folder).text_max_length, output_type="np",
                      callback_on_step_end=keep_latents, **REQUEST).frames[0]
    return final["latents"], frames


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_i2v_equals_diffusers_image_to_video_pipeline(tiny_wan21_i2v_dir, i2v_generators, dtype, caplog):
    """Latents and frames as diffusers makes them from an image of another aspect ratio, in fp32
    and bf16 (1e-5 is below half a bf16 ulp: equal wherever values pass through bf16); both
    stretch the image to the video's size, and ours says so in one warning."""
    image = _image(0)
    reference_latents, reference_frames = _diffusers(tiny_wan21_i2v_dir, dtype, image, seed=3)
    with caplog.at_level(logging.WARNING):
        ours = i2v_generators[dtype].generate(SamplingParams(prompt=PROMPT, negative_prompt=NEGATIVE, seed=3,
                                                             image=image, **REQUEST))
    assert ours.latents.shape == (1, 16, 2, 4, 6)
    torch.testing.assert_close(ours.latents, reference_latents.to(ours.latents.dtype), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ours.frames, reference_frames, rtol=1e-5, atol=1e-5)
    stretched = [r.getMessage() for r in caplog.records if "stretched" in r.getMessage()]
    assert len(stretched) == 1 and "the image is 56x40 (width x height) and the video 48x32" in stretched[0]


def test_the_condition_enters_every_step_and_both_branches_see_the_image(i2v_generators):
    """36 channels reach the patch embedding at every pass; the cross-attention context is the
    image's tokens (17: 16 patches and CLIP's class token) before the 512 text tokens, for the
    unconditional branch too, as diffusers passes the same image embedding to both."""
    generator = i2v_generators["float32"]
    transformer = denoising_stage(generator.pipeline).adapter.transformer
    inputs, contexts = [], []
    hooks = [transformer.patch_embedding.register_forward_pre_hook(lambda m, args: inputs.append(args[0].shape[1])),
             transformer.blocks[0].attn2.register_forward_pre_hook(lambda m, args: contexts.append(args[1].shape[1]))]
    try:
        generator.generate(SamplingParams(prompt=PROMPT, seed=1, image=_image(0),
                                          **{**REQUEST, "num_inference_steps": 2}))
    finally:
        for hook in hooks:
            hook.remove()
    assert inputs == [36] * 4 and contexts == [17 + 512] * 4


def test_the_adapter_equals_the_transformer_with_an_image(i2v_generators):
    """``embed`` with the image embedding and the condition channels, with and without its
    request constants, gives the transformer's own forward on the concatenated input."""
    adapter = denoising_stage(i2v_generators["float32"].pipeline).adapter
    config = adapter.transformer.config
    gen = torch.Generator().manual_seed(5)
    latents, condition = torch.randn(2, 16, 2, 4, 6, generator=gen), torch.randn(2, 20, 2, 4, 6, generator=gen)
    text = torch.randn(2, 512, config.text_dim, generator=gen)
    image = torch.randn(2, 17, config.image_dim, generator=gen)
    timestep = torch.tensor([999.0, 500.0])
    with torch.inference_mode():
        expected = adapter.transformer(torch.cat([latents, condition], dim=1), timestep, text,
                                       encoder_hidden_states_image=image, return_dict=False)[0]
        inputs = dict(encoder_hidden_states_image=image, condition=condition)
        direct = adapter.forward(latents, timestep, text, **inputs)
        hoisted = adapter.forward(latents, timestep, text, **inputs,
                                  **adapter.request_constants(latents, text, **inputs))
    assert expected.shape == latents.shape
    torch.testing.assert_close(direct, expected, rtol=0, atol=0)
    torch.testing.assert_close(hoisted, expected, rtol=0, atol=0)


def test_batched_cfg_stacks_the_image_inputs(i2v_generators):
    """cond and uncond as one batch of 2 (the default outside these parity tests): the image
    embedding and condition stack like the prompts, and the video is the two-pass one's up to
    the rounding of a batch-2 matrix product."""
    stage = denoising_stage(i2v_generators["float32"].pipeline)
    params = SamplingParams(prompt=PROMPT, negative_prompt=NEGATIVE, seed=6, image=_image(3),
                            **{**REQUEST, "num_inference_steps": 2})
    two_passes = i2v_generators["float32"].generate(params)
    batches = []
    hook = stage.adapter.transformer.patch_embedding.register_forward_pre_hook(
        lambda module, args: batches.append(args[0].shape[0]))
    stage.batched_cfg = True
    try:
        one_batch = i2v_generators["float32"].generate(params)
    finally:
        stage.batched_cfg = False
        hook.remove()
    assert batches == [2, 2]
    torch.testing.assert_close(one_batch.latents, two_passes.latents, rtol=1e-4, atol=1e-4)


def test_requests_with_other_images_make_their_own_videos(tiny_wan21_i2v_dir, i2v_generators, tmp_path):
    """The image of one request never reaches the next: each request after another's equals the
    same request on a freshly loaded generator, and two images make two videos. A path is read
    as the image it holds."""
    request = {**REQUEST, "guidance_scale": 1.0, "num_inference_steps": 2}
    path = tmp_path / "first.png"
    _image(1).save(path)
    generator = i2v_generators["float32"]
    first = generator.generate(SamplingParams(prompt=PROMPT, seed=2, image=str(path), **request))
    second = generator.generate(SamplingParams(prompt=PROMPT, seed=2, image=_image(2), **request))
    fresh = DiffGenerator.from_pretrained(str(tiny_wan21_i2v_dir), device="cpu", batched_cfg=False)
    second_alone = fresh.generate(SamplingParams(prompt=PROMPT, seed=2, image=_image(2), **request))
    first_again = fresh.generate(SamplingParams(prompt=PROMPT, seed=2, image=_image(1), **request))
    torch.testing.assert_close(second.latents, second_alone.latents, rtol=0, atol=0)
    torch.testing.assert_close(first.latents, first_again.latents, rtol=0, atol=0)
    assert not torch.equal(first.latents, second.latents)


@pytest.mark.parametrize("cache, key", [
    (CacheParams(strategy="easycache", threshold=0.3, options={"warmup_steps": 2}), None),
    (CacheParams(strategy="magcache"), "wan21_i2v_14b_480p"),
])
def test_caches_skip_steps_on_image_to_video(i2v_generators, cache, key):
    """EasyCache (whole model calls: the prediction keeps the 16 noise channels the input has)
    and MagCache with its published I2V 480P preset (the request's key) skip steps."""
    params = SamplingParams(prompt=PROMPT, seed=5, image=_image(0), cache=cache,
                            **{**REQUEST, "num_inference_steps": 6})
    result = i2v_generators["float32"].generate(params)
    assert result.cache_stats.total_skipped >= 2
    assert np.isfinite(result.frames).all()
    if key is not None:
        assert wan_i2v_cache_model_key(result.params) == key
        assert result.cache.config.mag_ratios == preset_ratio_table()[key]


def test_the_preset_key_follows_the_resolution():
    assert wan_i2v_cache_model_key(SamplingParams(height=480, width=832)) == "wan21_i2v_14b_480p"
    assert wan_i2v_cache_model_key(SamplingParams(height=1280, width=720)) == "wan21_i2v_14b_720p"


def test_an_i2v_folder_is_recognised_with_its_defaults(tiny_wan21_i2v_dir, i2v_generators):
    info = read_model_info(tiny_wan21_i2v_dir)
    assert info.image_to_video and not info.two_experts and info.diffusers_pipeline == "WanImageToVideoPipeline"
    assert info.sampling_defaults == WAN21_I2V_DEFAULTS
    assert isinstance(i2v_generators["float32"].pipeline, WanPipeline)
    resolved = i2v_generators["float32"].validate(SamplingParams(prompt=PROMPT, image=_image(0)))
    assert (resolved.height, resolved.width, resolved.num_frames, resolved.num_inference_steps,
            resolved.guidance_scale, resolved.fps) == (480, 832, 81, 50, 5.0, 16)


def test_image_mistakes_are_one_line_naming_image(i2v_generators, wan_generator, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    cases = [
        (i2v_generators["float32"], None, "makes a video from a first frame"),
        (wan_generator, _image(0), "takes no image"),
        (i2v_generators["float32"], str(tmp_path / "missing.png"), "does not exist"),
        (i2v_generators["float32"], str(tmp_path / "notes.png"), "not an image format PIL reads"),
        (i2v_generators["float32"], 3, "must be a PIL image or the path of an image file, got int"),
    ]
    for generator, image, fragment in cases:
        with pytest.raises(InvalidRequestError) as refused:
            generator.validate(SamplingParams(prompt=PROMPT, image=image))
        assert refused.value.param == "image" and fragment in str(refused.value)
        assert "\n" not in str(refused.value)


@pytest.mark.parametrize("change, fragment", [
    (lambda index, config: index.update(image_encoder=[None, None]), "names no image_encoder"),
    (lambda index, config: config.update(pos_embed_seq_len=514), "Wan2.1 FLF2V"),
    (lambda index, config: config.update(image_dim=None), "sets no image_dim"),
])
def test_other_image_to_video_folders_are_refused_in_one_line(tiny_wan21_i2v_dir, tmp_path, change, fragment):
    folder = tmp_path / "folder"
    (folder / "transformer").mkdir(parents=True)
    index = json.loads((tiny_wan21_i2v_dir / "model_index.json").read_text())
    config = json.loads((tiny_wan21_i2v_dir / "transformer" / "config.json").read_text())
    change(index, config)
    (folder / "model_index.json").write_text(json.dumps(index))
    (folder / "transformer" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ModelNotFoundError) as refused:
        read_model_info(folder)
    assert fragment in str(refused.value) and "\n" not in str(refused.value)


def test_cli_writes_an_mp4_from_an_image(tiny_wan21_i2v_dir, tmp_path, capsys):
    from sglang.cli.main import main

    path, out = tmp_path / "first.png", tmp_path / "i2v.mp4"
    _image(0, (48, 32)).save(path)
    args = ["generate", "--model-path", str(tiny_wan21_i2v_dir), "--prompt", PROMPT, "--image", str(path),
            "--num-inference-steps", "2", "--guidance-scale", "1", "--height", "32", "--width", "48",
            "--num-frames", "5", "--output-path", str(out)]
    assert main(args) == 0
    assert "image_conditioning" in capsys.readouterr().out
    assert iio.imread(out, index=None).shape == (5, 32, 48, 3)


def test_cli_image_mistakes_are_one_line_before_any_load(tiny_wan21_i2v_dir, tiny_wan_dir, tmp_path, monkeypatch,
                                                         capsys):
    from sglang.cli.main import main

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr(DiffGenerator, "from_pretrained", no_load)
    image = tmp_path / "first.png"
    _image(0).save(image)
    cases = [
        (tiny_wan21_i2v_dir, ["--image", str(tmp_path / "missing.png")], "does not exist"),
        (tiny_wan21_i2v_dir, [], "makes a video from a first frame"),
        (tiny_wan_dir, ["--image", str(image)], "takes no image"),
    ]
    for folder, extra, fragment in cases:
        args = ["generate", "--model-path", str(folder), "--prompt", PROMPT, "--output-path",
                str(tmp_path / "x.mp4"), *extra]
        assert main(args) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1 and lines[0].startswith("error: ") and fragment in lines[0]


def test_a_720p_folder_sets_its_size_and_so_gets_the_720p_presets(tiny_wan21_i2v_dir, tmp_path):
    """A 720P checkpoint has the 480P one's layout: its sglang_config.json sets the size, which
    picks the 720p presets through the request's resolution."""
    folder = tmp_path / "i2v-720p"
    (folder / "transformer").mkdir(parents=True)
    for name in ("model_index.json", "transformer/config.json"):
        shutil.copy(tiny_wan21_i2v_dir / name, folder / name)
    (folder / "sglang_config.json").write_text(json.dumps({"sampling_defaults": {"height": 720, "width": 1280}}))
    params = SamplingParams(prompt=PROMPT).with_defaults(read_model_info(folder).sampling_defaults)
    assert wan_i2v_cache_model_key(params) == "wan21_i2v_14b_720p"


def test_without_torchvision_the_image_processor_loads_as_its_pil_twin(tiny_wan21_i2v_dir):
    """transformers falls back to CLIPImageProcessorPil without torchvision and warns on every
    load; the loader names that class directly (same preprocessing, no warning)."""
    import importlib.util

    from sglang.multimodal_gen.runtime.models.loader import load_component

    processor = load_component(tiny_wan21_i2v_dir, "image_processor")
    expected = "CLIPImageProcessor" if importlib.util.find_spec("torchvision") else "CLIPImageProcessorPil"
    assert type(processor).__name__ == expected
