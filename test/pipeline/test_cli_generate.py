"""`sglang generate`: real files written and read back, and one clear line for every bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import imageio.v3 as iio
import numpy as np
import pytest
from conftest import REPO

from sglang.cli.main import main

SMALL = ["--height", "32", "--width", "48", "--num-frames", "5", "--num-inference-steps", "3"]


def test_generate_writes_mp4_with_requested_frames_and_size(tiny_wan_dir, tmp_path, capsys):
    out = tmp_path / "clip.mp4"
    code = main(["generate", "--model-path", str(tiny_wan_dir), "--prompt", "a red circle", "--output-path",
                 str(out), "--fps", "4", *SMALL])
    assert code == 0
    printed = capsys.readouterr().out
    assert f"saved {out}" in printed and "denoising" in printed and "decoding" in printed
    frames = iio.imread(out, index=None)
    assert frames.shape == (5, 32, 48, 3)
    assert frames.dtype == np.uint8
    assert iio.immeta(out)["fps"] == 4


def test_generate_npy_is_lossless_float_frames(tiny_wan_dir, wan_generator, tmp_path):
    from sglang.multimodal_gen.configs.sampling_params import SamplingParams

    out = tmp_path / "clip.npy"
    # Two CFG passes, as the wan_generator fixture runs them, so the videos must be equal bit for bit.
    assert main(["generate", "--model-path", str(tiny_wan_dir), "--prompt", "a red circle", "--seed", "5",
                 "--output-path", str(out), "--no-batched-cfg", *SMALL]) == 0
    saved = np.load(out)
    assert saved.shape == (5, 32, 48, 3) and saved.dtype == np.float32
    assert 0.0 <= saved.min() and saved.max() <= 1.0
    direct = wan_generator.generate(
        SamplingParams(prompt="a red circle", seed=5, height=32, width=48, num_frames=5, num_inference_steps=3)
    )
    np.testing.assert_array_equal(saved, direct.frames)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--height", "40"], "height 40 is not a multiple of 16"),
        (["--width", "50"], "width 50 is not a multiple of 16"),
        (["--num-frames", "6"], "num_frames 6 cannot be taken by the VAE: it must be 4k+1"),
        (["--prompt", "   "], "the prompt is empty"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--device", "cuda"], "CUDA is not available"),
        (["--num-inference-steps", "0"], "num_inference_steps must be an integer >= 1"),
        (["--output-path", "clip.gif"], "output path must end in .mp4 or .npy"),
        (["--dtype", "int8"], "unknown dtype 'int8'"),
    ],
)
def test_bad_input_exits_nonzero_with_one_line(tiny_wan_dir, capsys, extra, message):
    args = ["generate", "--model-path", str(tiny_wan_dir), "--prompt", "a cat", *SMALL, *extra]
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert err.startswith("error: ") and message in err
    assert "Traceback" not in err and len(err.splitlines()) == 1


def test_missing_model_folder_and_offline_hub_id(tmp_path, capsys):
    assert main(["generate", "--model-path", str(tmp_path / "nope"), "--prompt", "a cat"]) == 2
    assert "does not exist" in capsys.readouterr().err
    not_a_model = tmp_path / "empty"
    not_a_model.mkdir()
    assert main(["generate", "--model-path", str(not_a_model), "--prompt", "a cat"]) == 2
    assert "no model_index.json" in capsys.readouterr().err
    assert main(["generate", "--model-path", "Wan-AI/Wan2.1-T2V-1.3B-Diffusers", "--prompt", "a cat"]) == 2
    err = capsys.readouterr().err.strip()
    assert "could not find 'Wan-AI/Wan2.1-T2V-1.3B-Diffusers'" in err and "--model-path DIR" in err
    assert len(err.splitlines()) == 1


def test_a_built_in_model_is_chosen_by_its_folder_name_and_a_wrong_name_lists_them(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no local folder of that name: the built-in one is meant
    out = tmp_path / "hunyuan.npy"
    assert main(["generate", "--model-path", "hunyuanvideo-t2v-tiny", "--prompt", "a red circle moving left on a "
                 "blue background", "--num-inference-steps", "2", "--output-path", str(out)]) == 0
    assert np.load(out).shape == (17, 64, 64, 3)
    capsys.readouterr()
    assert main(["generate", "--model-path", "hunyuan-tiny", "--prompt", "a cat"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("error: model folder hunyuan-tiny does not exist "
                   "(built-in models: hunyuanvideo-t2v-tiny, wan2.1-i2v-tiny, wan2.1-t2v-tiny, wan2.1-t2v-tiny-hard, "
                   "wan2.2-t2v-tiny)")


def test_console_script_runs_builtin_model(tmp_path):
    """The installed entry point, on the built-in default model, as the README runs it."""
    out = tmp_path / "builtin.mp4"
    env = {**os.environ, "PYTHONPATH": str(REPO / "python")}
    proc = subprocess.run(
        [sys.executable, "-m", "sglang.cli.main", "generate", "--prompt", "a red circle moving left",
         "--num-inference-steps", "4", "--output-path", str(out)],
        capture_output=True, text=True, env=env, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert iio.imread(out, index=None).ndim == 4


def test_cache_estimator_flag_and_cache_params_key(tiny_wan_dir, tmp_path, capsys):
    """--cache-estimator and "estimator" in --cache-params give the same video; the estimator and
    its history memory are printed after the skipped steps (not for the default reuse)."""
    common = ["generate", "--model-path", str(tiny_wan_dir), "--prompt", "a red circle", "--height", "32",
              "--width", "48", "--num-frames", "5", "--num-inference-steps", "8", "--cache", "magcache",
              "--cache-threshold", "0.5", "--cache-max-skip-steps", "3"]
    flag, key, plain = tmp_path / "flag.npy", tmp_path / "key.npy", tmp_path / "plain.npy"
    assert main([*common, "--cache-estimator", "forecast2_sigma", "--output-path", str(flag)]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[-2].startswith("  estimator forecast2_sigma, history ") and printed[-2].endswith(" MiB")
    assert printed[-3].startswith("  skipped steps: ")
    assert main([*common, "--cache-params", '{"estimator": "forecast2_sigma"}', "--output-path", str(key)]) == 0
    capsys.readouterr()
    assert main([*common, "--output-path", str(plain)]) == 0
    assert not any(line.startswith("  estimator") for line in capsys.readouterr().out.splitlines())
    np.testing.assert_array_equal(np.load(flag), np.load(key))
    assert not np.array_equal(np.load(flag), np.load(plain))
