"""`sglang calibrate`: reproducible files, a fitted TeaCache polynomial, and the file in use."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from sglang.cli.main import main
from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.errors import InvalidRequestError
from sglang.multimodal_gen.runtime.cache.calibration import CalibrationResult, polynomial_fit_error
from sglang.multimodal_gen.runtime.cache.error_growth import ErrorGrowth
from sglang.multimodal_gen.runtime.entrypoints.calibrate import calibrate
from sglang.multimodal_gen.runtime.cache.teacache import preset_table

SIZE = ["--height", "32", "--width", "32", "--num-frames", "5"]
PROMPTS = ["a red circle moving left on a blue background", "a yellow square moving down on a green background"]
STEPS = 16


@pytest.fixture(scope="module")
def calibration_file(tiny_wan_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("calibration") / "tiny.json"
    args = ["calibrate", "--model-path", str(tiny_wan_dir), "--num-inference-steps", str(STEPS), "--seed", "4",
            "--output", str(out), *SIZE]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    assert main(args) == 0
    return out


def test_calibration_file_contents_and_plot(calibration_file):
    result = CalibrationResult.load(calibration_file)
    assert result.model_family == "wan" and result.num_prompts == 2 and result.num_inference_steps == STEPS
    assert result.dtype == "float32" and result.device == "cpu" and result.size == [5, 32, 32]
    assert set(result.branches) == {"cond", "uncond"}
    for branch in result.branches.values():
        assert len(branch.mag_ratio) == len(branch.mag_ratio_std) == len(branch.cosine_distance) == STEPS
        assert branch.mag_ratio[0] == 1.0 and all(r > 0 for r in branch.mag_ratio)
        assert any(d > 0 for d in branch.cosine_distance[1:])
    assert len(result.teacache_coefficients) == 5
    # How an error grows, measured on both prompts (the default measures up to 4): one value per
    # step and for the final latents, where it is 1.
    growth = ErrorGrowth.from_dict(result.error_growth)
    assert len(growth.sigmas) == STEPS + 1 and growth.sigmas[:-1] == pytest.approx(result.sigmas[:-1], rel=1e-5)
    assert growth.sigmas[-1] == 0.0 and growth.growth[-1] == 1.0 and all(g > 0 for g in growth.growth)
    png = calibration_file.with_suffix(".png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_calibrating_twice_with_the_same_seed_writes_identical_files(tiny_wan_dir, calibration_file, tmp_path,
                                                                    capsys):
    """Identical but for the step costs, which are timed."""
    again = tmp_path / "again.json"
    args = ["calibrate", "--model-path", str(tiny_wan_dir), "--num-inference-steps", str(STEPS), "--seed", "4",
            "--output", str(again), *SIZE, "--prompt", PROMPTS[0], "--prompt", PROMPTS[1]]
    assert main(args) == 0
    first, second = json.loads(calibration_file.read_text()), json.loads(again.read_text())
    assert first.pop("skipped_step_cost")["device"] == second.pop("skipped_step_cost")["device"] == "cpu"
    assert first == second
    # The summary names the planner's tables; the file measured no estimator (the planner fits its own).
    assert f"planner tables at {STEPS} steps (model outputs, 2 prompts)" in capsys.readouterr().out
    saved = CalibrationResult.load(again)
    assert saved.planner_estimator == {} and saved.nearest_planner_table(STEPS)["gram_of"] == "outputs"


def test_fitted_polynomial_beats_published_wan_coefficients_on_this_model(calibration_file):
    result = CalibrationResult.load(calibration_file)
    x, y = result.teacache_pairs()
    published = preset_table()["wan21_t2v_1.3b"]["modulated_input"]["coefficients"]
    fitted_error = polynomial_fit_error(result.teacache_coefficients, x, y)
    assert fitted_error < polynomial_fit_error(published, x, y) / 10


def test_generate_uses_the_calibration_file(wan_generator, calibration_file, caplog):
    params = SamplingParams(prompt=PROMPTS[0], seed=1, height=32, width=32, num_frames=5, num_inference_steps=STEPS,
                            cache=CacheParams(strategy="magcache", threshold=0.2, max_skip_steps=3,
                                              calibration_file=str(calibration_file)))
    result = wan_generator.generate(params)
    calibrated = CalibrationResult.load(calibration_file).branches
    assert result.cache.config.mag_ratios == {b: calibrated[b].mag_ratio for b in ("cond", "uncond")}
    with caplog.at_level(logging.WARNING):
        params.num_inference_steps = 40
        wan_generator.validate(params)  # as the server does before queueing the same request
        wan_generator.generate(params)
    assert caplog.text.count("resampled to 40") == 1


@pytest.mark.parametrize("content, message", [
    ("not json at all", "is not a calibration file"),
    (json.dumps({"magcache": [1, 2, 3]}), "is not a calibration file written by `sglang calibrate`"),
])
def test_not_a_calibration_file_is_refused(tiny_wan_dir, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.json"
    bad.write_text(content)
    code = main(["generate", "--model-path", str(tiny_wan_dir), "--prompt", "a cat", "--cache", "magcache",
                 "--cache-calibration", str(bad), "--num-inference-steps", "4", *SIZE])
    err = capsys.readouterr().err.strip()
    assert code == 2 and message in err and len(err.splitlines()) == 1


def test_calibration_of_another_family_is_refused(tiny_wan_dir, calibration_file, tmp_path, capsys):
    data = json.loads(calibration_file.read_text())
    data["model_family"] = "hunyuan"
    other = tmp_path / "hunyuan.json"
    other.write_text(json.dumps(data))
    code = main(["generate", "--model-path", str(tiny_wan_dir), "--prompt", "a cat", "--cache", "teacache",
                 "--cache-calibration", str(other), "--num-inference-steps", "4", *SIZE])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "calibration file is for a hunyuan model, not wan" in err


def test_fitted_coefficients_reach_teacache(wan_generator, calibration_file):
    params = SamplingParams(prompt=PROMPTS[1], seed=1, height=32, width=32, num_frames=5, num_inference_steps=STEPS,
                            cache=CacheParams(strategy="teacache", calibration_file=str(calibration_file)))
    result = wan_generator.generate(params)
    fitted = CalibrationResult.load(calibration_file).teacache_coefficients
    assert np.allclose(result.cache.config.coefficients, fitted)


def test_server_wide_calibration_applies_to_cached_requests(tiny_wan_dir, calibration_file):
    from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator

    generator = DiffGenerator.from_pretrained(str(tiny_wan_dir), device="cpu", cache_calibration=str(calibration_file))
    params = SamplingParams(prompt=PROMPTS[0], seed=1, height=32, width=32, num_frames=5, num_inference_steps=STEPS,
                            cache=CacheParams(strategy="magcache"))
    calibrated = CalibrationResult.load(calibration_file).branches
    assert generator.generate(params).cache.config.mag_ratios["cond"] == calibrated["cond"].mag_ratio


def test_serve_refuses_a_bad_calibration_file_before_listening(tiny_wan_dir, tmp_path, capsys):
    bad = tmp_path / "notes.json"
    bad.write_text("{}")
    code = main(["serve", "--model-path", str(tiny_wan_dir), "--port", "0", "--cache-calibration", str(bad)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "is not a calibration file" in err and len(err.splitlines()) == 1


def test_fresh_calibration_of_the_trained_builtin_model_skips_within_a_quality_bound(builtin_generator, tmp_path):
    """Measured on the trained built-in model (30 steps, 64x64, 17 frames): MagCache at the release
    defaults with a fresh calibration skips 15 of 30 steps per branch (2.00x fewer transformer
    passes) at 39.0 dB PSNR against the uncached video of the same seed; random weights would stay
    above 60 dB. The bound leaves margin for other CPUs' float ordering."""
    from sglang.multimodal_gen.runtime.entrypoints.calibrate import calibrate

    steps = 30
    output = tmp_path / "builtin.json"
    calibrate(builtin_generator, PROMPTS, SamplingParams(num_inference_steps=steps, seed=0), output)
    prompt = "a white triangle moving left on a black background"
    uncached = builtin_generator.generate(SamplingParams(prompt=prompt, seed=21, num_inference_steps=steps))
    cache = CacheParams(strategy="magcache", calibration_file=str(output))
    cached = builtin_generator.generate(SamplingParams(prompt=prompt, seed=21, num_inference_steps=steps, cache=cache))
    skipped = cached.cache_stats.branches["cond"].num_skipped
    mse = float(np.mean((cached.frames - uncached.frames) ** 2))
    psnr = 10 * np.log10(1.0 / mse)
    assert skipped >= 10, cached.cache_stats.summary()
    assert 28.0 <= psnr < 60.0, f"PSNR {psnr:.2f} dB with {skipped} skipped steps"


