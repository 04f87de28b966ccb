"""How the caching benchmark runs a configuration and what it records.

Runners for our pipeline (its denoising stage unchanged, with the DiT adapter, scheduler and cache
calls timed) and for diffusers' ``WanPipeline`` with the MagCache hook; the interleaved timing
rounds; the per-configuration summary row; calibration, weights digest and machine description.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import hashlib
import os
import platform
import statistics
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Protocol, Sequence

import numpy as np
import torch
from bench_configs import BASELINE, BenchConfig, describe
from metrics import PeakMemory, fidelity
from tqdm.auto import tqdm

from sglang.multimodal_gen.configs.models import read_model_info
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.cache.base import COND, UNCOND
from sglang.multimodal_gen.runtime.cache.calibration import CalibrationResult
from sglang.multimodal_gen.runtime.entrypoints.calibrate import calibrate
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator
from sglang.multimodal_gen.runtime.pipelines.base import PipelineStage, Req
from sglang.multimodal_gen.runtime.stages.denoising import DenoisingStage

CALIBRATION_SEED = 1000  # calibration runs use other seeds than the measured ones


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


class Runner(Protocol):
    """Runs one configuration on one request; ``BenchConfig.impl`` picks the runner."""

    def run(self, config: BenchConfig, params: SamplingParams, measure_memory: bool) -> RunRecord: ...


# --------------------------------------------------------------------------- our pipeline
class LoopProfile:
    """Seconds spent in each wrapped call during one denoising loop."""

    def __init__(self, device: torch.device) -> None:
        self.sync = device.type == "cuda"
        self.reset()

    def reset(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.cache_bytes: dict[str, int] = {}

    def wrap(self, part: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        """``fn`` with its time added to ``part`` (after a CUDA sync, so queued kernels count)."""

        def timed(*args: Any, **kwargs: Any) -> Any:
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
    """Our pipeline, with its denoising stage swapped for the profiled one when the runner is made."""

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

    def _on_transformer_call(self, module: torch.nn.Module, args: tuple[Any, ...]) -> None:
        if not self._calls:
            self._first_call = self._now()
        self._calls.append(False)

    def _on_block_run(self, module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        self._calls[-1] = True

    def _on_step_end(
        self, pipe: Any, step: int, timestep: torch.Tensor, callback_kwargs: dict[str, Any]
    ) -> dict[str, Any]:
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


# --------------------------------------------------------------------------- running
def run_section(
    label: str, runners: dict[str, Runner], configs: Sequence[BenchConfig], samples: Sequence[SamplingParams],
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
    config: BenchConfig, first: RunRecord, timed: dict[str, list[RunRecord]], scores: list[dict[str, float]] | None,
    steps: int,
) -> dict[str, Any]:
    """One table row: plan and passes from the warm-up run, times from the timed rounds, mean fidelity."""
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


def _add_bounds(rows: list[dict[str, Any]], configs: Sequence[BenchConfig], timed: dict[str, list[RunRecord]]) -> None:
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


def weights_digest(generator: DiffGenerator) -> str:
    """First 12 hex digits of the transformer weights' SHA-256: which weights the numbers belong to."""
    files = sorted((generator.pipeline.model_info.path / "transformer").glob("*.safetensors"))
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def machine_info(device: torch.device, threads: int) -> dict[str, Any]:
    """What the timings depend on: CPU, threads, device, library versions, load at the start."""
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
