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
import dataclasses
import logging
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

try:
    import sglang  # noqa: F401
except ImportError:  # a checkout without `pip install -e .`
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from bench_configs import BLOCK_HEAVY_TRANSFORMER, REPO, BenchSettings, Sweep, build_configs  # noqa: E402
from bench_harness import (  # noqa: E402
    DiffusersRunner, OursRunner, Runner, machine_info, resolve_calibration, run_section, weights_digest,
)
from bench_report import checks, render_markdown, write_outputs  # noqa: E402

from sglang.multimodal_gen.configs.sampling_params import SamplingParams  # noqa: E402
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator  # noqa: E402


def run_benchmark(settings: BenchSettings) -> dict[str, Any]:
    """Load the model, calibrate, run every section, check and write the outputs; returns the report."""
    torch.set_num_threads(settings.threads)
    sweep = settings.sweep
    generator = DiffGenerator.from_pretrained(settings.model_path, device=settings.device)
    device = generator.pipeline.device
    base = generator.validate(SamplingParams(prompt=sweep.prompts[0], **settings.request))
    steps = base.num_inference_steps
    samples = [dataclasses.replace(base, prompt=p, seed=s) for p in sweep.prompts for s in sweep.seeds]
    report: dict[str, Any] = {
        "command": settings.command, "machine": machine_info(device, settings.threads),
        "model": generator.model_name, "weights_sha256": weights_digest(generator), "num_inference_steps": steps,
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
        runners: dict[str, Runner] = {"ours": OursRunner(generator)}
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


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The flags docs/benchmarks.md lists; request sizes default to the model's own."""
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
    """Run the sweep the flags ask for, print the markdown and say where the files went."""
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
