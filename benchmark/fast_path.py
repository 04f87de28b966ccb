"""The fast path, measured: each change's own gain, and ours against diffusers end to end.

    python benchmark/fast_path.py                      # built-in and block-dominated model, CPU, ~15 min
    python benchmark/fast_path.py --no-compile         # without the torch.compile variants
    python benchmark/fast_path.py --device cuda --dtype bfloat16 --model-path FOLDER --no-block-heavy

For each model it runs, interleaved in one run, every variant of ``fast_path_configs.variants``:
diffusers' ``WanPipeline`` uncached and with its MagCache hook, and our pipeline before the fast
path (request constants recomputed every step, two CFG passes, eager), with the constants
hoisted, with batched CFG and with compiled blocks, each uncached and with MagCache at the
hook's settings (identical plans, checked). A warm-up round (which also pays every compile) is
followed by ``--repeats`` timed rounds, each running every variant once in a rotated order; a
change's gain is the median over rounds of the time ratio of two variants in the same round.
Then one profiled run of our default loop says where the remaining time goes (DiT embed /
blocks / head, scheduler, the loop; and the stages outside denoising).

Writes ``benchmark/results/fast-path-<device>.json`` and prints the markdown of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from bench_configs import BLOCK_HEAVY_TRANSFORMER, BenchConfig  # noqa: E402
from bench_harness import DiffusersRunner, OursRunner, RunRecord, machine_info  # noqa: E402
from fast_path_configs import (  # noqa: E402
    BLOCK_HEAVY_REQUEST,
    MAGCACHE_MAX_SKIP_STEPS,
    MAGCACHE_RETENTION,
    MAGCACHE_THRESHOLD,
    PROMPT,
    SEED,
    Variant,
    comparisons,
    variants,
)
from fast_path_report import render_markdown  # noqa: E402

from sglang.multimodal_gen.configs.cache_params import CacheParams  # noqa: E402
from sglang.multimodal_gen.configs.sampling_params import SamplingParams  # noqa: E402
from sglang.multimodal_gen.runtime.cache.base import COND, UNCOND  # noqa: E402
from sglang.multimodal_gen.runtime.cache.calibration import load_calibration  # noqa: E402
from sglang.multimodal_gen.runtime.entrypoints.generator import (  # noqa: E402
    BUILTIN_MODEL_PATH,
    DiffGenerator,
    resolve_device,
)
from sglang.multimodal_gen.runtime.stages.denoising import DenoisingStage  # noqa: E402


def _no_request_constants(*args: Any, **kwargs: Any) -> dict[str, Any]:
    """The loop before the fast path: ``embed`` recomputes every constant at every step."""
    return {}


def denoising_stage(generator: DiffGenerator) -> DenoisingStage:
    """The generator's denoising stage (inside the profiled wrapper once ``_profile`` swapped it in)."""
    return next(getattr(s, "inner", s) for s in generator.pipeline.stages
                if isinstance(getattr(s, "inner", s), DenoisingStage))


class OursVariants:
    """Our pipeline with each variant's switches set for its run: one copy loaded eager and, when
    compiling, one with ``enable_torch_compile`` (compiling changes the blocks in place)."""

    def __init__(self, model_path: str, device: str | None, dtype: str | None, compile_blocks: bool) -> None:
        self.eager = DiffGenerator.from_pretrained(model_path, device=device, dtype=dtype)
        self.compiled = (DiffGenerator.from_pretrained(model_path, device=device, dtype=dtype,
                                                       enable_torch_compile=True) if compile_blocks else None)

    def run(self, variant: Variant, params: SamplingParams) -> RunRecord:
        generator = self.compiled if variant.compiled else self.eager
        stage = denoising_stage(generator)
        default_batched = stage.batched_cfg
        stage.batched_cfg = variant.batched_cfg
        if not variant.hoisted:
            stage.adapter.request_constants = _no_request_constants
        try:
            start = time.perf_counter()
            result = generator.generate(params)
            e2e = time.perf_counter() - start
        finally:
            stage.batched_cfg = default_batched
            stage.adapter.__dict__.pop("request_constants", None)
        stats = result.cache_stats
        computed = ({b: list(s.computed_steps) for b, s in stats.branches.items()} if stats is not None else
                    {b: list(range(params.num_inference_steps)) for b in (COND, UNCOND)})
        return RunRecord(e2e_s=e2e, denoise_s=result.timings[DenoisingStage.name], computed_steps=computed,
                         frames=result.frames, parts=dict(result.timings))


