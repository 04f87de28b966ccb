"""Caching benchmark: uncached, TeaCache and MagCache in our pipeline, beside diffusers' MagCache hook.

For one model, a prompt set, seeds and a step count it runs every configuration on every
(prompt, seed) and records end-to-end and denoising time, transformer passes per CFG branch, the
ideal denoising speedup N / (N - skipped) beside the achieved one, where the denoising time goes
(DiT embed / blocks / head, scheduler, and the loop around them, where cache decisions and
residual handling live), peak memory, and PSNR / SSIM / MAE of the decoded frames against the
uncached output of the same seed. diffusers' own ``WanPipeline`` with ``hooks/mag_cache.py``
runs on the same weights, seeds and ratios as the peer.

Timing is interleaved: a first round over all configurations warms up and measures fidelity and
memory; then each timed round runs every configuration once per sample, rotating the order, and
speedups are medians of ratios taken within a round, so a change in machine load hits both sides.

    python benchmark/bench_cache.py            # CPU-sized default (a few minutes on 2 cores)
    python benchmark/bench_cache.py --full     # full sweep: more prompts, seeds, thresholds, rounds

Writes ``benchmark/results/bench_cache_<device>[_full].json`` and ``.md`` and the frontier plot
``docs/images/benchmark_frontier.png``. Results and method: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import hashlib
import json
import logging
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
try:
    import sglang  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(REPO / "python"))

from metrics import PeakMemory, fidelity  # noqa: E402

from sglang.multimodal_gen.configs.cache_params import CacheParams  # noqa: E402
from sglang.multimodal_gen.configs.models import read_model_info  # noqa: E402
from sglang.multimodal_gen.configs.sampling_params import SamplingParams  # noqa: E402
from sglang.multimodal_gen.runtime.cache.base import COND, UNCOND  # noqa: E402
from sglang.multimodal_gen.runtime.cache.calibration import CalibrationResult  # noqa: E402
from sglang.multimodal_gen.runtime.entrypoints.calibrate import calibrate  # noqa: E402
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator  # noqa: E402
from sglang.multimodal_gen.runtime.pipelines.base import PipelineStage, Req  # noqa: E402
from sglang.multimodal_gen.runtime.stages.denoising import DenoisingStage  # noqa: E402

# Captions of the built-in model's synthetic world; the first is one it never saw in training.
PROMPTS = [
    "a red circle moving left on a white background",
    "a blue square moving right on a yellow background",
    "a yellow triangle moving down on a black background",
    "a white circle moving up on a green background",
    "a green triangle moving left on a red background",
    "a black square moving down on a blue background",
]
CALIBRATION_SEED = 1000  # calibration runs use other seeds than the measured ones
BASELINE = "uncached"
PEER_BASELINE = "diffusers uncached"
# A random Wan transformer whose blocks dominate the step, for the speed part only.
BLOCK_HEAVY_TRANSFORMER = dict(num_attention_heads=8, attention_head_dim=64, ffn_dim=2048, num_layers=12)


@dataclass
class Sweep:
    """What to run. ``default`` is sized for a 2-core CPU; ``full`` is the full sweep."""

    prompts: list[str]
    seeds: list[int]
    repeats: int
    magcache_thresholds: list[float]
    teacache_thresholds: list[float]
    peer_thresholds: list[float]
    max_skip_steps: int = 4
    retention_ratio: float = 0.2

    @classmethod
    def default(cls) -> "Sweep":
        return cls(PROMPTS[:2], [0], 5, [0.03, 0.06, 0.12, 0.24], [0.025, 0.05, 0.1, 0.2], [0.06, 0.12, 0.24])

    @classmethod
    def full(cls) -> "Sweep":
        return cls(PROMPTS, [0, 1], 5, [0.015, 0.03, 0.06, 0.12, 0.24, 0.48], [0.0125, 0.025, 0.05, 0.1, 0.2, 0.4],
                   [0.03, 0.06, 0.12, 0.24, 0.48])


@dataclass
class BenchConfig:
    """One configuration. ``strategy`` names its line on the frontier; ``kind`` is its role there."""

    name: str
    strategy: str
    kind: str = "sweep"  # "uncached" | "never-skip" | "sweep" | "preset"
    cache: CacheParams = field(default_factory=CacheParams)
    hook: dict[str, Any] | None = None  # diffusers MagCacheConfig settings for the peer
    impl: str = "ours"  # "ours" | "diffusers"
    threshold: float | None = None

    @property
    def baseline(self) -> str:
        return BASELINE if self.impl == "ours" else PEER_BASELINE


@dataclass
class RunRecord:
    """What one generation measured. ``parts`` (ours only): seconds per part of the denoising loop."""

    e2e_s: float
    denoise_s: float
    computed_steps: dict[str, list[int]]
    frames: np.ndarray | None = None
    parts: dict[str, float] = field(default_factory=dict)
    cache_bytes: int = 0
    peak_bytes: int = 0


# --------------------------------------------------------------------------- our pipeline
class LoopProfile:
    """Seconds spent in each wrapped call during one denoising loop."""

    def __init__(self, device: torch.device) -> None:
        self.sync = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cache_bytes: dict[str, int] = {}

    def wrap(self, part: str, fn: Callable) -> Callable:
        def timed(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            if self.sync:
                torch.cuda.synchronize()
            self.seconds[part] += time.perf_counter() - start
            return out

        return timed


class ProfiledDenoising(PipelineStage):
    """The denoising stage unchanged, with its adapter, scheduler and cache calls timed."""

    name = DenoisingStage.name

    def __init__(self, inner: DenoisingStage, profile: LoopProfile) -> None:
        self.inner = inner
        self.profile = profile
        for part in ("embed", "blocks", "head"):
            setattr(inner.adapter, part, profile.wrap(part, getattr(inner.adapter, part)))

    def __call__(self, req: Req) -> Req:
        req.scheduler.step = self.profile.wrap("scheduler", req.scheduler.step)
        cache = req.cache
        if cache is not None:
            store = cache.store

            def sized_store(step: int, branch: str, residual: torch.Tensor) -> None:
                self.profile.cache_bytes[branch] = residual.numel() * residual.element_size()
                store(step, branch, residual)

            cache.store = sized_store
            for method in ("should_compute", "store", "reuse"):
                setattr(cache, method, self.profile.wrap("cache", getattr(cache, method)))
        return self.inner(req)


class OursRunner:
    def __init__(self, generator: DiffGenerator) -> None:
        self.generator = generator
        self.device = generator.pipeline.device
        self.profile = LoopProfile(self.device)
        stages = generator.pipeline.stages
        index = next(i for i, s in enumerate(stages) if isinstance(s, DenoisingStage))
        stages[index] = ProfiledDenoising(stages[index], self.profile)

    def run(self, config: BenchConfig, params: SamplingParams, measure_memory: bool) -> RunRecord:
        params = dataclasses.replace(params, cache=config.cache)
        self.profile.reset()
        memory = PeakMemory(self.device) if measure_memory else None
        with memory or contextlib.nullcontext():
            start = time.perf_counter()
            result = self.generator.generate(params)
            e2e = time.perf_counter() - start
        if result.cache_stats is not None:
            computed = {b: list(s.computed_steps) for b, s in result.cache_stats.branches.items()}
        else:
            branches = [COND, UNCOND] if params.guidance_scale > 1.0 else [COND]
            computed = {b: list(range(params.num_inference_steps)) for b in branches}
        return RunRecord(
            e2e_s=e2e, denoise_s=result.timings[DenoisingStage.name], computed_steps=computed, frames=result.frames,
            parts=dict(self.profile.seconds), cache_bytes=sum(self.profile.cache_bytes.values()),
            peak_bytes=memory.peak_bytes if memory else 0,
        )


# --------------------------------------------------------------------------- the diffusers peer
class DiffusersRunner:
    """diffusers' WanPipeline on the same folder: one plain, one whose transformer carries the hook.

    Denoising time runs from the first transformer call to the end of the last scheduler step
    (``callback_on_step_end``). A branch computed a step when its first block's attention ran: the
    hook skips whole blocks.
    """

    def __init__(self, model_path: str, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers import WanPipeline, WanTransformer3DModel

        self.device = device
        self.plain = WanPipeline.from_pretrained(model_path, dtype=dtype).to(device)
        transformer = WanTransformer3DModel.from_pretrained(model_path, subfolder="transformer", dtype=dtype)
        self.hooked = WanPipeline(
            tokenizer=self.plain.tokenizer, text_encoder=self.plain.text_encoder, vae=self.plain.vae,
            scheduler=copy.deepcopy(self.plain.scheduler), transformer=transformer.to(device),
        )
        # The prompt length our pipeline pads to (the folder's text_max_length or the family's 512).
        self.text_length = read_model_info(Path(model_path)).text_max_length
        for pipe in (self.plain, self.hooked):
            pipe.set_progress_bar_config(disable=True)
            pipe.transformer.register_forward_pre_hook(self._on_transformer_call)
            pipe.transformer.blocks[0].attn1.register_forward_hook(self._on_block_run)
        self._calls: list[bool] = []
        self._first_call = self._last_step = 0.0

    def _now(self) -> float:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def _on_transformer_call(self, module, args) -> None:
        if not self._calls:
            self._first_call = self._now()
        self._calls.append(False)

    def _on_block_run(self, module, args, output) -> None:
        self._calls[-1] = True

    def _on_step_end(self, pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        self._last_step = self._now()
        return {}

    def run(self, config: BenchConfig, params: SamplingParams, measure_memory: bool) -> RunRecord:
        from diffusers.hooks import MagCacheConfig, apply_mag_cache

        pipe = self.hooked if config.hook else self.plain
        if config.hook:  # re-applied per run: fresh hook state, as a new request would have
            settings = dict(config.hook)
            ratios = torch.tensor(settings.pop("mag_ratios"))
            apply_mag_cache(pipe.transformer, MagCacheConfig(
                mag_ratios=ratios, num_inference_steps=params.num_inference_steps, **settings))
        self._calls = []
        memory = PeakMemory(self.device) if measure_memory else None
        with memory or contextlib.nullcontext():
            start = time.perf_counter()
            frames = pipe(
                prompt=params.prompt, negative_prompt=params.negative_prompt, height=params.height,
                width=params.width, num_frames=params.num_frames, num_inference_steps=params.num_inference_steps,
                guidance_scale=params.guidance_scale, generator=torch.Generator("cpu").manual_seed(params.seed),
                output_type="np", max_sequence_length=self.text_length, callback_on_step_end=self._on_step_end,
            ).frames[0]
            e2e = time.perf_counter() - start
        per_step = len(self._calls) // params.num_inference_steps
        branches = [COND, UNCOND][:per_step]
        computed = {b: [s for s, ran in enumerate(self._calls[i::per_step]) if ran] for i, b in enumerate(branches)}
        return RunRecord(
            e2e_s=e2e, denoise_s=self._last_step - self._first_call, computed_steps=computed,
            frames=np.asarray(frames, dtype=np.float32), peak_bytes=memory.peak_bytes if memory else 0,
        )


# --------------------------------------------------------------------------- configurations
def build_configs(
    sweep: Sweep, calibration_file: str | None, shared_ratios: list[float], peer: bool, teacache: bool = True
) -> list[BenchConfig]:
    """Uncached first (every fidelity number refers to it), then our strategies, then the peer."""
    cal = {"calibration_file": calibration_file} if calibration_file else {}
    knobs = {"max_skip_steps": sweep.max_skip_steps, "retention_ratio": sweep.retention_ratio}
    mag, tea = "ours magcache", "ours teacache"
    configs = [
        BenchConfig(BASELINE, "uncached", "uncached"),
        BenchConfig("magcache never-skip", mag, "never-skip", CacheParams("magcache", threshold=0.0, **cal)),
    ]
    configs += [BenchConfig(f"magcache t={t}", mag, cache=CacheParams("magcache", threshold=t, **knobs, **cal),
                            threshold=t) for t in sweep.magcache_thresholds]
    configs += [BenchConfig(f"magcache preset {p}", mag, "preset", CacheParams("magcache", preset=p, **cal))
                for p in ("default", "fast")]
    # The release code plans each CFG branch alone; our default plans them together (sync_branches).
    apart = {"sync_branches": False}
    configs += [BenchConfig(f"magcache t={t} per-branch plans", "ours magcache, per-branch plans (release)",
                            cache=CacheParams("magcache", threshold=t, options=apart, **knobs, **cal), threshold=t)
                for t in sweep.magcache_thresholds]
    if teacache:
        never = CacheParams("teacache", threshold=0.0, **cal)
        configs.append(BenchConfig("teacache never-skip", tea, "never-skip", never))
        configs += [BenchConfig(f"teacache t={t}", tea, cache=CacheParams("teacache", threshold=t, **cal), threshold=t)
                    for t in sweep.teacache_thresholds]
        configs += [BenchConfig(f"teacache preset {p}", tea, "preset", CacheParams("teacache", preset=p, **cal))
                    for p in ("default", "fast")]
    if peer:
        shared = {"mag_ratios": {COND: shared_ratios, UNCOND: shared_ratios}}
        hook = {"mag_ratios": shared_ratios, **knobs}
        configs += [BenchConfig(f"magcache shared t={t}", "ours magcache, diffusers' settings",
                                cache=CacheParams("magcache", threshold=t, options=shared, **knobs), threshold=t)
                    for t in sweep.peer_thresholds]
        peer_name = "diffusers magcache hook"
        configs += [
            BenchConfig(PEER_BASELINE, "uncached", "uncached", impl="diffusers"),
            # diffusers skips while err <= threshold, so 0 may still skip; retention 1 never does.
            BenchConfig("diffusers hook never-skip", peer_name, "never-skip", impl="diffusers",
                        hook={**hook, "threshold": 0.0, "retention_ratio": 1.0}),
        ]
        configs += [BenchConfig(f"diffusers hook t={t}", peer_name, impl="diffusers", hook={**hook, "threshold": t},
                                threshold=t) for t in sweep.peer_thresholds]
    return configs


def describe(config: BenchConfig) -> str:
    if config.hook:
        hook = config.hook
        return f"threshold {hook['threshold']}, K {hook['max_skip_steps']}, retention {hook['retention_ratio']}"
    cache = config.cache
    if not cache.enabled:
        return ""
    parts = [f"preset {cache.preset}"] if cache.preset else []
    parts += [f"{k} {v}" for k, v in (("threshold", cache.threshold), ("K", cache.max_skip_steps),
                                      ("retention", cache.retention_ratio)) if v is not None]
    if "mag_ratios" in cache.options:
        parts.append("cond ratios for both branches")
    return ", ".join(parts)


# --------------------------------------------------------------------------- running
def run_section(
    label: str, runners: dict[str, Any], configs: Sequence[BenchConfig], samples: Sequence[SamplingParams],
    repeats: int, measure_fidelity: bool = True,
) -> list[dict[str, Any]]:
    """Round 0 warms up and measures fidelity and memory; rounds 1..repeats are timed, interleaved."""
    if configs[0].name != BASELINE or repeats < 1:
        raise ValueError("the first configuration must be the uncached baseline, and repeats >= 1")
    bar = tqdm(total=len(configs) * len(samples) * (1 + repeats), desc=label, unit="run")
    first: dict[str, RunRecord] = {}
    scores: dict[str, list[dict[str, float]]] = defaultdict(list)
    for sample in samples:
        reference = None
        for config in configs:
            record = runners[config.impl].run(config, sample, measure_memory=True)
            reference = record.frames if reference is None else reference
            if measure_fidelity:
                scores[config.name].append(fidelity(record.frames, reference))
            record.frames = None
            kept = first.setdefault(config.name, record)
            kept.peak_bytes = max(kept.peak_bytes, record.peak_bytes)
            bar.update()
    timed: dict[str, list[RunRecord]] = defaultdict(list)
    for rep in range(repeats):
        order = list(configs[rep % len(configs):]) + list(configs[: rep % len(configs)])
        for sample in samples:
            for config in order:
                record = runners[config.impl].run(config, sample, measure_memory=False)
                record.frames = None
                timed[config.name].append(record)
                bar.update()
    bar.close()
    steps = samples[0].num_inference_steps
    rows = [summarise(c, first[c.name], timed, scores.get(c.name), steps) for c in configs]
    _add_bounds(rows, configs, timed)
    return rows


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def _paired(timed: dict[str, list[RunRecord]], a: str, b: str, fn: Callable[[RunRecord, RunRecord], float]) -> float:
    """Median of ``fn(run of a, run of b)`` over runs made in the same round on the same sample."""
    return _median([fn(x, y) for x, y in zip(timed[a], timed[b], strict=True)])


def _loop_s(record: RunRecord) -> float:
    """Denoising time outside the model and the scheduler: cache calls, residual handling, CFG, loop."""
    return record.denoise_s - sum(record.parts.get(p, 0.0) for p in ("embed", "blocks", "head", "scheduler"))


def summarise(
    config: BenchConfig, first: RunRecord, timed: dict[str, list[RunRecord]], scores: list[dict] | None, steps: int
) -> dict[str, Any]:
    runs = timed[config.name]
    passes = {b: len(s) for b, s in first.computed_steps.items()}
    total = steps * len(passes)
    skipped = total - sum(passes.values())
    ideal = total / (total - skipped)
    speedup = _paired(timed, config.baseline, config.name, lambda base, run: base.denoise_s / run.denoise_s)
    row: dict[str, Any] = {
        "name": config.name, "strategy": config.strategy, "kind": config.kind, "impl": config.impl,
        "settings": describe(config), "threshold": config.threshold,
        "passes": passes, "computed_steps": first.computed_steps, "skipped": skipped,
        "branches_share_plan": len({tuple(s) for s in first.computed_steps.values()}) == 1,
        "ideal_speedup": ideal, "denoise_speedup": speedup, "achieved_over_ideal": speedup / ideal,
        "e2e_speedup": _paired(timed, config.baseline, config.name, lambda base, run: base.e2e_s / run.e2e_s),
        "denoise_ms": 1e3 * _median([r.denoise_s for r in runs]),
        "e2e_ms": 1e3 * _median([r.e2e_s for r in runs]),
        "peak_mem_mib": first.peak_bytes / 2**20,
    }
    if config.impl == "ours":
        parts = {p: 1e3 * _median([r.parts.get(p, 0.0) for r in runs]) / steps
                 for p in ("embed", "blocks", "head", "scheduler", "cache")}
        parts["loop"] = 1e3 * _median([_loop_s(r) for r in runs]) / steps
        row["ms_per_step"] = parts
        row["cache_bytes"] = first.cache_bytes
        row["overhead_ms_per_step"] = 1e3 * _paired(
            timed, config.baseline, config.name, lambda base, run: _loop_s(run) - _loop_s(base)) / steps
    if config.kind == "never-skip":
        row["never_skip_overhead_ms_per_step"] = 1e3 * _paired(
            timed, config.baseline, config.name, lambda base, run: run.denoise_s - base.denoise_s) / steps
    if scores:
        for metric in ("psnr", "ssim", "mae"):
            row[metric] = float(np.mean([s[metric] for s in scores]))
    return row


def _add_bounds(rows: list[dict], configs: Sequence[BenchConfig], timed: dict[str, list[RunRecord]]) -> None:
    """Zero-overhead bound: only the blocks' share of the uncached step shrinks when steps are skipped."""
    base = timed.get(BASELINE)
    if not base:
        return
    denoise = _median([r.denoise_s for r in base])
    blocks = _median([r.parts.get("blocks", 0.0) for r in base])
    for row, config in zip(rows, configs, strict=True):
        if config.impl == "ours":
            saved = blocks * (1 - 1 / row["ideal_speedup"])
            row["bound_speedup"] = denoise / (denoise - saved)
            row["achieved_over_bound"] = row["denoise_speedup"] / row["bound_speedup"]
            row["blocks_share"] = blocks / denoise


