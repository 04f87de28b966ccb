"""CFG parallel over two gloo processes gives the single-process video, bit for bit.

One worker group (this process is rank 0, one spawned worker is rank 1) serves every test in
the module. Each rank runs one CFG branch with the same modules, inputs and op order as the
single process runs that branch, and the guidance combines the gathered predictions with the
same ops, so the expected difference is exactly 0 in fp32 (and that is what we measured): the
tests compare latents with ``torch.equal`` and frames with ``np.array_equal``. Any real
divergence (a branch run on the other's inputs, a scheduler stepped on different values, a
cache that carried state between requests) shows up as a nonzero difference at once.
"""

from __future__ import annotations

import json
import os
import signal

import numpy as np
import pytest
import torch
from conftest import TINY_REQUEST, skipping_strategies

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.errors import InvalidRequestError
from sglang.multimodal_gen.runtime.cache.base import COND, UNCOND, StepFeatures, TimestepCache
from sglang.multimodal_gen.runtime.cache import base as cache_base
from sglang.multimodal_gen.runtime.cache.error_growth import ErrorGrowth, LatentProbe
from sglang.multimodal_gen.runtime.distributed import parallel_state as ps
from sglang.multimodal_gen.runtime.distributed.worker_group import ParallelConfig, WorkerGroupError
from sglang.multimodal_gen.runtime.entrypoints.calibrate import calibrate, error_growth
from sglang.multimodal_gen.runtime.entrypoints.generator import BUILTIN_MODEL_PATH, DiffGenerator

PROMPT = "a red circle moving left on a blue background"
STEPS = 10
REQUEST = {**TINY_REQUEST, "num_inference_steps": STEPS}
FAIL_STEP = 3

STRATEGIES = skipping_strategies(str(BUILTIN_MODEL_PATH / "calibration.json"))


class RaiseOnRank1(TimestepCache):
    """Computes every step, except that rank 1 raises at ``FAIL_STEP``."""

    name = "test_raise_on_rank1"

    def _decide(self, step: int, branch: str, features: StepFeatures) -> bool:
        if ps.world_rank() == 1 and step == FAIL_STEP:
            raise RuntimeError(f"test strategy fails on rank 1 at step {step}")
        return True


class KilledOnRank1(TimestepCache):
    """Computes every step, except that rank 1's process is killed (SIGKILL) at ``FAIL_STEP``."""

    name = "test_killed_on_rank1"

    def _decide(self, step: int, branch: str, features: StepFeatures) -> bool:
        if ps.world_rank() == 1 and step == FAIL_STEP:
            os.kill(os.getpid(), signal.SIGKILL)
        return True


TEST_STRATEGIES = (RaiseOnRank1, KilledOnRank1)


def register_test_strategy() -> None:
    """Run in each worker before it loads (and in this process by the fixture)."""
    for cls in TEST_STRATEGIES:
        if cls.name not in cache_base.registered_caches():
            cache_base.register_cache(cls)


@pytest.fixture(scope="module")
def cfg_group(tiny_wan_dir):
    register_test_strategy()
    generator = DiffGenerator.from_pretrained(
        str(tiny_wan_dir), device="cpu", num_gpus=2, enable_cfg_parallel=True, dist_timeout_s=60,
        worker_init=register_test_strategy,
    )
    yield generator
    generator.close()
    for cls in TEST_STRATEGIES:
        cache_base._REGISTRY.unregister(cls.name)


def _params(cache: CacheParams, **overrides) -> SamplingParams:
    fields = {"prompt": PROMPT, "negative_prompt": "blurry", "seed": 3, **REQUEST, **overrides}
    return SamplingParams(cache=cache, **fields)


def _steps(result) -> dict[str, tuple[list[int], list[int]]]:
    stats = result.cache_stats
    return {name: (b.computed_steps, b.skipped_steps) for name, b in stats.branches.items()}


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_cfg_parallel_gives_the_single_process_video(cfg_group, wan_generator, strategy):
    cache = STRATEGIES[strategy]
    single = wan_generator.generate(_params(cache))
    parallel = cfg_group.generate(_params(cache))
    assert torch.equal(parallel.latents, single.latents)
    assert np.array_equal(parallel.frames, single.frames)
    reports = parallel.rank_reports
    assert [(r["rank"], r["cfg_rank"]) for r in reports] == [(0, 0), (1, 1)]
    if strategy == "none":
        assert single.cache_stats is None and parallel.cache_stats is None
        return
    assert parallel.cache_stats.strategy == single.cache_stats.strategy == strategy
    expected = _steps(single)
    assert set(expected) == {COND, UNCOND}
    assert _steps(parallel) == expected
    # Every rank took (for its branch) and reports (for both) the single process's decisions.
    for report in reports:
        assert report["steps"] == expected, report
    assert single.cache_stats.total_skipped > 0, f"{strategy} skips nothing here; the test would prove little"


