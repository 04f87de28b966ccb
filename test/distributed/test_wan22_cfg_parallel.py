"""Wan2.2's two experts on two processes: CFG parallel (each rank runs its branch on the expert the
step's timestep chooses, with that expert's guidance scale) and Ulysses, uncached and with a cache
kept per expert, give the one-process video and per-expert decisions. Its own module: one worker
group per process, and test_cfg_parallel.py keeps another alive for its whole module."""

from __future__ import annotations

import pytest
import torch
from conftest import TINY_REQUEST

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator

PROMPT = "a red circle moving left on a blue background"
REQUEST = {**{k: v for k, v in TINY_REQUEST.items() if k != "guidance_scale"}, "num_inference_steps": 6}
# Every other step of each expert after its first (random weights give EasyCache nothing to skip).
EVERY_OTHER = CacheParams(strategy="even", retention_ratio=0.0)


@pytest.fixture(scope="module")
def wan22_dir(tmp_path_factory):
    """The tiny two-expert folder with 4 heads (Ulysses over 2 ranks needs an even count)."""
    from sglang.multimodal_gen.tools.tiny_models import (
        WAN_COMPONENTS,
        build_tiny_wan,
        save_low_noise_expert,
        write_model_index,
    )

    folder = build_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-wan22-4heads", seed=0,
                            transformer_config={"num_attention_heads": 4, "attention_head_dim": 16})
    save_low_noise_expert(folder, seed=0)
    write_model_index(folder, components={**WAN_COMPONENTS, "transformer_2": ["diffusers", "WanTransformer3DModel"]},
                      extra={"boundary_ratio": 0.875})
    return folder


@pytest.fixture(scope="module")
def references(wan22_dir):
    """The one-process runs, uncached and cached, that both parallel layouts must give."""
    single = DiffGenerator.from_pretrained(str(wan22_dir), device="cpu", batched_cfg=False)
    return single.generate(_params()), single.generate(_params(EVERY_OTHER))


def _params(cache: CacheParams | None = None) -> SamplingParams:
    return SamplingParams(prompt=PROMPT, negative_prompt="blurry", seed=5, guidance_scale=4.0, guidance_scale_2=2.0,
                          cache=cache or CacheParams(), **REQUEST)


def _expert_steps(result) -> dict:
    return {expert: {b: (s["computed_steps"], s["skipped_steps"]) for b, s in report["branches"].items()}
            for expert, report in result.cache_stats.to_dict()["experts"].items()}


@pytest.mark.parametrize("parallel", [dict(enable_cfg_parallel=True), dict(ulysses_degree=2)], ids=["cfg", "ulysses"])
def test_two_processes_run_both_experts_as_one_process(wan22_dir, references, parallel):
    group = DiffGenerator.from_pretrained(str(wan22_dir), device="cpu", num_gpus=2, dist_timeout_s=60, **parallel)
    try:
        uncached, cached = group.generate(_params()), group.generate(_params(EVERY_OTHER))
    finally:
        group.close()
    reference, reference_cached = references
    exact = "enable_cfg_parallel" in parallel  # Ulysses sums attention in another order
    for ours, expected in ((uncached, reference), (cached, reference_cached)):
        if exact:
            assert torch.equal(ours.latents, expected.latents)
        else:
            torch.testing.assert_close(ours.latents, expected.latents, atol=1e-5, rtol=1e-5)
    assert _expert_steps(cached) == _expert_steps(reference_cached)
    assert reference_cached.cache_stats.total_skipped > 0  # else the cached comparison proves little
