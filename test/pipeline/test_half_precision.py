"""bf16 and fp16 end to end on the CPU: every strategy on both families, the built-in model against
diffusers at its declared text length, and TeaCache's decisions unchanged by the dtype.

The parity matrix (test_parity_matrix.py) compares half-precision runs with diffusers' pipelines
and MagCache hook; this file covers what diffusers has no counterpart for.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_REQUEST

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.models import read_model_info
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.cache import registered_caches
from sglang.multimodal_gen.runtime.entrypoints.generator import BUILTIN_MODEL_PATH, DiffGenerator
from sglang.multimodal_gen.tools.synthetic_videos import HELD_OUT

SHIPPED_STRATEGIES = ("teacache", "magcache", "easycache")
HALF = ("bfloat16", "float16")
# A strategy that skips steps in half precision stays this close (PSNR of frames, dB) to the same
# strategy in fp32 on the random tiny models; measured 42.8-60.2 dB in bf16, 72.7-76.6 dB in fp16.
HALF_VS_FP32_MIN_PSNR = 35.0


def psnr(frames: np.ndarray, reference: np.ndarray) -> float:
    """Frames in [0, 1]."""
    return float(10 * np.log10(1.0 / max(np.mean((frames - reference) ** 2), 1e-20)))


def test_shipped_strategies_are_the_registered_ones():
    assert set(SHIPPED_STRATEGIES) <= set(registered_caches())


@pytest.fixture(scope="module")
def generators(tiny_wan_dir, tiny_hunyuan_dir):
    """(family, dtype) -> generator, loaded once each."""
    folders = {"wan": tiny_wan_dir, "hunyuan": tiny_hunyuan_dir}
    made: dict[tuple[str, str], DiffGenerator] = {}

    def get(family: str, dtype: str) -> DiffGenerator:
        if (family, dtype) not in made:
            made[family, dtype] = DiffGenerator.from_pretrained(str(folders[family]), device="cpu", dtype=dtype,
                                                                 batched_cfg=False)
        return made[family, dtype]

    return get


def _request(family: str, strategy: str) -> SamplingParams:
    # Thresholds high enough that every strategy skips on the random tiny models.
    knobs = {"teacache": dict(threshold=2.0, options={"coefficients": [1.0, 0.0]}),
             "magcache": dict(threshold=0.5, max_skip_steps=3),
             "easycache": dict(threshold=0.3, options={"warmup_steps": 3})}.get(strategy, {})
    request = {**TINY_REQUEST, "num_inference_steps": 10, "guidance_scale": 5.0 if family == "wan" else 6.0}
    return SamplingParams(prompt="a blue square moving up", seed=2, cache=CacheParams(strategy=strategy, **knobs),
                          **request)


@pytest.mark.parametrize("strategy", ["none", *SHIPPED_STRATEGIES])
@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("family", ["wan", "hunyuan"])
def test_every_strategy_runs_in_half_precision(generators, family, dtype, strategy):
    reference = generators(family, "float32").generate(_request(family, strategy))
    half = generators(family, dtype).generate(_request(family, strategy))
    assert half.latents.dtype == (torch.float32 if family == "wan" else getattr(torch, dtype))
    assert np.isfinite(half.frames).all()
    assert psnr(half.frames, reference.frames) > HALF_VS_FP32_MIN_PSNR
    if strategy != "none":
        assert half.cache_stats.total_skipped > 0
        if strategy == "magcache":  # a plan from the ratios alone: the dtype cannot change it
            assert half.cache.plan() == reference.cache.plan()


# --------------------------------------------------------------------------- the built-in model
@pytest.fixture(scope="module")
def builtin_generators():
    return {dtype: DiffGenerator.from_pretrained(device="cpu", dtype=dtype, batched_cfg=False)
            for dtype in ("float32", *HALF)}


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_builtin_model_matches_diffusers_at_its_declared_text_length(builtin_generators, dtype):
    from diffusers import AutoencoderKLWan, WanPipeline

    info = read_model_info(BUILTIN_MODEL_PATH)
    assert info.text_max_length == 32  # trained with 32-token prompts; declared in sglang_config.json
    vae = AutoencoderKLWan.from_pretrained(BUILTIN_MODEL_PATH / "vae", dtype=torch.float32)
    pipe = WanPipeline.from_pretrained(BUILTIN_MODEL_PATH, vae=vae, dtype=getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    size = {k: info.sampling_defaults[k] for k in ("height", "width", "num_frames")}
    prompt, request = HELD_OUT[0].caption, dict(num_inference_steps=8, guidance_scale=5.0, **size)
    reference = pipe(prompt=prompt, negative_prompt="", generator=torch.Generator().manual_seed(4), output_type="np",
                     max_sequence_length=info.text_max_length, **request).frames[0]
    ours = builtin_generators[dtype].generate(SamplingParams(prompt=prompt, seed=4, **request))
    np.testing.assert_allclose(ours.frames, reference, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("preset", ["slow", "fast"])
def test_teacache_makes_the_same_decisions_in_half_precision_on_the_builtin_model(builtin_generators, preset):
    """On Wan the indicator is the timestep embedding; rounded to bf16 it still crosses the
    threshold at the same steps (measured on 50 and 30 steps, two prompts, both presets). It
    depends on the timestep alone, not on the video, so a small one shows the same decisions."""
    params = SamplingParams(prompt=HELD_OUT[1].caption, seed=1, height=32, width=32, num_frames=5,
                            cache=CacheParams(strategy="teacache", preset=preset))
    decisions = {}
    for dtype, generator in builtin_generators.items():
        stats = generator.generate(params).cache_stats
        decisions[dtype] = {b: s.computed_steps for b, s in stats.branches.items()}
    assert 0 < len(decisions["float32"]["cond"]) < 50
    assert decisions["bfloat16"] == decisions["float32"] == decisions["float16"]
