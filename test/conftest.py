"""Shared fixtures (tiny models built once per test session in the diffusers layout, the built-in
model loaded once), how the suite splits over pytest-xdist workers, and the time per test file."""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import uuid
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterator

import pytest

REPO = Path(__file__).resolve().parents[1]
TEST_DIR = REPO / "test"
sys.path.insert(0, str(REPO / "python"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if "PYTEST_XDIST_WORKER_COUNT" in os.environ:
    # Each xdist worker (and the processes it spawns, which inherit this) takes its share of the
    # cores: two workers of two threads each on two cores would contend for every kernel. Set
    # before torch is imported, which reads it once.
    _share = (os.cpu_count() or 1) // int(os.environ["PYTEST_XDIST_WORKER_COUNT"])
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, _share)))

# What one xdist worker runs whole (``--dist loadscope``, scheduled by ``pytest_xdist_make_scheduler``
# below): every test that starts torch.distributed processes, one after another (one group of
# processes at a time, no two picking free ports at once); every test of the `sglang serve` process
# that server/ shares (started once); every other file's tests, so that a module's fixtures (a
# loaded model, a calibration) are built on one worker only.
SHARED_SCOPES = ("distributed", "server")
# Tests outside distributed/ that start torch.distributed processes too.
ALSO_DISTRIBUTED = ("test/pipeline/test_torch_compile.py::test_ulysses_workers_compile_and_match_one_process",)


def xdist_scope(nodeid: str) -> str:
    """The unit of work of a test under ``--dist loadscope``: its shared scope, else its file."""
    path = nodeid.split("::")[0]
    if nodeid in ALSO_DISTRIBUTED:
        return "distributed"
    directory = Path(path).parts[1] if Path(path).parts[0] == "test" else ""
    return directory if directory in SHARED_SCOPES else path


@pytest.hookimpl(tryfirst=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log):
    """``--dist loadscope`` with :func:`xdist_scope` as the scope (pytest 9.2 no longer lets
    ``xdist_group`` marks reach xdist's ``loadgroup``, pytest-xdist issue 1386); other modes as xdist has them."""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedScopeScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return xdist_scope(nodeid)

    return SharedScopeScheduling(config, log)


_FILE_SECONDS: dict[str, float] = defaultdict(float)


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Add each phase (setup, call, teardown) of a test to its file's time (under xdist this runs
    where the reports meet too)."""
    _FILE_SECONDS[report.nodeid.split("::")[0]] += report.duration


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    """Seconds per test file, slowest first: where the suite's time goes, so a file that grows shows."""
    if not _FILE_SECONDS:
        return
    terminalreporter.section("seconds per test file (setup + call + teardown of its tests)")
    for path, seconds in sorted(_FILE_SECONDS.items(), key=lambda item: -item[1]):
        terminalreporter.write_line(f"{seconds:8.1f}s  {path}")

# Small request geometry every pipeline test shares: 64x48 pixels, 5 frames -> 2x8x6 latents.
TINY_REQUEST = dict(height=64, width=48, num_frames=5, num_inference_steps=6, guidance_scale=5.0)


def psnr_db(test, reference) -> float:
    """PSNR of decoded frames in [0, 1] against a reference video."""
    import numpy as np

    mse = float(np.mean((np.asarray(test, np.float64) - np.asarray(reference, np.float64)) ** 2))
    return 10 * math.log10(1.0 / max(mse, 1e-20))


def magcache_params(threshold: float, ratios: dict, strategy: str = "magcache"):
    """MagCache (or a probe cache following its plan) at K=4, retention 0.2, with the given ratios."""
    from sglang.multimodal_gen.configs.cache_params import CacheParams

    return CacheParams(strategy=strategy, threshold=threshold, max_skip_steps=4, retention_ratio=0.2,
                       options={"mag_ratios": ratios})


def half_skip_threshold(ratios: dict, steps: int = 50) -> tuple[float, int]:
    """The smallest threshold whose MagCache plan skips at least half the steps of every branch of ``ratios``."""
    import numpy as np

    from sglang.multimodal_gen.runtime.cache import build_cache

    for threshold in np.arange(0.005, 0.6, 0.005):
        plan = build_cache(magcache_params(float(threshold), ratios), steps, None, tuple(ratios)).plan()
        skipped = min(p.count(False) for p in plan.values())
        if skipped >= steps // 2:
            return float(threshold), skipped
    raise AssertionError("no threshold skips half the steps")


# Schedulers a real checkpoint may ship, per family: name -> (diffusers class, its kwargs).
WAN_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    # Wan2.1-T2V checkpoints ship UniPC over flow sigmas (the base folder already has it).
    "unipc": ("UniPCMultistepScheduler", dict(prediction_type="flow_prediction", use_flow_sigmas=True,
                                              flow_shift=3.0, solver_order=2, predict_x0=True, solver_type="bh2",
                                              lower_order_final=True)),
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", dict(shift=3.0)),
    "dpm_flow": ("DPMSolverMultistepScheduler", dict(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                     flow_shift=3.0, solver_order=2)),
}
HUNYUAN_SCHEDULERS: dict[str, tuple[str, dict[str, Any]]] = {
    "flow_euler": ("FlowMatchEulerDiscreteScheduler", dict(shift=7.0)),
    # The HunyuanVideo pipeline hands the scheduler explicit sigmas; UniPC takes them over flow sigmas.
    "unipc_flow": ("UniPCMultistepScheduler", dict(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                   flow_shift=7.0)),
}


