"""The two-expert fine-tuning script, run for a few steps: each expert trains on its side of the
boundary only, and the folder it writes is a Wan2.2 two-expert folder the runtime runs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from sglang.multimodal_gen.configs.models import read_model_info
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator
from sglang.multimodal_gen.tools import train_experts

SMOKE = ["--num-videos", "4", "--steps", "2", "--batch", "2", "--warmup", "1", "--log-every", "1"]


@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_each_expert_draws_noise_levels_on_its_side_of_the_boundary(shift):
    gen = torch.Generator().manual_seed(0)
    high = train_experts.expert_sigmas("high_noise", 4000, gen, 0.875, shift)
    low = train_experts.expert_sigmas("low_noise", 4000, gen, 0.875, shift)
    assert high.min() >= 0.875 - 1e-6 and low.max() < 0.875 and low.min() >= 0.0 and high.max() <= 1.0
    assert train_experts.shifted_sigmas(torch.tensor(train_experts.boundary_quantile(0.875, shift)), shift) == \
        pytest.approx(0.875)


def test_few_step_fine_tuning_writes_a_two_expert_folder_that_runs(tmp_path, restore_threads):
    out, checkpoint = tmp_path / "experts", tmp_path / "checkpoint"
    args = ["--output", str(out), "--checkpoint-dir", str(checkpoint), "--checkpoint-every", "1", *SMOKE]
    assert train_experts.main(args) == 0
    info = read_model_info(out)
    assert info.two_experts and info.boundary_ratio == 0.875
    high, low = (load_file(out / folder / "diffusion_pytorch_model.safetensors") for folder in ("transformer", "transformer_2"))
    assert any(not torch.equal(high[name], low[name]) for name in high)
    summary = json.loads((out / "training_summary.json").read_text())
    assert set(summary["experts"]) == {"high_noise", "low_noise"} and summary["config"]["steps"] == 2
    # A finished run's checkpoint gives the same experts again without training.
    again = tmp_path / "again"
    assert train_experts.main([*args[:1], str(again), *args[2:], "--resume"]) == 0
    assert torch.equal(load_file(again / "transformer_2" / "diffusion_pytorch_model.safetensors")["proj_out.weight"],
                       low["proj_out.weight"])
    result = DiffGenerator.from_pretrained(str(out), device="cpu").generate(
        SamplingParams(prompt="a red square", num_inference_steps=4, height=32, width=32, num_frames=5))
    assert result.frames.shape[0] == 5


def test_a_source_with_two_experts_is_refused(tiny_wan22_dir, tmp_path):
    with pytest.raises(SystemExit, match="not a one-transformer Wan folder"):
        train_experts.main(["--output", str(tmp_path / "x"), "--source", str(tiny_wan22_dir), *SMOKE])