def test_state_is_reset_per_request_on_every_rank(cfg_group, wan_generator):
    cache = STRATEGIES["easycache"]
    first = cfg_group.generate(_params(cache))
    other = cfg_group.generate(_params(cache, seed=4, prompt="a green square"))
    again = cfg_group.generate(_params(cache))
    assert torch.equal(first.latents, again.latents)
    assert _steps(first) == _steps(again)
    assert torch.equal(other.latents, wan_generator.generate(_params(cache, seed=4, prompt="a green square")).latents)


def test_the_error_growth_measured_on_two_ranks_is_the_single_process_one(cfg_group, wan_generator):
    """Every rank perturbs its latents alike, so the ranks stay in step and measure what one
    process measures."""
    requests = [_params(CacheParams()), _params(CacheParams(), seed=4, prompt="a green square")]

    def measured(generator: DiffGenerator) -> ErrorGrowth:
        references = [LatentProbe(seed=index) for index in range(len(requests))]
        for params, reference in zip(requests, references):
            generator.generate(params, probe=reference)
        return error_growth(generator, requests, references)

    single = measured(wan_generator)
    assert measured(cfg_group) == single
    assert len(single.growth) == STEPS + 1 and single.growth[-1] == 1.0


def test_calibrating_on_two_ranks_writes_the_single_process_file(cfg_group, wan_generator, tmp_path):
    """Each rank records its own branch; rank 0 gathers the other's records, so the file (and its
    plot) holds both branches as one process records them. It used to hold the uncond branch
    empty, and drawing the plot failed."""
    prompts = [PROMPT, "a green square moving up"]
    defaults = SamplingParams(**REQUEST)
    files = {}
    for name, generator in (("single", wan_generator), ("parallel", cfg_group)):
        calibrate(generator, prompts, defaults, tmp_path / f"{name}.json", growth_prompts=1)
        files[name] = json.loads((tmp_path / f"{name}.json").read_text())
        assert (tmp_path / f"{name}.png").is_file()
    recorded = ("branches", "planner_tables", "error_growth", "teacache_coefficients", "blend_alpha")
    single, parallel = ({key: f[key] for key in recorded} for f in (files["single"], files["parallel"]))
    assert set(single["branches"]) == {COND, UNCOND} and all(single["branches"][b]["mag_ratio"] for b in (COND, UNCOND))
    assert parallel == single


def test_a_single_branch_request_runs_on_both_ranks(cfg_group, wan_generator):
    params = _params(CacheParams(), guidance_scale=1.0, negative_prompt=None)
    assert torch.equal(cfg_group.generate(params).latents, wan_generator.generate(params).latents)


def test_a_rank_raising_fails_the_request_and_the_next_one_succeeds(cfg_group, wan_generator):
    restarts = cfg_group.workers.restarts
    with pytest.raises(WorkerGroupError, match=f"rank 1: RuntimeError: test strategy fails on rank 1 at step {FAIL_STEP}"):
        cfg_group.generate(_params(CacheParams(strategy=RaiseOnRank1.name)))
    assert cfg_group.workers.restarts == restarts + 1
    assert not ps.is_initialized() or ps.world_size() == 1  # the driver's accessors stay single-process
    params = _params(STRATEGIES["magcache"])
    assert torch.equal(cfg_group.generate(params).latents, wan_generator.generate(params).latents)


@pytest.mark.parametrize(
    "flags, message",
    [
        (dict(num_gpus=2, ulysses_degree=1, sp_degree=2), "ring attention is not supported"),
        (dict(num_gpus=3, enable_cfg_parallel=True), "must equal 2 \\(cfg parallel\\) x sp degree"),
        (dict(num_gpus=2, ulysses_degree=1), "must equal sp degree 1"),
        (dict(num_gpus=0), "num_gpus must be a whole number >= 1"),
    ],
)
def test_inconsistent_flags_are_refused_before_loading(tiny_wan_dir, flags, message):
    with pytest.raises(InvalidRequestError, match=message):
        DiffGenerator.from_pretrained(str(tiny_wan_dir), device="cpu", **flags)


def test_cfg_parallel_needs_two_branches(tiny_hunyuan_dir):
    with pytest.raises(InvalidRequestError, match="needs a model with two CFG branches; hunyuan runs 1"):
        DiffGenerator.from_pretrained(str(tiny_hunyuan_dir), device="cpu", num_gpus=2, enable_cfg_parallel=True)


