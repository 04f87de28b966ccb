"""Every user mistake of the `sglang` CLI exits 2 with one `error:` line, and what needs no model
is refused before the model is looked at.

The order is proven without mocks: such tests pass a --model-path that does not exist together
with the mistake, and the error must be about the mistake, not the missing model.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from sglang.cli.main import main
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.errors import InvalidRequestError
from sglang.multimodal_gen.runtime.utils.video_io import check_output_path

SMALL = ["--height", "32", "--width", "48", "--num-frames", "5", "--num-inference-steps", "2"]


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """The single non-empty stderr line, which must be an `error:` line."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(lines) == 1, lines
    assert lines[0].startswith("error: "), lines
    return lines[0]


def usage_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    """argparse's error: usage lines, then one `PROG: error: ...` line."""
    lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert lines and lines[0].startswith("usage: "), lines
    errors = [line for line in lines if ": error: " in line]
    assert errors == [lines[-1]], lines
    assert "Traceback" not in "\n".join(lines)
    return lines[-1]


@pytest.fixture
def missing_model(tmp_path: Path) -> str:
    return str(tmp_path / "no-such-model")


@pytest.fixture
def a_file(tmp_path: Path) -> Path:
    path = tmp_path / "afile"
    path.write_text("not a folder")
    return path


# ------------------------------------------------------------------------------ generate, before load
def _generate_cases(tmp_path: Path, a_file: Path) -> list[tuple[list[str], str]]:
    (tmp_path / "clip.mp4").mkdir()
    latin1 = tmp_path / "latin1.json"
    latin1.write_bytes(b'{"sqrt_ratios": true, "note": "caf\xe9"}')
    return [
        (["--output-path", str(a_file / "x.mp4")], f"{a_file} is a file, not a folder"),
        (["--output-path", str(a_file / "sub" / "x.npy")], f"{a_file} is a file, not a folder"),
        (["--output-path", str(tmp_path / "clip.gif")], "the output path must end in .mp4 or .npy"),
        (["--output-path", str(tmp_path / "clip.mp4")], "is a directory; give a file name"),
        (["--prompt", "caf\udce9 \udcff"], "prompt is not valid UTF-8: character 3 is the undecodable byte 0xe9"),
        (["--prompt", "a \ud800 cat"], "prompt is not valid UTF-8: character 2 is the lone surrogate U+D800"),
        (["--negative-prompt", "blurry \udcff"], "negative_prompt is not valid UTF-8"),
        (["--seed", str(2**64)], f"seed must be at most {2**64 - 1}"),
        (["--seed", "-1"], "seed must be an integer >= 0"),
        (["--guidance-scale", "nan"], "guidance_scale must be a number >= 0, got nan"),
        (["--num-inference-steps", "0"], "num_inference_steps must be an integer >= 1"),
        (["--fps", "0"], "fps must be an integer >= 1"),
        (["--dtype", "int8"], "unknown dtype 'int8'"),
        (["--device", "tpu"], "unknown device 'tpu'"),
        (["--cache", "magcache", "--cache-params", "{bad"], "--cache-params is not valid JSON"),
        (["--cache", "magcache", "--cache-params", str(latin1)], "is not UTF-8 text"),
        (["--cache", "magcache", "--cache-calibration", str(tmp_path / "nope.json")],
         f"calibration file {tmp_path / 'nope.json'} does not exist"),
        (["--cache", "magcache", "--cache-calibration", str(a_file)], "is not a calibration file"),
        (["--cache-calibration", str(a_file)], "cache settings ['calibration_file'] were given but the cache "
                                               "strategy is 'none'"),
        (["--cache", "easycache", "--cache-speedup", "2"],
         "easycache cannot be tuned to a speedup; use --cache-speedup without --cache (the planner)"),
        (["--output-path", str(tmp_path / "renders" / "outdir" / "video")],
         f"cannot write {tmp_path / 'renders' / 'outdir' / 'video'}: the output path must end in .mp4 or .npy"),
    ]


CASE_IDS = ["output-under-file", "output-under-file-deeper", "output-gif", "output-is-dir", "prompt-bytes",
            "prompt-surrogate", "negative-prompt-bytes", "seed-too-large", "seed-negative", "guidance-nan",
            "steps-0", "fps-0", "dtype", "device", "cache-params-json", "cache-params-latin1",
            "calibration-missing", "calibration-not-json", "calibration-without-cache", "easycache-speedup",
            "output-folder-kept"]


