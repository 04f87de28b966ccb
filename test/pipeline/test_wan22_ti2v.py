"""Wan2.2 TI2V-5B (text to video) against diffusers' own WanPipeline on a tiny TI2V folder: the
timestep per token of ``expand_timesteps``, the Wan2.2 VAE (48 latent channels, 16x spatial),
the release's defaults and 32-pixel size rule, the CLI, and the caches on one transformer."""

from __future__ import annotations

import json
import shutil

import imageio.v3 as iio
import numpy as np
import pytest
import torch
from conftest import WAN_SCHEDULERS, set_scheduler

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.models import WAN22_TI2V_DEFAULTS, read_model_info
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.errors import InvalidRequestError, ModelNotFoundError
from sglang.multimodal_gen.runtime.cache.reduction import TokenStatistics
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator, denoising_stage
from sglang.multimodal_gen.runtime.models.wan import WanDiTAdapter

PROMPT = "a red circle moving left on a blue background"
NEGATIVE = "blurry, low quality"
# 64x96 pixels, 5 frames -> 48 x 2 x 4 x 6 latents -> 2 x 2 x 3 = 12 tokens.
REQUEST = dict(height=64, width=96, num_frames=5, num_inference_steps=3, guidance_scale=5.0)
TOKENS = 12


@pytest.fixture(scope="module")
def ti2v_generators(tiny_wan22_ti2v_dir):
    return {dtype: DiffGenerator.from_pretrained(str(tiny_wan22_ti2v_dir), device="cpu", dtype=dtype, batched_cfg=False)
            for dtype in ("float32", "bfloat16")}


def _diffusers(folder, dtype: str, seed: int) -> np.ndarray:
    from diffusers import AutoencoderKLWan, WanPipeline

    vae = AutoencoderKLWan.from_pretrained(folder / "vae", dtype=torch.float32)  # ours decodes in fp32 too
    pipe = WanPipeline.from_pretrained(folder, vae=vae, dtype=getattr(torch, dtype))
    assert pipe.config.expand_timesteps
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(seed),
                max_sequence_length=read_model_info(folder).text_max_length, output_type="np", **REQUEST).frames[0]


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_ti2v_equals_diffusers_wan_pipeline(tiny_wan22_ti2v_dir, ti2v_generators, dtype):
    """Frames as diffusers' WanPipeline makes them with expand_timesteps, in fp32 and in bf16 (where
    1e-5 is below half a bf16 ulp: equal wherever values pass through bf16, see test_parity_matrix)."""
    reference = _diffusers(tiny_wan22_ti2v_dir, dtype, 7)
    ours = ti2v_generators[dtype].generate(SamplingParams(prompt=PROMPT, negative_prompt=NEGATIVE, seed=7, **REQUEST))
    assert ours.latents.shape == (1, 48, 2, 4, 6)
    np.testing.assert_allclose(ours.frames, reference, rtol=1e-5, atol=1e-5)


def test_ti2v_with_flow_match_euler_equals_diffusers(tiny_wan22_ti2v_dir, tmp_path):
    """Another scheduler: flow-match Euler's timesteps are not whole numbers, so the per-token
    timestep carries fractions into the embedding."""
    folder = tmp_path / "ti2v-euler"
    shutil.copytree(tiny_wan22_ti2v_dir, folder)
    set_scheduler(folder, *WAN_SCHEDULERS["flow_euler"])
    ours = DiffGenerator.from_pretrained(str(folder), device="cpu", batched_cfg=False).generate(
        SamplingParams(prompt=PROMPT, negative_prompt=NEGATIVE, seed=2, **REQUEST))
    np.testing.assert_allclose(ours.frames, _diffusers(folder, "float32", 2), rtol=1e-5, atol=1e-5)