# --------------------------------------------------------------------------- calibration & models
def resolve_calibration(
    generator: DiffGenerator, prompts: Sequence[str], base: SamplingParams, workdir: Path, given: str | None = None
) -> tuple[str | None, str, list[float]]:
    """(calibration file, where it came from, cond ratio curve for the peer comparison)."""
    shipped = generator.pipeline.model_info.calibration_file
    if given is not None:
        path, source = Path(given), f"{Path(given).name} (--calibration)"
    elif shipped is not None and shipped.is_file():
        path, source = shipped, f"{shipped.name}, shipped with the model"
    else:
        path = workdir / "calibration.json"
        template = dataclasses.replace(base, seed=CALIBRATION_SEED)
        calibrate(generator, prompts, template, path, show_progress=True)
        source = f"calibrated by the benchmark on its prompts with seeds {CALIBRATION_SEED}+ (not the measured seeds)"
    calibration = CalibrationResult.load(path)
    return str(path), source, list(calibration.branches[COND].mag_ratio)


def _weights_digest(generator: DiffGenerator) -> str:
    """First 12 hex digits of the transformer weights' SHA-256: which weights the numbers belong to."""
    files = sorted((generator.pipeline.model_info.path / "transformer").glob("*.safetensors"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    import diffusers

    info = {"cpu": cpu, "cpu_count": os.cpu_count(), "torch_threads": threads, "device": str(device),
            "torch": torch.__version__, "diffusers": diffusers.__version__, "python": platform.python_version(),
            "load_average_start": list(os.getloadavg())}
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


# --------------------------------------------------------------------------- entry point
@dataclass
class BenchSettings:
    sweep: Sweep
    model_path: str | None = None
    request: dict[str, Any] = field(default_factory=dict)  # SamplingParams overrides: steps, size
    device: str | None = None
    threads: int = 1
    peer: bool = True
    block_heavy: bool = True
    configs: list[BenchConfig] | None = None  # overrides the sweep's configurations
    calibration_file: str | None = None  # default: the model's own, else calibrate on the prompts
    output_dir: Path = REPO / "benchmark" / "results"
    plot_path: Path = REPO / "docs" / "images" / "benchmark_frontier.png"
    tag: str = ""
    command: str = ""


def run_benchmark(settings: BenchSettings) -> dict[str, Any]:
    torch.set_num_threads(settings.threads)
    sweep = settings.sweep
    generator = DiffGenerator.from_pretrained(settings.model_path, device=settings.device)
    device = generator.pipeline.device
    base = generator.validate(SamplingParams(prompt=sweep.prompts[0], **settings.request))
    steps = base.num_inference_steps
    samples = [dataclasses.replace(base, prompt=p, seed=s) for p in sweep.prompts for s in sweep.seeds]
    report: dict[str, Any] = {
        "command": settings.command, "machine": machine_info(device, settings.threads),
        "model": generator.model_name, "weights_sha256": _weights_digest(generator), "num_inference_steps": steps,
        "size": [base.num_frames, base.height, base.width], "guidance_scale": base.guidance_scale,
        "prompts": sweep.prompts, "seeds": sweep.seeds, "repeats": sweep.repeats, "sections": {},
    }
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="bench_cache_") as tmp:
        workdir = Path(tmp)
        if settings.configs is None:
            calibration_file, source, ratios = resolve_calibration(
                generator, sweep.prompts, base, workdir, settings.calibration_file)
            configs = build_configs(sweep, calibration_file, ratios, settings.peer)
        else:
            calibration_file, source, configs = None, "configs given by the caller", settings.configs
        report["calibration"] = source
        runners: dict[str, Any] = {"ours": OursRunner(generator)}
        if any(c.impl == "diffusers" for c in configs):
            pipeline = generator.pipeline
            runners["diffusers"] = DiffusersRunner(str(pipeline.model_info.path), device, pipeline.dtype)
        report["sections"]["main"] = run_section("main", runners, configs, samples, sweep.repeats)
        if settings.block_heavy:
            report["sections"]["block_heavy"] = _block_heavy_section(
                settings, sweep, samples[0], calibration_file, workdir)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    report["wall_s"] = time.perf_counter() - start
    report["checks"] = checks(report)
    write_outputs(report, settings)
    return report


def _block_heavy_section(settings: BenchSettings, sweep: Sweep, sample: SamplingParams,
                         calibration_file: str | None, workdir: Path) -> list[dict[str, Any]]:
    """The speed part on a random Wan transformer with more, wider layers: same plans, blocks dominate."""
    from sglang.multimodal_gen.tools.tiny_models import build_tiny_wan

    path = build_tiny_wan(workdir / "block-heavy-wan", seed=0, transformer_config=BLOCK_HEAVY_TRANSFORMER)
    generator = DiffGenerator.from_pretrained(str(path), device=settings.device)
    configs = [c for c in build_configs(sweep, calibration_file, [], peer=False, teacache=False) if c.kind != "preset"]
    rows = run_section("block-heavy", {"ours": OursRunner(generator)}, configs, [sample], sweep.repeats,
                       measure_fidelity=False)
    for row in rows:
        row["model"] = f"random Wan transformer {BLOCK_HEAVY_TRANSFORMER}"
    return rows


def checks(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's acceptance numbers: achieved / ideal for our MagCache, and ours vs diffusers at equal skips."""
    out: dict[str, Any] = {}
    for section, rows in report["sections"].items():
        mag = [r for r in rows if r["impl"] == "ours" and r["strategy"].startswith("ours magcache") and r["skipped"]]
        if mag:
            out[f"{section}_magcache_min_achieved_over_ideal"] = min(r["achieved_over_ideal"] for r in mag)
            out[f"{section}_magcache_min_achieved_over_bound"] = min(r["achieved_over_bound"] for r in mag)
    out["peer"] = peer_pairs(report["sections"]["main"])
    return out


def peer_pairs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ours with diffusers' settings vs the diffusers hook, threshold by threshold."""
    ours = {r["threshold"]: r for r in rows if r["strategy"] == "ours magcache, diffusers' settings"}
    theirs = {r["threshold"]: r for r in rows if r["strategy"] == "diffusers magcache hook" and r["kind"] == "sweep"}
    pairs = []
    for t in sorted(set(ours) & set(theirs)):
        a, b = ours[t], theirs[t]
        pair = {"threshold": t, "skipped_ours": a["skipped"], "skipped_diffusers": b["skipped"],
                "same_plan": a["computed_steps"] == b["computed_steps"],
                "speedup_ours": a["denoise_speedup"], "speedup_diffusers": b["denoise_speedup"]}
        if "psnr" in a:
            for metric in ("psnr", "ssim", "mae"):
                pair[f"{metric}_ours"], pair[f"{metric}_diffusers"] = a[metric], b[metric]
            # Same plan, same arithmetic: equal up to float rounding (0.01 dB).
            pair["fidelity_at_least_diffusers"] = a["psnr"] >= b["psnr"] - 0.01
        pairs.append(pair)
    return pairs


# --------------------------------------------------------------------------- outputs
def _fmt(value: Any, digits: int = 2) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}f}"
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return "\n".join(lines)


