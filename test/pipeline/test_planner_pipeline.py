"""--cache-speedup on the trained built-in model (64x64, 17 frames): the budget, in time with the
calibration's step costs or in passes with none, is met exactly in real generations by every
strategy that takes one, plans are deterministic and shared by the CFG branches, the planner beats
running fewer steps, a calibration without planner data falls back to MagCache in one warning, and
`sglang calibrate` records what the planner needs."""

from __future__ import annotations

import json
import logging
import math
import re

import numpy as np
import pytest

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.errors import InvalidRequestError
from sglang.multimodal_gen.runtime.cache.base import CALIBRATION_WINDOW, COND, UNCOND, budget_passes
from sglang.multimodal_gen.runtime.cache.budget import checked_budget_passes
from sglang.multimodal_gen.runtime.cache.budget import PASSES_ONLY
from sglang.multimodal_gen.runtime.cache.registry import get_cache_class
from sglang.multimodal_gen.runtime.cache.validation import CacheConfigError
from sglang.multimodal_gen.runtime.cache.calibration import CalibrationResult, _warn_resampled_once
from sglang.multimodal_gen.tools.synthetic_videos import HELD_OUT

PROMPT = "a green square moving up on a black background"
# What `sglang calibrate` records for the planner (inner products normalised per prompt, sigmas,
# tables per step count) does not depend on the video's size: its tests calibrate at this one.
SMALL = dict(height=32, width=32, num_frames=5)


def _generate(generator, steps: int, cache: CacheParams | None = None, prompt: str = PROMPT, seed: int = 0,
              **size: int):
    return generator.generate(SamplingParams(prompt=prompt, seed=seed, num_inference_steps=steps,
                                             cache=cache or CacheParams(), **size))


def psnr(test: np.ndarray, reference: np.ndarray) -> float:
    mse = float(np.mean((np.asarray(test, np.float64) - np.asarray(reference, np.float64)) ** 2))
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _time_budget_passes(generator, steps: int, speedup: float, strategy: str = "planner",
                        branches: int = 2) -> int:
    """The passes a time budget gives with the built-in calibration's step costs (the rule the
    runtime applies: the nearest pass count, or one fewer where that falls short of the speedup)."""
    costs = generator.step_costs(CalibrationResult.load(generator.pipeline.model_info.calibration_file))
    cost = costs.skipped_step_cost(branches, get_cache_class(strategy).skips_whole_model)
    return checked_budget_passes(steps, speedup, cost)


def _assert_budget(result, steps: int, passes: int, strategy: str) -> None:
    stats = result.cache_stats
    assert stats.strategy == strategy, stats.summary()
    assert set(stats.branches) == {COND, UNCOND}
    for name, branch in stats.branches.items():
        assert branch.num_computed == passes, (name, stats.summary())
        assert branch.num_skipped == steps - passes > 0, (name, stats.summary())


def test_the_shipped_calibration_holds_cpu_step_costs(builtin_generator):
    """Measured by `sglang calibrate` on the CPU, so requests here plan without measuring."""
    calibration = CalibrationResult.load(builtin_generator.pipeline.model_info.calibration_file)
    costs = calibration.step_costs()
    assert costs is not None and costs.device == "cpu"
    assert builtin_generator.step_costs(calibration) == costs
    assert builtin_generator._measured_step_costs is None


@pytest.mark.parametrize("steps", [20, 30, 50])
def test_the_planner_meets_the_speedup_exactly(builtin_generator, steps):
    for speedup in (1.5, 2, 3):
        result = _generate(builtin_generator, steps, CacheParams(speedup=speedup))
        _assert_budget(result, steps, _time_budget_passes(builtin_generator, steps, speedup), "planner")
        assert result.cache_stats.asked_speedup == speedup
        passes_only = _generate(builtin_generator, steps, CacheParams(speedup=speedup, step_costs=PASSES_ONLY))
        _assert_budget(passes_only, steps, budget_passes(steps, speedup), "planner")
        assert result.cache_stats.branches[COND].computed_steps == result.cache_stats.branches[UNCOND].computed_steps
        assert result.cache.plan()[COND] == [s in result.cache_stats.branches[COND].computed_steps
                                             for s in range(steps)]


@pytest.mark.parametrize("steps, warning", [(20, None), (30, None), (40, None),
                                             (100, "made at 50 steps and is resampled to 100")])