def test_the_transformer_embeds_a_timestep_per_token(ti2v_generators):
    """The time embedder sees one timestep per token of the patch grid, each the step's, as
    diffusers feeds it (its output alone could not tell: every token has the same timestep)."""
    adapter = denoising_stage(ti2v_generators["float32"].pipeline).adapter
    seen = []
    hook = adapter.transformer.condition_embedder.time_embedder.register_forward_pre_hook(
        lambda module, args: seen.append(tuple(args[0].shape)))
    try:
        ti2v_generators["float32"].generate(SamplingParams(prompt=PROMPT, seed=1, **{**REQUEST, "guidance_scale": 1.0}))
    finally:
        hook.remove()
    assert seen == [(1, TOKENS, adapter.transformer.config.freq_dim)] * REQUEST["num_inference_steps"]
    timesteps = adapter.token_timesteps(torch.tensor([999, 937]), (2, 48, 2, 4, 6))
    assert timesteps.dtype == torch.float32 and timesteps.tolist() == [[999.0] * TOKENS, [937.0] * TOKENS]


def test_the_adapter_equals_the_transformer_on_timesteps_that_differ_per_token(ti2v_generators):
    """A ``(batch, tokens)`` timestep whose tokens differ (what image conditioning will pass): the
    adapter, with and without its request constants, gives the transformer's own forward."""
    adapter = denoising_stage(ti2v_generators["float32"].pipeline).adapter
    gen = torch.Generator().manual_seed(5)
    latents = torch.randn(2, 48, 2, 4, 6, generator=gen)
    text = torch.randn(2, 8, adapter.transformer.config.text_dim, generator=gen)
    timestep = torch.stack([torch.linspace(999.0, 0.0, TOKENS), torch.linspace(10.0, 900.0, TOKENS)])
    with torch.inference_mode():
        expected = adapter.transformer(latents, timestep, text, return_dict=False)[0]
        direct = adapter.forward(latents, timestep, text)
        hoisted = adapter.forward(latents, timestep, text, **adapter.request_constants(latents, text))
    torch.testing.assert_close(direct, expected, rtol=0, atol=0)
    torch.testing.assert_close(hoisted, expected, rtol=0, atol=0)


def test_teacache_indicator_changes_as_with_a_timestep_per_video(ti2v_generators):
    """TeaCache's statistic on the per-token embedding equals the per-video one's (the rows are
    equal), so its decisions on TI2V text-to-video are those of the same model fed one timestep."""
    per_token = denoising_stage(ti2v_generators["float32"].pipeline).adapter
    per_video = WanDiTAdapter(per_token.transformer)
    latents = torch.randn(1, 48, 2, 4, 6, generator=torch.Generator().manual_seed(0))
    text = torch.randn(1, 8, per_token.transformer.config.text_dim, generator=torch.Generator().manual_seed(1))
    changes, shapes = [], []
    for adapter in (per_token, per_video):
        first, second = (adapter.embed(latents, torch.tensor([t]), text)[1].modulated_input for t in (999, 937))
        changes.append(TokenStatistics().relative_l1(second, first))
        shapes.append(tuple(first.shape))
    width = per_token.transformer.config.num_attention_heads * per_token.transformer.config.attention_head_dim
    assert shapes == [(1, TOKENS, width), (1, width)]
    assert changes[0] == pytest.approx(changes[1], rel=1e-6)


def test_a_ti2v_folder_takes_the_ti2v_defaults_and_its_size_rule(tiny_wan22_ti2v_dir, ti2v_generators):
    info = read_model_info(tiny_wan22_ti2v_dir)
    assert info.expand_timesteps and not info.two_experts
    assert info.sampling_defaults == WAN22_TI2V_DEFAULTS
    resolved = ti2v_generators["float32"].validate(SamplingParams(prompt=PROMPT))
    assert (resolved.num_inference_steps, resolved.guidance_scale) == (50, 5.0)
    assert (resolved.width, resolved.height, resolved.num_frames, resolved.fps) == (1280, 704, 121, 24)
    with pytest.raises(InvalidRequestError) as refused:
        ti2v_generators["float32"].validate(SamplingParams(prompt=PROMPT, height=48, width=96))
    assert refused.value.param == "height" and "\n" not in str(refused.value)
    assert "height 48 is not a multiple of 32" in str(refused.value)


