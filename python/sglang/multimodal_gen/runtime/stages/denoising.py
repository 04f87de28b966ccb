"""The denoising loop: per step and CFG branch, run the DiT blocks or reuse the cached residual."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from sglang.multimodal_gen.runtime.cache.branches import COND, UNCOND
from sglang.multimodal_gen.runtime.cache.budget import StepCosts
from sglang.multimodal_gen.runtime.cache.experts import ExpertCaches
from sglang.multimodal_gen.runtime.cache.strategy import StepFeatures, TimestepCache
from sglang.multimodal_gen.runtime.distributed.cfg_parallel import BranchPlacement
from sglang.multimodal_gen.runtime.models.base import DiTAdapter, take_rows
from sglang.multimodal_gen.runtime.models.experts import HIGH_NOISE, LOW_NOISE, ExpertSwitch
from sglang.multimodal_gen.runtime.pipelines.base import PipelineStage, Req
from sglang.multimodal_gen.runtime.utils.sync_free import SolveWithoutErrorCheck
from sglang.multimodal_gen.runtime.utils.timing import PassTimer, device_label

logger = logging.getLogger(__name__)


@dataclass
class ModelInputs:
    """What the model takes besides latents and timestep, for one CFG branch or for several stacked
    as one batch: the prompt embedding, the branch's conditioning (HunyuanVideo's mask, pooled
    prompt and guidance) and the adapter's ``request_constants``, the last two as keyword
    arguments of ``embed``."""

    encoder_hidden_states: torch.Tensor
    conditioning: dict[str, Any] = field(default_factory=dict)
    constants: dict[str, Any] = field(default_factory=dict)

    @property
    def kwargs(self) -> dict[str, Any]:
        return {**self.conditioning, **self.constants}


@dataclass(frozen=True)
class StepInputs:
    """What every branch of one denoising step takes: the step index, the latents as the
    scheduler holds them (what a skipped whole-model call adds its estimate to), the same in the
    model dtype, the timestep and the scheduler's sigma."""

    step: int
    latents: torch.Tensor
    model_input: torch.Tensor
    timestep: torch.Tensor
    sigma: float | None


class BranchInputs:
    """The model inputs of any batch of this process's CFG branches: stacked on the batch
    dimension, with the adapter's request constants of that batch, each made once per request.

    Args:
        adapter: Computes the request constants (``request_constants``).
        dtype: The model's compute dtype, which the latents take to enter the model.
        inputs: Each branch's inputs, without constants.
        latents: The request's initial latents (one branch's batch).
    """

    def __init__(self, adapter: DiTAdapter, dtype: torch.dtype, inputs: dict[str, ModelInputs],
                 latents: torch.Tensor) -> None:
        self._adapter = adapter
        self._dtype = dtype
        self._inputs = inputs
        self._latents = latents
        self._batches: dict[tuple[str, ...], ModelInputs | None] = {}

    def batch(self, branches: tuple[str, ...]) -> ModelInputs | None:
        """The inputs of ``branches`` as one batch, or ``None`` where they do not stack (tensors of
        different shapes or other values that differ)."""
        if branches not in self._batches:
            self._batches[branches] = self._stack(branches)
        return self._batches[branches]

    def _stack(self, branches: tuple[str, ...]) -> ModelInputs | None:
        parts = [self._inputs[b] for b in branches]
        if len(parts) == 1:
            return self._with_constants(parts[0].encoder_hidden_states, parts[0].conditioning, self._latents)
        names = set(parts[0].conditioning)
        if any(set(p.conditioning) != names for p in parts):
            return None
        stacked = {name: _stack([p.conditioning[name] for p in parts]) for name in names}
        embeds = _stack([p.encoder_hidden_states for p in parts])
        if embeds is _UNSTACKABLE or any(value is _UNSTACKABLE for value in stacked.values()):
            return None
        return self._with_constants(embeds, stacked, torch.cat([self._latents] * len(parts)))

    def _with_constants(
        self, encoder_hidden_states: torch.Tensor, conditioning: dict[str, Any], latents: torch.Tensor
    ) -> ModelInputs:
        constants = self._adapter.request_constants(latents.to(self._dtype), encoder_hidden_states, **conditioning)
        return ModelInputs(encoder_hidden_states, conditioning, constants)


