"""Batched CFG (cond and uncond as one batch of 2) against the two-pass loop the parity tests pin.

What may differ: a matrix product over a batch of 2 may block its rows differently from two
products of one, so the same sums are rounded in another order. In fp32 that moves a value by a
few float32 ulps per product; over the tiny model's layers and 10 steps we measured at most 5e-6
of the latents' largest magnitude, so the fp32 tests allow 1e-4 of it (20x the measurement, still
a thousandth of what a wrong row, branch or residual gives: those move the latents by 1e-1 and
more). In bf16 the same reordering moves a value by a bf16 ulp (2^-8 relative); we measured 0 on
most requests and 0.17 (at 2.6% of the largest magnitude) on one with half the steps skipped,
where bf16 itself is 1.63 away from fp32; the bf16 test allows half of bf16's own error against
fp32.

The decisions must not move at all: every strategy skips the same steps in both loops, a
strategy that decides per pair skips both branches together (one blocks pass of batch 2 or
none), and one that decides per branch runs a blocks pass of the branches that compute.
"""

from __future__ import annotations

from typing import ClassVar

import pytest
import torch
from conftest import TINY_REQUEST, skipping_strategies

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.cache import base as cache_base
from sglang.multimodal_gen.runtime.cache.base import UNCOND, StepFeatures, TimestepCache
from sglang.multimodal_gen.runtime.entrypoints.generator import BUILTIN_MODEL_PATH, DiffGenerator
from sglang.multimodal_gen.runtime.stages.denoising import DenoisingStage

PROMPT = "a red circle moving left on a blue background"
STEPS = 10
STRATEGIES = skipping_strategies(str(BUILTIN_MODEL_PATH / "calibration.json"))
FP32_TOLERANCE = 1e-4  # of the latents' largest magnitude (see the module docstring)


class UncondEveryOtherStep(TimestepCache):
    """cond computes every step, uncond every other one: the branches of a batch part ways."""

    name: ClassVar[str] = "test_uncond_every_other_step"

    def _decide(self, step: int, branch: str, features: StepFeatures) -> bool:
        return branch != UNCOND or step % 2 == 0


class WholeModelUncondEveryOtherStep(UncondEveryOtherStep):
    """The same plan for a strategy that skips the whole model call."""

    name: ClassVar[str] = "test_whole_model_uncond_every_other_step"
    skips_whole_model: ClassVar[bool] = True


@pytest.fixture(scope="module", autouse=True)
def registered_test_strategies():
    for cls in (UncondEveryOtherStep, WholeModelUncondEveryOtherStep):
        cache_base.register_cache(cls)
    yield
    for cls in (UncondEveryOtherStep, WholeModelUncondEveryOtherStep):
        cache_base._REGISTRY.unregister(cls.name)


def _stage(generator: DiffGenerator) -> DenoisingStage:
    return next(s for s in generator.pipeline.stages if isinstance(s, DenoisingStage))


def _run(generator: DiffGenerator, cache: CacheParams, batched: bool, seed: int = 1):
    stage = _stage(generator)
    params = SamplingParams(prompt=PROMPT, seed=seed, cache=cache, **{**TINY_REQUEST, "num_inference_steps": STEPS})
    blocks_batches: list[int] = []
    hook = stage.adapter.transformer.blocks[0].register_forward_pre_hook(
        lambda module, args: blocks_batches.append(args[0].shape[0]))
    default, stage.batched_cfg = stage.batched_cfg, batched
    try:
        result = generator.generate(params)
    finally:
        stage.batched_cfg = default
        hook.remove()
    return result, blocks_batches


def _plan(result) -> dict[str, list[int]] | None:
    stats = result.cache_stats
    return None if stats is None else {b: s.computed_steps for b, s in stats.branches.items()}