def test_the_shipped_planner_tables_count_as_calibrated(builtin_generator, steps, warning, caplog):
    """The built-in calibration holds planner tables at 20, 30 and 50 steps: a request near one of
    them plans from that table and is not told to recalibrate."""
    _warn_resampled_once.cache_clear()  # it warns once per process; this test counts its own
    with caplog.at_level(logging.WARNING, logger="sglang.multimodal_gen.runtime.cache.calibration"):
        builtin_generator.validate(SamplingParams(prompt="a red circle", num_inference_steps=steps,
                                                  cache=CacheParams(speedup=2)))
    warnings = [r.getMessage() for r in caplog.records if "resampled" in r.getMessage()]
    if warning is None:
        assert warnings == []
    else:
        assert len(warnings) == 1 and warning in warnings[0]


def test_magcache_still_warns_far_from_its_50_step_ratios(builtin_generator, caplog):
    _warn_resampled_once.cache_clear()
    with caplog.at_level(logging.WARNING, logger="sglang.multimodal_gen.runtime.cache.calibration"):
        builtin_generator.validate(SamplingParams(prompt="a red circle", num_inference_steps=20,
                                                  cache=CacheParams(strategy="magcache")))
    assert "made at 50 steps and is resampled to 20; recalibrate" in caplog.text


@pytest.mark.parametrize("strategy", ["magcache", "teacache", "even"])
def test_strategies_tuned_to_the_speedup_meet_it_exactly(builtin_generator, strategy):
    """They skip the blocks only (embed and head still run), so a time budget buys them fewer
    passes than the planner, which skips the whole model call."""
    result = _generate(builtin_generator, 20, CacheParams(strategy=strategy, speedup=2))
    passes = _time_budget_passes(builtin_generator, 20, 2, strategy)
    assert passes <= _time_budget_passes(builtin_generator, 20, 2) <= 10
    _assert_budget(result, 20, passes, strategy)
    _assert_budget(_generate(builtin_generator, 20, CacheParams(strategy=strategy, speedup=2, step_costs=PASSES_ONLY)),
                   20, 10, strategy)


def test_plans_are_deterministic_and_shared_by_the_branches(builtin_generator):
    cache = CacheParams(speedup=2.5)
    first = _generate(builtin_generator, 30, cache)
    second = _generate(builtin_generator, 30, cache, prompt="a red circle moving left on a blue background", seed=5)
    plan = first.cache.plan()
    assert plan[COND] == plan[UNCOND] and second.cache.plan() == plan  # decided offline: no prompt or seed in it
    assert first.cache.estimator.name == second.cache.estimator.name
    again = _generate(builtin_generator, 30, cache)
    assert again.cache.plan() == plan and np.array_equal(again.frames, first.frames)


def test_the_planner_at_2x_beats_running_half_the_steps(builtin_generator):
    """Equal transformer passes: 25 planned of 50 steps against 25 plain steps, PSNR against the
    uncached 50-step video of a held-out caption. Measured: 47.7 dB (planner, forecast1) against
    45.5 dB (25 steps)."""
    prompt = HELD_OUT[0].caption
    reference = _generate(builtin_generator, 50, prompt=prompt).frames
    planned = _generate(builtin_generator, 50, CacheParams(speedup=2, step_costs=PASSES_ONLY), prompt=prompt)
    assert planned.cache_stats.branches[COND].num_computed == 25
    fewer_steps = _generate(builtin_generator, 25, prompt=prompt).frames
    planned_db, fewer_db = psnr(planned.frames, reference), psnr(fewer_steps, reference)
    assert planned_db > fewer_db, f"planner {planned_db:.2f} dB vs 25 steps {fewer_db:.2f} dB"


def test_a_calibration_without_planner_data_falls_back_to_magcache_in_one_warning(builtin_generator, tmp_path,
                                                                                  caplog):
    info = builtin_generator.pipeline.model_info
    data = json.loads(open(info.calibration_file).read())
    assert all(branch["output_gram"] for branch in data["branches"].values())
    for branch in data["branches"].values():
        del branch["gram"], branch["output_gram"]
    del data["planner_tables"]  # as a file written before the planner
    old = tmp_path / "before-planner.json"
    old.write_text(json.dumps(data))
    with caplog.at_level(logging.WARNING):
        result = _generate(builtin_generator, 50, CacheParams(speedup=2, calibration_file=str(old),
                                                              step_costs=PASSES_ONLY))
    _assert_budget(result, 50, 25, "magcache")
    warnings = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert len([w for w in warnings if "no planner calibration" in w]) == 1, warnings
    assert all("\n" not in w for w in warnings)