def run_model(label: str, model_path: str, args: argparse.Namespace, request: dict[str, Any]) -> dict[str, Any]:
    """Every variant on one model: warm-up, timed rounds, gains, fidelity, plans, a profile."""
    ours = OursVariants(model_path, args.device, args.dtype, not args.no_compile)
    pipeline = ours.eager.pipeline
    base = ours.eager.validate(SamplingParams(prompt=PROMPT, seed=SEED, **request))
    ratios = list(load_calibration(BUILTIN_MODEL_PATH / "calibration.json").branches[COND].mag_ratio)
    knobs = dict(threshold=MAGCACHE_THRESHOLD, max_skip_steps=MAGCACHE_MAX_SKIP_STEPS,
                 retention_ratio=MAGCACHE_RETENTION)
    magcache = CacheParams("magcache", options={"mag_ratios": {COND: ratios, UNCOND: ratios}}, **knobs)
    hook = {"mag_ratios": ratios, **knobs}
    diffusers = DiffusersRunner(str(pipeline.model_info.path), pipeline.device, pipeline.dtype)
    all_variants = variants(not args.no_compile)
    default_loop = "hoisted+batched" if denoising_stage(ours.eager).batched_cfg else "hoisted"

    def run(variant: Variant) -> RunRecord:
        if variant.impl == "diffusers":
            config = BenchConfig(variant.name, variant.name, impl="diffusers", hook=hook if variant.cached else None)
            return diffusers.run(config, base, measure_memory=False)
        return ours.run(variant, dataclasses.replace(base, cache=magcache if variant.cached else CacheParams()))

    bar = tqdm(total=len(all_variants) * (1 + args.repeats), desc=label, unit="run")
    warmup: dict[str, RunRecord] = {}
    for variant in all_variants:
        warmup[variant.name] = run(variant)
        bar.update()
    timed: dict[str, list[RunRecord]] = defaultdict(list)
    for rnd in range(args.repeats):
        shift = rnd % len(all_variants)
        for variant in all_variants[shift:] + all_variants[:shift]:
            record = run(variant)
            record.frames = None
            timed[variant.name].append(record)
            bar.update()
    bar.close()
    rows = [_row(v, warmup[v.name], timed[v.name], warmup) for v in all_variants]
    gains = [_gain(c, timed) for c in comparisons(not args.no_compile)]
    profile = _profile(ours.eager, base, magcache, default_loop == "hoisted+batched")
    for name, variant in (("uncached", f"ours {default_loop}"), ("magcache", f"ours {default_loop} magcache")):
        stages = timed[variant][0].parts
        profile[name]["stages_ms"] = {s: 1e3 * statistics.median(r.parts[s] for r in timed[variant]) for s in stages}
    return {"model": label, "model_path": str(model_path), "request": [base.num_frames, base.height, base.width],
            "num_inference_steps": base.num_inference_steps, "dtype": str(pipeline.dtype).removeprefix("torch."),
            "default_loop": default_loop, "rows": rows, "gains": gains, "profile": profile,
            "compile_warmup_s": {v.name: warmup[v.name].e2e_s for v in all_variants if v.compiled}}


def _row(variant: Variant, first: RunRecord, runs: Sequence[RunRecord], warmup: dict[str, RunRecord]) -> dict[str, Any]:
    """Median times, passes, and the largest frame difference against the uncompiled, unbatched
    run of the same implementation and cache (diffusers: against ours before the fast path)."""
    reference = "ours before magcache" if variant.cached else "ours before"
    difference = float(np.abs(first.frames - warmup[reference].frames).max())
    row = {"name": variant.name, "impl": variant.impl, "cached": variant.cached,
           "passes": {b: len(s) for b, s in first.computed_steps.items()},
           "computed_steps": first.computed_steps,
           "denoise_ms": 1e3 * statistics.median(r.denoise_s for r in runs),
           "e2e_ms": 1e3 * statistics.median(r.e2e_s for r in runs),
           "max_frame_diff": difference, "reference": reference}
    if variant.cached:
        peer = "diffusers+hook" if variant.impl == "ours" else "ours before magcache"
        row["same_plan_as"] = {peer: first.computed_steps == warmup[peer].computed_steps}
    return row


