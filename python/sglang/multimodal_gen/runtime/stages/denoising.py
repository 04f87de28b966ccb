"""The denoising loop: per step and CFG branch, run the DiT blocks or reuse the cached residual."""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from tqdm.auto import tqdm

from sglang.multimodal_gen.runtime.cache.base import COND, UNCOND, StepFeatures, TimestepCache
from sglang.multimodal_gen.runtime.distributed.cfg_parallel import BranchPlacement
from sglang.multimodal_gen.runtime.models.base import DiTAdapter, take_rows
from sglang.multimodal_gen.runtime.pipelines.base import PipelineStage, Req
from sglang.multimodal_gen.runtime.utils.sync_free import SolveWithoutErrorCheck
from sglang.multimodal_gen.runtime.utils.timing import PassTimer

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


class DenoisingStage(PipelineStage):
    """Knows caching only through ``TimestepCache``: one ``should_compute`` per step and branch.

    By default cond and uncond run as separate transformer passes (as diffusers' WanPipeline
    does), cond first, so each branch has its own cache decision and its own residual (unless the
    strategy ``decides_per_pair``). With ``batched_cfg`` the branches of this process run as one
    batch: one embedding of the batch, the decisions cond first, one blocks pass of the branches
    that compute (all of them, for a strategy that ``decides_per_pair``) and one head for all.
    ``req.conditioning[branch]`` holds any further model inputs of a branch and reaches
    ``adapter.embed`` as keyword arguments, with the adapter's ``request_constants`` (computed once
    per request). A strategy that ``skips_whole_model`` is asked before the embedding and a skip
    returns the latents plus its estimate of the model output minus them. A :class:`PassTimer`
    times the loop and every pass the cache may skip (the blocks, or the whole model call; a pass
    of a batch counts once per branch in it); with a cache the figures go to its stats
    (``CacheStats.record_timing``) for the measured speedup. With CFG parallel a
    :class:`BranchPlacement` names the branches this rank runs and gathers every branch's
    prediction before guidance, so every rank steps the scheduler on the same values.

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
    ) -> None:
        self.adapter = adapter
        self.dtype = dtype
        self.embedded_guidance_scale = embedded_guidance_scale
        self.timestep_in_latent_dtype = timestep_in_latent_dtype
        self.batched_cfg = batched_cfg
        self.sync_free_scheduler = sync_free_scheduler

    def __call__(self, req: Req) -> Req:
        params, cache, scheduler = req.params, req.cache, req.scheduler
        if cache is not None:
            cache.reset()
        placement = BranchPlacement(tuple(req.prompt_embeds))
        placement.attach(cache)
        _warn_if_nothing_skips(cache, planned=True)
        latents = req.latents
        model_dtype = self.dtype
        timesteps = req.timesteps
        sigmas = scheduler_sigmas(scheduler, len(timesteps))
        branches = placement.local_branches
        inputs = self._branch_inputs(req, branches, latents)
        batch = self._stacked_inputs(branches, inputs, latents) if self.batched_cfg and len(branches) > 1 else None
        if batch is None:  # batched, the constants are the batch's; a branch alone lets embed make its own
            inputs = {b: self._with_constants(i.encoder_hidden_states, i.conditioning, latents)
                      for b, i in inputs.items()}
        bar = tqdm(total=len(timesteps), desc="denoising", unit="step", disable=not req.show_progress_bar)
        if req.progress is not None:
            req.progress(0, len(timesteps))  # before the first step: a caller may stop it here
        timer = PassTimer(latents.device)
        timer.start()
        for step, t in enumerate(timesteps):
            model_input = latents.to(model_dtype)
            timestep = t.expand(model_input.shape[0])
            if self.timestep_in_latent_dtype:
                timestep = timestep.to(latents.dtype)
            if batch is not None:
                local = self._predict_batch(step, branches, latents, model_input, timestep, sigmas[step], batch,
                                            inputs, req, timer)
            else:
                local = {
                    branch: self._predict(step, branch, latents, model_input, timestep, sigmas[step], inputs[branch],
                                          req, timer)
                    for branch in branches
                }
            preds = placement.gather(local)
            noise_pred = preds[COND]
            if UNCOND in preds:
                noise_pred = preds[UNCOND] + params.guidance_scale * (preds[COND] - preds[UNCOND])
            with SolveWithoutErrorCheck() if self.sync_free_scheduler else contextlib.nullcontext():
                latents = scheduler.step(noise_pred, t, latents, return_dict=False)[0]
            bar.update()
            if req.progress is not None:
                req.progress(step + 1, len(timesteps))
        bar.close()
        timing = timer.finish()
        placement.merge_stats(cache)
        if cache is not None:
            cache.stats.record_timing(timing.total_seconds, timing.pass_seconds)
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

    def _with_constants(
        self, encoder_hidden_states: torch.Tensor, conditioning: dict[str, Any], latents: torch.Tensor
    ) -> ModelInputs:
        """The inputs with the adapter's request constants, computed once here for the whole loop."""
        constants = self.adapter.request_constants(latents.to(self.dtype), encoder_hidden_states, **conditioning)
        return ModelInputs(encoder_hidden_states, conditioning, constants)

    def _stacked_inputs(
        self, branches: Sequence[str], inputs: dict[str, ModelInputs], latents: torch.Tensor
    ) -> ModelInputs | None:
        """The branches' inputs as one batch (with the batch's request constants), or ``None`` where
        they do not stack: tensors of different shapes or other values that differ."""
        parts = [inputs[b] for b in branches]
        names = set(parts[0].conditioning)
        if any(set(p.conditioning) != names for p in parts):
            return None
        stacked = {name: _stack([p.conditioning[name] for p in parts]) for name in names}
        embeds = _stack([p.encoder_hidden_states for p in parts])
        if embeds is _UNSTACKABLE or any(value is _UNSTACKABLE for value in stacked.values()):
            return None
        return self._with_constants(embeds, stacked, torch.cat([latents] * len(parts)))

    def _predict(
        self,
        step: int,
        branch: str,
        latents: torch.Tensor,
        model_input: torch.Tensor,
        timestep: torch.Tensor,
        sigma: float | None,
        inputs: ModelInputs,
        req: Req,
        timer: PassTimer,
    ) -> torch.Tensor:
        cache = req.cache
        if cache is not None and cache.skips_whole_model:
            features = StepFeatures(timestep=timestep, sigma=sigma, latents=latents)
            if not cache.should_compute(step, branch, features):
                return self._reused_model_output(cache, step, branch, latents)
            with timer.time_pass():
                out = self.adapter.forward(model_input, timestep, inputs.encoder_hidden_states, **inputs.kwargs)
            self._store_model_residual(cache, step, branch, out, latents)
            return out
        hidden, ctx = self.adapter.embed(model_input, timestep, inputs.encoder_hidden_states, **inputs.kwargs)
        features = StepFeatures(
            timestep=timestep, modulated_input=ctx.modulated_input, timestep_projection=ctx.timestep_projection,
            sigma=sigma, latents=latents,
        )
        if cache is None or cache.should_compute(step, branch, features):
            with timer.time_pass():
                out = self.adapter.blocks(hidden, ctx)
            if cache is not None:
                cache.store(step, branch, out - hidden)
        else:
            out = hidden + cache.reuse(step, branch)
        return self.adapter.head(out, ctx)

    def _predict_batch(
        self,
        step: int,
        branches: Sequence[str],
        latents: torch.Tensor,
        model_input: torch.Tensor,
        timestep: torch.Tensor,
        sigma: float | None,
        batch: ModelInputs,
        inputs: dict[str, ModelInputs],
        req: Req,
        timer: PassTimer,
    ) -> dict[str, torch.Tensor]:
        """Every branch of ``branches`` at one step, with one blocks (or model) pass for those that compute."""
        cache, n = req.cache, len(branches)
        if cache is not None and cache.skips_whole_model:
            features = StepFeatures(timestep=timestep, sigma=sigma, latents=latents)
            computing = [b for b in branches if cache.should_compute(step, b, features)]
            preds = {b: self._reused_model_output(cache, step, b, latents) for b in branches if b not in computing}
            if len(computing) == n:
                with timer.time_pass(count=n):
                    out = self.adapter.forward(torch.cat([model_input] * n), timestep.repeat(n),
                                               batch.encoder_hidden_states, **batch.kwargs)
                for branch, pred in zip(branches, out.chunk(n)):
                    self._store_model_residual(cache, step, branch, pred, latents)
                    preds[branch] = pred
            else:  # a strategy deciding per branch: those that compute run one by one (their
                # inputs carry no constants, so embed computes them: such steps are rare)
                for branch in computing:
                    with timer.time_pass():
                        out = self.adapter.forward(model_input, timestep, inputs[branch].encoder_hidden_states,
                                                   **inputs[branch].kwargs)
                    self._store_model_residual(cache, step, branch, out, latents)
                    preds[branch] = out
            return {b: preds[b] for b in branches}
        hidden, ctx = self.adapter.embed(torch.cat([model_input] * n), timestep.repeat(n), batch.encoder_hidden_states,
                                         **batch.kwargs)
        rows = hidden.chunk(n)
        computing = [
            row for row, branch in enumerate(branches)
            if cache is None or cache.should_compute(step, branch, StepFeatures(
                timestep=timestep, modulated_input=_row(ctx.modulated_input, row, n),
                timestep_projection=_row(ctx.timestep_projection, row, n), sigma=sigma, latents=latents,
            ))
        ]
        outs = list(rows)
        computed = None
        if computing:
            with timer.time_pass(count=len(computing)):
                computed = self.adapter.blocks(take_rows(hidden, computing), ctx.select(computing))
            for row, out in zip(computing, computed.chunk(len(computing))):
                outs[row] = out
                if cache is not None:
                    cache.store(step, branches[row], out - rows[row])
        for row, branch in enumerate(branches):
            if row not in computing:
                outs[row] = rows[row] + cache.reuse(step, branch)
        blocks_out = computed if len(computing) == n else torch.cat(outs)
        return dict(zip(branches, self.adapter.head(blocks_out, ctx).chunk(n)))

    def _reused_model_output(self, cache: TimestepCache, step: int, branch: str, latents: torch.Tensor) -> torch.Tensor:
        """A skipped whole-model call: the latents plus the estimate of output minus input."""
        return (latents.float() + cache.reuse(step, branch)).to(self.dtype)

    def _store_model_residual(
        self, cache: TimestepCache, step: int, branch: str, out: torch.Tensor, latents: torch.Tensor
    ) -> None:
        if out.shape != latents.shape:
            raise RuntimeError(f"{cache.name} caches the model output minus its input, but this model maps "
                               f"latents {tuple(latents.shape)} to {tuple(out.shape)}")
        cache.store(step, branch, out.float() - latents.float())


def _row(tensor: torch.Tensor | None, row: int, n: int) -> torch.Tensor | None:
    """Branch ``row``'s part of a batch of ``n`` branches."""
    return None if tensor is None else tensor.chunk(n)[row]


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


def _warn_if_nothing_skips(cache: TimestepCache | None, planned: bool) -> None:
    """One warning per request whose cache skips nothing: before the run for a strategy with a
    plan (``planned=True``), after it for the others, with the strategy's reason and knob."""
    if cache is None or (cache.plan() is not None) != planned:
        return
    reason = cache.no_skip_reason()
    if reason is not None:
        logger.warning(reason)
