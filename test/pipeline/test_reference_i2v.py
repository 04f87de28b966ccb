"""The built-in image-to-video model: loads by name as a Wan2.1 I2V folder with its calibration and
its held-out and calibration first frames (what it makes from them: test_input_reference.py over
the server, benchmark/frontier.py for caching)."""

from __future__ import annotations


from sglang.multimodal_gen.configs.models import read_model_info
from sglang.multimodal_gen.runtime.cache.calibration import CalibrationResult
from sglang.multimodal_gen.runtime.entrypoints.calibrate import read_prompt_lines, split_prompt_lines
from sglang.multimodal_gen.runtime.models.loader import resolve_model_path


def test_the_built_in_i2v_model_is_a_calibrated_i2v_folder_with_first_frames():
    folder = resolve_model_path("wan2.1-i2v-tiny")
    info = read_model_info(folder)
    assert info.image_to_video and info.diffusers_pipeline == "WanImageToVideoPipeline"
    calibration = CalibrationResult.load(folder / info.calibration_file)
    assert calibration.num_inference_steps == 50
    assert [table["num_inference_steps"] for table in calibration.planner_tables] == [20, 30]
    held_out, calibration_prompts = (split_prompt_lines(folder / name, read_prompt_lines(folder / name), "required")
                                     for name in ("heldout_prompts.txt", "calibration_prompts.txt"))
    assert len(held_out[0]) == 12 and len(calibration_prompts[0]) == 8
    assert not set(held_out[0]) & set(calibration_prompts[0])  # held-out captions were never trained on
    assert sum(f.stat().st_size for f in folder.rglob("*") if f.is_file()) < 30 * 2**20