def test_calibrate_records_the_window_inner_products_and_the_sigmas(builtin_generator, tmp_path):
    from sglang.multimodal_gen.runtime.entrypoints.calibrate import calibrate

    steps = 20  # beyond CALIBRATION_WINDOW, so the rows stop growing
    output = tmp_path / "planner.json"
    calibrate(builtin_generator, [PROMPT], SamplingParams(num_inference_steps=steps, seed=0, **SMALL), output)
    saved = CalibrationResult.load(output)
    assert CALIBRATION_WINDOW < steps
    for name, branch in saved.branches.items():
        rows = branch.output_gram
        assert [len(row) for row in rows] == [min(t, CALIBRATION_WINDOW) + 1 for t in range(steps)], name
        # One prompt: its inner products divided by its mean |v_t|^2.
        assert np.mean([row[0] for row in rows]) == pytest.approx(1.0)
        assert all(row[0] > 0 for row in rows) and branch.gram == []
    assert len(saved.sigmas) == steps + 1 and saved.sigmas[-1] == 0.0
    assert all(a > b for a, b in zip(saved.sigmas, saved.sigmas[1:]))
    # With the step costs of this device.
    costs = saved.step_costs()
    assert costs is not None and costs.device == "cpu" and costs.step_tail > 0 and costs.embed_and_head > 0
    # The planner takes the fresh file at its own step count (13 passes: close enough to forecast).
    result = _generate(builtin_generator, steps, CacheParams(speedup=1.5, calibration_file=str(output),
                                                             step_costs=PASSES_ONLY), **SMALL)
    _assert_budget(result, steps, 13, "planner")
    assert result.cache.config.sigmas == saved.sigmas
    assert result.cache.config.gram_of == "outputs" and result.cache_stats.estimator == "fitted"


def test_calibrate_adds_planner_tables_that_requests_nearest_their_step_count_use(builtin_generator, tmp_path):
    """--planner-steps: the same prompts uncached at more step counts; a request plans from the
    table nearest its step count (by ratio), so 25 steps takes 30's, not 20's."""
    from sglang.multimodal_gen.runtime.entrypoints.calibrate import calibrate

    output = tmp_path / "tables.json"
    calibrate(builtin_generator, [PROMPT], SamplingParams(num_inference_steps=20, seed=0, **SMALL), output,
              planner_steps=[8, 30, 20, 8])
    saved = CalibrationResult.load(output)
    assert [t["num_inference_steps"] for t in saved.planner_tables] == [8, 30]  # 20 is the main run, 8 once
    for table in saved.planner_tables:
        n = table["num_inference_steps"]
        assert len(table["sigmas"]) == n + 1 and table["sigmas"][-1] == 0.0
        assert {b: len(rows) for b, rows in table["output_gram"].items()} == {COND: n, UNCOND: n}
    for steps, table_steps in [(8, 8), (12, 8), (20, 20), (25, 30), (30, 30), (50, 30)]:
        result = _generate(builtin_generator, steps, CacheParams(speedup=2, calibration_file=str(output),
                                                                 step_costs=PASSES_ONLY), **SMALL)
        _assert_budget(result, steps, budget_passes(steps, 2), "planner")
        assert len(result.cache.config.sigmas) == table_steps + 1, steps


def test_a_calibration_costs_only_the_recorded_runs(builtin_generator, tmp_path):
    """One uncached generation per prompt and table, plus one short uncached run timing the step
    costs (5 steps, stopped after denoising): no planned generation measures an estimator."""
    from sglang.multimodal_gen.runtime.entrypoints.calibrate import calibrate

    generations, measured = [], []
    generate, measure = builtin_generator.generate, builtin_generator.measure_step_costs

    def counted(params, *args, **kwargs):
        generations.append((params.num_inference_steps, params.cache.strategy))
        return generate(params, *args, **kwargs)

    def timed(params):
        measured.append(params.prompt)
        return measure(params)

    builtin_generator.generate, builtin_generator.measure_step_costs = counted, timed
    try:
        saved = calibrate(builtin_generator, [PROMPT, "a blue square"], SamplingParams(num_inference_steps=12, seed=0,
                          **SMALL), tmp_path / "p.json", planner_steps=[8])
    finally:
        del builtin_generator.generate, builtin_generator.measure_step_costs
    assert sorted(generations) == [(8, "none"), (8, "none"), (12, "none"), (12, "none")]
    assert measured == [PROMPT]
    assert saved.planner_estimator == {} and "estimator" not in saved.planner_tables[0]


