"""Wan2.2 T2V-A14B's two experts against diffusers' own WanPipeline on a tiny two-expert folder:
the switch at the boundary timestep, each expert's guidance scale, defaults and refusals."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest
import torch
from conftest import TINY_REQUEST

from sglang.multimodal_gen.configs.models import WAN22_TWO_EXPERT_DEFAULTS, read_model_info
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.errors import InvalidRequestError, ModelNotFoundError

PROMPT = "a red circle moving left on a blue background"
NEGATIVE = "blurry, low quality"
# 6 steps: UniPC's timesteps 999 and 937 are >= 875 (high-noise expert), 857, 750, 600 and 376 are not.
REQUEST = {**{k: v for k, v in TINY_REQUEST.items() if k != "guidance_scale"}, "num_inference_steps": 6}


@pytest.fixture(scope="module")
def wan22_dir(tiny_wan22_dir):
    return tiny_wan22_dir


@pytest.fixture(scope="module")
def wan22_generators(wan22_dir):
    from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator

    return {dtype: DiffGenerator.from_pretrained(str(wan22_dir), device="cpu", dtype=dtype, batched_cfg=False)
            for dtype in ("float32", "bfloat16")}


def _diffusers(folder, dtype: str, seed: int, **call):
    from diffusers import AutoencoderKLWan, WanPipeline

    vae = AutoencoderKLWan.from_pretrained(folder / "vae", dtype=torch.float32)  # ours decodes in fp32 too
    pipe = WanPipeline.from_pretrained(folder, vae=vae, dtype=getattr(torch, dtype))
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompt=PROMPT, negative_prompt=NEGATIVE, generator=torch.Generator().manual_seed(seed),
                max_sequence_length=read_model_info(folder).text_max_length, **call)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("guidance", [{"guidance_scale": 4.0, "guidance_scale_2": 2.0}, {"guidance_scale": 4.0}])
def test_two_experts_equal_diffusers_wan_pipeline(wan22_dir, wan22_generators, dtype, guidance):
    """Latents and frames as diffusers' WanPipeline makes them, in fp32 and bf16; without
    guidance_scale_2 the low-noise expert takes guidance_scale, as there."""
    reference = _diffusers(wan22_dir, dtype, 7, output_type="np", **guidance, **REQUEST).frames[0]
    ours = wan22_generators[dtype].generate(SamplingParams(prompt=PROMPT, negative_prompt=NEGATIVE, seed=7,
                                                           **guidance, **REQUEST))
    assert ours.params.guidance_scale_2 == guidance.get("guidance_scale_2", 4.0)
    np.testing.assert_allclose(ours.frames, reference, rtol=1e-5, atol=1e-5)


def test_each_step_runs_the_expert_its_timestep_chooses(wan22_generators):
    """transformer for timesteps >= 0.875 * 1000, transformer_2 for the rest; the low-noise
    expert's guidance scale changes only the steps it runs."""
    generator = wan22_generators["float32"]
    pipeline = generator.pipeline
    calls = []
    hooks = [module.register_forward_pre_hook(lambda *_, name=name: calls.append(name))
             for name, module in (("high", pipeline.transformer.patch_embedding),
                                  ("low", pipeline.transformer_2.patch_embedding))]
    try:
        generator.generate(SamplingParams(prompt=PROMPT, negative_prompt=NEGATIVE, seed=1, **REQUEST))
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == ["high"] * 4 + ["low"] * 8  # two CFG passes per step
    base = SamplingParams(prompt=PROMPT, negative_prompt=NEGATIVE, seed=1, guidance_scale=4.0, **REQUEST)
    a = generator.generate(base)
    b = generator.generate(dataclasses.replace(base, guidance_scale_2=1.5))
    assert not torch.equal(a.latents, b.latents)


def test_a_two_expert_folder_takes_the_wan22_defaults(wan22_dir, wan22_generators):
    info = read_model_info(wan22_dir)
    assert info.two_experts and info.boundary_ratio == 0.875
    assert info.sampling_defaults == WAN22_TWO_EXPERT_DEFAULTS
    resolved = wan22_generators["float32"].validate(SamplingParams(prompt=PROMPT))
    assert (resolved.num_inference_steps, resolved.guidance_scale, resolved.guidance_scale_2) == (40, 4.0, 3.0)
    assert (resolved.width, resolved.height, resolved.num_frames, resolved.fps) == (1280, 720, 81, 16)


def test_guidance_scale_2_on_one_transformer_is_refused_naming_it(wan_generator):
    with pytest.raises(InvalidRequestError) as refused:
        wan_generator.generate(SamplingParams(prompt=PROMPT, guidance_scale_2=3.0, **REQUEST))
    assert refused.value.param == "guidance_scale_2" and "one transformer" in str(refused.value)
    with pytest.raises(InvalidRequestError) as negative:
        wan_generator.validate(SamplingParams(prompt=PROMPT, guidance_scale_2=-1.0))
    assert negative.value.param == "guidance_scale_2"


@pytest.mark.parametrize("change, fragment", [
    (lambda index: index.pop("transformer_2"), "sets boundary_ratio but names no transformer_2"),
    (lambda index: index.pop("boundary_ratio"), "its boundary_ratio is None"),
    (lambda index: index.update(boundary_ratio=1.5), "its boundary_ratio is 1.5"),
    (lambda index: index.update(expand_timesteps=True), "Wan2.2 TI2V-5B"),
])
def test_half_made_wan22_folders_are_refused_in_one_line(wan22_dir, tmp_path, change, fragment):
    folder = tmp_path / "folder"
    folder.mkdir()
    index = json.loads((wan22_dir / "model_index.json").read_text())
    change(index)
    (folder / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(ModelNotFoundError) as refused:
        read_model_info(folder)
    assert fragment in str(refused.value) and "\n" not in str(refused.value)


def test_a_wan21_index_with_diffusers_empty_optional_entries_is_one_transformer(tiny_wan_dir, tmp_path):
    """diffusers writes ``"transformer_2": [null, null]`` and ``"boundary_ratio": null`` for a
    Wan2.1 pipeline it saves: still one transformer."""
    folder = tmp_path / "wan21"
    shutil.copytree(tiny_wan_dir, folder)
    index = json.loads((folder / "model_index.json").read_text())
    index.update(transformer_2=[None, None], boundary_ratio=None, expand_timesteps=False)
    (folder / "model_index.json").write_text(json.dumps(index))
    assert not read_model_info(folder).two_experts


def test_cli_generates_with_guidance_scale_2(wan22_dir, tmp_path, capsys):
    from sglang.cli.main import main

    out = tmp_path / "two.npy"
    args = ["generate", "--model-path", str(wan22_dir), "--prompt", PROMPT, "--guidance-scale", "4",
            "--guidance-scale-2", "2.5", "--num-inference-steps", "4", "--height", "64", "--width", "48",
            "--num-frames", "5", "--output-path", str(out)]
    assert main(args) == 0
    assert np.load(out).shape == (5, 64, 48, 3)
