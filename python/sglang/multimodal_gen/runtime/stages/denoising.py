"""The denoising loop: per step and CFG branch, run the DiT blocks or reuse the cached residual."""

from __future__ import annotations

import logging

import torch
from tqdm.auto import tqdm

from sglang.multimodal_gen.runtime.cache.base import COND, UNCOND, StepFeatures, TimestepCache
from sglang.multimodal_gen.runtime.distributed.cfg_parallel import BranchPlacement
from sglang.multimodal_gen.runtime.models.base import DiTAdapter
from sglang.multimodal_gen.runtime.pipelines.base import PipelineStage, Req
from sglang.multimodal_gen.runtime.utils.sync_free import SolveWithoutErrorCheck
from sglang.multimodal_gen.runtime.utils.timing import PassTimer

logger = logging.getLogger(__name__)


class DenoisingStage(PipelineStage):
    """Knows caching only through ``TimestepCache``: one ``should_compute`` per step and branch.

    cond and uncond run as separate transformer passes (as diffusers' WanPipeline does), cond
    first, so each branch has its own cache decision and its own residual (unless the strategy
    ``decides_per_pair``). ``req.conditioning[branch]`` holds any further model inputs of a branch
    and reaches ``adapter.embed`` as keyword arguments. A strategy that ``skips_whole_model`` is
    asked before the embedding and a skip returns the latents plus its estimate of the model
    output minus them. A :class:`PassTimer` times the loop and every pass the cache may skip (the
    blocks, or the whole model call); with a cache the figures go to its stats
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
    """

    name = "denoising"

    def __init__(
        self,
        adapter: DiTAdapter,
        dtype: torch.dtype,
        embedded_guidance_scale: float | None = None,
        timestep_in_latent_dtype: bool = False,
    ) -> None:
        self.adapter = adapter
        self.dtype = dtype
        self.embedded_guidance_scale = embedded_guidance_scale
        self.timestep_in_latent_dtype = timestep_in_latent_dtype

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
        conditioning = {branch: dict(req.conditioning.get(branch, {})) for branch in req.prompt_embeds}
        if self.embedded_guidance_scale is not None:
            guidance = torch.tensor(
                [params.guidance_scale] * latents.shape[0], dtype=model_dtype, device=latents.device
            ) * self.embedded_guidance_scale
            for kwargs in conditioning.values():
                kwargs["guidance"] = guidance
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
            preds = placement.gather({
                branch: self._predict(
                    step, branch, latents, model_input, timestep, sigmas[step], req.prompt_embeds[branch],
                    conditioning[branch], req, timer,
                )
                for branch in placement.local_branches
            })
            noise_pred = preds[COND]
            if UNCOND in preds:
                noise_pred = preds[UNCOND] + params.guidance_scale * (preds[COND] - preds[UNCOND])
            with SolveWithoutErrorCheck():  # UniPC's solve would sync every step
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

    def _predict(
        self,
        step: int,
        branch: str,
        latents: torch.Tensor,
        model_input: torch.Tensor,
        timestep: torch.Tensor,
        sigma: float | None,
        encoder_hidden_states: torch.Tensor,
        conditioning: dict[str, torch.Tensor],
        req: Req,
        timer: PassTimer,
    ) -> torch.Tensor:
        cache = req.cache
        if cache is not None and cache.skips_whole_model:
            features = StepFeatures(timestep=timestep, sigma=sigma, latents=latents)
            if not cache.should_compute(step, branch, features):
                return (latents.float() + cache.reuse(step, branch)).to(self.dtype)
            with timer.time_pass():
                out = self.adapter.forward(model_input, timestep, encoder_hidden_states, **conditioning)
            if out.shape != latents.shape:
                raise RuntimeError(f"{cache.name} caches the model output minus its input, but this model maps "
                                   f"latents {tuple(latents.shape)} to {tuple(out.shape)}")
            cache.store(step, branch, out.float() - latents.float())
            return out
        hidden, ctx = self.adapter.embed(model_input, timestep, encoder_hidden_states, **conditioning)
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