@pytest.mark.parametrize("index", range(len(CASE_IDS)), ids=CASE_IDS)
def test_generate_mistake_is_refused_before_the_model_is_looked_at(index, tmp_path, a_file, missing_model, capsys):
    extra, message = _generate_cases(tmp_path, a_file)[index]
    args = ["generate", "--model-path", missing_model, "--prompt", "a cat", "--output-path",
            str(tmp_path / "ok.mp4"), *SMALL, *extra]
    assert main(args) == 2
    line = one_error_line(capsys)
    assert message in line
    assert "no-such-model" not in line


def test_non_utf8_prompt_bytes_through_the_console_entry(tmp_path, missing_model):
    """Bytes argv as a shell passes it: Python keeps the undecodable bytes as lone surrogates."""
    env = {**os.environ, "PYTHONPATH": str(REPO / "python"), "PYTHONUTF8": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "sglang.cli.main", "generate", "--prompt", b"caf\xe9 \xff", "--model-path",
         missing_model, "--output-path", str(tmp_path / "x.mp4")],
        capture_output=True, env=env, timeout=120,
    )
    err = proc.stderr.decode("utf-8", "backslashreplace")
    assert proc.returncode == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("error: prompt is not valid UTF-8: character 3 is the undecodable byte 0xe9")
    assert not (tmp_path / "x.mp4").exists()


def test_non_utf8_prompt_with_a_real_model_is_one_line(tiny_wan_dir, tmp_path, capsys):
    """With a model that loads, the tokenizer would otherwise meet the surrogate (a TypeError)."""
    args = ["generate", "--model-path", str(tiny_wan_dir), "--prompt", "caf\udce9", "--output-path",
            str(tmp_path / "x.mp4"), *SMALL]
    assert main(args) == 2
    assert "prompt is not valid UTF-8" in one_error_line(capsys)


@pytest.mark.parametrize("field", ["prompt", "negative_prompt"])
def test_the_pipeline_refuses_non_utf8_text_naming_the_field(wan_generator, field):
    """What library users and the server get: the input validation stage itself refuses it."""
    params = SamplingParams(prompt="a cat", height=32, width=48, num_frames=5, num_inference_steps=2)
    setattr(params, field, "caf\udce9")
    with pytest.raises(InvalidRequestError, match=f"{field} is not valid UTF-8") as info:
        wan_generator.validate(params)
    assert info.value.param == field


def test_output_path_checks_let_through_what_can_be_written(tmp_path):
    existing = tmp_path / "old.mp4"
    existing.write_bytes(b"")
    assert check_output_path(str(existing)) == existing
    assert check_output_path(str(tmp_path / "new" / "deeper" / "x.NPY")).name == "x.NPY"
    assert not (tmp_path / "new").exists()  # checking creates nothing


@pytest.fixture
def unwritable_folder(tmp_path: Path):
    """A folder this user may not write in: a 0500 folder, or for root (whom modes do not stop)
    procfs's /proc/sys, which the kernel keeps unwritable even to root."""
    if hasattr(os, "geteuid") and os.geteuid() != 0:
        locked = tmp_path / "locked"
        locked.mkdir(mode=0o500)
        yield locked
        locked.chmod(0o700)
        return
    proc_sys = Path("/proc/sys")
    if not proc_sys.is_dir() or os.access(proc_sys, os.W_OK):
        pytest.skip("no folder here that this user cannot write in")
    yield proc_sys


def test_output_folder_that_is_not_writable(unwritable_folder, missing_model, capsys):
    """Checked with os.access, so it holds for permission bits and read-only mounts alike."""
    assert main(["generate", "--model-path", missing_model, "--prompt", "a cat", "--output-path",
                 str(unwritable_folder / "sub" / "x.mp4")]) == 2
    assert f"folder {unwritable_folder} is not writable" in one_error_line(capsys)