@pytest.mark.parametrize("change, fragment", [
    (lambda index: index.update(transformer_2=["diffusers", "WanTransformer3DModel"], boundary_ratio=0.875),
     "a Wan2.2 folder is one or the other"),
    (lambda index: index.update(expand_timesteps="yes"), "expand_timesteps must be true or false"),
])
def test_mixed_wan22_folders_are_refused_in_one_line(tiny_wan22_ti2v_dir, tmp_path, change, fragment):
    index = json.loads((tiny_wan22_ti2v_dir / "model_index.json").read_text())
    change(index)
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelNotFoundError) as refused:
        read_model_info(tmp_path)
    assert fragment in str(refused.value) and "\n" not in str(refused.value)


def test_cli_writes_a_ti2v_mp4_and_refuses_a_size_off_32_in_one_line(tiny_wan22_ti2v_dir, tmp_path, capsys):
    from sglang.cli.main import main

    out = tmp_path / "ti2v.mp4"
    size = ["--height", "64", "--width", "96", "--num-frames", "5", "--num-inference-steps", "2"]
    assert main(["generate", "--model-path", str(tiny_wan22_ti2v_dir), "--prompt", PROMPT, *size,
                 "--output-path", str(out)]) == 0
    assert iio.imread(out, index=None).shape == (5, 64, 96, 3)
    assert iio.immeta(out)["fps"] == 24  # the TI2V default
    capsys.readouterr()
    assert main(["generate", "--model-path", str(tiny_wan22_ti2v_dir), "--prompt", PROMPT, *size,
                 "--width", "80"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "width 80 is not a multiple of 32" in err and len(err.splitlines()) == 1


@pytest.mark.parametrize("cache", [
    CacheParams(strategy="easycache", threshold=0.3, options={"warmup_steps": 2}),
    CacheParams(strategy="teacache", threshold=1.0, options={"coefficients": [1.0, 0.0]}),
], ids=["easycache", "teacache-own-coefficients"])
def test_caches_skip_steps_on_one_ti2v_transformer(ti2v_generators, cache):
    """One transformer, so every strategy runs as on Wan2.1."""
    generator = ti2v_generators["float32"]
    params = SamplingParams(prompt=PROMPT, seed=4, cache=cache, **{**REQUEST, "num_inference_steps": 10})
    result = generator.generate(params)
    assert all(branch.skipped_steps for branch in result.cache_stats.branches.values())
    assert np.isfinite(result.frames).all()


@pytest.mark.parametrize("cache, flag", [(CacheParams(strategy="magcache"), "--cache magcache"),
                                         (CacheParams(speedup=2.0), "--cache-speedup")])
def test_presets_are_refused_without_a_calibration(ti2v_generators, cache, flag):
    """No published preset covers Wan2.2: the 1.3B curves are not used in silence."""
    with pytest.raises(InvalidRequestError) as refused:
        ti2v_generators["float32"].generate(SamplingParams(prompt=PROMPT, cache=cache, **REQUEST))
    message = str(refused.value)
    assert message.startswith(f"{flag} needs a calibration of this model") and "--cache easycache" in message


def test_a_calibrated_ti2v_folder_takes_magcache_and_a_speedup(ti2v_generators, tmp_path):
    from sglang.multimodal_gen.runtime.entrypoints.calibrate import calibrate

    generator = ti2v_generators["float32"]
    template = SamplingParams(prompt=PROMPT, seed=1, **{**REQUEST, "num_inference_steps": 10})
    calibration = calibrate(generator, [PROMPT, "a blue square moving up"], template, tmp_path / "ti2v.json")
    assert not calibration.experts and set(calibration.branches) == {"cond", "uncond"}
    for cache in (CacheParams(strategy="magcache"), CacheParams(speedup=2.0)):
        cache.calibration_file = str(tmp_path / "ti2v.json")
        stats = generator.generate(SamplingParams(prompt=PROMPT, seed=4, cache=cache,
                                                  **{**REQUEST, "num_inference_steps": 10})).cache_stats
        assert stats.total_skipped > 0 and not stats.step_experts