def _gain(comparison, timed: dict[str, list[RunRecord]]) -> dict[str, Any]:
    slow, fast = timed[comparison.slower], timed[comparison.faster]
    return {"label": comparison.label, "slower": comparison.slower, "faster": comparison.faster,
            "denoise": statistics.median(a.denoise_s / b.denoise_s for a, b in zip(slow, fast, strict=True)),
            "e2e": statistics.median(a.e2e_s / b.e2e_s for a, b in zip(slow, fast, strict=True))}


def _profile(generator: DiffGenerator, base: SamplingParams, magcache: CacheParams, batched: bool) -> dict[str, Any]:
    """Where the default loop's time goes, uncached and cached: one warm-up and one timed run each,
    with the adapter, scheduler and cache calls timed (``bench_harness.OursRunner``)."""
    runner = OursRunner(generator)  # swaps in the profiled stage: this generator is not timed again
    denoising_stage(generator).batched_cfg = batched
    out = {}
    for name, cache in (("uncached", CacheParams()), ("magcache", magcache)):
        config = BenchConfig(name, name, cache=cache)
        runner.run(config, base, measure_memory=False)
        record = runner.run(config, base, measure_memory=False)
        steps = base.num_inference_steps
        parts = {p: 1e3 * s / steps for p, s in record.parts.items()}
        parts["loop"] = 1e3 * record.denoise_s / steps - sum(parts.values())
        out[name] = {"denoise_ms_per_step": 1e3 * record.denoise_s / steps, "parts_ms_per_step": parts,
                     "e2e_ms": 1e3 * record.e2e_s, "denoise_ms": 1e3 * record.denoise_s}
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default=None, help="diffusers-layout Wan folder; default: the built-in model")
    parser.add_argument("--no-block-heavy", action="store_true", help="skip the block-dominated random model")
    parser.add_argument("--no-compile", action="store_true", help="skip the torch.compile variants")
    parser.add_argument("--repeats", type=int, default=4, help="timed rounds after the warm-up round (default 4)")
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:N; default: cuda if available")
    parser.add_argument("--dtype", default=None, help="float32 or bfloat16; default: the device's default")
    parser.add_argument("--threads", type=int, default=1, help="torch.set_num_threads (default 1: shared machine)")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON path; default benchmark/results/fast-path-<device>.json")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    device = resolve_device(args.device)
    report: dict[str, Any] = {
        "command": " ".join(["python benchmark/fast_path.py", *(sys.argv[1:] if argv is None else argv)]),
        "machine": machine_info(device, args.threads), "repeats": args.repeats, "prompt": PROMPT, "seed": SEED,
        "magcache": {"threshold": MAGCACHE_THRESHOLD, "max_skip_steps": MAGCACHE_MAX_SKIP_STEPS,
                     "retention_ratio": MAGCACHE_RETENTION, "ratios": "the built-in model's cond curve, both branches"},
        "models": [],
    }
    report["models"].append(run_model("built-in" if args.model_path is None else Path(args.model_path).name,
                                      str(args.model_path or BUILTIN_MODEL_PATH), args, {}))
    if not args.no_block_heavy:
        from sglang.multimodal_gen.tools.tiny_models import build_tiny_wan

        with tempfile.TemporaryDirectory(prefix="fast_path_") as tmp:
            path = build_tiny_wan(Path(tmp) / "block-heavy-wan", seed=0, transformer_config=BLOCK_HEAVY_TRANSFORMER)
            section = run_model("block-heavy", str(path), args, BLOCK_HEAVY_REQUEST)
            section["model_path"] = f"random Wan transformer {BLOCK_HEAVY_TRANSFORMER}"
            report["models"].append(section)
    report["machine"]["load_average_end"] = list(os.getloadavg())
    report["wall_s"] = time.perf_counter() - start
    output = args.output or REPO / "benchmark" / "results" / f"fast-path-{device.type}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(report, indent=1) + "\n")
    print(render_markdown(report))
    print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