class DenoisingStage(PipelineStage):
    """Knows caching only through ``TimestepCache``: one ``should_compute`` per step and branch.

    Each step runs this process's CFG branches in batches: with ``batched_cfg`` all of them as
    one batch, otherwise (as diffusers' WanPipeline does) a batch of one per branch, cond first.
    Every batch goes through :meth:`_predict`, the one place that asks the cache, runs what
    computes, stores and reuses. The strategy says what a skip covers: the blocks (the batch is
    embedded, the branches that compute run the blocks as one batch, the head runs on all), or
    with ``skips_whole_model`` the whole model call (asked before any embedding; the branches
    that compute run the model as one batch, a skipped one returns the latents plus its
    estimate of the model output minus them, or with ``skip_relative_to_input`` off its
    estimate of the output itself). ``req.conditioning[branch]`` holds any further
    model inputs of a branch and reaches ``adapter.embed`` as keyword arguments, with the
    adapter's ``request_constants`` (computed once per request and batch). A :class:`PassTimer`
    times the loop, each step, every pass the cache may skip (a pass of a batch counts once per
    branch in it) and the model's work around the blocks (embed, head); with a cache the figures
    go to its stats (``CacheStats.record_timing``) for the measured speedup, without one they
    become the run's step costs (``req.step_costs``, what a time budget plans with). With CFG
    parallel a :class:`BranchPlacement` names the branches this rank runs and gathers every
    branch's prediction before guidance, so every rank steps the scheduler on the same values.

    Args:
        adapter: The model's embed / blocks / head split.
        dtype: The compute dtype the pipeline loaded the transformer in: latents and guidance
            enter the model in it, as diffusers' pipelines cast them to ``transformer.dtype``.
        embedded_guidance_scale: For guidance-distilled models (HunyuanVideo), which take the
            guidance as a model input rather than from a second CFG branch: every branch then gets
            ``guidance = guidance_scale * embedded_guidance_scale`` (1000 for HunyuanVideo, as its
            diffusers pipeline passes it). ``None`` (Wan) passes no guidance input.
        timestep_in_latent_dtype: HunyuanVideo's pipeline casts the timestep to the latents' dtype,
            which its scheduler turns into the model dtype after the first step (so in bf16 the
            timestep is rounded to bf16, e.g. 996.5 -> 996); Wan's passes it in fp32. We follow each.
        batched_cfg: Run this process's CFG branches as one batch (``--batched-cfg``): fewer,
            larger kernels, the same predictions up to the rounding of a batch-2 matrix product.
            Branches whose inputs differ in shape still run one by one.
        sync_free_scheduler: Step the scheduler in :class:`SolveWithoutErrorCheck` (UniPC's solve
            without the error check that reads back to the host). On CUDA that check stalls the
            host every step; on the CPU the host is the device, nothing waits, and the wrapper's
            Python dispatch would cost ~0.3 ms a step, so the generator sets this for CUDA only.
        correct_estimated_steps: Whether a multistep scheduler's corrector (UniPC's) runs on steps
            the cache's up-front plan estimates. The corrector re-solves the previous step with
            this step's model output; on an estimated step that output is an extrapolation of the
            earlier ones, so correcting with it counts the estimate's error twice. Off, such steps
            skip the corrector as diffusers' ``disable_corrector`` would (computed steps keep it).
            On by default: the scheduler as it ships. Off measured better at every speedup for the
            estimators that reuse (MagCache, even skipping, the planner with ``reuse``; Wan2.1 models) and, for the
            fitted planner, at 1.5x-2x and on the image-to-video model, but worse at 3x on the
            text-to-video ones (docs/benchmarks.md, "UniPC's corrector on estimated steps"). Only a
            cache with a plan known before the run (the planner, ``even``, MagCache) names its
            estimated steps, the same on every rank.
        experts: Wan2.2's low-noise expert and where it takes over (``adapter`` is then the
            high-noise one): the one place a step's model and guidance scale are chosen; ``None``
            for one transformer. Such a request's cache is an :class:`ExpertCaches`, one strategy
            instance per expert, asked with the same calls: nothing cached crosses the switch.
            Before the loop and where the step's expert changes the stage calls its ``enter``,
            which with ``--offload-idle-expert`` moves the experts' weights (``ExpertOffload``).
    """

    name = "denoising"

    def __init__(
        self,
        adapter: DiTAdapter,
        dtype: torch.dtype,
        embedded_guidance_scale: float | None = None,
        timestep_in_latent_dtype: bool = False,
        batched_cfg: bool = False,
        sync_free_scheduler: bool = False,
        experts: ExpertSwitch | None = None,
        correct_estimated_steps: bool = True,
    ) -> None:
        self.adapter = adapter
        self.experts = experts
        #: Every transformer the loop may run, by expert name (one: ``HIGH_NOISE``).
        self.adapters: dict[str, DiTAdapter] = {HIGH_NOISE: adapter}
        if experts is not None:
            self.adapters[LOW_NOISE] = experts.low_noise
        self.dtype = dtype
        self.embedded_guidance_scale = embedded_guidance_scale
        self.timestep_in_latent_dtype = timestep_in_latent_dtype
        self.batched_cfg = batched_cfg
        self.sync_free_scheduler = sync_free_scheduler
        self.correct_estimated_steps = correct_estimated_steps

    def __call__(self, req: Req) -> Req:
        params, cache, scheduler = req.params, req.cache, req.scheduler
        if cache is not None:
            cache.reset()
        placement = BranchPlacement(tuple(req.prompt_embeds))
        placement.attach(cache)
        _warn_if_nothing_skips(cache, planned=True)
        latents = req.latents
        timesteps = req.timesteps
        sigmas = scheduler_sigmas(scheduler, len(timesteps))
        if not self.correct_estimated_steps:
            skip_corrector_on(scheduler, planned_estimates(cache, len(timesteps)))
        experts = (self.experts.schedule(timesteps.tolist()) if self.experts is not None
                   else [HIGH_NOISE] * len(timesteps))
        if isinstance(cache, ExpertCaches) and cache.schedule != experts:
            raise RuntimeError(f"the cache was built for experts {cache.schedule}, the steps run {experts}")
        if self.experts is not None:
            self.experts.enter(experts[0])  # before any request constant is made with its weights
        branch_inputs = self._branch_inputs(req, placement.local_branches, latents)
        inputs = {name: BranchInputs(adapter, self.dtype, branch_inputs, latents)
                  for name, adapter in self.adapters.items()}
        batches = self._batches(placement.local_branches, inputs, experts[0])
        # No hidden bar: a tqdm makes a process-shared lock (a named semaphore that a worker
        # stopped mid-request would leak) and a monitor thread even when disabled. Closed on any
        # exit, so an interrupted run's last line is not the bar's.
        bar = tqdm(total=len(timesteps), desc="denoising", unit="step") if req.show_progress_bar else None
        with bar if bar is not None else contextlib.nullcontext():
            if req.progress is not None:
                req.progress(0, len(timesteps))  # before the first step: a caller may stop it here
            timer = PassTimer(latents.device, per_step=cache is None)  # step costs come from uncached runs
            timer.start()
            for step, t in enumerate(timesteps):
                model_input = latents.to(self.dtype)
                timestep = t.expand(model_input.shape[0])
                if self.timestep_in_latent_dtype:
                    timestep = timestep.to(latents.dtype)
                current = StepInputs(step, latents, model_input, timestep, sigmas[step])
                expert = experts[step]
                if step > 0 and expert != experts[step - 1]:
                    self.experts.enter(expert)
                guidance_scale = params.guidance_scale if expert == HIGH_NOISE else params.guidance_scale_2
                local = {}
                for branches in batches:
                    local.update(self._predict(current, branches, self.adapters[expert], inputs[expert], cache, timer))
                preds = placement.gather(local)
                noise_pred = preds[COND]
                if UNCOND in preds:
                    noise_pred = preds[UNCOND] + guidance_scale * (preds[COND] - preds[UNCOND])
                with SolveWithoutErrorCheck() if self.sync_free_scheduler else contextlib.nullcontext():
                    latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
                if req.probe is not None:
                    latents = req.probe.after_step(step, sigmas[step], latents)
                if bar is not None:
                    bar.update()
                if req.progress is not None:
                    req.progress(step + 1, len(timesteps))
                timer.end_step()
        timing = timer.finish()
        placement.merge_stats(cache)
        if cache is not None:
            cache.stats.record_timing(timing.total_seconds, timing.pass_seconds)
        else:
            req.step_costs = StepCosts.from_timing(timing.step_seconds, timing.step_passes, timing.step_rest,
                                                   device_label(latents.device))
        _warn_if_nothing_skips(cache, planned=False)
        req.latents = latents
        return req

    def _branch_inputs(self, req: Req, branches: Sequence[str], latents: torch.Tensor) -> dict[str, ModelInputs]:
        """Each branch's prompt embedding and conditioning (the guidance input included)."""
        inputs = {}
        for branch in branches:
            conditioning = dict(req.conditioning.get(branch, {}))
            if self.embedded_guidance_scale is not None:
                conditioning["guidance"] = torch.tensor(
                    [req.params.guidance_scale] * latents.shape[0], dtype=self.dtype, device=latents.device
                ) * self.embedded_guidance_scale
            inputs[branch] = ModelInputs(req.prompt_embeds[branch], conditioning)
        return inputs

    def _batches(
        self, branches: Sequence[str], inputs: dict[str, BranchInputs], first: str
    ) -> list[tuple[str, ...]]:
        """The batches every step runs: all branches as one where ``batched_cfg`` is on and their
        inputs stack, else one per branch. Their inputs (and the request constants of each expert
        on the device, ``first`` among them) are made here, before the loop; an expert that waits
        on the host (``--offload-idle-expert``) makes its own at its first step, after its move,
        since its rotary table and projected prompt come from its weights and buffers."""
        together = tuple(branches)
        if self.batched_cfg and len(together) > 1 and inputs[first].batch(together) is not None:
            batches = [together]
        else:
            batches = [(branch,) for branch in together]
        for name, expert_inputs in inputs.items():
            if self.experts is None or self.experts.on_device(name):
                for batch in batches:
                    expert_inputs.batch(batch)
        return batches

    def _predict(
        self,
        current: StepInputs,
        branches: tuple[str, ...],
        adapter: DiTAdapter,
        inputs: BranchInputs,
        cache: TimestepCache | ExpertCaches | None,
        timer: PassTimer,
    ) -> dict[str, torch.Tensor]:
        """The predictions of one batch of ``branches`` at one step: each branch asks the cache
        (in order, cond first), the branches that compute run the skippable part (the blocks, or
        the whole model call) as one batch and store what a skip would replace, the others add
        the cache's estimate instead."""
        n = len(branches)
        whole_model = cache is not None and cache.skips_whole_model
        if whole_model:
            bases = [current.latents] * n
            features = [StepFeatures(timestep=current.timestep, sigma=current.sigma, latents=current.latents)] * n
        else:
            batch = inputs.batch(branches)
            with timer.time_rest(count=n):
                hidden, ctx = adapter.embed(_repeat(current.model_input, n), _repeat(current.timestep, n),
                                            batch.encoder_hidden_states, **batch.kwargs)
            bases = _rows(hidden, n)
            features = [
                StepFeatures(timestep=current.timestep, modulated_input=_row(ctx.modulated_input, row, n),
                             timestep_projection=_row(ctx.timestep_projection, row, n), sigma=current.sigma,
                             latents=current.latents)
                for row in range(n)
            ]
        computing = [row for row, branch in enumerate(branches)
                     if cache is None or cache.should_compute(current.step, branch, features[row])]
        outs = list(bases)
        computed = None
        if computing:
            k = len(computing)
            if whole_model:
                part = inputs.batch(tuple(branches[row] for row in computing))
                with timer.time_pass(count=k):
                    computed = adapter.forward(_repeat(current.model_input, k), _repeat(current.timestep, k),
                                               part.encoder_hidden_states, **part.kwargs)
            else:
                with timer.time_pass(count=k):
                    computed = adapter.blocks(take_rows(hidden, computing), ctx.select(computing))
            for row, out in zip(computing, _rows(computed, k)):
                outs[row] = out
                if cache is not None:
                    cache.store(current.step, branches[row], self._residual(cache, out, bases[row], whole_model))
        for row, branch in enumerate(branches):
            if row not in computing:
                estimate = cache.reuse(current.step, branch)
                if not whole_model:
                    outs[row] = bases[row] + estimate
                elif cache.skip_relative_to_input:
                    outs[row] = (bases[row].float() + estimate).to(self.dtype)
                else:
                    outs[row] = estimate.to(self.dtype)
        if whole_model:
            predictions = dict(zip(branches, outs))
        else:
            blocks_out = computed if len(computing) == n else _cat(outs)
            with timer.time_rest(count=n):
                out = adapter.head(blocks_out, ctx)
            predictions = dict(zip(branches, _rows(out, n)))
        if cache is not None and cache.calibrate:
            for branch, prediction in predictions.items():
                cache.record_output(current.step, branch, prediction)
        return predictions

    @staticmethod
    def _residual(cache: TimestepCache | ExpertCaches, out: torch.Tensor, base: torch.Tensor, whole_model: bool) -> torch.Tensor:
        """What a skip would replace: the blocks' output minus their input, or (in float32) the
        model output minus its latent input, or the model output itself (``skip_relative_to_input``
        off)."""
        if not whole_model:
            return out - base
        if not cache.skip_relative_to_input:
            return out.float()
        if out.shape != base.shape:
            raise RuntimeError(f"{cache.name} caches the model output minus its input, but this model maps "
                               f"latents {tuple(base.shape)} to {tuple(out.shape)}")
        return out.float() - base.float()


