"""The built-in two-expert model: loads by name as a Wan2.2 folder with its per-expert calibration."""

from __future__ import annotations

from sglang.multimodal_gen.configs.models import read_model_info
from sglang.multimodal_gen.runtime.cache.calibration import CalibrationResult
from sglang.multimodal_gen.runtime.models.loader import resolve_model_path


def test_the_built_in_two_expert_model_is_a_calibrated_wan22_folder():
    folder = resolve_model_path("wan2.2-t2v-tiny")
    info = read_model_info(folder)
    assert info.two_experts and info.boundary_ratio == 0.875
    assert (info.sampling_defaults["num_inference_steps"], info.sampling_defaults["guidance_scale_2"]) == (40, 8.0)
    calibration = CalibrationResult.load(folder / info.calibration_file)
    assert {e: p.num_inference_steps for e, p in calibration.experts.items()} == {"high_noise": 13, "low_noise": 27}
    assert all(len(p.planner_tables) == 3 for p in calibration.experts.values())
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 30 * 2**20