def test_an_older_calibration_of_block_residuals_plans_with_the_estimator_it_measured(builtin_generator, tmp_path):
    """Files written before the outputs were recorded hold ``gram`` (block residuals) and a measured
    estimator per speedup: they still load and plan with that estimator; ``fitted`` is refused
    for them in one line naming `sglang calibrate`."""
    info = builtin_generator.pipeline.model_info
    data = json.loads(open(info.calibration_file).read())
    for branch in data["branches"].values():
        branch["gram"] = branch.pop("output_gram")
    for table in data["planner_tables"]:
        table["gram"] = table.pop("output_gram")
        table["estimator"] = {"1.5": "forecast1", "2": "reuse", "3": "blend"}
    data["planner_estimator"] = {"1.5": "forecast1", "2": "blend", "3": "reuse"}
    old = tmp_path / "blocks.json"
    old.write_text(json.dumps(data))
    for steps, speedup, expected in [(50, 2, "blend"), (50, 3, "reuse"), (20, 2, "reuse")]:
        result = _generate(builtin_generator, steps, CacheParams(speedup=speedup, calibration_file=str(old),
                                                                 step_costs=PASSES_ONLY), **SMALL)
        assert result.cache.config.gram_of == "blocks" and result.cache_stats.estimator == expected, steps
    with pytest.raises(CacheConfigError) as refused:
        _generate(builtin_generator, 50, CacheParams(speedup=2, estimator="fitted", calibration_file=str(old),
                                                     step_costs=PASSES_ONLY), **SMALL)
    assert "predates them" in str(refused.value) and "sglang calibrate" in str(refused.value)


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def test_cli_refuses_a_speedup_below_one_before_the_model_is_looked_at(tmp_path, capsys):
    from sglang.cli.main import main

    args = ["generate", "--model-path", str(tmp_path / "no-such-model"), "--prompt", "a cat", "--output-path",
            str(tmp_path / "x.mp4"), "--num-inference-steps", "4", "--cache-speedup", "0.5"]
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert "cache speedup must be a number >= 1" in line and "no-such-model" not in line


@pytest.mark.parametrize("value", ["1", "20,x", "0,30"])
def test_cli_refuses_bad_planner_steps_before_the_model_is_looked_at(tmp_path, capsys, value):
    from sglang.cli.main import main

    args = ["calibrate", "--model-path", str(tmp_path / "no-such-model"), "--prompt", "a cat", "--output",
            str(tmp_path / "c.json"), "--planner-steps", value]
    assert main(args) == 2
    line = _one_error_line(capsys)
    assert "--planner-steps must be comma-separated whole numbers >= 2" in line and "no-such-model" not in line


def test_cli_cache_speedup_runs_the_planner(tmp_path, capsys):
    from sglang.cli.main import main

    args = ["generate", "--prompt", PROMPT, "--output-path", str(tmp_path / "x.mp4"), "--height", "32", "--width",
            "48", "--num-frames", "5", "--num-inference-steps", "12", "--device", "cpu", "--cache-speedup", "3"]
    assert main(args) == 0
    out = capsys.readouterr().out
    from sglang.multimodal_gen.runtime.entrypoints.generator import BUILTIN_MODEL_PATH

    costs = CalibrationResult.load(BUILTIN_MODEL_PATH / "calibration.json").step_costs()
    passes = checked_budget_passes(12, 3, costs.skipped_step_cost(2, whole_model=True))
    assert f"planner: computed {passes} of 12 steps per branch" in out
    assert re.search(r"\(\d\.\d\dx measured, 3x asked\)", out), out