def main_table(rows: list[dict[str, Any]], fidelity_columns: bool = True) -> str:
    headers = ["config", "settings", "passes cond/uncond", "ideal", "achieved", "achieved/ideal", "bound",
               "e2e speedup", "denoise ms", "e2e ms", "overhead ms/step", "cache KiB", "peak MiB"]
    if fidelity_columns:
        headers += ["PSNR dB", "SSIM", "MAE"]
    body = []
    for r in rows:
        passes = "/".join(str(n) for n in r["passes"].values()) + ("" if r["branches_share_plan"] else " †")
        line = [r["name"], r["settings"], passes, r["ideal_speedup"],
                r["denoise_speedup"], r["achieved_over_ideal"], r.get("bound_speedup"), r["e2e_speedup"],
                r["denoise_ms"], r["e2e_ms"], r.get("overhead_ms_per_step"),
                _fmt(r["cache_bytes"] / 1024, 1) if "cache_bytes" in r else "", r["peak_mem_mib"]]
        if fidelity_columns:
            line += [r.get("psnr"), _fmt(r.get("ssim"), 4), _fmt(r.get("mae"), 4)]
        body.append(line)
    return _table(headers, body)


def breakdown_table(rows: list[dict[str, Any]]) -> str:
    parts = ("embed", "blocks", "head", "scheduler", "cache", "loop")
    body = [[r["name"], *(r["ms_per_step"][p] for p in parts), _fmt(100 * r.get("blocks_share", 0.0), 1)]
            for r in rows if "ms_per_step" in r and r["kind"] in ("uncached", "never-skip")]
    return _table(["config", *(f"{p} ms/step" for p in parts), "blocks % of uncached"], body)