def test_sglang_flag_arithmetic():
    assert ParallelConfig.from_flags(4, True).ulysses_degree == 2  # the processes CFG leaves go to SP
    assert ParallelConfig.from_flags(2, False, sp_degree=2).sp_degree == 2
    assert ParallelConfig.from_flags(1).num_gpus == 1


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--num-gpus", "2", "--ulysses-degree", "1", "--sp-degree", "2"], "error: ring attention is not supported"),
        (["--num-gpus", "4", "--enable-cfg-parallel", "--ulysses-degree", "1"], "error: --num-gpus 4 must equal 2"),
    ],
)
def test_cli_refuses_inconsistent_flags_in_one_line(tmp_path, capsys, flags, message):
    from sglang.cli.main import main

    code = main(["generate", "--prompt", "x", "--device", "cpu", "--output-path", str(tmp_path / "o.mp4"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith(message) and "\n" not in err, err


def test_cli_refuses_cfg_parallel_for_a_distilled_model(tiny_hunyuan_dir, tmp_path, capsys):
    from sglang.cli.main import main

    code = main(["generate", "--prompt", "x", "--device", "cpu", "--model-path", str(tiny_hunyuan_dir),
                 "--output-path", str(tmp_path / "o.mp4"), "--num-gpus", "2", "--enable-cfg-parallel"])
    assert code == 2 and "needs a model with two CFG branches" in capsys.readouterr().err


def test_serve_takes_the_process_flags():
    from sglang.cli.main import build_parser

    args = build_parser().parse_args(["serve", "--num-gpus", "2", "--enable-cfg-parallel", "--ulysses-degree", "1"])
    assert (args.num_gpus, args.enable_cfg_parallel, args.ulysses_degree, args.sp_degree) == (2, True, 1, None)


def test_the_server_runs_its_jobs_on_the_worker_group(cfg_group, tmp_path):
    import time

    from fastapi.testclient import TestClient

    from sglang.multimodal_gen.runtime.entrypoints.http_server import ServerConfig, create_app

    app = create_app(cfg_group, "tiny-wan", ServerConfig(data_dir=str(tmp_path / "data")))
    with TestClient(app, base_url="http://localhost") as client:
        ids = [client.post("/v1/videos", json={"prompt": prompt, "size": "48x64", "num_frames": 5,
                                               "num_inference_steps": 4}).json()["id"]
               for prompt in ("a red circle", "a blue square")]
        for video_id in ids:
            deadline = time.monotonic() + 60
            while (video := client.get(f"/v1/videos/{video_id}").json())["status"] not in ("completed", "failed"):
                assert time.monotonic() < deadline, video
                time.sleep(0.05)
            assert video["status"] == "completed", video
            assert client.get(f"/v1/videos/{video_id}/content").status_code == 200


def test_rank_0_stopping_mid_request_raises_its_own_error_and_the_next_request_succeeds(cfg_group, wan_generator):
    """A cancellation (the server raises from the progress callback) stops rank 0 between steps;
    the workers wait in that step's collective, so the group is rebuilt, and the caller gets its
    own exception back."""

    class Stop(Exception):
        pass

    def progress(done: int, total: int) -> None:
        if done == 2:
            raise Stop

    restarts = cfg_group.workers.restarts
    with pytest.raises(Stop):
        cfg_group.generate(_params(CacheParams()), progress=progress)
    assert cfg_group.workers.restarts == restarts + 1
    params = _params(STRATEGIES["teacache"])
    assert torch.equal(cfg_group.generate(params).latents, wan_generator.generate(params).latents)


def test_a_killed_rank_fails_the_request_and_the_next_one_succeeds(cfg_group, wan_generator):
    restarts = cfg_group.workers.restarts
    with pytest.raises(WorkerGroupError, match="rank 1 exited with code -9"):
        cfg_group.generate(_params(CacheParams(strategy=KilledOnRank1.name)))
    assert cfg_group.workers.restarts == restarts + 1
    params = _params(STRATEGIES["even"])
    assert torch.equal(cfg_group.generate(params).latents, wan_generator.generate(params).latents)


def test_a_worker_killed_between_requests_is_replaced_before_the_next(cfg_group, wan_generator):
    restarts = cfg_group.workers.restarts
    (worker,) = cfg_group.workers._procs
    os.kill(worker.pid, signal.SIGKILL)
    worker.join(timeout=10)
    params = _params(CacheParams())
    assert torch.equal(cfg_group.generate(params).latents, wan_generator.generate(params).latents)
    assert cfg_group.workers.restarts == restarts + 1
