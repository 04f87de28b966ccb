"""Offline API: load a model once, generate many videos (``DiffGenerator``, as sglang names it)."""

from __future__ import annotations

import collections
import dataclasses
import importlib
import logging
from pathlib import Path
from typing import Any, Callable

import torch
from PIL import Image

from sglang.multimodal_gen.configs.models import ModelInfo, read_model_info
from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.errors import InvalidRequestError
from sglang.multimodal_gen.runtime.cache.budget import PASSES_ONLY, StepCosts
from sglang.multimodal_gen.runtime.cache.calibration import CalibrationResult, apply_calibration, load_calibration
from sglang.multimodal_gen.runtime.cache.error_growth import LatentProbe
from sglang.multimodal_gen.runtime.cache.experts import gives_model_data, presetless_refusal
from sglang.multimodal_gen.runtime.cache.planner import BudgetPlanner, planner_or_fallback
from sglang.multimodal_gen.runtime.cache.registry import get_cache_class
from sglang.multimodal_gen.runtime.distributed.worker_group import ParallelConfig, WorkerGroup
from sglang.multimodal_gen.runtime.models.loader import BUILTIN_MODELS_DIR, resolve_model_path
from sglang.multimodal_gen.runtime.pipelines.base import GenerationResult, Pipeline, ProgressCallback, VideoGeometry
from sglang.multimodal_gen.runtime.stages.denoising import DenoisingStage
from sglang.multimodal_gen.runtime.utils.timing import device_label
from sglang.multimodal_gen.runtime.utils.video_io import check_output_path, save_video

logger = logging.getLogger(__name__)

# The default --model-path; the other built-in models are chosen by folder name (loader.BUILTIN_MODELS_DIR).
BUILTIN_MODEL_PATH = BUILTIN_MODELS_DIR / "wan2.1-t2v-tiny"

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
           "float16": torch.float16, "fp16": torch.float16}


