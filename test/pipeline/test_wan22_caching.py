"""Caching a Wan2.2 two-expert folder: per-expert state (the switch is always computed), per-expert
calibration with `sglang calibrate`, every strategy and the planner's one budget on it."""

from __future__ import annotations

import json

import pytest

from sglang.cli.main import main
from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.errors import InvalidRequestError
from sglang.multimodal_gen.runtime.cache import StepFeatures, TimestepCache
from sglang.multimodal_gen.runtime.cache.budget import checked_budget_passes
from sglang.multimodal_gen.runtime.cache.calibration import CalibrationResult
from sglang.multimodal_gen.runtime.cache.registry import _REGISTRY, register_cache

pytestmark = pytest.mark.filterwarnings("ignore:Polyfit may be poorly conditioned")

PROMPTS = ["a red circle moving left on a blue background", "a yellow square moving down on a green background"]
SIZE = dict(height=32, width=32, num_frames=5)
STEPS = 12


@pytest.fixture(scope="module")
def generator(tiny_wan22_dir):
    from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator

    return DiffGenerator.from_pretrained(str(tiny_wan22_dir), device="cpu", batched_cfg=False)


@pytest.fixture(scope="module")
def switch_step(generator) -> int:
    """The first low-noise step of a ``STEPS``-step request."""
    return generator.pipeline.expert_schedule(STEPS).index("low_noise")


@pytest.fixture(scope="module")
def calibration_file(tiny_wan22_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("wan22-calibration") / "experts.json"
    args = ["calibrate", "--model-path", str(tiny_wan22_dir), "--num-inference-steps", str(STEPS), "--seed", "3",
            "--height", "32", "--width", "32", "--num-frames", "5", "--planner-steps", "8", "--output", str(out)]
    for prompt in PROMPTS:
        args += ["--prompt", prompt]
    assert main(args) == 0
    return out


def request(cache: CacheParams, steps: int = STEPS) -> SamplingParams:
    return SamplingParams(prompt="a green triangle moving up", seed=5, num_inference_steps=steps, cache=cache, **SIZE)


class SkipsWheneverItMay(TimestepCache):
    name = "skips-whenever-it-may"

    def _decide(self, step: int, branch: str, features: StepFeatures) -> bool:
        return False


def test_the_step_after_the_switch_is_computed(generator, switch_step):
    """A strategy that would skip every step computes only the first step of each expert."""
    register_cache(SkipsWheneverItMay)
    try:
        stats = generator.generate(request(CacheParams(strategy=SkipsWheneverItMay.name))).cache_stats
    finally:
        _REGISTRY.unregister(SkipsWheneverItMay.name)
    for branch in stats.branches.values():
        assert branch.computed_steps == [0, switch_step]
    assert stats.summary().startswith(f"{SkipsWheneverItMay.name}: high-noise computed 1 of {switch_step}, "
                                      f"low-noise 1 of {STEPS - switch_step} steps per branch")


def test_calibration_is_recorded_per_expert(calibration_file, switch_step):
    result = CalibrationResult.load(calibration_file)
    assert result.branches == {} and list(result.experts) == ["high_noise", "low_noise"]
    high, low = result.experts["high_noise"], result.experts["low_noise"]
    assert (high.num_inference_steps, low.num_inference_steps) == (switch_step, STEPS - switch_step)
    assert high.sigmas[-1] == low.sigmas[0] and low.sigmas[-1] == 0.0  # the high expert hands over mid-schedule
    for part in (high, low):
        assert set(part.branches) == {"cond", "uncond"} and len(part.teacache_coefficients) == 5
        assert part.branches["cond"].mag_ratio[0] == 1.0  # nothing compared across the switch
        assert [t["num_inference_steps"] for t in part.planner_tables] == [len(part.planner_tables[0]["sigmas"]) - 1]
    assert result.skipped_step_cost["device"] == "cpu"
    assert calibration_file.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("cache", [
    CacheParams(strategy="magcache"),
    CacheParams(strategy="teacache", threshold=0.3),
    CacheParams(strategy="easycache", threshold=0.3),
    CacheParams(strategy="magcache", speedup=2.0),
])
def test_strategies_run_per_expert_with_the_calibration(generator, calibration_file, switch_step, cache):
    cache.calibration_file = str(calibration_file)
    stats = generator.generate(request(cache)).cache_stats
    assert stats.step_experts == generator.pipeline.expert_schedule(STEPS)
    for branch in stats.branches.values():
        assert 0 in branch.computed_steps and switch_step in branch.computed_steps
    assert "high-noise computed" in stats.summary() and set(stats.to_dict()["experts"]) == {"high_noise", "low_noise"}


@pytest.mark.parametrize("steps", [STEPS, 8, 16])
def test_the_planner_spends_one_budget_across_the_experts(generator, calibration_file, steps):
    cache = CacheParams(speedup=2.0, calibration_file=str(calibration_file))
    result = generator.generate(request(cache, steps))
    stats = result.cache_stats
    experts = stats.to_dict()["experts"]
    passes = [experts[e]["branches"]["cond"]["computed"] for e in ("high_noise", "low_noise")]
    costs = result.params.cache.step_costs
    budget = checked_budget_passes(steps, 2.0, costs.skipped_step_cost(2, whole_model=True))
    assert all(p >= 1 for p in passes) and sum(passes) == stats.branches["cond"].num_computed == budget


def test_a_strategy_that_needs_a_calibration_is_refused_without_one(generator):
    for cache, flag in ((CacheParams(strategy="magcache"), "--cache magcache"), (CacheParams(speedup=2.0), "--cache-speedup")):
        with pytest.raises(InvalidRequestError) as refused:
            generator.generate(request(cache))
        message = str(refused.value)
        assert message.startswith(flag) and "sglang calibrate" in message and "--cache easycache" in message
        assert refused.value.param == "cache_calibration" and "\n" not in message


def test_calibrations_of_the_other_kind_are_refused(generator, wan_generator, calibration_file, tmp_path):
    one_transformer = tmp_path / "one.json"
    data = json.loads(calibration_file.read_text())
    part = data["experts"]["high_noise"]
    one = {**data, **{k: part[k] for k in ("branches", "num_inference_steps", "sigmas", "planner_tables")},
           "experts": {}}
    one_transformer.write_text(json.dumps(one))
    with pytest.raises(InvalidRequestError, match="with one transformer, unlike this one"):
        generator.generate(request(CacheParams(strategy="magcache", calibration_file=str(one_transformer))))
    with pytest.raises(InvalidRequestError, match="with several experts, unlike this one"):
        wan_generator.generate(SamplingParams(prompt="a cat", num_inference_steps=6, **SIZE, cache=CacheParams(
            strategy="magcache", calibration_file=str(calibration_file))))


def test_cli_summary_reports_per_expert(tiny_wan22_dir, tmp_path, capsys):
    args = ["generate", "--model-path", str(tiny_wan22_dir), "--prompt", PROMPTS[0], "--num-inference-steps", "6",
            "--height", "32", "--width", "32", "--num-frames", "5", "--cache", "easycache",
            "--output", str(tmp_path / "v.mp4")]
    assert main(args) == 0
    assert "easycache: high-noise computed" in capsys.readouterr().out