def test_builtin_model_uses_its_shipped_calibration_by_default(builtin_generator):
    info = builtin_generator.pipeline.model_info
    shipped = CalibrationResult.load(info.calibration_file)
    assert shipped.model_family == "wan" and shipped.num_inference_steps == 50 and shipped.num_prompts == 8
    result = builtin_generator.generate(
        SamplingParams(prompt=PROMPTS[0], seed=2, num_inference_steps=50, cache=CacheParams(strategy="magcache"))
    )
    assert result.cache.config.mag_ratios["uncond"] == shipped.branches["uncond"].mag_ratio
    assert result.cache_stats.total_skipped > 0


def test_builtin_model_teacache_default_preset_skips_at_20_steps(builtin_generator):
    """The 50-step calibration and preset skip nothing at 20 steps unless the threshold is scaled by
    50/20 (measured: 13 of 20 steps computed per branch; docs/benchmarks.md)."""
    params = SamplingParams(prompt="a green square moving up on a white background", seed=1, num_inference_steps=20,
                            cache=CacheParams(strategy="teacache"))
    result = builtin_generator.generate(params)
    assert result.cache_stats.branches["cond"].num_skipped >= 1, result.cache_stats.summary()
    assert result.cache_stats.branches["uncond"].num_skipped >= 1
    assert result.cache.config.calibration_steps == 50 and result.cache.threshold == pytest.approx(0.05 * 50 / 20)


