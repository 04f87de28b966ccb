"""The planner's choices on captions it may be tuned on: the model's training captions, never scored.

    python benchmark/planner_tuning.py                                  # built-in Wan model
    python benchmark/planner_tuning.py --model-path wan2.1-t2v-tiny-hard
    python benchmark/planner_tuning.py --steps 40 100 --speedups 2 3 --constant INTERPOLATION_SPREAD=0.5
    python benchmark/planner_tuning.py --uncorrected-estimates      # UniPC's corrector off on estimated steps

Where a choice of the planner's (its forecast check, a constant of it) is weighed, the held-out
captions of ``frontier.py`` and ``robustness.py`` are what it is judged on, so they must not be what
it is chosen on. This runs the planner with its ``fitted`` estimator and the check on, the same with
``check_forecast`` off, and the planner planning for ``reuse``, on the first two tuning captions of
``frontier_configs.model_prompts`` (training scenes) with seed 11, at 20, 30 and 50 steps and 1.5x,
2x and 3x (``--steps``, ``--speedups``); PSNR of the decoded frames against the uncached run of the
same request, at equal passes. ``--constant NAME=VALUE`` sets one of ``runtime/cache/planner.py``'s
module constants (``TRUSTED_SHARE``, ``INTERPOLATION_SPREAD``, ...) for the run, which is how
those constants are weighed. Rows go to JSON; the mean and worst per method are printed. One torch
thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from frontier_configs import model_prompts  # noqa: E402
from metrics import psnr  # noqa: E402

from sglang.multimodal_gen.configs.cache_params import CacheParams  # noqa: E402
from sglang.multimodal_gen.configs.sampling_params import SamplingParams  # noqa: E402
from sglang.multimodal_gen.runtime.cache import planner  # noqa: E402
from sglang.multimodal_gen.runtime.cache.budget import PASSES_ONLY  # noqa: E402
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator, denoising_stage  # noqa: E402

STEP_COUNTS = (20, 30, 50)
SPEEDUPS = (1.5, 2.0, 3.0)
SEED = 11
CAPTIONS = 2
#: Each method's planner request: the estimator it names and its planner knobs.
METHODS = {
    "fitted, checked": (None, {}),
    "fitted, unchecked": (None, {"check_forecast": False}),
    "planner, reuse": ("reuse", {}),
}


def planner_constant(text: str) -> tuple[str, float]:
    """``NAME=VALUE`` for a numeric module constant of the planner."""
    name, _, value = text.partition("=")
    if not name.isupper() or not isinstance(getattr(planner, name, None), (int, float)):
        raise argparse.ArgumentTypeError(f"{name!r} is not a numeric constant of runtime/cache/planner.py")
    try:
        return name, float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: the value must be a number") from None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default="wan2.1-t2v-tiny", help="a Wan or HunyuanVideo folder or a built-in model's name")
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEP_COUNTS))
    parser.add_argument("--speedups", type=float, nargs="+", default=list(SPEEDUPS))
    parser.add_argument("--constant", type=planner_constant, action="append", default=[], metavar="NAME=VALUE",
                        help="set a planner module constant for this run (repeatable)")
    parser.add_argument("--uncorrected-estimates", action="store_true",
                        help="skip UniPC's corrector on the steps the plan estimates (the denoising stage's "
                             "correct_estimated_steps off)")
    parser.add_argument("--output", default=None, help="JSON rows (default: benchmark/results/planner-tuning-MODEL.json)")
    args = parser.parse_args()
    for name, value in args.constant:
        setattr(planner, name, value)
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    generator = DiffGenerator.from_pretrained(args.model_path, device="cpu")
    denoising_stage(generator.pipeline).correct_estimated_steps = not args.uncorrected_estimates
    info = generator.pipeline.model_info
    _, tuning = model_prompts(info.path)
    output = Path(args.output or REPO / f"benchmark/results/planner-tuning-{Path(info.path).name}.json")
    rows: list[dict] = []
    bar = tqdm(total=len(args.steps) * CAPTIONS * (1 + len(args.speedups) * len(METHODS)), desc="tuning", unit="run")
    for steps in args.steps:
        for caption in tuning[:CAPTIONS]:
            base = SamplingParams(prompt=caption, seed=SEED, num_inference_steps=steps)
            reference = generator.generate(base).frames
            bar.update()
            for speedup in args.speedups:
                scores = {}
                for method, (estimator, options) in METHODS.items():
                    cache = CacheParams(strategy="planner", speedup=speedup, estimator=estimator,
                                        step_costs=PASSES_ONLY, options=dict(options))
                    scores[method] = psnr(generator.generate(dataclasses.replace(base, cache=cache)).frames, reference)
                    bar.update()
                rows.append({"steps": steps, "speedup": speedup, "caption": caption, "seed": SEED,
                             "constants": dict(args.constant), "corrected_estimates": not args.uncorrected_estimates,
                             "psnr": scores})
    bar.close()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(rows, indent=1))
    for method in METHODS:
        values = [row["psnr"][method] for row in rows]
        print(f"{method:18s} mean {statistics.mean(values):5.2f}  worst {min(values):5.1f}")
    print(f"rows: {output}")


if __name__ == "__main__":
    main()