def _repeat(tensor: torch.Tensor, n: int) -> torch.Tensor:
    """``tensor`` once per branch of a batch of ``n`` (itself for a batch of one)."""
    return tensor if n == 1 else torch.cat([tensor] * n)


def _cat(rows: list[torch.Tensor]) -> torch.Tensor:
    """The branches' rows as one batch (the row itself for a batch of one)."""
    return rows[0] if len(rows) == 1 else torch.cat(rows)


def _rows(tensor: torch.Tensor, n: int) -> list[torch.Tensor]:
    """A batch of ``n`` branches cut into its branches."""
    return [tensor] if n == 1 else list(tensor.chunk(n))


def _row(tensor: torch.Tensor | None, row: int, n: int) -> torch.Tensor | None:
    """Branch ``row``'s part of a batch of ``n`` branches."""
    return None if tensor is None else _rows(tensor, n)[row]


_UNSTACKABLE = object()


def _stack(values: Sequence[Any]) -> Any:
    """The branches' values of one input as one batch: tensors concatenated on the batch dimension,
    anything else only where every branch has the same; ``_UNSTACKABLE`` where they do not stack."""
    first = values[0]
    if isinstance(first, torch.Tensor):
        if any(not isinstance(v, torch.Tensor) or v.shape != first.shape or v.dtype != first.dtype for v in values):
            return _UNSTACKABLE
        return torch.cat(list(values))
    return first if all(v is first or v == first for v in values) else _UNSTACKABLE


