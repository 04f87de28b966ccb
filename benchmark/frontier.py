"""The caching frontier: every method a user has for a speedup, at the same transformer passes.

    python benchmark/frontier.py                                  # built-in model, 8 prompts x 2 seeds
    python benchmark/frontier.py --model-path /work/models/wan-seed4242 --calibration C.json
    python benchmark/frontier.py --steps 20                       # at another step count
    python benchmark/frontier.py --quick                          # 1 prompt, 1 seed (a smoke run)
    python benchmark/frontier.py --budget time                    # each speedup asked in time, as users ask
    python benchmark/frontier.py --model-path hunyuanvideo-t2v-tiny --output benchmark/results/frontier-hunyuan.json
    python benchmark/frontier.py --model-path wan2.2-t2v-tiny --steps 40   # two experts: adds the boundary-blind planner
    python benchmark/frontier.py --methods "plain steps;planner" --uncorrected-estimates  # UniPC's corrector off where estimated
    python benchmark/frontier.py --model-path wan2.1-i2v-tiny --output benchmark/results/frontier-i2v.json  # image to video

For each held-out prompt and seed: the uncached run (50 steps unless ``--steps``) is the reference;
every method of ``frontier_configs.METHODS`` is asked for 1.5x, 2x, 2.5x and 3x (``round(steps /
x)`` passes per branch) and scored by PSNR and SSIM of its decoded frames against the reference. The report gives
mean and worst case over samples with each method's real pass count, and a plot
(``frontier_report.py``). A method without a budget (EasyCache) first has its threshold tuned per
speedup on training captions (``threshold_search.py``); the thresholds go into the JSON. It also gives, for our pipeline's methods, the measured denoising
speedup: the median over samples of the uncached runs' denoising time over the median of the
method's, all in the same run (the uncached run of a sample just before its methods). One torch
thread; other load on the machine shows in these ratios, not in the fidelity.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from frontier_configs import (  # noqa: E402
    METHODS,
    SEEDS,
    SPEEDUPS,
    STEPS,
    FrontierMethod,
    Request,
    model_prompts,
    prompt_images,
)
from frontier_report import markdown_table, plot_frontier, summarise  # noqa: E402
from metrics import psnr, ssim  # noqa: E402
from threshold_search import nearest_threshold  # noqa: E402

from sglang.multimodal_gen.configs.sampling_params import SamplingParams  # noqa: E402
from sglang.multimodal_gen.runtime.entrypoints.calibrate import (  # noqa: E402
    calibrate,
    read_prompt_lines,
    split_prompt_lines,
)
from sglang.multimodal_gen.runtime.cache.budget import PASSES_ONLY, budget_passes  # noqa: E402
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator, denoising_stage  # noqa: E402


class DiffusersTaylorSeer:
    """diffusers' own pipeline (``WanPipeline`` or ``HunyuanVideoPipeline``) on the same folder with
    its TaylorSeer hook, counting the steps whose blocks ran (the first block's attention fired)."""

    def __init__(self, gen: DiffGenerator, params: SamplingParams) -> None:
        info = gen.pipeline.model_info
        self.params = params
        self.family = info.family.name
        self.call_kwargs: dict = {"max_sequence_length": info.text_max_length}
        if self.family == "wan":
            from diffusers import WanPipeline

            self.pipe = WanPipeline.from_pretrained(info.path, dtype=torch.float32)
            self.call_kwargs["negative_prompt"] = params.negative_prompt
            first_attention = self.pipe.transformer.blocks[0].attn1
        else:
            from diffusers import HunyuanVideoPipeline

            # diffusers gets the Llama tokenizer and prompt crop as our loader and text stage read them
            # (transformers' LlamaTokenizerFast would rebuild the byte-level vocabulary; see test_hunyuan.py).
            text_stage = next(s for s in gen.pipeline.stages if s.name == "text_encoding")
            self.pipe = HunyuanVideoPipeline.from_pretrained(info.path, tokenizer=text_stage.tokenizer, dtype=torch.float32)
            self.call_kwargs["prompt_template"] = {"template": text_stage.template, "crop_start": text_stage.crop_start}
            first_attention = self.pipe.transformer.transformer_blocks[0].attn
        self.pipe.set_progress_bar_config(disable=True)
        first_attention.register_forward_hook(lambda *_: self._ran.__setitem__(-1, True))
        self.pipe.transformer.register_forward_pre_hook(lambda *_: self._ran.append(False))
        self._ran: list[bool] = []

    def run(self, prompt: str, seed: int, steps: int, settings: dict) -> tuple[np.ndarray, int]:
        from diffusers import TaylorSeerCacheConfig

        transformer = self.pipe.transformer
        if getattr(transformer, "_cache_config", None) is not None:
            transformer.disable_cache()
        transformer.enable_cache(TaylorSeerCacheConfig(**settings, taylor_factors_dtype=torch.float32))
        self._ran = []
        p = self.params
        frames = self.pipe(
            prompt=prompt, height=p.height, width=p.width, num_frames=p.num_frames,
            num_inference_steps=steps, guidance_scale=p.guidance_scale,
            generator=torch.Generator("cpu").manual_seed(seed), output_type="np", **self.call_kwargs,
        ).frames[0]
        # Wan runs cond then uncond each step: count the cond branch's passes; HunyuanVideo runs one.
        cond_passes = self._ran[0::2] if self.family == "wan" else self._ran
        return np.asarray(frames, dtype=np.float32), sum(cond_passes)


@contextlib.contextmanager
def boundary_blind(gen: DiffGenerator) -> Iterator[None]:
    """Run a two-expert model's requests with one cache state across both experts (and calibrate
    it as one run): what caching that ignores the switch does. For comparison only; the runtime
    always keeps the state per expert."""
    pipeline = gen.pipeline
    validation = pipeline.stages[0]
    saved = pipeline.expert_schedule
    pipeline.expert_schedule = validation.expert_schedule = None
    try:
        yield
    finally:
        pipeline.expert_schedule = validation.expert_schedule = saved


def blind_calibration(gen: DiffGenerator, steps: int, folder: Path) -> Path:
    """A calibration of the whole run as if one transformer ran it, on the model's calibration prompts."""
    info = gen.pipeline.model_info
    path = Path(info.path) / "calibration_prompts.txt"
    prompts, images = split_prompt_lines(path, read_prompt_lines(path), info.image_input)
    output = folder / "boundary-blind.json"
    with boundary_blind(gen):
        calibrate(gen, prompts, SamplingParams(prompt=prompts[0], num_inference_steps=steps), output, images=images)
    return output


def tune_thresholds(gen: DiffGenerator, methods: list[FrontierMethod], steps: int, prompts: list[str],
                    images: dict[str, Path]) -> dict:
    """``{strategy: {speedup: (threshold, mean passes on the tuning prompts)}}`` for the methods that
    need one; found once per strategy (with ``reuse``: the estimator barely moves the passes)."""
    tuned: dict[str, dict[float, tuple[float, float]]] = {}
    for method in methods:
        for speedup in SPEEDUPS:
            request = method.request(speedup, steps)
            strategy = request.cache.strategy if request.tune_threshold else None
            if strategy is None or speedup in tuned.get(strategy, {}):
                continue
            base = dataclasses.replace(request.cache, estimator=None)
            tuned.setdefault(strategy, {})[speedup] = nearest_threshold(
                gen, base, budget_passes(steps, speedup), steps, prompts, images)
    return tuned


def run_method(
    gen: DiffGenerator, peer: DiffusersTaylorSeer | None, method: FrontierMethod, speedup: float, steps: int,
    prompt: str, seed: int, tuned: dict, budget: str, blind_file: Path | None = None, image: Path | None = None,
) -> tuple[np.ndarray, int, float | None]:
    """Frames, passes per branch and (our pipeline only) denoising seconds of one method at one speedup.
    ``budget``: ``passes`` counts skipped steps as free (every budgeted method runs ``round(steps /
    x)`` passes); ``time`` plans with the model's step costs, as a user's request does."""
    request: Request = method.request(speedup, steps)
    if budget == "passes" and request.cache is not None and request.cache.speedup is not None:
        request = dataclasses.replace(request, cache=dataclasses.replace(request.cache, step_costs=PASSES_ONLY))
    if request.tune_threshold:
        threshold = tuned[request.cache.strategy][speedup][0]
        request = dataclasses.replace(request, cache=dataclasses.replace(request.cache, threshold=threshold))
    if request.taylorseer is not None:
        return (*peer.run(prompt, seed, steps, request.taylorseer), None)
    if request.boundary_blind:
        request = dataclasses.replace(request, cache=dataclasses.replace(request.cache, calibration_file=str(blind_file)))
    params = SamplingParams(prompt=prompt, seed=seed, num_inference_steps=request.num_inference_steps, image=image)
    if request.cache is not None:
        params = dataclasses.replace(params, cache=request.cache)
    with boundary_blind(gen) if request.boundary_blind else contextlib.nullcontext():
        result = gen.generate(params)
    stats = result.cache_stats
    passes = stats.branches["cond"].num_computed if stats is not None else request.num_inference_steps
    return result.frames, passes, result.timings["denoising"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="a Wan or HunyuanVideo folder, or a built-in model's name (default: the built-in Wan model)")
    parser.add_argument("--calibration", default=None, help="calibration file (default: the folder's own)")
    parser.add_argument("--quick", action="store_true", help="1 prompt, 1 seed")
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help=f"seeds per prompt, from 0 (default {len(SEEDS)})")
    parser.add_argument("--steps", type=int, default=STEPS, help="step count of the reference and the cached runs")
    parser.add_argument("--methods", default=None,
                        help="subset of the method names, separated by ';' (names may hold commas)")
    parser.add_argument("--budget", choices=("passes", "time"), default="passes",
                        help="compare at equal transformer passes (skipped steps counted as free), or ask "
                             "every budgeted method for the speedup in time, as a user's request does")
    parser.add_argument("--uncorrected-estimates", action="store_true",
                        help="skip UniPC's corrector on the steps a plan estimates (the denoising stage's "
                             "correct_estimated_steps off; docs/benchmarks.md weighs it)")
    parser.add_argument("--output", default=str(REPO / "benchmark/results/frontier.json"))
    parser.add_argument("--plot", default=str(REPO / "docs/images/frontier.png"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    chosen = None if args.methods is None else [name.strip() for name in args.methods.split(";")]
    unknown = sorted(set(chosen or ()) - {m.name for m in METHODS})
    if unknown:
        parser.error(f"unknown method(s) {unknown}; choose from: {'; '.join(m.name for m in METHODS)}")
    gen = DiffGenerator.from_pretrained(args.model_path, device="cpu", cache_calibration=args.calibration)
    denoising_stage(gen.pipeline).correct_estimated_steps = not args.uncorrected_estimates
    two_experts = gen.pipeline.expert_schedule is not None
    images = prompt_images(Path(gen.pipeline.model_info.path))
    # diffusers' TaylorSeer hook caches one transformer (the harness runs its text-to-video
    # pipelines); the blind planner compares only where there are two.
    applies = {"diffusers taylorseer": not two_experts and not images, "planner, boundary-blind": two_experts}
    methods = [m for m in METHODS if (chosen is None and applies.get(m.name, True)) or (chosen and m.name in chosen)]
    if any(m.name == "planner, boundary-blind" for m in methods) and not two_experts:
        parser.error("'planner, boundary-blind' compares caching across the switch of a two-expert model")
    prompts, tuning_prompts = model_prompts(gen.pipeline.model_info.path)
    if args.quick:
        prompts, tuning_prompts = prompts[:1], tuning_prompts[:1]
    samples = [(p, s) for p in prompts for s in range(1 if args.quick else args.seeds)]
    steps = args.steps
    first = SamplingParams(prompt=prompts[0], num_inference_steps=steps, image=images.get(prompts[0]))
    defaults = gen.validate(first)
    peer = DiffusersTaylorSeer(gen, defaults) if any(
        m.name == "diffusers taylorseer" for m in methods) else None
    gen.generate(first)  # warm-up, not measured
    tuned = tune_thresholds(gen, methods, steps, tuning_prompts, images)
    scratch = Path(tempfile.mkdtemp(prefix="frontier-"))
    blind_file = blind_calibration(gen, steps, scratch) if any(m.name == "planner, boundary-blind" for m in methods) else None
    for strategy, by_speedup in tuned.items():
        print(f"{strategy} thresholds (mean passes on {len(tuning_prompts)} "
              f"training captions): " + ", ".join(f"{x:g}x {t:g} ({p:.1f})" for x, (t, p) in by_speedup.items()))
    rows: list[dict] = []
    bar = tqdm(total=len(samples) * (1 + len(methods) * len(SPEEDUPS)), desc="frontier", unit="run")
    for prompt, seed in samples:
        uncached = gen.generate(SamplingParams(prompt=prompt, seed=seed, num_inference_steps=steps,
                                               image=images.get(prompt)))
        reference = uncached.frames
        bar.update()
        for method in methods:
            for speedup in SPEEDUPS:
                frames, passes, seconds = run_method(gen, peer, method, speedup, steps, prompt, seed, tuned,
                                                     args.budget, blind_file, images.get(prompt))
                rows.append(dict(method=method.name, speedup=speedup, prompt=prompt, seed=seed, passes=passes,
                                 psnr=psnr(frames, reference), ssim=ssim(frames, reference), seconds=seconds,
                                 uncached_seconds=uncached.timings["denoising"]))
                bar.update()
    bar.close()
    summary = summarise(rows)
    model = gen.model_name
    header = (f"{model}, {steps} steps, {len(samples)} samples (held-out prompts x seeds), budget in {args.budget}; "
              f"PSNR dB / SSIM against the uncached {steps}-step run: mean (worst)")
    print(header)
    print(markdown_table(summary, [m.name for m in methods]))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    thresholds = {strategy: {str(x): {"threshold": t, "tuning_passes": p} for x, (t, p) in by_speedup.items()}
                  for strategy, by_speedup in tuned.items()}
    Path(args.output).write_text(json.dumps({"model": model, "steps": steps, "samples": samples,
                                             "budget": args.budget, "tuned_thresholds": thresholds,
                                             "summary": summary, "runs": rows},
                                            indent=1) + "\n")
    plot_frontier(summary, methods, f"{model}: {len(samples)} held-out samples, {steps} steps", args.plot)
    print(f"wrote {args.output} and {args.plot}")


if __name__ == "__main__":
    main()
