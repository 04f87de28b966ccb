"""Wan2.2's two experts on two processes (CFG parallel): each rank runs its branch on the expert
the step's timestep chooses, with that expert's guidance scale. Its own module: one worker group
per process, and test_cfg_parallel.py keeps another alive for its whole module."""

from __future__ import annotations

import torch
from conftest import TINY_REQUEST

from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator

PROMPT = "a red circle moving left on a blue background"
REQUEST = {k: v for k, v in TINY_REQUEST.items() if k != "guidance_scale"}


def test_cfg_parallel_runs_both_experts_of_a_wan22_folder_as_one_process(tiny_wan22_dir):
    params = SamplingParams(prompt=PROMPT, negative_prompt="blurry", seed=5, guidance_scale=4.0,
                            guidance_scale_2=2.0, **REQUEST)
    single = DiffGenerator.from_pretrained(str(tiny_wan22_dir), device="cpu", batched_cfg=False).generate(params)
    group = DiffGenerator.from_pretrained(str(tiny_wan22_dir), device="cpu", num_gpus=2, enable_cfg_parallel=True,
                                          dist_timeout_s=60)
    try:
        parallel = group.generate(params)
    finally:
        group.close()
    assert torch.equal(parallel.latents, single.latents)
    assert [(r["rank"], r["cfg_rank"]) for r in parallel.rank_reports] == [(0, 0), (1, 1)]

