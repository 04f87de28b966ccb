"""EasyCache on real pipelines: the built-in model at the step counts users pick, in fp32 and bf16,
with forecasting estimators, HunyuanVideo's release defaults, and the CLI."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from sglang.cli.main import main
from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.cache.calibration import apply_calibration
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator

PROMPT = "a blue square moving right on a yellow background"
# Measured on the built-in model with the release defaults (threshold 0.05, warm-up 10): computed
# 17 of 20, 21 of 30 and 25 of 50 steps on this prompt; PSNR against the uncached run 38-52 dB.
MIN_PSNR = 30.0


def psnr(frames: np.ndarray, reference: np.ndarray) -> float:
    return float(10 * np.log10(1.0 / max(np.mean((frames - reference) ** 2), 1e-20)))


@pytest.fixture(scope="module")
def builtin():
    return {dtype: DiffGenerator.from_pretrained(device="cpu", dtype=dtype) for dtype in ("float32", "bfloat16")}


@pytest.mark.parametrize("steps", [20, 30, 50])
def test_builtin_model_skips_at_user_step_counts(builtin, steps):
    gen = builtin["float32"]
    reference = gen.generate(SamplingParams(prompt=PROMPT, seed=0, num_inference_steps=steps))
    result = gen.generate(SamplingParams(prompt=PROMPT, seed=0, num_inference_steps=steps,
                                         cache=CacheParams("easycache")))
    stats = result.cache_stats
    assert (result.cache.config.threshold, result.cache.config.warmup_steps) == (0.05, 10)
    assert stats.branches["cond"].skipped_steps == stats.branches["uncond"].skipped_steps
    assert stats.total_skipped > 0 and min(stats.branches["cond"].skipped_steps) >= 10
    assert steps - 1 in stats.branches["cond"].computed_steps
    assert psnr(result.frames, reference.frames) > MIN_PSNR


def test_the_models_calibration_is_not_warned_about(builtin, caplog):
    """EasyCache takes nothing from a calibration, so a far step count is no reason to warn."""
    info = builtin["float32"].pipeline.model_info
    with caplog.at_level(logging.WARNING):
        params = apply_calibration(CacheParams("easycache"), info.calibration_file, info.family.name, 13)
        assert params.options == {} and "resampled" not in caplog.text
        apply_calibration(CacheParams("magcache"), info.calibration_file, info.family.name, 13)
    assert "resampled to 13" in caplog.text


def test_bf16_runs_and_stays_close_to_fp32(builtin):
    request = SamplingParams(prompt=PROMPT, seed=1, cache=CacheParams("easycache"))
    full = builtin["float32"].generate(request)
    half = builtin["bfloat16"].generate(request)
    assert np.isfinite(half.frames).all() and half.cache_stats.total_skipped > 0
    assert abs(half.cache_stats.total_computed - full.cache_stats.total_computed) <= 4
    assert psnr(half.frames, full.frames) > MIN_PSNR


@pytest.mark.parametrize("estimator", ["forecast1", "forecast1_sigma", "blend"])
def test_forecast_estimators_compose(builtin, estimator):
    gen = builtin["float32"]
    reuse = gen.generate(SamplingParams(prompt=PROMPT, seed=0, num_inference_steps=30, cache=CacheParams("easycache")))
    forecast = gen.generate(SamplingParams(prompt=PROMPT, seed=0, num_inference_steps=30,
                                           cache=CacheParams("easycache", estimator=estimator)))
    assert forecast.cache_stats.estimator == estimator and forecast.cache_stats.total_skipped > 0
    assert not np.array_equal(forecast.frames, reuse.frames)


def test_hunyuan_gets_its_release_defaults_and_skips(hunyuan_generator):
    request = dict(prompt=PROMPT, seed=0, height=32, width=48, num_frames=5, num_inference_steps=12)
    default = hunyuan_generator.generate(SamplingParams(**request, cache=CacheParams("easycache")))
    assert (default.cache.config.threshold, default.cache.config.warmup_steps) == (0.025, 5)
    assert list(default.cache_stats.branches) == ["cond"]
    looser = hunyuan_generator.generate(SamplingParams(**request, cache=CacheParams("easycache", threshold=0.5)))
    assert looser.cache_stats.total_skipped > 0
    assert min(looser.cache_stats.branches["cond"].skipped_steps) >= 5


def test_cli_prints_the_summary_and_refuses_a_speedup_in_one_line(tiny_wan_dir, tmp_path, capsys):
    common = ["generate", "--model-path", str(tiny_wan_dir), "--prompt", "a red circle", "--height", "32",
              "--width", "48", "--num-frames", "5", "--num-inference-steps", "12", "--cache", "easycache"]
    out = tmp_path / "clip.npy"
    assert main([*common, "--cache-threshold", "0.3", "--cache-params", '{"warmup_steps": 3}',
                 "--output-path", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "easycache: computed " in printed and "skipped steps: cond " in printed
    assert np.load(out).shape[0] == 5
    assert main([*common, "--cache-speedup", "2", "--output-path", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert "easycache cannot be tuned to a speedup" in err and "\n" not in err
