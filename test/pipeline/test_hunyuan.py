"""HunyuanVideo: our pipeline and adapter against diffusers' own HunyuanVideoPipeline and transformer
forward, both caching strategies on it (MagCache's plan against the release algorithm with the
published ratios, TeaCache's latent-dependent skips), and `sglang generate` on a HunyuanVideo folder."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from sglang.cli.main import main
from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.models import read_model_info
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.errors import InvalidRequestError
from sglang.multimodal_gen.runtime.cache.base import COND
from sglang.multimodal_gen.runtime.models.hunyuan import HunyuanDiTAdapter
from sglang.multimodal_gen.runtime.pipelines.hunyuan import hunyuan_cache_model_key
from sglang.multimodal_gen.runtime.stages.hunyuan_text_encoding import HunyuanTextEncodingStage

PROMPT = "a red circle moving left on a blue background"
# 64x48 pixels, 5 frames -> 2x8x6 latents (HunyuanVideo's VAE: 8x spatial, 4x temporal).
REQUEST = dict(height=64, width=48, num_frames=5, num_inference_steps=6, guidance_scale=6.0)

# MagCache4HunyuanVideo/magcache_sample_video.py (Zehong-Ma/MagCache): the published magnitude
# ratios per denoising step of a 50-step run, chosen by video height (544 or 720).
RELEASE_RATIOS = {
    544: [1.0, 1.06971, 1.29073, 1.11245, 1.09596, 1.05233, 1.01415, 1.05672, 1.00848, 1.03632, 1.02974,
          1.00984, 1.03028, 1.00681, 1.06614, 1.05022, 1.02592, 1.01776, 1.02985, 1.00726, 1.03727, 1.01502,
          1.00992, 1.03371, 0.9976, 1.02742, 1.0093, 1.01869, 1.00815, 1.01461, 1.01152, 1.03082, 1.0061,
          1.02162, 1.01999, 0.99063, 1.01186, 1.0217, 0.99947, 1.01711, 0.9904, 1.00258, 1.00878, 0.97039,
          0.97686, 0.94315, 0.97728, 0.91154, 0.86139, 0.76592],
    720: [1.0, 1.0754, 1.27807, 1.11596, 1.09504, 1.05188, 1.00844, 1.05779, 1.00657, 1.04142, 1.03101,
          1.00679, 1.02556, 1.00908, 1.06949, 1.05438, 1.02214, 1.02321, 1.03019, 1.00779, 1.03381, 1.01886,
          1.01161, 1.02968, 1.00544, 1.02822, 1.00689, 1.02119, 1.0105, 1.01044, 1.01572, 1.02972, 1.0094,
          1.02368, 1.0226, 0.98965, 1.01588, 1.02146, 1.0018, 1.01687, 0.99436, 1.00283, 1.01139, 0.97122,
          0.98251, 0.94513, 0.97656, 0.90943, 0.85703, 0.75456],
}
# (preset level, threshold, K): the release CLI defaults and the values its script hard-codes.
MAGCACHE_LEVELS = [("default", 0.12, 2), ("fast", 0.24, 6)]


def reference_magcache_plan(ratios: list[float], steps: int, threshold: float, k: int, retention: float = 0.2):
    """The release's ``magcache_forward`` decisions, one per step (no CFG), True = run the blocks.

    The release indexes its 50 ratios by step; for other step counts they are resampled to the
    nearest step as MagCache4Wan2.1's ``nearest_interp`` does.
    """
    picked = np.round(np.arange(steps) * (len(ratios) - 1) / (steps - 1)).astype(int)
    plan, acc_ratio, acc_steps, acc_err = [], 1.0, 0, 0.0
    for cnt in range(steps):
        skip = False
        if cnt >= int(retention * steps):
            acc_ratio *= ratios[picked[cnt]]
            acc_err += abs(1 - acc_ratio)
            acc_steps += 1
            if acc_err <= threshold and acc_steps <= k:
                skip = True
            else:
                acc_ratio, acc_steps, acc_err = 1.0, 0, 0.0
        plan.append(not skip)
    return plan


def _params(seed: int = 7, cache: CacheParams | None = None, **overrides) -> SamplingParams:
    return SamplingParams(prompt=PROMPT, seed=seed, cache=cache or CacheParams(), **{**REQUEST, **overrides})


def _text_stage(generator) -> HunyuanTextEncodingStage:
    return next(s for s in generator.pipeline.stages if isinstance(s, HunyuanTextEncodingStage))


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_hunyuan_dir, hunyuan_generator):
    from diffusers import HunyuanVideoPipeline

    # transformers 5's LlamaTokenizerFast rebuilds a SentencePiece-style pipeline around a byte-level
    # (Llama 3) vocabulary, so diffusers gets the tokenizer as our loader reads it: tokenizer.json as saved.
    tokenizer = _text_stage(hunyuan_generator).tokenizer
    pipe = HunyuanVideoPipeline.from_pretrained(tiny_hunyuan_dir, tokenizer=tokenizer, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_run(pipe, text_stage: HunyuanTextEncodingStage, seed: int, output_type: str):
    return pipe(
        prompt=PROMPT,
        generator=torch.Generator().manual_seed(seed),
        output_type=output_type,
        prompt_template={"template": text_stage.template, "crop_start": text_stage.crop_start},
        **REQUEST,
    ).frames


def test_family_detected_from_model_index(tiny_hunyuan_dir):
    info = read_model_info(tiny_hunyuan_dir)
    assert info.family.name == "hunyuan"
    assert info.sampling_defaults["guidance_scale"] == 6.0 and info.sampling_defaults["num_frames"] == 129


def test_latents_and_frames_match_diffusers_hunyuan_pipeline(hunyuan_generator, diffusers_pipe):
    text_stage = _text_stage(hunyuan_generator)
    # The tiny tokenizer's own template crop (the published 95 is the Llama 3 tokenizer's).
    assert 0 < text_stage.crop_start != 95
    ours = hunyuan_generator.generate(_params(seed=7))

    reference_latents = _diffusers_run(diffusers_pipe, text_stage, seed=7, output_type="latent")
    assert ours.latents.shape == reference_latents.shape == (1, 16, 2, 8, 6)
    torch.testing.assert_close(ours.latents, reference_latents, rtol=1e-5, atol=1e-5)

    reference_frames = _diffusers_run(diffusers_pipe, text_stage, seed=7, output_type="np")[0]
    assert ours.frames.shape == reference_frames.shape == (5, 64, 48, 3)
    np.testing.assert_allclose(ours.frames, reference_frames, atol=1e-5)


def test_adapter_embed_blocks_head_equals_transformer_forward(hunyuan_generator):
    transformer = hunyuan_generator.pipeline.transformer
    adapter = HunyuanDiTAdapter(transformer)
    gen = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 16, 3, 8, 6, generator=gen)
    timestep = torch.tensor([999.0, 421.0])
    text = torch.randn(2, 11, transformer.config.text_embed_dim, generator=gen)
    mask = torch.zeros(2, 11)
    mask[0, :7], mask[1, :3] = 1, 1
    pooled = torch.randn(2, transformer.config.pooled_projection_dim, generator=gen)
    guidance = torch.tensor([6000.0, 3500.0])
    with torch.no_grad():
        expected = transformer(latents, timestep, text, mask, pooled, guidance, return_dict=False)[0]
        hidden, ctx = adapter.embed(
            latents, timestep, text, encoder_attention_mask=mask, pooled_projections=pooled, guidance=guidance
        )
        blocks_out = adapter.blocks(hidden, ctx)
        ours = adapter.head(blocks_out, ctx)
        first_block_norm = transformer.transformer_blocks[0].norm1(hidden, emb=ctx.temb)[0]
    torch.testing.assert_close(ours, expected, rtol=0, atol=0)
    # The residual a cache stores is over the image tokens only (3 x 4 x 3 = 36 of them).
    width = transformer.config.num_attention_heads * transformer.config.attention_head_dim
    assert blocks_out.shape == hidden.shape == (2, 36, width)
    assert (blocks_out - hidden).abs().mean() > 1e-3
    # TeaCache's indicator: the first double-stream block's modulated, normalised image input.
    torch.testing.assert_close(ctx.modulated_input, first_block_norm, rtol=0, atol=0)


@pytest.mark.parametrize("level,threshold,k", MAGCACHE_LEVELS)
@pytest.mark.parametrize("height,width", [(544, 960), (720, 1280)])
def test_magcache_plan_equals_release_algorithm_at_50_steps(hunyuan_generator, height, width, level, threshold, k):
    cache = CacheParams(strategy="magcache", preset=level)
    params = _params(cache=cache, height=height, width=width, num_frames=129, num_inference_steps=50)
    plan = hunyuan_generator.pipeline.validate(params).cache.plan()
    assert list(plan) == [COND]
    assert plan[COND] == reference_magcache_plan(RELEASE_RATIOS[height], 50, threshold, k)
    assert not all(plan[COND])


def test_magcache_run_skips_exactly_the_reference_plan(hunyuan_generator):
    steps = 10
    result = hunyuan_generator.generate(_params(cache=CacheParams(strategy="magcache"), num_inference_steps=steps))
    expected = reference_magcache_plan(RELEASE_RATIOS[544], steps, threshold=0.12, k=2)
    stats = result.cache_stats.branches
    assert list(stats) == [COND]
    assert stats[COND].computed_steps == [i for i, compute in enumerate(expected) if compute]
    assert stats[COND].num_skipped == expected.count(False) > 0


def test_teacache_skips_more_as_threshold_grows(hunyuan_generator):
    skipped = []
    for threshold in (0.05, 0.1, 0.2, 0.5, 1.0):
        cache = CacheParams(strategy="teacache", threshold=threshold)
        result = hunyuan_generator.generate(_params(seed=0, cache=cache, num_inference_steps=10))
        stats = result.cache_stats.branches[COND]
        assert stats.computed_steps[0] == 0 and stats.computed_steps[-1] == 9  # first and last always run
        skipped.append(stats.num_skipped)
    assert skipped == sorted(skipped) and skipped[0] < skipped[-1], skipped


def test_teacache_indicator_depends_on_the_latent(hunyuan_generator):
    changes = []
    for seed in (0, 1):
        result = hunyuan_generator.generate(_params(seed=seed, cache=CacheParams(strategy="teacache")), calibrate=True)
        changes.append(result.cache.calibration_records()[COND].input_change)
    assert len(changes[0]) == REQUEST["num_inference_steps"]
    assert changes[0] != changes[1]


def test_cache_preset_key_follows_resolution():
    key = lambda h, w: hunyuan_cache_model_key(SamplingParams(prompt="x", height=h, width=w))  # noqa: E731
    assert key(544, 960) == key(960, 544) == key(480, 848) == key(64, 48) == key(624, 1104) == "hunyuan_544p"
    assert key(720, 1280) == key(1280, 720) == key(1080, 1920) == key(640, 1136) == "hunyuan_720p"


def test_negative_prompt_is_refused(hunyuan_generator):
    with pytest.raises(InvalidRequestError) as info:
        hunyuan_generator.validate(SamplingParams(prompt=PROMPT, negative_prompt="blurry", **REQUEST))
    assert info.value.param == "negative_prompt"


@pytest.mark.parametrize("strategy", ["teacache", "magcache"])
def test_cli_generate_with_cache(tiny_hunyuan_dir, tmp_path, capsys, strategy):
    output = tmp_path / "video.npy"
    argv = [
        "generate", "--model-path", str(tiny_hunyuan_dir), "--prompt", PROMPT, "--cache", strategy,
        "--height", "64", "--width", "48", "--num-frames", "5", "--num-inference-steps", "10",
        "--device", "cpu", "--output-path", str(output),
    ]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert f"{strategy}: computed" in out and f"saved {output}" in out
    assert np.load(output).shape == (5, 64, 48, 3)


def test_estimators_on_hunyuan_keep_the_plan_and_change_only_what_skips_add(hunyuan_generator):
    """One branch (embedded guidance), FlowMatchEuler sigmas: reuse is today's output, forecasts differ."""
    steps = 10
    today = hunyuan_generator.generate(_params(cache=CacheParams(strategy="magcache"), num_inference_steps=steps))
    for name in ("reuse", "forecast2_sigma", "blend"):
        result = hunyuan_generator.generate(
            _params(cache=CacheParams(strategy="magcache", estimator=name), num_inference_steps=steps)
        )
        assert result.cache_stats.branches[COND].skipped_steps == today.cache_stats.branches[COND].skipped_steps
        assert torch.equal(result.latents, today.latents) == (name == "reuse"), name