def _close(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_batched_cfg_equals_two_passes(builtin_generator, name):
    two, two_batches = _run(builtin_generator, STRATEGIES[name], batched=False)
    one, one_batches = _run(builtin_generator, STRATEGIES[name], batched=True)
    assert _plan(one) == _plan(two)
    if name != "none":
        assert one.cache_stats.total_skipped > 0
        assert one.cache_stats.timed_passes == two.cache_stats.timed_passes  # counted per branch
    assert _close(one.latents, two.latents) < FP32_TOLERANCE
    # Every strategy here computes both branches or neither: one batch-2 pass per computed step.
    assert set(two_batches) == {1} and set(one_batches) == {2}
    assert len(one_batches) * 2 == len(two_batches)


@pytest.mark.parametrize("strategy", [UncondEveryOtherStep.name, WholeModelUncondEveryOtherStep.name])
def test_branches_that_part_ways_run_the_computing_ones(builtin_generator, strategy):
    cache = CacheParams(strategy=strategy)
    two, _ = _run(builtin_generator, cache, batched=False)
    one, batches = _run(builtin_generator, cache, batched=True)
    assert _plan(one) == _plan(two) == {"cond": list(range(STEPS)), "uncond": list(range(0, STEPS, 2))}
    assert _close(one.latents, two.latents) < FP32_TOLERANCE
    # One pass per step: of the batch when both compute, of cond alone when uncond skips.
    assert batches == [2 if step % 2 == 0 else 1 for step in range(STEPS)]
    assert one.cache_stats.timed_passes == STEPS + STEPS // 2


def test_bf16_batched_cfg_is_within_bf16_rounding():
    generators = {d: DiffGenerator.from_pretrained(device="cpu", dtype=d) for d in ("float32", "bfloat16")}
    for name in ("none", "even"):
        reference, _ = _run(generators["float32"], STRATEGIES[name], batched=False)
        two, _ = _run(generators["bfloat16"], STRATEGIES[name], batched=False)
        one, _ = _run(generators["bfloat16"], STRATEGIES[name], batched=True)
        assert _plan(one) == _plan(two)
        bf16_error = (two.latents.float() - reference.latents.float()).abs().max()
        assert (one.latents.float() - two.latents.float()).abs().max() <= 0.5 * bf16_error, name


def test_request_constants_are_computed_once_per_request(builtin_generator):
    """The rotary table and the projected prompt: per branch and batch, never per step."""
    model = _stage(builtin_generator).adapter.transformer
    calls = {"rope": 0, "text": 0}
    hooks = [model.rope.register_forward_hook(lambda *a: calls.__setitem__("rope", calls["rope"] + 1)),
             model.condition_embedder.text_embedder.register_forward_hook(
                 lambda *a: calls.__setitem__("text", calls["text"] + 1))]
    try:
        _run(builtin_generator, CacheParams(), batched=False)
        assert calls == {"rope": 2, "text": 2}  # cond and uncond, once each for 10 steps
        _run(builtin_generator, CacheParams(), batched=True)
        assert calls == {"rope": 3, "text": 3}  # batched: once, for the batch of both
    finally:
        for hook in hooks:
            hook.remove()


def test_hunyuan_request_constants_are_computed_once_per_request(hunyuan_generator):
    """HunyuanVideo's rotary table, pooled-prompt projection and guidance embedding."""
    model = _stage(hunyuan_generator).adapter.transformer
    embedder = model.time_text_embed
    modules = {"rope": model.rope, "pooled": embedder.text_embedder, "guidance": embedder.guidance_embedder,
               "time": embedder.timestep_embedder}
    calls = dict.fromkeys(modules, 0)
    hooks = [module.register_forward_hook(lambda *a, name=name: calls.__setitem__(name, calls[name] + 1))
             for name, module in modules.items()]
    params = SamplingParams(prompt=PROMPT, seed=1, **{**TINY_REQUEST, "num_inference_steps": STEPS})
    try:
        hunyuan_generator.generate(params)
    finally:
        for hook in hooks:
            hook.remove()
    assert calls == {"rope": 1, "pooled": 1, "guidance": 1, "time": STEPS}
