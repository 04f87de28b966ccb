"""The I2V fine-tuning script, run for a few steps: the new transformer starts as the T2V model
behaves, and the folder it writes is a Wan2.1 I2V folder the runtime runs from an image, with
held-out and calibration prompts in the ``IMAGE_PATH<TAB>caption`` format."""

from __future__ import annotations

import json

import torch
from PIL import Image

from sglang.multimodal_gen.configs.models import read_model_info
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator
from sglang.multimodal_gen.tools import train_i2v

SMOKE = ["--num-videos", "2", "--steps", "2", "--batch", "2", "--warmup", "1", "--log-every", "1"]


@torch.no_grad()
def test_the_new_transformer_starts_as_the_source_model():
    """Zero extra input channels and a zero image value projection: the source's velocity,
    whatever the condition and the image embedding."""
    cfg = train_i2v.I2VTrainConfig()
    source = train_i2v.load_source(cfg)
    model = train_i2v.i2v_transformer(source, cfg).eval()
    gen = torch.Generator().manual_seed(0)
    noisy = torch.randn(1, 16, 2, 4, 4, generator=gen)
    condition = torch.randn(1, 20, 2, 4, 4, generator=gen)
    text = train_i2v.pad_text(torch.randn(1, 32, 32, generator=gen))
    image = torch.randn(1, 17, 32, generator=gen)
    timestep = torch.tensor([500.0])
    expected = source.transformer.eval()(noisy, timestep, text, return_dict=False)[0]
    got = model(torch.cat([noisy, condition], dim=1), timestep, text, image, return_dict=False)[0]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_few_step_run_writes_an_i2v_folder_that_generates_from_an_image(tmp_path, restore_threads):
    out, checkpoint = tmp_path / "i2v", tmp_path / "checkpoint"
    args = ["--output", str(out), "--checkpoint-dir", str(checkpoint), "--checkpoint-every", "1", *SMOKE]
    assert train_i2v.main(args) == 0
    info = read_model_info(out)
    assert info.text_max_length == 512
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "WanImageToVideoPipeline"
    assert json.loads((out / "training_summary.json").read_text())["config"]["steps"] == 2
    calibration = (out / "calibration_prompts.txt").read_text().splitlines()
    lines = (out / "heldout_prompts.txt").read_text().splitlines()
    assert lines and calibration and not set(lines) & set(calibration)
    images = []
    for line in lines + calibration:
        path, tab, caption = line.partition("\t")
        assert tab and caption.strip() and (out / path).is_file()
        images.append(out / path)
    with Image.open(images[0]) as image:
        assert image.size == (64, 64)
    result = DiffGenerator.from_pretrained(str(out), device="cpu").generate(
        SamplingParams(prompt=lines[0].partition("\t")[2], image=str(images[0]), num_inference_steps=2,
                       height=32, width=32, num_frames=5))
    assert result.frames.shape[0] == 5