def test_the_planner_weighs_its_gaps_by_the_calibrated_error_growth(wan_generator, calibration_file):
    cache = CacheParams(strategy="planner", speedup=2.0, calibration_file=str(calibration_file))
    params = SamplingParams(prompt=PROMPTS[1], seed=1, height=32, width=32, num_frames=5, num_inference_steps=STEPS,
                            cache=cache)
    planner = wan_generator.generate(params).cache
    assert planner.config.growth == ErrorGrowth.from_dict(CalibrationResult.load(calibration_file).error_growth)


def test_calibrating_without_the_growth_runs_nothing_more_and_a_bad_count_is_one_line(wan_generator, tmp_path):
    template = SamplingParams(prompt=PROMPTS[0], height=32, width=32, num_frames=5, num_inference_steps=6)
    result = calibrate(wan_generator, PROMPTS[:1], template, tmp_path / "flat.json", growth_prompts=0)
    assert result.error_growth == {} and result.nearest_planner_table(6) is not None
    with pytest.raises(InvalidRequestError, match="growth prompts must be a whole number >= 0, got -1"):
        calibrate(wan_generator, PROMPTS[:1], template, tmp_path / "bad.json", growth_prompts=-1)


def test_calibrated_blend_alpha_reaches_the_blend_estimator(wan_generator, calibration_file):
    alpha = CalibrationResult.load(calibration_file).blend_alpha
    assert isinstance(alpha, float) and np.isfinite(alpha)
    cache = CacheParams(strategy="magcache", estimator="blend", calibration_file=str(calibration_file))
    params = SamplingParams(prompt=PROMPTS[1], seed=1, height=32, width=32, num_frames=5, num_inference_steps=STEPS,
                            cache=cache)
    assert wan_generator.generate(params).cache.estimator.alpha == alpha
