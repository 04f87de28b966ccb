"""Residual estimators on the built-in model: what a skipped step adds, at the same skips.

    python benchmark/estimators.py            # 2 strategies x 2 presets x every estimator, 4 prompts x 2 seeds, 20 steps
    python benchmark/estimators.py --quick    # 1 prompt, 1 seed

For every (strategy, preset) the skip decisions do not depend on the estimator (MagCache plans up
front; TeaCache on Wan decides from the timestep schedule), so each row compares estimators at
exactly the same transformer passes. PSNR of the decoded frames against the uncached run of the
same prompt, seed and step count (mean and worst over samples). `blend` runs at 0.5 (the shipped
calibration file predates the fit), `blend (fit)` at the alpha `sglang calibrate` fits on the
model's calibration_prompts.txt at this step count (printed). Prompts are held-out captions, none
in calibration_prompts.txt.
"""

from __future__ import annotations

import argparse
import logging
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from sglang.multimodal_gen.configs.cache_params import CacheParams  # noqa: E402
from sglang.multimodal_gen.configs.sampling_params import SamplingParams  # noqa: E402
from sglang.multimodal_gen.runtime.cache import registered_estimators  # noqa: E402
from sglang.multimodal_gen.runtime.entrypoints.calibrate import calibrate, read_prompts_file  # noqa: E402
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator  # noqa: E402
from sglang.multimodal_gen.tools.synthetic_videos import HELD_OUT  # noqa: E402

from metrics import psnr  # noqa: E402  (benchmark/metrics.py, next to this script)

PROMPTS = [HELD_OUT[i].caption for i in (0, 9, 22, 31)]
SEEDS = [0, 1]
SETTINGS = [("magcache", "default"), ("magcache", "fast"), ("teacache", "slow"), ("teacache", "fast")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 prompt, 1 seed")
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    prompts, seeds = (PROMPTS[:1], SEEDS[:1]) if args.quick else (PROMPTS, SEEDS)
    gen = DiffGenerator.from_pretrained(None, device="cpu")
    samples = [(p, s) for p in prompts for s in seeds]
    calibration_prompts = read_prompts_file(REPO / "python/sglang/multimodal_gen/builtin/wan2.1-t2v-tiny/calibration_prompts.txt")
    with tempfile.TemporaryDirectory() as folder:
        alpha = calibrate(gen, calibration_prompts, SamplingParams(num_inference_steps=args.steps),
                          Path(folder) / "fit.json").blend_alpha
    columns = [(name, {"estimator": name}) for name in registered_estimators()]
    columns.append(("blend (fit)", {"estimator": "blend", "blend_alpha": alpha}))
    uncached = {k: gen.generate(SamplingParams(prompt=k[0], seed=k[1], num_inference_steps=args.steps)).frames
                for k in samples}
    print(f"{args.steps} steps, {len(samples)} samples; PSNR dB against uncached: mean (worst); "
          f"fitted blend_alpha {alpha:.3f} ({len(calibration_prompts)} calibration prompts)")
    print("| strategy | preset | passes/branch | " + " | ".join(c for c, _ in columns) + " |")
    print("|---|---|---|" + "---|" * len(columns))
    for strategy, preset in SETTINGS:
        cells, passes = [], None
        for _, knobs in columns:
            scores = []
            for prompt, seed in samples:
                cache = CacheParams(strategy=strategy, preset=preset, **knobs)
                result = gen.generate(SamplingParams(prompt=prompt, seed=seed, num_inference_steps=args.steps,
                                                     cache=cache))
                passes = result.cache_stats.branches["cond"].num_computed
                scores.append(psnr(result.frames, uncached[(prompt, seed)]))
            cells.append(f"{np.mean(scores):.1f} ({min(scores):.1f})")
        print(f"| {strategy} | {preset} | {passes} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