def set_scheduler(folder: Path, class_name: str, kwargs: dict[str, Any]) -> None:
    """Replace the scheduler of the diffusers folder ``folder`` (a copy: this edits it in place)."""
    import diffusers

    shutil.rmtree(folder / "scheduler")
    getattr(diffusers, class_name)(num_train_timesteps=1000, **kwargs).save_pretrained(folder / "scheduler")
    index = json.loads((folder / "model_index.json").read_text())
    index["scheduler"] = ["diffusers", class_name]
    (folder / "model_index.json").write_text(json.dumps(index, indent=2))


def skipping_strategies(calibration_file: str) -> dict:
    """Cache settings that skip steps on the tiny models at 10 steps (tests that use them assert
    that they do), one per strategy, ``none`` first; the planner plans from ``calibration_file``."""
    from sglang.multimodal_gen.configs.cache_params import CacheParams

    return {
        "none": CacheParams(),
        "magcache": CacheParams(strategy="magcache", threshold=0.5, max_skip_steps=3, retention_ratio=0.2),
        "teacache": CacheParams(strategy="teacache", threshold=1.0, options={"coefficients": [1.0, 0.0]}),
        "planner": CacheParams(strategy="planner", speedup=2.0, calibration_file=calibration_file),
        "even": CacheParams(strategy="even", options={"interval": 2}),
        "easycache": CacheParams(strategy="easycache", threshold=0.3, options={"warmup_steps": 2}),
    }


@pytest.fixture(scope="session")
def tiny_wan_dir(tmp_path_factory) -> Path:
    from sglang.multimodal_gen.tools.tiny_models import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-wan", seed=0)


@pytest.fixture(scope="session")
def tiny_wan22_dir(tmp_path_factory) -> Path:
    """A tiny Wan2.2 T2V-A14B-style folder: two experts of random weights, boundary_ratio 0.875."""
    from sglang.multimodal_gen.tools.tiny_models import build_tiny_wan22_two_experts

    return build_tiny_wan22_two_experts(tmp_path_factory.mktemp("models") / "tiny-wan22", seed=0)


@pytest.fixture(scope="session")
def tiny_wan22_ti2v_dir(tmp_path_factory) -> Path:
    """A tiny Wan2.2 TI2V-5B-style folder: one transformer fed a timestep per token (expand_timesteps),
    the Wan2.2 VAE (48 latent channels, 16x spatial)."""
    from sglang.multimodal_gen.tools.tiny_models import build_tiny_wan22_ti2v

    return build_tiny_wan22_ti2v(tmp_path_factory.mktemp("models") / "tiny-wan22-ti2v", seed=0)


@pytest.fixture(scope="session")
def tiny_wan21_i2v_dir(tmp_path_factory) -> Path:
    """A tiny Wan2.1 I2V folder: a CLIP image encoder and a transformer of 36 input channels."""
    from sglang.multimodal_gen.tools.tiny_models import build_tiny_wan21_i2v

    return build_tiny_wan21_i2v(tmp_path_factory.mktemp("models") / "tiny-wan21-i2v", seed=0)


@pytest.fixture(scope="session")
def wan_generator(tiny_wan_dir):
    from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator

    # Two CFG passes, as diffusers' WanPipeline runs them: the parity tests compare to it.
    return DiffGenerator.from_pretrained(str(tiny_wan_dir), device="cpu", batched_cfg=False)


@pytest.fixture(scope="session")
def tiny_hunyuan_dir(tmp_path_factory) -> Path:
    from sglang.multimodal_gen.tools.tiny_models import build_tiny_hunyuan

    return build_tiny_hunyuan(tmp_path_factory.mktemp("models") / "tiny-hunyuan", seed=0)


@pytest.fixture(scope="session")
def builtin_generator():
    """The built-in Wan model in fp32 with the default settings; a test that changes one of them
    puts it back."""
    from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator

    return DiffGenerator.from_pretrained(device="cpu")


@pytest.fixture(scope="session")
def hunyuan_generator(tiny_hunyuan_dir):
    from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator

    return DiffGenerator.from_pretrained(str(tiny_hunyuan_dir), device="cpu")



POSTGRES_ENV = "SGLANG_TEST_POSTGRES_URL"


@contextlib.contextmanager
def fresh_postgres_database() -> Iterator[str]:
    """The URL of a new, empty database on the PostgreSQL server ``SGLANG_TEST_POSTGRES_URL``
    names (``scripts/test_postgres.sh start`` runs one; ``.ci/run`` does), dropped afterwards.
    Without the variable the test is skipped, or fails under CI (``CI=true``): there a missing
    database is a broken setup, not a choice."""
    from urllib.parse import urlsplit, urlunsplit

    url = os.environ.get(POSTGRES_ENV)
    if not url:
        message = f"{POSTGRES_ENV} is not set; start a database with scripts/test_postgres.sh"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message)
        pytest.skip(message)
    import psycopg

    name = f"sglang_test_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(url, autocommit=True) as admin:
        admin.execute(f"CREATE DATABASE {name}")
    try:
        yield urlunsplit(urlsplit(url)._replace(path=f"/{name}"))
    finally:
        with psycopg.connect(url, autocommit=True) as admin:
            admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


@pytest.fixture
def postgres_url() -> Iterator[str]:
    """A new PostgreSQL database for one test (see :func:`fresh_postgres_database`)."""
    with fresh_postgres_database() as url:
        yield url


@pytest.fixture
def restore_threads():
    """The training scripts set torch's thread count for the whole process; give the rest of the suite its own back."""
    import torch

    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)