# ------------------------------------------------------------------------------ model folders
def test_model_folder_with_broken_sglang_config(tiny_wan_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_wan_dir, model)
    (model / "sglang_config.json").write_text("{bad")
    assert main(["generate", "--model-path", str(model), "--prompt", "a cat",
                 "--output-path", str(tmp_path / "x.mp4")]) == 2
    assert "sglang_config.json is not valid JSON" in one_error_line(capsys)


def test_model_folder_without_weights(tiny_wan_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_wan_dir, model)
    for weights in (model / "transformer").glob("*.safetensors"):
        weights.unlink()
    assert main(["generate", "--model-path", str(model), "--prompt", "a cat",
                 "--output-path", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    # diffusers may log its own warnings before giving up; ours is the one error line.
    assert len(errors) == 1 and "Traceback" not in err, err
    assert errors[0].startswith(f"error: cannot load the transformer of {model}")


def test_model_index_with_a_malformed_entry(tiny_wan_dir, tmp_path, capsys):
    model = tmp_path / "model"
    shutil.copytree(tiny_wan_dir, model)
    index = json.loads((model / "model_index.json").read_text())
    index["tokenizer"] = "AutoTokenizer"
    (model / "model_index.json").write_text(json.dumps(index))
    assert main(["generate", "--model-path", str(model), "--prompt", "a cat",
                 "--output-path", str(tmp_path / "x.mp4")]) == 2
    assert "tokenizer must be [library, class name]" in one_error_line(capsys)


def test_ulysses_degree_the_heads_refuse_starts_no_process(tiny_wan_dir, tmp_path, monkeypatch, capsys):
    """The degree is checked against transformer/config.json's heads (3 in the test's tiny Wan)
    before any worker process starts, as the other process-flag mistakes are."""
    from sglang.multimodal_gen.runtime.entrypoints import generator as generator_module

    def no_workers(*args, **kwargs):
        raise AssertionError("worker processes were started for a degree the heads refuse")

    monkeypatch.setattr(generator_module, "WorkerGroup", no_workers)
    assert main(["generate", "--model-path", str(tiny_wan_dir), "--prompt", "a cat", "--device", "cpu",
                 "--output-path", str(tmp_path / "x.mp4"), "--num-gpus", "2", "--ulysses-degree", "2", *SMALL]) == 2
    assert one_error_line(capsys) == ("error: --ulysses-degree 2 does not divide the 3 attention heads of this Wan "
                                      "transformer; use a degree that divides 3")


# ------------------------------------------------------------------------------ --log-level
def test_unknown_log_level_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as info:
        main(["--log-level", "verbose", "generate", "--prompt", "a cat"])
    assert info.value.code == 2
    assert "argument --log-level: invalid choice: 'verbose'" in usage_error_line(capsys)


def test_log_level_is_case_insensitive(missing_model, capsys):
    assert main(["--log-level", "DEBUG", "generate", "--model-path", missing_model, "--prompt", "a cat"]) == 2
    assert "does not exist" in capsys.readouterr().err  # parsed, then stopped at the missing model


def test_log_level_after_the_command(missing_model, capsys):
    assert main(["generate", "--log-level", "info", "--model-path", missing_model, "--prompt", "a cat"]) == 2
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------ --version, --help, hints
def test_version_is_one_line(capsys):
    import diffusers
    import torch
    import transformers

    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.splitlines() == [
        f"sglang 0.1.0 (torch {torch.__version__}, diffusers {diffusers.__version__}, "
        f"transformers {transformers.__version__})"]


def _help(command: str, capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as info:
        main([command, "--help"])
    assert info.value.code == 0
    return " ".join(capsys.readouterr().out.split())


def test_generate_help_lists_every_registered_strategy_and_the_defaults(capsys):
    from sglang.multimodal_gen.runtime.cache.registry import registered_caches

    text = _help("generate", capsys)
    assert f"--cache CACHE timestep cache strategy: none (the default), {', '.join(registered_caches())}" in text
    assert "easycache" in registered_caches()
    assert "disables CFG (default: the model's, e.g. 5.0 for Wan2.1)" in text
    assert "CFG branch (default: the model's; empty for Wan2.1 and HunyuanVideo)" in text


def test_calibrate_help_does_not_promise_an_mp4(capsys):
    text = _help("calibrate", capsys)
    assert "--fps FPS frames per second of the requests (model default); calibrate writes no video" in text
    assert "mp4" not in text


def test_an_uncached_hub_id_suggests_hf_download(monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network: the cache only
    assert main(["generate", "--model-path", "someone/nothing-here", "--prompt", "a cat"]) == 2
    assert "(e.g. `hf download someone/nothing-here --local-dir DIR`)" in one_error_line(capsys)


# ------------------------------------------------------------------------------ calibrate
def test_calibrate_output_that_cannot_be_written(a_file, missing_model, capsys):
    assert main(["calibrate", "--model-path", missing_model, "--prompt", "a cat",
                 "--output", str(a_file / "c.json")]) == 2
    assert f"cannot write calibration output {a_file / 'c.json'}: {a_file} is a file" in one_error_line(capsys)


def test_calibrate_output_must_be_json(tmp_path, missing_model, capsys):
    assert main(["calibrate", "--model-path", missing_model, "--prompt", "a cat",
                 "--output", str(tmp_path / "c.txt")]) == 2
    assert "must be a .json file" in one_error_line(capsys)


def test_calibrate_plot_path_taken_by_a_folder(tmp_path, missing_model, capsys):
    (tmp_path / "c.png").mkdir()
    assert main(["calibrate", "--model-path", missing_model, "--prompt", "a cat",
                 "--output", str(tmp_path / "c.json")]) == 2
    assert f"calibration plot {tmp_path / 'c.png'} is a directory" in one_error_line(capsys)


@pytest.mark.parametrize("extra, message", [
    (["--prompt", "ok", "--prompt", "caf\udcff"], "prompt is not valid UTF-8"),
    (["--prompt", "ok", "--prompt", "two", "--seed", str(2**64 - 1)], f"seed must be at most {2**64 - 1}, got {2**64}"),
    (["--prompt", "ok", "--device", "tpu"], "unknown device 'tpu'"),
    (["--prompts-file", "/no/such/prompts.txt"], "prompts file /no/such/prompts.txt does not exist"),
    ([], "give at least one --prompt or a --prompts-file"),
], ids=["prompt-bytes", "seed-of-second-prompt", "device", "prompts-file-missing", "no-prompt"])
def test_calibrate_mistake_is_refused_before_the_model_is_looked_at(tmp_path, missing_model, capsys, extra,
                                                                    message):
    assert main(["calibrate", "--model-path", missing_model, "--output", str(tmp_path / "c.json"), *extra]) == 2
    line = one_error_line(capsys)
    assert message in line and "no-such-model" not in line


@pytest.mark.parametrize("value, message", [
    ("-1", "count must be >= 0 (0: no growth measured), got -1"),
    ("two", "invalid count 'two'; use a whole number >= 0 (0: no growth measured)"),
])
def test_calibrate_growth_prompts_is_a_usage_error_before_the_model_loads(missing_model, capsys, value, message):
    with pytest.raises(SystemExit) as info:
        main(["calibrate", "--model-path", missing_model, "--prompt", "a cat", "--growth-prompts", value])
    assert info.value.code == 2
    assert f"argument --growth-prompts: {message}" in usage_error_line(capsys)


# ------------------------------------------------------------------------------ serve
def test_serve_port_out_of_range_is_a_usage_error(missing_model, capsys):
    with pytest.raises(SystemExit) as info:
        main(["serve", "--model-path", missing_model, "--port", "70000"])
    assert info.value.code == 2
    assert "argument --port: port 70000 is out of range" in usage_error_line(capsys)


def test_serve_taken_port_is_refused_before_the_model_is_looked_at(missing_model, capsys):
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        assert main(["serve", "--model-path", missing_model, "--port", str(port)]) == 2
    assert f"cannot listen on 127.0.0.1:{port}" in one_error_line(capsys)


def test_serve_unresolvable_host_is_refused_before_the_model_is_looked_at(missing_model, capsys):
    assert main(["serve", "--model-path", missing_model, "--host", "no such host!", "--port", "0"]) == 2
    assert "cannot resolve --host 'no such host!'" in one_error_line(capsys)


def test_serve_bad_calibration_is_refused_before_the_model_is_looked_at(a_file, missing_model, capsys):
    assert main(["serve", "--model-path", missing_model, "--port", "0", "--cache-calibration", str(a_file)]) == 2
    assert "is not a calibration file" in one_error_line(capsys)
