"""The denoising stage's ``correct_estimated_steps`` on the tiny Wan pipeline (UniPC): off, the
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


@pytest.fixture
def prepared_scheduler(wan_generator):
    """The scheduler each request copies, with its ``disable_corrector`` restored afterwards."""
    stage = next(s for s in wan_generator.pipeline.stages if isinstance(s, LatentPreparationStage))
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


def test_off_is_diffusers_disable_corrector_on_the_planned_skips(wan_generator, prepared_scheduler):
    params = _params(CacheParams(strategy="even", options={"interval": 2}))
    corrected = _generate(wan_generator, params, corrected=True)
    uncorrected = _generate(wan_generator, params, corrected=False)
    skipped = corrected.cache_stats.branches["cond"].skipped_steps
    assert skipped and uncorrected.cache_stats.branches["cond"].skipped_steps == skipped
    # UniPC corrects step i - 1 at step i unless i - 1 is listed: list every skipped step's.
    prepared_scheduler.disable_corrector = [step - 1 for step in skipped]
    reference = _generate(wan_generator, params, corrected=True)
    assert torch.equal(uncorrected.latents, reference.latents)
    # Equal only if each step's exception was undone after it (else every later step would skip too).
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
