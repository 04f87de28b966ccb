"""The reference-model training script, run for a few steps: it writes a pipeline the runtime loads.

The real run (docs/reference-model.md) takes most of an hour; here every phase runs a handful of
steps, which is enough to check the folder layout, the logged losses, and that reusing a VAE
(``--vae-from``) gives exactly the weights a full run gives.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors.torch import load_file

from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator
from sglang.multimodal_gen.tools import train_reference

SMOKE = ["--vae-steps", "3", "--vae-full-clips-from", "2", "--vae-batch", "2", "--num-videos", "16",
         "--dit-steps", "3", "--dit-batch", "2", "--dit-warmup", "1", "--log-every", "2"]


@pytest.fixture
def restore_threads():
    """The script sets torch's thread count for the whole process; give the rest of the suite its own back."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def test_few_step_training_writes_a_loadable_pipeline_and_reusing_its_vae_reproduces_it(tmp_path, caplog, restore_threads):
    caplog.set_level(logging.INFO, logger="train_reference")
    full = tmp_path / "full"
    assert train_reference.main(["--output", str(full), *SMOKE]) == 0
    assert "vae step 2/3 reconstruction loss" in caplog.text and "dit step 3/3 flow-matching loss" in caplog.text

    summary = json.loads((full / "training_summary.json").read_text())
    assert summary["config"]["dit_steps"] == 3 and summary["vae_from"] is None
    assert summary["vae_final_reconstruction_loss"] > 0 and summary["dit_final_flow_matching_loss"] > 0
    for component in ("scheduler", "text_encoder", "tokenizer", "transformer", "vae"):
        assert (full / component).is_dir(), component

    generator = DiffGenerator.from_pretrained(str(full), device="cpu")
    frames = generator.generate(SamplingParams(prompt="a red circle moving left on a blue background", seed=0,
                                               num_inference_steps=2)).frames
    assert frames.shape == (17, 64, 64, 3)

    resumed = tmp_path / "resumed"
    assert train_reference.main(["--output", str(resumed), "--vae-from", str(full / "vae"), *SMOKE]) == 0
    for component in ("transformer", "text_encoder"):
        (name,) = [p.name for p in (full / component).glob("*.safetensors")]
        ours, theirs = load_file(full / component / name), load_file(resumed / component / name)
        assert ours.keys() == theirs.keys()
        assert all(torch.equal(ours[k], theirs[k]) for k in ours), component


def test_reusing_a_folder_that_is_not_a_vae_fails_with_one_line(tmp_path, restore_threads):
    with pytest.raises(SystemExit, match="no config.json there; pass the vae/ folder of a finished run"):
        train_reference.main(["--output", str(tmp_path / "out"), "--vae-from", str(tmp_path), *SMOKE])
