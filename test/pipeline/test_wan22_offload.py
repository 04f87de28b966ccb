"""``--offload-idle-expert``: on a tiny two-expert folder the experts trade places at the switch
(recorded as the moves ``ExpertOffload`` makes, on a CPU where a move changes nothing) and the
video is the one without it; refused in one line on a one-transformer folder; a no-op on a CPU."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import TINY_REQUEST

from sglang.cli.main import main
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.errors import UserError
from sglang.multimodal_gen.runtime.entrypoints import generator as generator_module
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator, denoising_stage
from sglang.multimodal_gen.runtime.models.experts import HIGH_NOISE, LOW_NOISE, ExpertOffload
from sglang.multimodal_gen.runtime.models.wan import WanDiTAdapter

PROMPT = "a red circle moving left on a blue background"
# 6 steps: UniPC's timesteps 999 and 937 are >= 875 (high-noise expert), the other four are not.
REQUEST = {**{k: v for k, v in TINY_REQUEST.items() if k != "guidance_scale"}, "num_inference_steps": 6}


def test_the_idle_expert_waits_on_the_host_and_the_video_is_the_same(tiny_wan22_dir, monkeypatch):
    """At load the low-noise expert goes to the host; at step 2 (the switch) the high-noise one
    leaves the device before the low-noise one enters, which only then makes its request
    constants; the next request starts by moving them back. The latents equal those of a
    generator that keeps both on the device."""
    events: list[tuple] = []
    for method, where in (("_offload", "host"), ("_load", "device")):
        def record(self, expert, original=getattr(ExpertOffload, method), where=where):
            events.append((expert, where))
            original(self, expert)

        monkeypatch.setattr(ExpertOffload, method, record)
    make_constants = WanDiTAdapter.request_constants

    def constants(self, *args, **kwargs):  # made from the expert's weights: only once it is on the device
        events.append(("constants", self.transformer))
        return make_constants(self, *args, **kwargs)

    monkeypatch.setattr(WanDiTAdapter, "request_constants", constants)
    plain = DiffGenerator.from_pretrained(str(tiny_wan22_dir), device="cpu")
    # On a CPU the generator turns the flag off; take its decision out to run the moves here.
    monkeypatch.setattr(generator_module, "resolve_offload_idle_expert", lambda requested, info, device: requested)
    offloading = DiffGenerator.from_pretrained(str(tiny_wan22_dir), device="cpu", offload_idle_expert=True)
    assert events == [(LOW_NOISE, "host")]
    pipeline = offloading.pipeline
    made = {HIGH_NOISE: ("constants", pipeline.transformer), LOW_NOISE: ("constants", pipeline.transformer_2)}
    assert denoising_stage(plain.pipeline).experts.offload is None

    def progress(done: int, total: int) -> None:
        events.append(("steps done", done))

    params = SamplingParams(prompt=PROMPT, seed=3, **REQUEST)
    expected = plain.generate(params).latents
    steps = [("steps done", done) for done in range(7)]
    switch = [(HIGH_NOISE, "host"), (LOW_NOISE, "device")]
    for back in ([], [(LOW_NOISE, "host"), (HIGH_NOISE, "device")]):  # the first request, then the next
        events.clear()
        assert torch.equal(offloading.generate(params, progress=progress).latents, expected)
        assert events == back + [made[HIGH_NOISE]] + steps[:3] + switch + [made[LOW_NOISE]] + steps[3:]
    assert denoising_stage(pipeline).experts.offload.on_device == {HIGH_NOISE: False, LOW_NOISE: True}


def test_one_transformer_is_refused_in_one_line(tiny_wan_dir, capsys):
    assert main(["generate", "--model-path", str(tiny_wan_dir), "--prompt", "a cat", "--offload-idle-expert"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: --offload-idle-expert needs a model with two experts")
    assert "has one transformer" in err and len(err.splitlines()) == 1


def test_the_cli_flag_reaches_the_generator_and_is_a_no_op_on_a_cpu(tiny_wan22_dir, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger=generator_module.__name__)
    out = tmp_path / "clip.mp4"
    assert main(["generate", "--model-path", str(tiny_wan22_dir), "--prompt", PROMPT, "--output-path", str(out),
                 "--height", "64", "--width", "48", "--num-frames", "5", "--num-inference-steps", "3",
                 "--offload-idle-expert"]) == 0
    assert out.stat().st_size > 0
    said = [r.getMessage() for r in caplog.records if "nothing on a CPU" in r.getMessage()]
    assert len(said) == 1 and said[0].startswith("--offload-idle-expert")


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["calibrate", "--prompt", "a cat"]])
def test_serve_and_calibrate_pass_the_flag_to_the_load(command, tiny_wan22_dir, tmp_path, monkeypatch):
    loads = []

    def load(*args, **kwargs):
        loads.append(kwargs)
        raise UserError("not loaded in this test")

    monkeypatch.setattr(DiffGenerator, "from_pretrained", load)
    where = (["--data-dir", str(tmp_path / "videos")] if command[0] == "serve"
             else ["--output", str(tmp_path / "calibration.json")])
    assert main([*command, "--model-path", str(tiny_wan22_dir), *where, "--offload-idle-expert"]) == 2
    assert loads == [{**loads[0], "offload_idle_expert": True}]
