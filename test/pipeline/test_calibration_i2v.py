"""`sglang calibrate` on the tiny Wan2.1 I2V folder: a prompts file of IMAGE_PATH<TAB>caption lines,
the file it writes driving a MagCache speedup, and the format's mistakes in one line each, before
the model loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sglang.cli.main import main
from sglang.multimodal_gen.runtime.cache.calibration import CalibrationResult
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator

SIZE = ["--height", "32", "--width", "48", "--num-frames", "5"]
STEPS = 6


def _write_image(path: Path, seed: int) -> Path:
    pixels = np.random.default_rng(seed).integers(0, 256, (40, 56, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return path


@pytest.fixture(scope="module")
def i2v_calibration(tiny_wan21_i2v_dir, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("i2v-calibration")
    (folder / "frames").mkdir()
    _write_image(folder / "frames" / "first.png", 1)
    second = _write_image(folder / "second.png", 2)
    prompts = folder / "prompts.txt"
    # A relative path is read from the prompts file's folder; an absolute one as it is.
    prompts.write_text("# image<TAB>caption\nframes/first.png\ta red circle moving left\n\n"
                       f"{second}\ta yellow square moving down\n")
    out = folder / "i2v.json"
    assert main(["calibrate", "--model-path", str(tiny_wan21_i2v_dir), "--prompts-file", str(prompts),
                 "--num-inference-steps", str(STEPS), "--output", str(out), *SIZE]) == 0
    return out


def test_calibration_of_an_i2v_model_has_both_branches_and_a_planner_table(i2v_calibration):
    result = CalibrationResult.load(i2v_calibration)
    assert result.num_prompts == 2 and result.num_inference_steps == STEPS and result.size == [5, 32, 48]
    assert set(result.branches) == {"cond", "uncond"}
    assert all(len(branch.mag_ratio) == STEPS for branch in result.branches.values())
    assert result.nearest_planner_table(STEPS)["gram_of"] == "outputs"
    assert result.skipped_step_cost["device"] == "cpu"


def test_i2v_calibration_drives_a_magcache_speedup(tiny_wan21_i2v_dir, i2v_calibration, tmp_path, capsys):
    # The budget is in time, by the file's step costs; timed ones may make 2x unreachable at 6 steps
    # (whole passes), so here a skipped step costs nothing and 2x is exactly half the passes.
    data = json.loads(i2v_calibration.read_text())
    data["skipped_step_cost"].update(embed_and_head=0.0, step_tail=0.0)
    calibration = tmp_path / "free-skips.json"
    calibration.write_text(json.dumps(data))
    image = _write_image(tmp_path / "frame.png", 3)
    out = tmp_path / "video.npy"
    assert main(["generate", "--model-path", str(tiny_wan21_i2v_dir), "--prompt", "a red circle", "--image",
                 str(image), "--num-inference-steps", str(STEPS), "--cache", "magcache", "--cache-calibration",
                 str(calibration), "--cache-speedup", "2", "--output-path", str(out), *SIZE]) == 0
    printed = capsys.readouterr().out
    assert f"magcache: computed {STEPS // 2} of {STEPS} steps per branch" in printed, printed
    assert "skipped steps: cond " in printed and np.load(out).shape[0] == 5


@pytest.fixture
def no_model_load(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("the model was loaded before the mistake was refused")

    monkeypatch.setattr(DiffGenerator, "from_pretrained", refuse)


def _calibrate_error(model: Path, tmp_path: Path, capsys, *extra: str) -> str:
    assert main(["calibrate", "--model-path", str(model), "--output", str(tmp_path / "c.json"), *extra]) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


@pytest.mark.parametrize("content, message", [
    ("ok.png\ta cat\na dog\n", "line 2 has no tab: an image-to-video model needs IMAGE_PATH<TAB>caption"),
    ("\n# comment\nmissing.png\ta cat\n", "line 3: image file {folder}/missing.png does not exist"),
    ("notes.txt\ta cat\n", "line 1: cannot read image {folder}/notes.txt: not an image format PIL reads"),
    ("ok.png\t\n", "line 1 has no caption after the tab"),
], ids=["no-tab", "missing-image", "not-an-image", "no-caption"])
def test_i2v_prompts_file_mistakes(tiny_wan21_i2v_dir, tmp_path, capsys, no_model_load, content, message):
    _write_image(tmp_path / "ok.png", 0)
    (tmp_path / "notes.txt").write_text("not an image")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(content)
    line = _calibrate_error(tiny_wan21_i2v_dir, tmp_path, capsys, "--prompts-file", str(prompts))
    assert f"prompts file {prompts} " in line and message.format(folder=tmp_path) in line


def test_tab_line_on_a_text_to_video_model(tiny_wan_dir, tmp_path, capsys, no_model_load):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\nframe.png\ta dog\n")
    line = _calibrate_error(tiny_wan_dir, tmp_path, capsys, "--prompts-file", str(prompts))
    assert f"prompts file {prompts} line 2 holds a tab" in line and "makes videos from text alone" in line


def test_prompt_and_image_flags(tiny_wan21_i2v_dir, tiny_wan_dir, tmp_path, capsys, no_model_load):
    image = str(_write_image(tmp_path / "ok.png", 0))
    assert "pass the image (--image PATH" in _calibrate_error(tiny_wan21_i2v_dir, tmp_path, capsys,
                                                              "--prompt", "a cat")
    assert "takes no image" in _calibrate_error(tiny_wan_dir, tmp_path, capsys, "--prompt", "a cat", "--image", image)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("ok.png\ta cat\n")
    assert "--image is the first frame of each --prompt" in _calibrate_error(
        tiny_wan21_i2v_dir, tmp_path, capsys, "--prompts-file", str(prompts), "--image", image)