def test_a_model_without_calibration_falls_back_to_magcache_presets(wan_generator, caplog):
    """The tiny random Wan ships no calibration file: the speedup still holds, through MagCache's presets."""
    params = SamplingParams(prompt=PROMPT, seed=0, height=32, width=32, num_frames=5, num_inference_steps=12,
                            cache=CacheParams(speedup=3, step_costs=PASSES_ONLY))
    with caplog.at_level(logging.WARNING):
        result = wan_generator.generate(params)
    _assert_budget(result, 12, 4, "magcache")
    assert len([r for r in caplog.records if "no planner calibration" in r.getMessage()]) == 1


def test_a_calibration_made_in_another_dtype_has_its_step_costs_measured():
    """The shipped costs were timed in fp32; a bf16 generator of the same model measures its own
    (bf16 on a CPU shifts the shares: its matrix products are slower)."""
    from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator

    generator = DiffGenerator.from_pretrained(device="cpu", dtype="bfloat16")
    calibration = CalibrationResult.load(generator.pipeline.model_info.calibration_file)
    assert calibration.dtype == "float32" and calibration.step_costs().device == "cpu"
    costs = generator.prepare_step_costs()
    assert generator._measured_step_costs is costs and costs != calibration.step_costs()
    assert costs.device == "cpu" and costs.step_tail > 0


def _uncalibrated_builtin(tmp_path):
    """The built-in model's folder without its calibration, loaded."""
    import shutil

    from sglang.multimodal_gen.runtime.entrypoints.generator import BUILTIN_MODEL_PATH, DiffGenerator

    folder = tmp_path / "uncalibrated"
    shutil.copytree(BUILTIN_MODEL_PATH, folder)
    (folder / "calibration.json").unlink()
    config = json.loads((folder / "sglang_config.json").read_text())
    del config["cache_calibration_file"]
    (folder / "sglang_config.json").write_text(json.dumps(config))
    return DiffGenerator.from_pretrained(str(folder), device="cpu")


def test_a_request_the_model_refuses_is_refused_before_any_step_cost_measurement(tmp_path):
    """A measurement is a generation: a budgeted request with a size the model cannot take is
    refused in one line without one, and a valid one then measures."""
    generator = _uncalibrated_builtin(tmp_path)
    measured = []
    measure = generator.measure_step_costs
    generator.measure_step_costs = lambda params: measured.append(params) or measure(params)
    with pytest.raises(InvalidRequestError) as refused:
        generator.generate(SamplingParams(prompt=PROMPT, height=33, cache=CacheParams(speedup=2)))
    assert refused.value.param == "height" and measured == []
    _generate(generator, 12, CacheParams(strategy="even", speedup=2), **SMALL)
    assert len(measured) == 1


def test_without_recorded_step_costs_they_are_measured_once_and_planned_with(tmp_path):
    """The built-in model's folder without its calibration: the first budgeted request measures
    the step costs (5 uncached steps at the default size), later ones reuse them, and the budget
    counts them."""
    generator = _uncalibrated_builtin(tmp_path)
    assert generator.pipeline.model_info.calibration_file is None
    costs = generator.step_costs()
    assert costs.device == "cpu" and 0 < costs.step_tail < 5 and 0 < costs.embed_and_head < 1
    assert generator.step_costs() is costs
    result = _generate(generator, 12, CacheParams(strategy="even", speedup=2), **SMALL)
    # Measured costs: the runtime's rule (one pass fewer where the nearest count falls short).
    _assert_budget(result, 12, checked_budget_passes(12, 2, costs.skipped_step_cost(2, whole_model=False)), "even")


def test_the_uncached_estimate_stays_within_ten_percent_of_a_real_uncached_run(builtin_generator):
    """What `(N.NNx measured)` divides by: the cached run's denoising time plus its skipped passes
    at the typical pass time, against the denoising time of the same request run uncached.
    Fastest of 7 interleaved runs each, on one torch thread: this machine's wall clock varies by
    a quarter from run to run under load, and the fastest run is the one load touched least."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        estimates, uncached = [], []
        for _ in range(7):
            cached = _generate(builtin_generator, 30, CacheParams(speedup=2))
            estimates.append(cached.cache_stats.uncached_estimate_seconds)
            plain = builtin_generator.pipeline.run(SamplingParams(prompt=PROMPT, num_inference_steps=30),
                                                   stop_after="denoising")
            uncached.append(plain.timings["denoising"])
    finally:
        torch.set_num_threads(threads)
    assert abs(min(estimates) / min(uncached) - 1) <= 0.10, (estimates, uncached)
