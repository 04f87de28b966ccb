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

SMOKE = ["--vae-steps", "3", "--vae-full-clips-from", "2", "--vae-batch", "2", "--num-videos", "4",
         "--dit-steps", "3", "--dit-batch", "2", "--dit-warmup", "1", "--log-every", "2"]


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


HUNYUAN_SMOKE = ["--architecture", "hunyuan", "--vae-steps", "2", "--vae-full-clips-from", "1", "--vae-batch", "2",
                 "--num-videos", "4", "--dit-steps", "2", "--dit-batch", "2", "--dit-warmup", "1",
                 "--distill-steps", "2", "--log-every", "1"]


def _weights(folder) -> dict[str, dict[str, torch.Tensor]]:
    return {str(f.relative_to(folder)): load_file(f) for f in sorted(folder.rglob("*.safetensors"))}


def test_hunyuan_training_is_reproducible_and_writes_a_distilled_pipeline(tmp_path, caplog, restore_threads):
    """Two few-step runs of the same command give the same weights in every component, and so does a
    run reusing the first one's VAE; the result loads as a HunyuanVideo pipeline with its guidance embedded."""
    caplog.set_level(logging.INFO, logger="train_reference")
    first, second, resumed = tmp_path / "first", tmp_path / "second", tmp_path / "resumed"
    assert train_reference.main(["--output", str(first), *HUNYUAN_SMOKE]) == 0
    assert "distill step 2/2 guidance-distillation loss" in caplog.text
    assert train_reference.main(["--output", str(second), *HUNYUAN_SMOKE]) == 0
    assert train_reference.main(["--output", str(resumed), "--vae-from", str(first / "vae"), *HUNYUAN_SMOKE]) == 0

    ours = _weights(first)
    assert {name.split("/")[0] for name in ours} == {"text_encoder", "text_encoder_2", "transformer", "vae"}
    for other in (_weights(second), _weights(resumed)):
        assert ours.keys() == other.keys()
        for name, tensors in ours.items():
            assert all(torch.equal(tensors[k], other[name][k]) for k in tensors), name

    summary = json.loads((first / "training_summary.json").read_text())
    assert summary["architecture"] == "hunyuan" and summary["distill_final_loss"] > 0
    config = json.loads((first / "sglang_config.json").read_text())
    assert config["text_max_length"] == 16 and config["sampling_defaults"]["guidance_scale"] == 2.0
    generator = DiffGenerator.from_pretrained(str(first), device="cpu")
    assert generator.pipeline.model_info.family.name == "hunyuan"
    frames = generator.generate(SamplingParams(prompt="a red circle moving left on a blue background", seed=0,
                                               num_inference_steps=2)).frames
    assert frames.shape == (17, 64, 64, 3)


def test_distilling_guidance_of_a_cfg_model_is_refused(tmp_path, restore_threads):
    with pytest.raises(SystemExit, match="wan runs classifier-free guidance, it has no guidance input to distill"):
        train_reference.main(["--output", str(tmp_path / "out"), "--distill-steps", "5", *SMOKE])


def test_a_vae_of_the_other_architecture_is_refused_with_one_line(tmp_path, restore_threads):
    from sglang.multimodal_gen.tools.reference_architectures import WanArchitecture

    WanArchitecture().new_vae(16).save_pretrained(tmp_path / "wan-vae")
    with pytest.raises(SystemExit, match="not a hunyuan VAE"):
        train_reference.main(["--output", str(tmp_path / "out"), "--vae-from", str(tmp_path / "wan-vae"), *HUNYUAN_SMOKE])


def test_a_stopped_and_resumed_run_gives_the_weights_of_an_uninterrupted_one(tmp_path, caplog, restore_threads):
    """Hard world, few steps: stopping after transformer step 2 and resuming in a new call of the
    script reproduces every weight of the run that never stopped; the result ships its held-out captions."""
    from sglang.multimodal_gen.runtime.models.loader import BUILTIN_MODELS_DIR

    caplog.set_level(logging.INFO, logger="train_reference")
    hard = ["--world", "hard", "--vae-from", str(BUILTIN_MODELS_DIR / "wan2.1-t2v-tiny" / "vae"), "--num-videos", "4",
            "--dit-steps", "4", "--dit-batch", "2", "--dit-warmup", "1", "--log-every", "2"]
    whole, split, checkpoints = tmp_path / "whole", tmp_path / "split", tmp_path / "checkpoints"
    assert train_reference.main(["--output", str(whole), *hard]) == 0
    assert train_reference.main(["--output", str(split), "--checkpoint-dir", str(checkpoints), "--stop-after-steps", "2", *hard]) == 0
    assert "stopped after dit step 2" in caplog.text and not (split / "transformer").exists()
    with pytest.raises(SystemExit, match="holds a run already; pass --resume"):
        train_reference.main(["--output", str(split), "--checkpoint-dir", str(checkpoints), *hard])
    with pytest.raises(SystemExit, match=r"holds a run with other settings \(dit_steps\)"):
        train_reference.main(["--output", str(split), "--checkpoint-dir", str(checkpoints), "--resume", *hard, "--dit-steps", "5"])
    assert train_reference.main(["--output", str(split), "--checkpoint-dir", str(checkpoints), "--resume", *hard]) == 0
    assert "dit: resuming at step 2/4" in caplog.text

    ours, theirs = _weights(whole), _weights(split)
    assert ours.keys() == theirs.keys() and len(ours) == 3
    for name, tensors in ours.items():
        assert all(torch.equal(tensors[k], theirs[name][k]) for k in tensors), name
    assert json.loads((split / "vae" / "config.json").read_text())["latents_std"] == \
        json.loads((whole / "vae" / "config.json").read_text())["latents_std"]
    held_out = (whole / "heldout_prompts.txt").read_text().splitlines()
    assert len(held_out) == 12 and held_out[0] == "a red circle moving left on a green background"
    assert json.loads((whole / "training_summary.json").read_text())["config"]["world"] == "hard"


def test_resume_without_a_checkpoint_folder_is_refused_with_one_line(tmp_path, restore_threads):
    with pytest.raises(SystemExit, match="--resume and --stop-after-steps need --checkpoint-dir"):
        train_reference.main(["--output", str(tmp_path / "out"), "--resume", *SMOKE])
    with pytest.raises(SystemExit, match="no checkpoint in"):
        train_reference.main(["--output", str(tmp_path / "out"), "--checkpoint-dir", str(tmp_path / "none"), "--resume", *SMOKE])
