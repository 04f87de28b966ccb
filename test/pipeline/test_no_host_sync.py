"""No host-device sync inside the denoising loop, for the uncached run and every strategy whose plan
is known up front (``TimestepCache.plan()``: even, MagCache, the planner), with every residual
estimator and scheduler, on both models; while TeaCache and EasyCache, which decide from the data
of each step, do read values back every step (their rule: they sync by nature).

A sync stalls the host until the device has drained its queue, so the next step's kernels are
launched late; a loop without one keeps the device busy. :class:`HostSyncDetector` watches exactly
the loop (it is the request's progress callback) and records every call that would sync on CUDA;
its docstring (``test/host_sync.py``) says what it can and cannot see on this CPU-only machine.

The scheduler is part of the loop, and diffusers' schedulers sync in two places the pipeline
avoids: on the first step unless ``set_begin_index`` was called (latent preparation calls it), and
in UniPC's ``torch.linalg.solve`` (on CUDA the stage steps the scheduler in ``SolveWithoutErrorCheck``;
the tests here set the stage as on CUDA).
The last two tests show both syncs on the bare scheduler, so they fail once diffusers drops them.

Every case runs with the denoising stage's ``batched_cfg`` off and on (cond and uncond as one
batch-2 pass): the batched path cuts and joins its rows by slicing, with no index tensor to copy.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import shutil
from pathlib import Path

import pytest
import torch
from conftest import HUNYUAN_SCHEDULERS, TINY_REQUEST, WAN_SCHEDULERS, set_scheduler, skipping_strategies
from host_sync import HostSyncDetector

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.cache import registered_estimators
from sglang.multimodal_gen.runtime.cache.base import StepFeatures, TimestepCache, _REGISTRY, register_cache
from sglang.multimodal_gen.runtime.entrypoints.generator import BUILTIN_MODEL_PATH, DiffGenerator
from sglang.multimodal_gen.runtime.pipelines.base import GenerationResult
from sglang.multimodal_gen.runtime.utils.sync_free import SolveWithoutErrorCheck

PROMPT = "a green square moving up on a black background"
STEPS = 10  # skipping_strategies skip steps on the tiny models at this count
CALIBRATION = str(BUILTIN_MODEL_PATH / "calibration.json")
STRATEGIES = skipping_strategies(CALIBRATION)
# MagCache also on calibrated ratios (the same file the planner plans from) besides the presets.
STRATEGIES["magcache_calibrated"] = dataclasses.replace(STRATEGIES["magcache"], calibration_file=CALIBRATION)
PLANNED = ("none", "even", "magcache", "magcache_calibrated", "planner")
DATA_DRIVEN = ("teacache", "easycache")
HERE = str(Path(__file__).resolve())


@pytest.fixture(params=[False, True], ids=["sequential_cfg", "batched_cfg"])
def batched_cfg(request) -> bool:
    return request.param


def _wan_params(cache: CacheParams) -> SamplingParams:
    return SamplingParams(prompt=PROMPT, negative_prompt="blurry", seed=3, cache=cache,
                          **{**TINY_REQUEST, "num_inference_steps": STEPS})


def _hunyuan_params(cache: CacheParams) -> SamplingParams:
    return SamplingParams(prompt=PROMPT, seed=3, cache=cache, **{**TINY_REQUEST, "num_inference_steps": STEPS})


def _watch(generator: DiffGenerator, params: SamplingParams, batched_cfg: bool,
           monkeypatch: pytest.MonkeyPatch) -> tuple[HostSyncDetector, GenerationResult]:
    """Generate with the detector on the loop, the denoising stage's ``batched_cfg`` set and its
    scheduler stepped as on CUDA (``sync_free_scheduler``, which the generator sets for CUDA only)."""
    stage = next(s for s in generator.pipeline.stages if s.name == "denoising")
    monkeypatch.setattr(stage, "batched_cfg", batched_cfg)
    monkeypatch.setattr(stage, "sync_free_scheduler", True)
    detector = HostSyncDetector()
    with detector:
        result = generator.generate(params, progress=detector.progress)
    assert detector.steps_watched == params.num_inference_steps  # the whole loop was watched
    return detector, result


def _assert_planned_and_skipping(result: GenerationResult, strategy: str) -> None:
    """A cached run must have had a plan, and have skipped, or it proves nothing about the skip path."""
    if STRATEGIES[strategy].strategy == "none":
        assert result.cache is None
        return
    assert result.cache.plan() is not None, strategy
    assert result.cache_stats.total_skipped > 0, result.cache_stats.summary()


@pytest.mark.parametrize("strategy", PLANNED)
def test_planned_strategies_make_no_sync_in_the_wan_loop(wan_generator, strategy, batched_cfg, monkeypatch):
    detector, result = _watch(wan_generator, _wan_params(STRATEGIES[strategy]), batched_cfg, monkeypatch)
    assert detector.events == [], detector.report()
    _assert_planned_and_skipping(result, strategy)


@pytest.mark.parametrize("estimator", registered_estimators())
def test_every_estimator_makes_no_sync_in_the_wan_loop(wan_generator, estimator, batched_cfg, monkeypatch):
    strategy = "planner" if estimator == "fitted" else "magcache"  # fitted is the planner's own
    cache = dataclasses.replace(STRATEGIES[strategy], estimator=estimator)
    detector, result = _watch(wan_generator, _wan_params(cache), batched_cfg, monkeypatch)
    assert detector.events == [], detector.report()
    assert result.cache_stats.estimator == estimator
    _assert_planned_and_skipping(result, strategy)


@pytest.mark.parametrize("strategy", ["none", "magcache"])
def test_planned_strategies_make_no_sync_in_the_hunyuan_loop(hunyuan_generator, strategy, batched_cfg, monkeypatch):
    detector, result = _watch(hunyuan_generator, _hunyuan_params(STRATEGIES[strategy]), batched_cfg, monkeypatch)
    assert detector.events == [], detector.report()
    _assert_planned_and_skipping(result, strategy)


@pytest.fixture(scope="module")
def scheduler_generator(tmp_path_factory, tiny_wan_dir, tiny_hunyuan_dir):
    """The tiny model of a family with another scheduler (built once per module and variant)."""
    made: dict[tuple[str, str], DiffGenerator] = {}

    def build(family: str, name: str) -> DiffGenerator:
        if (family, name) not in made:
            folder = tmp_path_factory.mktemp("schedulers") / f"{family}-{name}"
            shutil.copytree(tiny_wan_dir if family == "wan" else tiny_hunyuan_dir, folder)
            set_scheduler(folder, *(WAN_SCHEDULERS if family == "wan" else HUNYUAN_SCHEDULERS)[name])
            made[family, name] = DiffGenerator.from_pretrained(str(folder), device="cpu")
        return made[family, name]

    return build


@pytest.mark.parametrize("family, scheduler", [
    *[("wan", name) for name in WAN_SCHEDULERS if name != "unipc"],  # the tiny folder's own, tested above
    *[("hunyuan", name) for name in HUNYUAN_SCHEDULERS if name != "flow_euler"],
])
def test_other_schedulers_make_no_sync_in_the_loop(scheduler_generator, family, scheduler, batched_cfg, monkeypatch):
    generator = scheduler_generator(family, scheduler)
    params = (_wan_params if family == "wan" else _hunyuan_params)(STRATEGIES["magcache"])
    detector, result = _watch(generator, params, batched_cfg, monkeypatch)
    assert detector.events == [], detector.report()
    _assert_planned_and_skipping(result, "magcache")


# ------------------------------------------------------------------ the detector can fail


@pytest.mark.parametrize("strategy", DATA_DRIVEN)
def test_strategies_that_decide_from_the_data_are_seen_syncing(wan_generator, strategy, batched_cfg, monkeypatch):
    detector, result = _watch(wan_generator, _wan_params(STRATEGIES[strategy]), batched_cfg, monkeypatch)
    assert result.cache.plan() is None
    assert len({event.step for event in detector.events}) > STEPS // 2, detector.report()  # most steps
    assert all("runtime/cache/" in event.caller for event in detector.events), detector.report()


class ReadsTheTimestep(TimestepCache):
    """A plan known up front (every step), whose ``_decide`` reads the timestep back all the same."""

    name = "test_reads_the_timestep"

    def _decide(self, step: int, branch: str, features: StepFeatures) -> bool:
        return float(features.timestep[0]) >= 0.0

    def plan(self) -> dict[str, list[bool]]:
        return {b: [True] * self.num_inference_steps for b in self.branches}


@pytest.fixture
def reads_the_timestep():
    register_cache(ReadsTheTimestep)
    yield ReadsTheTimestep.name
    _REGISTRY.unregister(ReadsTheTimestep.name)


def test_a_value_read_in_a_planned_strategy_is_seen_at_its_step(wan_generator, reads_the_timestep, monkeypatch):
    detector, _ = _watch(wan_generator, _wan_params(CacheParams(strategy=reads_the_timestep)), False, monkeypatch)
    assert [event.step for event in detector.events] == [s for s in range(STEPS) for _ in ("cond", "uncond")]
    assert {event.op for event in detector.events} == {"aten.item.default"}  # float() in inference mode
    assert all(event.caller.startswith(f"{HERE}:") for event in detector.events), detector.report()


def test_the_scheduler_syncs_on_its_first_step_unless_its_begin_index_is_set(wan_generator):
    """diffusers' ``_init_step_index`` finds the first timestep with ``nonzero().item()``;
    ``set_begin_index(0)``, which latent preparation calls (as diffusers' pipelines do), avoids it."""
    scheduler = next(s for s in wan_generator.pipeline.stages if s.name == "latent_preparation").scheduler
    latents = torch.randn(1, 4, 2, 8, 6, generator=torch.Generator().manual_seed(0))
    for begin_index, expected in ((None, {"aten.nonzero.default", "aten.item.default"}), (0, set())):
        fresh = copy.deepcopy(scheduler)
        fresh.set_timesteps(STEPS)
        if begin_index is not None:
            fresh.set_begin_index(begin_index)
        detector = HostSyncDetector()
        with torch.inference_mode(), detector.watching():  # as the pipeline runs it
            fresh.step(torch.zeros_like(latents), fresh.timesteps[0], latents, return_dict=False)
        assert {event.op for event in detector.events} == expected, detector.report()


def test_unipc_solves_with_a_host_error_check_that_the_stage_lifts(wan_generator):
    """UniPC (the tiny Wan's scheduler, as Wan2.1's) calls ``torch.linalg.solve`` for its corrector
    from the third step on; on CUDA the stage runs ``step`` in ``SolveWithoutErrorCheck``, which drops only
    the check: the steps give the same latents bit for bit."""
    scheduler = next(s for s in wan_generator.pipeline.stages if s.name == "latent_preparation").scheduler
    assert type(scheduler).__name__ == "UniPCMultistepScheduler"
    noise = torch.randn(4, 1, 4, 2, 8, 6, generator=torch.Generator().manual_seed(0))
    outputs = {}
    for lifted in (False, True):
        fresh = copy.deepcopy(scheduler)
        fresh.set_timesteps(4)
        fresh.set_begin_index(0)
        latents, detector = noise[0], HostSyncDetector()
        with torch.inference_mode(), detector:
            for step, t in enumerate(fresh.timesteps):
                detector.progress(step, 4)
                with SolveWithoutErrorCheck() if lifted else contextlib.nullcontext():
                    latents = fresh.step(noise[step], t, latents, return_dict=False)[0]
            detector.progress(4, 4)
        outputs[lifted] = latents
        expected = [] if lifted else [(2, "aten.linalg_solve.default"), (3, "aten.linalg_solve.default")]
        assert [(event.step, event.op) for event in detector.events] == expected, detector.report()
    assert torch.equal(outputs[False], outputs[True])