def resolve_device(device: str | None) -> torch.device:
    """``None`` picks CUDA when present; anything torch cannot use is refused in one line."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, ValueError):
        raise InvalidRequestError(f"unknown device {device!r}; use cpu, cuda or cuda:N", param="device") from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise InvalidRequestError(f"device {device!r} requested but CUDA is not available here", param="device")
    if resolved.type == "cuda" and resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise InvalidRequestError(
            f"device {device!r} does not exist: this machine has {torch.cuda.device_count()} CUDA device(s), "
            f"cuda:0 to cuda:{torch.cuda.device_count() - 1}",
            param="device",
        )
    if resolved.type not in ("cpu", "cuda"):
        raise InvalidRequestError(f"device type {resolved.type!r} is not supported; use cpu or cuda", param="device")
    return resolved


def resolve_dtype(dtype: str | None, device: torch.device) -> torch.dtype:
    """``None`` means bfloat16 on CUDA and float32 on the CPU."""
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in _DTYPES:
        raise InvalidRequestError(f"unknown dtype {dtype!r}; choose one of {', '.join(_DTYPES)}", param="dtype")
    return _DTYPES[dtype]


def resolve_batched_cfg(batched_cfg: bool | None, enable_cfg_parallel: bool = False) -> bool:
    """Whether the denoising stage runs cond and uncond as one batch of 2. ``None`` ("auto"): on.
    On CUDA one pass of batch 2 keeps the GPU busier than two of batch 1 (sglang's default); on
    the CPU it measured faster too, 1.21-1.25x denoising on the built-in model and 1.08-1.10x on a
    block-dominated one (benchmark/fast_path.py, docs/benchmarks.md). CFG parallel puts the
    branches on different ranks, so there is nothing to batch."""
    if enable_cfg_parallel:
        if batched_cfg:
            logger.warning("--batched-cfg does not apply with --enable-cfg-parallel: each rank runs one branch")
        return False
    return True if batched_cfg is None else bool(batched_cfg)


def resolve_offload_idle_expert(offload_idle_expert: bool, info: ModelInfo, device: torch.device) -> bool:
    """Whether the pipeline keeps its idle expert on the CPU: refused in one line (before any
    load) for a model with one transformer, where nothing is idle; off, with one info line, on a
    CPU, where the weights already are where they would be offloaded to."""
    if not offload_idle_expert:
        return False
    if not info.two_experts:
        raise InvalidRequestError(
            f"--offload-idle-expert needs a model with two experts (Wan2.2 T2V-A14B's transformer and "
            f"transformer_2); {info.path.name} has one transformer", param="offload_idle_expert")
    if device.type == "cpu":
        logger.info("--offload-idle-expert does nothing on a CPU: there is no device memory to offload to")
        return False
    return True


def pipeline_class(info: ModelInfo) -> type[Pipeline]:
    """The pipeline of a model folder: its family module's ``PIPELINE_CLASS`` (which reads the
    folder's kind, text or image to video, from ``info``)."""
    return importlib.import_module(info.family.pipeline_module).PIPELINE_CLASS


def denoising_stage(pipeline: Pipeline) -> DenoisingStage:
    """The pipeline's denoising stage (every pipeline has exactly one)."""
    return next(stage for stage in pipeline.stages if isinstance(stage, DenoisingStage))


class DiffGenerator:
    """A loaded pipeline. ``generate`` runs one request; requests never share cache state."""

    def __init__(
        self,
        pipeline: Pipeline,
        model_path: str,
        cache_calibration: str | None = None,
        workers: WorkerGroup | None = None,
    ) -> None:
        self.pipeline = pipeline
        self.model_path = model_path
        self.cache_calibration = cache_calibration
        self.workers = workers
        self._measured_step_costs: StepCosts | None = None

    @classmethod
    def from_pretrained(
        cls,
        model_path: str | None = None,
        device: str | None = None,
        dtype: str | None = None,
        cache_calibration: str | None = None,
        *,
        num_gpus: int = 1,
        enable_cfg_parallel: bool = False,
        ulysses_degree: int | None = None,
        sp_degree: int | None = None,
        dist_timeout_s: float | None = None,
        worker_init: Callable[[], None] | None = None,
        enable_torch_compile: bool = False,
        batched_cfg: bool | None = None,
        offload_idle_expert: bool = False,
    ) -> "DiffGenerator":
        """Load a model. ``cache_calibration``: a calibration file every cached request uses unless
        it names its own (it takes precedence over the model folder's own calibration).

        ``num_gpus > 1`` starts ``num_gpus - 1`` worker processes (this process is rank 0) that
        load the same model and run every request with it: ``enable_cfg_parallel`` puts the cond
        and uncond branches on different ranks, ``ulysses_degree`` (or ``sp_degree``) shards the
        sequence. ``dist_timeout_s`` bounds every collective; ``worker_init`` is a picklable
        function each worker runs before loading. Call :meth:`close` to stop the workers.

        ``enable_torch_compile`` compiles the DiT's transformer blocks (``DiTAdapter.compile_blocks``);
        the first request of each new shape pays the compile. ``batched_cfg`` runs the cond and
        uncond branches as one batch of 2 (``None``: on unless CFG parallel; see
        :func:`resolve_batched_cfg`); ``False`` gives the two passes diffusers' pipelines run.
        ``offload_idle_expert`` (Wan2.2 two-expert models) keeps the expert that is not running on
        the CPU (:func:`resolve_offload_idle_expert`). Worker processes build their pipelines with
        all three."""
        extra: dict[str, Any] = {} if dist_timeout_s is None else {"timeout_s": dist_timeout_s}
        parallel = ParallelConfig.from_flags(num_gpus, enable_cfg_parallel, ulysses_degree, sp_degree, **extra)
        model_path = str(model_path or BUILTIN_MODEL_PATH)
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        info = read_model_info(resolve_model_path(model_path))
        parallel.check(info.family, info.num_attention_heads)
        if cache_calibration is not None:
            load_calibration(cache_calibration).check_model(info.family.name)
        use_batched_cfg = resolve_batched_cfg(batched_cfg, parallel.enable_cfg_parallel)
        offload = resolve_offload_idle_expert(offload_idle_expert, info, torch_device)
        pipeline_cls = pipeline_class(info)
        options = {"offload_idle_expert": True} if offload else {}

        def load() -> Pipeline:
            logger.info("loading %s model from %s on %s (%s)", info.family.name, info.path, torch_device, torch_dtype)
            pipeline = pipeline_cls(info, torch_device, torch_dtype, **options)
            stage = denoising_stage(pipeline)
            stage.batched_cfg = use_batched_cfg
            stage.sync_free_scheduler = torch_device.type == "cuda"
            if enable_torch_compile:
                for adapter in stage.adapters.values():
                    adapter.compile_blocks()
            return pipeline

        if parallel.num_gpus == 1:
            return cls(load(), model_path, cache_calibration)
        if torch_device.type == "cuda" and torch.cuda.device_count() < parallel.num_gpus:
            raise InvalidRequestError(
                f"--num-gpus {parallel.num_gpus} but this machine has {torch.cuda.device_count()} CUDA device(s); "
                "one process per GPU (use --device cpu for gloo processes)", param="num_gpus")
        if torch_device.type == "cuda":
            torch_device = torch.device("cuda", 0)
        load_args = dict(model_path=model_path, device=str(torch_device), dtype=dtype,
                         cache_calibration=cache_calibration, enable_torch_compile=enable_torch_compile,
                         batched_cfg=use_batched_cfg, offload_idle_expert=offload)
        workers = WorkerGroup(parallel, load_args, load, load_worker_pipeline, worker_init,
                              preload=(__name__, info.family.pipeline_module, *WORKER_PRELOAD))
        return cls(workers.pipeline, model_path, cache_calibration, workers)

    def close(self) -> None:
        """Stop the worker processes of a multi-process generator (nothing for one process)."""
        if self.workers is not None:
            self.workers.close()
            self.workers = None

    def __enter__(self) -> "DiffGenerator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    @property
    def geometry(self) -> VideoGeometry:
        """The size and frame-count strides this model's requests must respect."""
        return self.pipeline.geometry

    @property
    def model_name(self) -> str:
        """The hub id, or the folder name of a local model (no machine-specific absolute path)."""
        path = Path(self.model_path)
        return path.name if path.exists() else self.model_path

    def validate(self, params: SamplingParams) -> SamplingParams:
        """Check a request without running it; returns it with the model's defaults filled in."""
        if params.output_path is not None:
            check_output_path(params.output_path)
        return self.pipeline.validate(self._with_calibration(params)).params

    def _with_calibration(self, params: SamplingParams) -> SamplingParams:
        """Swap the shipped presets for a calibration file: the request's, the server's, the model's;
        with a speedup, add what a skipped step costs (:meth:`step_costs`)."""
        info = self.pipeline.model_info
        if not params.cache.enabled:
            return params
        calibration_file = params.cache.calibration_file or self.cache_calibration or info.calibration_file
        calibration = load_calibration(calibration_file) if calibration_file else None
        cache = params.cache
        steps = params.num_inference_steps or info.sampling_defaults.get("num_inference_steps", 1)
        expert_steps = self._expert_steps(steps)
        if (expert_steps or info.expand_timesteps) and calibration is None \
                and not gives_model_data(get_cache_class(cache.strategy), cache.options):
            asked = "--cache-speedup" if cache.strategy == BudgetPlanner.name else f"--cache {cache.strategy}"
            raise presetless_refusal(asked, several_experts=bool(expert_steps))
        if cache.strategy == BudgetPlanner.name:
            cache = planner_or_fallback(cache, calibration)
        if calibration_file is not None:
            cache = apply_calibration(cache, calibration_file, info.family.name, steps, expert_steps)
        if cache.step_costs is None and takes_a_speedup(cache):
            if self._recorded_step_costs(calibration) is None and self._measured_step_costs is None:
                # A measurement is a generation: refuse what the request gets wrong before spending one.
                self.pipeline.validate(dataclasses.replace(
                    params, cache=dataclasses.replace(cache, step_costs=PASSES_ONLY)))
            cache = dataclasses.replace(cache, step_costs=self.step_costs(calibration))
        return dataclasses.replace(params, cache=cache)

    def _expert_steps(self, num_inference_steps: object) -> dict[str, int] | None:
        """Each expert's steps in a request of ``num_inference_steps`` (``None`` for one transformer,
        or a step count the request's validation will refuse)."""
        schedule = self.pipeline.expert_schedule
        if schedule is None or not isinstance(num_inference_steps, int) or isinstance(num_inference_steps, bool) \
                or num_inference_steps < 1:
            return None
        return dict(collections.Counter(schedule(num_inference_steps)))

    def step_costs(self, calibration: CalibrationResult | None = None) -> StepCosts:
        """What a step costs outside the part a cache skips, for a speedup to be a time budget: the
        calibration's when it was measured on this kind of device in this dtype (bf16 on a CPU
        shifts the shares: its matrix products are slower), else measured once on this
        generator by a short uncached run at the model's default size (every rank takes part;
        the request carries the result to all of them, so every rank plans the same)."""
        recorded = self._recorded_step_costs(calibration)
        if recorded is not None:
            return recorded
        if self._measured_step_costs is None:
            self._measured_step_costs = self.measure_step_costs(SamplingParams(prompt="step costs"))
            logger.info("measured step costs on %s: embed and head %.3f, step tail %.3f of a model call",
                        self._measured_step_costs.device, self._measured_step_costs.embed_and_head,
                        self._measured_step_costs.step_tail)
        return self._measured_step_costs

    def _recorded_step_costs(self, calibration: CalibrationResult | None) -> StepCosts | None:
        """The calibration's step costs where they were timed on this kind of device in this dtype."""
        recorded = calibration.step_costs() if calibration is not None else None
        if (recorded is not None and recorded.device == device_label(self.pipeline.device)
                and calibration.dtype == str(self.pipeline.dtype).removeprefix("torch.")):
            return recorded
        return None

    def prepare_step_costs(self) -> StepCosts:
        """:meth:`step_costs` for the generator's own calibration, measured now if it holds none
        for this device. A server calls it before taking requests: a measurement is a generation,
        which must not run beside one of a request's."""
        calibration_file = self.cache_calibration or self.pipeline.model_info.calibration_file
        return self.step_costs(load_calibration(calibration_file) if calibration_file else None)

    def measure_step_costs(self, params: SamplingParams) -> StepCosts:
        """Time ``STEP_COST_STEPS`` uncached denoising steps of ``params`` (nothing decoded)."""
        params = dataclasses.replace(params, num_inference_steps=STEP_COST_STEPS)
        if self.pipeline.model_info.image_to_video and params.image is None:
            params = dataclasses.replace(params, image=_STEP_COST_IMAGE)  # any frame costs the same
        return self._denoise_uncached(params).step_costs

    def trace_latents(self, params: SamplingParams, probe: LatentProbe) -> None:
        """Run ``params`` uncached through denoising only, ``probe`` seeing the latents after every
        step: what ``sglang calibrate`` measures an error's growth with."""
        self._denoise_uncached(params, probe)

    def _denoise_uncached(self, params: SamplingParams, probe: LatentProbe | None = None) -> GenerationResult:
        """``params`` without a cache through the denoising stage only (nothing decoded), on every rank."""
        params = dataclasses.replace(params, cache=CacheParams(), output_path=None)
        if self.workers is None:
            return self.pipeline.run(params, stop_after="denoising", probe=probe)
        self.pipeline.validate(params)
        return self.workers.run(self.pipeline, params, stop_after="denoising", probe=probe)

    def generate(
        self,
        params: SamplingParams,
        progress: ProgressCallback | None = None,
        show_progress_bar: bool = False,
        calibrate: bool = False,
        probe: LatentProbe | None = None,
    ) -> GenerationResult:
        """One generation; ``calibrate`` records what ``sglang calibrate`` keeps, and ``probe`` sees
        the latents after every step (``cache/error_growth.py``)."""
        if params.output_path is not None:
            check_output_path(params.output_path)
        params = self._with_calibration(params)
        kwargs = dict(progress=progress, show_progress_bar=show_progress_bar, calibrate=calibrate, probe=probe)
        if self.workers is None:
            result = self.pipeline.run(params, **kwargs)
        else:
            self.pipeline.validate(params, calibrate=calibrate)  # refuse bad input before any worker sees it
            result = self.workers.run(self.pipeline, params, **kwargs)
        if params.output_path is not None:
            result.output_path = str(save_video(result.frames, params.output_path, result.params.fps))
        return result


#: Steps of the uncached run that measures step costs: the median over them leaves out the first
#: (kernel warm-up, a compile).
STEP_COST_STEPS = 5
#: The first frame of an image-to-video model's step-cost run (resized to the model's size like any).
_STEP_COST_IMAGE = Image.new("RGB", (64, 64), (128, 128, 128))


def takes_a_speedup(cache: CacheParams) -> bool:
    """Whether the request's cache works to a ``--cache-speedup`` budget."""
    return cache.speedup is not None or get_cache_class(cache.strategy).default_speedup is not None


# What every worker imports to load a model, imported once in the workers' fork server: the two
# libraries' model bases and transformers' index of its models (seconds of a start on a CPU).
WORKER_PRELOAD = ("transformers.models", "transformers.modeling_utils", "diffusers.models.modeling_utils")


def load_worker_pipeline(load: dict[str, Any]) -> Pipeline:
    """A worker rank's pipeline, loaded from the same arguments as rank 0's (with the worker's
    device): what :class:`WorkerGroup` runs in each worker process (picklable, by name)."""
    return DiffGenerator.from_pretrained(**load).pipeline
