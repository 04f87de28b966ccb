"""The built-in HunyuanVideo-architecture model is trained: its guidance embedding is a real
control, it draws its training captions' backgrounds and motion, and caching it costs measurable
fidelity, where a calibrated plan, an even one and a broken cache score far apart.

On random HunyuanVideo weights every cache looks harmless, so quality checks of caches on this
architecture run on this model. The figures behind the bounds are in docs/reference-model.md
(benchmark/reference_model.py --model-path hunyuanvideo-t2v-tiny, benchmark/frontier.py).
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import half_skip_threshold, magcache_params, psnr_db

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.cache.base import COND, budget_passes
from sglang.multimodal_gen.runtime.cache.budget import PASSES_ONLY
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator
from sglang.multimodal_gen.runtime.models.loader import BUILTIN_MODELS_DIR, builtin_model_names
from sglang.multimodal_gen.tools.adherence import SEED_OFFSET, read_video, score
from sglang.multimodal_gen.tools.probe_caches import register_probe_caches
from sglang.multimodal_gen.tools.synthetic_videos import HELD_OUT, TRAIN_SCENES

NAME = "hunyuanvideo-t2v-tiny"
FOLDER = BUILTIN_MODELS_DIR / NAME
STEPS = 50
PROMPT = HELD_OUT[4].caption


@pytest.fixture(scope="module")
def reference() -> DiffGenerator:
    return DiffGenerator.from_pretrained(NAME, device="cpu")


@pytest.fixture(scope="module")
def own_ratios(reference) -> dict[str, list[float]]:
    result = reference.generate(SamplingParams(prompt=TRAIN_SCENES[0].caption, seed=1), calibrate=True)
    return {b: list(r.mag_ratio) for b, r in result.cache.calibration_records().items()}


@pytest.fixture(scope="module")
def uncached(reference) -> np.ndarray:
    return reference.generate(SamplingParams(prompt=PROMPT, seed=SEED_OFFSET)).frames


def test_it_ships_beside_the_wan_model_small_trained_and_selected_by_name(reference):
    assert builtin_model_names() == ["hunyuanvideo-t2v-tiny", "wan2.1-i2v-tiny", "wan2.1-t2v-tiny",
                                     "wan2.1-t2v-tiny-hard", "wan2.2-t2v-tiny"]
    info = reference.pipeline.model_info
    assert info.path == FOLDER and info.family.name == "hunyuan" and info.text_max_length == 16
    assert info.sampling_defaults == dict(num_inference_steps=50, guidance_scale=2.0, height=64, width=64,
                                          num_frames=17, fps=8, negative_prompt="")
    assert info.calibration_file == FOLDER / "calibration.json"
    summary = json.loads((FOLDER / "training_summary.json").read_text())
    assert summary["architecture"] == "hunyuan" and summary["dit_final_flow_matching_loss"] < 1.0
    assert summary["total_minutes"] <= 60
    assert sum(f.stat().st_size for f in FOLDER.rglob("*") if f.is_file()) < 12 * 2**20


def test_training_captions_get_their_background_and_direction(reference):
    """Six training captions, an unused seed each: background and direction read back (random
    weights: 0 of 72 for both on held-out captions). Held-out captions and the shape's colour are
    not checked: its VAE shifts flat colours (docs/reference-model.md)."""
    hits = {"background": 0, "direction": 0}
    scenes = TRAIN_SCENES[::54]
    for scene in scenes:
        frames = reference.generate(SamplingParams(prompt=scene.caption, seed=SEED_OFFSET)).frames
        result = score(read_video(frames), scene)
        for attribute in hits:
            hits[attribute] += result[attribute]
    assert len(scenes) == 6 and hits["background"] >= 5 and hits["direction"] >= 3, hits


def test_the_embedded_guidance_was_distilled_into_a_real_control(reference, uncached):
    """Guidance 1 (the plain conditional model) and the default 2 draw different videos of the same
    seed (measured 27.7 dB apart); skipping half the steps moves a video far less (below)."""
    unguided = reference.generate(SamplingParams(prompt=PROMPT, seed=SEED_OFFSET, guidance_scale=1.0)).frames
    assert psnr_db(unguided, uncached) < 32


def test_skipping_half_the_steps_costs_fidelity_and_broken_caches_cost_more(reference, own_ratios, uncached):
    register_probe_caches()
    threshold, skipped = half_skip_threshold(own_ratios)

    def psnr_of(cache: CacheParams) -> float:
        return psnr_db(reference.generate(SamplingParams(prompt=PROMPT, seed=SEED_OFFSET, cache=cache)).frames, uncached)

    magcache = psnr_of(magcache_params(threshold, own_ratios))
    even = psnr_of(CacheParams(strategy="probe_even_skip", options={"num_skip": skipped, "start_step": 10}))
    zero = psnr_of(magcache_params(threshold, own_ratios, "probe_zero_residual"))
    stale = psnr_of(magcache_params(threshold, own_ratios, "probe_stale_residual"))
    for psnr in (magcache, even):
        assert 30 <= psnr < 55, (magcache, even)
    # On this model, unlike the Wan one, the calibrated plan beats the even one (47 vs 37 dB over 8 prompts).
    assert magcache > even + 3.0, (magcache, even)
    assert max(zero, stale) < min(magcache, even) - 10.0, (zero, stale, magcache, even)


def test_random_weights_hide_what_caching_costs(hunyuan_generator):
    """The same skipping on random HunyuanVideo weights: nearly lossless, so useless as a quality test."""
    request = dict(prompt=PROMPT, seed=SEED_OFFSET, height=64, width=64, num_frames=17, num_inference_steps=STEPS)
    calibration = hunyuan_generator.generate(SamplingParams(**request), calibrate=True)
    ratios = {b: list(r.mag_ratio) for b, r in calibration.cache.calibration_records().items()}
    threshold, _ = half_skip_threshold(ratios)
    cached = hunyuan_generator.generate(SamplingParams(**request, cache=magcache_params(threshold, ratios))).frames
    assert psnr_db(cached, calibration.frames) > 50


@pytest.mark.parametrize("speedup", [1.5, 2.0])
def test_the_planner_beats_running_fewer_steps_at_equal_passes(reference, uncached, speedup):
    """``--cache-speedup`` with the model's own calibration against plain steps, same transformer passes."""
    passes = budget_passes(STEPS, speedup)
    planned = reference.generate(SamplingParams(prompt=PROMPT, seed=SEED_OFFSET, cache=CacheParams(speedup=speedup)))
    assert planned.cache_stats.branches[COND].num_computed == passes
    fewer = reference.generate(SamplingParams(prompt=PROMPT, seed=SEED_OFFSET, num_inference_steps=passes)).frames
    planned_db, fewer_db = psnr_db(planned.frames, uncached), psnr_db(fewer, uncached)
    assert planned_db > fewer_db, f"planner {planned_db:.2f} dB vs {passes} steps {fewer_db:.2f} dB"


def test_bf16_caching_costs_nothing_beyond_bf16_itself(uncached):
    """bf16 (the CUDA default) against the fp32 uncached video: the planner at 2x lands where bf16's
    own rounding does (measured 44.3 and 44.6 dB)."""
    bf16 = DiffGenerator.from_pretrained(NAME, device="cpu", dtype="bfloat16")
    plain = psnr_db(bf16.generate(SamplingParams(prompt=PROMPT, seed=SEED_OFFSET)).frames, uncached)
    # Equal passes: a time budget's pass count would follow the bf16 step costs this machine measures.
    planned = bf16.generate(SamplingParams(prompt=PROMPT, seed=SEED_OFFSET,
                                           cache=CacheParams(speedup=2, step_costs=PASSES_ONLY)))
    assert planned.cache_stats.branches[COND].num_computed == 25
    assert plain > 35 and psnr_db(planned.frames, uncached) > plain - 1.5, (plain, psnr_db(planned.frames, uncached))
