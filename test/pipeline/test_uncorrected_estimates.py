"""The denoising stage's ``correct_estimated_steps`` on the tiny Wan pipeline (UniPC), fp32 and bf16: off, the
steps a plan estimates skip UniPC's corrector exactly as diffusers' own ``disable_corrector`` does,
and nothing else changes."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from conftest import TINY_REQUEST
from diffusers import UniPCMultistepScheduler

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.entrypoints.generator import denoising_stage
from sglang.multimodal_gen.runtime.stages.latent_preparation import LatentPreparationStage

PROMPT = "a red circle moving left on a white background"
STEPS = 12


def _params(cache: CacheParams | None) -> SamplingParams:
    params = SamplingParams(prompt=PROMPT, negative_prompt="blurry", seed=5,
                            **{**TINY_REQUEST, "num_inference_steps": STEPS})
    return params if cache is None else dataclasses.replace(params, cache=cache)


@pytest.fixture(scope="module")
def bf16_wan_generator(tiny_wan_dir):
    from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator

    return DiffGenerator.from_pretrained(str(tiny_wan_dir), device="cpu", dtype="bfloat16", batched_cfg=False)


@pytest.fixture(params=["float32", "bfloat16"])
def generator(request, wan_generator, bf16_wan_generator):
    return wan_generator if request.param == "float32" else bf16_wan_generator


@pytest.fixture
def prepared_scheduler(generator):
    """The scheduler each request copies, with its ``disable_corrector`` restored afterwards."""
    stage = next(s for s in generator.pipeline.stages if isinstance(s, LatentPreparationStage))
    assert isinstance(stage.scheduler, UniPCMultistepScheduler)
    saved = list(stage.scheduler.disable_corrector)
    yield stage.scheduler
    stage.scheduler.disable_corrector = saved


def _generate(generator, params: SamplingParams, corrected: bool):
    stage = denoising_stage(generator.pipeline)
    stage.correct_estimated_steps = corrected
    try:
        return generator.generate(params)
    finally:
        stage.correct_estimated_steps = True


def test_off_is_diffusers_disable_corrector_on_the_planned_skips(generator, prepared_scheduler):
    params = _params(CacheParams(strategy="even", options={"interval": 2}))
    shipped = list(prepared_scheduler.disable_corrector)
    corrected = _generate(generator, params, corrected=True)
    uncorrected = _generate(generator, params, corrected=False)
    # The exceptions went to that request's copy of the scheduler, not to the one requests copy.
    assert prepared_scheduler.disable_corrector == shipped
    skipped = corrected.cache_stats.branches["cond"].skipped_steps
    assert skipped and uncorrected.cache_stats.branches["cond"].skipped_steps == skipped
    # UniPC corrects step i - 1 at step i unless i - 1 is listed: list every skipped step's.
    prepared_scheduler.disable_corrector = [step - 1 for step in skipped]
    reference = _generate(generator, params, corrected=True)
    assert torch.equal(uncorrected.latents, reference.latents)
    assert not torch.equal(uncorrected.latents, corrected.latents)


@pytest.mark.parametrize("cache", [None, CacheParams(strategy="teacache", threshold=1.0,
                                                       options={"coefficients": [1.0, 0.0]})],
                         ids=["uncached", "teacache"])
def test_off_changes_nothing_without_a_plan(wan_generator, cache):
    """Uncached runs estimate nothing; TeaCache decides during the run, so it names no step ahead."""
    params = _params(cache)
    corrected = _generate(wan_generator, params, corrected=True)
    uncorrected = _generate(wan_generator, params, corrected=False)
    if cache is not None:
        assert corrected.cache_stats.total_skipped > 0
    assert torch.equal(uncorrected.latents, corrected.latents)
