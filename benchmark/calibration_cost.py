"""What a planner calibration costs, against the uncached runs it records.

    python benchmark/calibration_cost.py                          # both built-in models, 8 prompts, 50 steps
    python benchmark/calibration_cost.py --models wan2.1-t2v-tiny --rounds 1
    python benchmark/calibration_cost.py --growth-prompts 0         # without measuring the error growth

Per model and round: the folder's calibration prompts run uncached one after another, at the
seeds ``sglang calibrate`` gives them (what a calibration records), then ``calibrate()`` on the
same prompts and step count (one planner table, no ``--planner-steps``). Reported: the fastest of
each over the rounds (this machine's wall clock varies by a quarter from run to run under load;
the fastest is the one load touched least) and their ratio. One torch thread.

To time an earlier version, copy this file into a checkout of it and run it there: it imports the
``sglang`` beside it.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from sglang.multimodal_gen.configs.cache_params import CacheParams  # noqa: E402
from sglang.multimodal_gen.configs.sampling_params import SamplingParams  # noqa: E402
from sglang.multimodal_gen.runtime.entrypoints.calibrate import calibrate, read_prompts_file  # noqa: E402
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator  # noqa: E402

MODELS = ("wan2.1-t2v-tiny", "hunyuanvideo-t2v-tiny")
STEPS = 50


def time_uncached(generator: DiffGenerator, prompts: list[str], steps: int) -> float:
    start = time.perf_counter()
    for index, prompt in enumerate(prompts):
        generator.generate(SamplingParams(prompt=prompt, seed=index, num_inference_steps=steps, cache=CacheParams()))
    return time.perf_counter() - start


def time_calibration(generator: DiffGenerator, prompts: list[str], steps: int, growth_prompts: int | None) -> float:
    options = {} if growth_prompts is None else {"growth_prompts": growth_prompts}
    with tempfile.TemporaryDirectory() as folder:
        start = time.perf_counter()
        calibrate(generator, prompts, SamplingParams(num_inference_steps=steps, seed=0), Path(folder) / "c.json",
                  **options)
        return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="built-in model names or folders")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the fastest of each counts")
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--growth-prompts", type=int, default=None,
                        help="calibrate()'s growth_prompts (default: its own; 0 measures no error growth)")
    parser.add_argument("--output", default=None, help="JSON rows (default: print only)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    rows = []
    for model in args.models:
        generator = DiffGenerator.from_pretrained(model, device="cpu")
        prompts = read_prompts_file(Path(generator.pipeline.model_info.path) / "calibration_prompts.txt")
        generator.generate(SamplingParams(prompt=prompts[0], num_inference_steps=2))  # warm-up, not timed
        uncached, calibration = [], []
        for _ in range(args.rounds):
            uncached.append(time_uncached(generator, prompts, args.steps))
            calibration.append(time_calibration(generator, prompts, args.steps, args.growth_prompts))
        row = {"model": model, "prompts": len(prompts), "steps": args.steps, "growth_prompts": args.growth_prompts,
               "uncached_seconds": min(uncached),
               "calibration_seconds": min(calibration), "ratio": min(calibration) / min(uncached),
               "rounds": {"uncached": uncached, "calibration": calibration}}
        rows.append(row)
        print(f"{model}: {len(prompts)} uncached runs of {args.steps} steps {row['uncached_seconds']:.1f} s, "
              f"calibration {row['calibration_seconds']:.1f} s: {row['ratio']:.2f}x (fastest of {args.rounds})",
              flush=True)
    if args.output:
        Path(args.output).write_text(json.dumps(rows, indent=1) + "\n")


if __name__ == "__main__":
    main()