def peer_table(pairs: list[dict[str, Any]]) -> str:
    body = [[p["threshold"], f"{p['skipped_ours']} / {p['skipped_diffusers']}", "yes" if p["same_plan"] else "no",
             f"{_fmt(p['speedup_ours'])} / {_fmt(p['speedup_diffusers'])}",
             f"{_fmt(p.get('psnr_ours'), 3)} / {_fmt(p.get('psnr_diffusers'), 3)}",
             f"{_fmt(p.get('ssim_ours'), 4)} / {_fmt(p.get('ssim_diffusers'), 4)}",
             f"{_fmt(p.get('mae_ours'), 5)} / {_fmt(p.get('mae_diffusers'), 5)}"] for p in pairs]
    return _table(["threshold", "skipped ours / diffusers", "same plan", "denoise speedup", "PSNR dB", "SSIM", "MAE"],
                  body)


def render_markdown(report: dict[str, Any]) -> str:
    m = report["machine"]
    main = report["sections"]["main"]
    never = {r["name"]: r for r in main if r["kind"] == "never-skip"}
    lines = [
        f"# Caching benchmark: {report['model']}",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']} with {m['torch_threads']} thread(s), "
        f"diffusers {m['diffusers']}, device {m['device']}; load average {_fmt(m['load_average_start'][0])} at start, "
        f"{_fmt(m['load_average_end'][0])} at end.  ",
        f"Request: {report['size'][0]} frames {report['size'][1]}x{report['size'][2]}, {report['num_inference_steps']} "
        f"steps, guidance {report['guidance_scale']}; {len(report['prompts'])} prompt(s) x seeds {report['seeds']}; "
        f"{report['repeats']} timed round(s) after one warm-up round; wall time {report['wall_s']:.0f} s.  ",
        f"Calibration: {report['calibration']}. Transformer weights sha256 {report['weights_sha256']}.",
        "",
        "Speedups are of the denoising stage against the uncached run of the same implementation (medians of "
        "ratios within a round); *ideal* = N / (N - skipped) transformer passes; *bound* = the speedup if only the "
        "blocks' share of the uncached step shrank and caching cost nothing; *overhead* = extra time per step in "
        "the loop outside the model and scheduler (decisions, residual store/add) vs uncached; *cache KiB* = the "
        "residuals the strategy holds; *peak* = process RSS sampled every 2 ms during the run on CPU (all loaded "
        "models included), torch.cuda.max_memory_allocated on CUDA. Fidelity: decoded frames against our uncached "
        "output of the same seed.",
        "",
        "## All configurations",
        "",
        main_table(main),
        "",
        "† cond and uncond run different steps.",
        "",
        "## Where the denoising time goes",
        "",
        breakdown_table(main),
        "",
    ]
    if never:
        extra = ", ".join(f"{n} {_fmt(r['never_skip_overhead_ms_per_step'], 3)} ms" for n, r in never.items())
        lines += [f"Never-skipping configurations minus uncached, per step: {extra}.", ""]
    if report["checks"]["peer"]:
        lines += ["## Ours vs diffusers' MagCache hook (same ratios, threshold, K, retention)", "",
                  peer_table(report["checks"]["peer"]), ""]
    if "block_heavy" in report["sections"]:
        rows = report["sections"]["block_heavy"]
        lines += ["## Block-dominated model (speed only; random weights)", "",
                  f"{rows[0]['model']}; first prompt and seed.", "",
                  main_table(rows, fidelity_columns=False), "", breakdown_table(rows), ""]
    lines += ["## Checks", "", "```", json.dumps({k: v for k, v in report["checks"].items() if k != "peer"},
                                                  indent=1), "```", ""]
    return "\n".join(lines)