def scheduler_sigmas(scheduler, num_steps: int) -> list[float | None]:
    """The scheduler's sigma of every step, read once before the loop (no per-step device sync),
    for the estimators that forecast in sigma; ``None`` per step when it has no ``sigmas``."""
    sigmas = getattr(scheduler, "sigmas", None)
    if sigmas is None or len(sigmas) < num_steps:
        return [None] * num_steps
    values = sigmas.tolist() if hasattr(sigmas, "tolist") else list(sigmas)
    return [float(v) for v in values[:num_steps]]


def planned_estimates(cache: TimestepCache | ExpertCaches | None, num_steps: int) -> list[bool]:
    """Per step, whether the cache's plan (known before the run, the same on every rank) estimates
    any branch's prediction there; all False without a cache, in calibration or without a plan."""
    plan = cache.plan() if cache is not None and not cache.calibrate else None
    if not plan:
        return [False] * num_steps
    return [not all(computed) for computed in zip(*plan.values())]


def skip_corrector_on(scheduler: Any, estimated: Sequence[bool]) -> None:
    """Turn a multistep scheduler's corrector off on the ``estimated`` steps, through its own
    ``disable_corrector``: UniPC corrects the previous step at step ``i`` unless ``i - 1`` is listed
    (its step index is the loop's, from ``set_begin_index(0)``). Schedulers without a corrector are
    left alone. ``scheduler`` is the request's own copy (``LatentPreparationStage``), so nothing
    carries over to the next request."""
    disabled = getattr(scheduler, "disable_corrector", None)
    if disabled is not None:
        scheduler.disable_corrector = [*disabled, *(step - 1 for step, estimate in enumerate(estimated) if estimate)]


def _warn_if_nothing_skips(cache: TimestepCache | ExpertCaches | None, planned: bool) -> None:
    """One warning per request whose cache skips nothing: before the run for a strategy with a
    plan (``planned=True``), after it for the others, with the strategy's reason and knob."""
    if cache is None or (cache.plan() is not None) != planned:
        return
    reason = cache.no_skip_reason()
    if reason is not None:
        logger.warning(reason)