def plot_frontier(report: dict[str, Any], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    # PSNR is inf (None once saved as JSON) for configurations identical to uncached.
    rows = [r for r in report["sections"]["main"] if r.get("psnr") is not None and math.isfinite(r["psnr"])]
    styles = {"ours magcache": "o-", "ours magcache, per-branch plans (release)": "x-.", "ours teacache": "s-",
              "ours magcache, diffusers' settings": "^--", "diffusers magcache hook": "v:"}
    for strategy, style in styles.items():
        line = sorted((r for r in rows if r["strategy"] == strategy and r["kind"] == "sweep"),
                      key=lambda r: r["threshold"])
        if line:
            (handle,) = ax.plot([r["denoise_speedup"] for r in line], [r["psnr"] for r in line], style, label=strategy)
            for r in rows:
                if r["strategy"] == strategy and r["kind"] == "preset":
                    ax.plot(r["denoise_speedup"], r["psnr"], "*", markersize=12, color=handle.get_color())
                    ax.annotate(r["name"], (r["denoise_speedup"], r["psnr"]), fontsize=7,
                                textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("denoising speedup vs uncached (achieved)")
    ax.set_ylabel("PSNR vs uncached (dB)")
    ax.set_title(f"{report['model']}: {report['num_inference_steps']} steps, {report['machine']['device']} "
                 "(stars: presets)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _jsonable(value: Any) -> Any:
    """Strict JSON: infinite PSNR (identical output) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_outputs(report: dict[str, Any], settings: BenchSettings) -> None:
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    stem = settings.output_dir / f"bench_cache_{report['machine']['device'].split(':')[0]}{settings.tag}"
    report["outputs"] = {"json": str(stem.with_suffix(".json")), "markdown": str(stem.with_suffix(".md")),
                         "plot": str(settings.plot_path)}
    stem.with_suffix(".json").write_text(json.dumps(_jsonable(report), indent=1, allow_nan=False) + "\n")
    stem.with_suffix(".md").write_text(render_markdown(report))
    plot_frontier(report, settings.plot_path)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default=None, help="diffusers-layout Wan folder; default: the built-in model")
    parser.add_argument("--num-inference-steps", type=int, default=None, help="default: the model's")
    parser.add_argument("--height", type=int, default=None, help="default: the model's")
    parser.add_argument("--width", type=int, default=None, help="default: the model's")
    parser.add_argument("--num-frames", type=int, default=None, help="default: the model's")
    parser.add_argument("--full", action="store_true", help="the full sweep (more prompts, seeds, thresholds, rounds)")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds after the warm-up round")
    parser.add_argument("--calibration", default=None,
                        help="calibration file (sglang calibrate); default: the model's, else calibrate on the prompts")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N; default: cuda if available")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: shared machine)")
    parser.add_argument("--no-peer", action="store_true", help="skip diffusers' WanPipeline + MagCache hook")
    parser.add_argument("--no-block-heavy", action="store_true", help="skip the block-dominated speed model")
    parser.add_argument("--output-dir", type=Path, default=REPO / "benchmark" / "results")
    parser.add_argument("--plot", type=Path, default=REPO / "docs" / "images" / "benchmark_frontier.png")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    sweep = Sweep.full() if args.full else Sweep.default()
    if args.repeats is not None:
        sweep.repeats = args.repeats
    settings = BenchSettings(
        sweep=sweep, model_path=args.model_path, device=args.device,
        request={k: v for k in ("num_inference_steps", "height", "width", "num_frames")
                 if (v := getattr(args, k)) is not None},
        threads=args.threads, calibration_file=args.calibration, peer=not args.no_peer,
        block_heavy=not args.no_block_heavy, output_dir=args.output_dir, plot_path=args.plot,
        tag="_full" if args.full else "",
        command=" ".join(["python benchmark/bench_cache.py", *(sys.argv[1:] if argv is None else argv)]),
    )
    report = run_benchmark(settings)
    print(render_markdown(report))
    print(f"wrote {report['outputs']['json']}, {report['outputs']['markdown']}, {report['outputs']['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
