"""The planner's choices on captions it may be tuned on: the model's training captions, never scored.

    python benchmark/planner_tuning.py                                  # built-in Wan model
    python benchmark/planner_tuning.py --model-path wan2.1-t2v-tiny-hard
    python benchmark/planner_tuning.py --steps 40 100 --speedups 2 3 --constant INTERPOLATION_SPREAD=0.5
    python benchmark/planner_tuning.py --uncorrected-estimates      # UniPC's corrector off on estimated steps
    python benchmark/planner_tuning.py --sample-captions 6 --seeds 11 12 --speedups 2 3 \
        --methods "fitted, checked" "planner, reuse"                 # 12 samples per setting

Where a choice of the planner's (its forecast check, a constant of it) is weighed, the held-out
captions of ``frontier.py`` and ``robustness.py`` are what it is judged on, so they must not be what
it is chosen on. This runs the planner with its ``fitted`` estimator and the check on, the same with
``check_forecast`` off, and the planner planning for ``reuse``, on the first two tuning captions of
``frontier_configs.model_prompts`` (training scenes) with seed 11, at 20, 30 and 50 steps and 1.5x,
2x and 3x (``--steps``, ``--speedups``); PSNR of the decoded frames against the uncached run of the
same request, at equal passes. ``--constant NAME=VALUE`` sets one of ``runtime/cache/planner.py``'s
module constants (``TRUSTED_SHARE``, ``INTERPOLATION_SPREAD``, ...) for the run, which is how
those constants are weighed. Two captions and one seed leave a setting's mean to chance (a change
of the planner moved single settings by 3-5 dB either way): ``--sample-captions N`` draws N of the
world's training captions that are not among the model's calibration prompts instead (a fixed
draw), and ``--seeds`` takes several seeds. Rows go to JSON; the mean and worst per method are
printed, and per setting with ``--per-setting``. One torch thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import random
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
from sglang.multimodal_gen.configs.models import read_model_info  # noqa: E402
from sglang.multimodal_gen.configs.sampling_params import SamplingParams  # noqa: E402
from sglang.multimodal_gen.runtime.cache import planner  # noqa: E402
from sglang.multimodal_gen.runtime.cache.budget import PASSES_ONLY  # noqa: E402
from sglang.multimodal_gen.runtime.entrypoints.calibrate import read_prompts_file  # noqa: E402
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator, denoising_stage  # noqa: E402
from sglang.multimodal_gen.tools.adherence import model_world  # noqa: E402
from sglang.multimodal_gen.tools.synthetic_videos import WORLDS  # noqa: E402

STEP_COUNTS = (20, 30, 50)
SPEEDUPS = (1.5, 2.0, 3.0)
SEED = 11
CAPTIONS = 2
#: Seeds the draw of ``--sample-captions``.
CAPTION_DRAW_SEED = 5
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


def sampled_captions(model_folder: Path, count: int) -> list[str]:
    """``count`` training captions of the model's world outside its calibration prompts, a fixed draw."""
    if read_model_info(model_folder).image_to_video:
        raise SystemExit("error: --sample-captions draws text-to-video training captions; this model takes a first frame")
    calibration = set(read_prompts_file(model_folder / "calibration_prompts.txt"))
    pool = [scene.caption for scene in WORLDS[model_world(model_folder)].train_scenes if scene.caption not in calibration]
    if not 1 <= count <= len(pool):
        raise SystemExit(f"error: --sample-captions takes 1 to {len(pool)} for this model, not {count}")
    return random.Random(CAPTION_DRAW_SEED).sample(pool, count)


def print_scores(rows: list[dict], methods: list[str], per_setting: bool) -> None:
    settings = sorted({(row["steps"], row["speedup"]) for row in rows}) if per_setting else []
    for setting in [*settings, None]:
        chosen = [row for row in rows if setting is None or (row["steps"], row["speedup"]) == setting]
        label = "all" if setting is None else f"{setting[0]} steps {setting[1]:g}x"
        scores = "  ".join(f"{method} {statistics.mean(r['psnr'][method] for r in chosen):5.2f} / "
                           f"{min(r['psnr'][method] for r in chosen):5.1f}" for method in methods)
        print(f"{label:16s} {scores}")


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
    parser.add_argument("--sample-captions", type=int, default=None, metavar="N",
                        help="N training captions outside the calibration prompts (a fixed draw) instead of the "
                             f"first {CAPTIONS} tuning captions")
    parser.add_argument("--seeds", type=int, nargs="+", default=[SEED])
    parser.add_argument("--guidance", type=float, default=None, help="guidance scale (default: the model's)")
    parser.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    parser.add_argument("--per-setting", action="store_true", help="print the mean and worst per step count and speedup too")
    parser.add_argument("--output", default=None, help="JSON rows (default: benchmark/results/planner-tuning-MODEL.json)")
    args = parser.parse_args()
    for name, value in args.constant:
        setattr(planner, name, value)
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    generator = DiffGenerator.from_pretrained(args.model_path, device="cpu")
    denoising_stage(generator.pipeline).correct_estimated_steps = not args.uncorrected_estimates
    info = generator.pipeline.model_info
    if args.sample_captions is None:
        captions = model_prompts(info.path)[1][:CAPTIONS]
    else:
        captions = sampled_captions(Path(info.path), args.sample_captions)
    guidance = {} if args.guidance is None else {"guidance_scale": args.guidance}
    output = Path(args.output or REPO / f"benchmark/results/planner-tuning-{Path(info.path).name}.json")
    rows: list[dict] = []
    samples = len(args.steps) * len(captions) * len(args.seeds)
    bar = tqdm(total=samples * (1 + len(args.speedups) * len(args.methods)), desc="tuning", unit="run")
    for steps in args.steps:
        for caption in captions:
            for seed in args.seeds:
                base = SamplingParams(prompt=caption, seed=seed, num_inference_steps=steps, **guidance)
                reference = generator.generate(base).frames
                bar.update()
                for speedup in args.speedups:
                    scores = {}
                    for method in args.methods:
                        estimator, options = METHODS[method]
                        cache = CacheParams(strategy="planner", speedup=speedup, estimator=estimator,
                                            step_costs=PASSES_ONLY, options=dict(options))
                        scores[method] = psnr(generator.generate(dataclasses.replace(base, cache=cache)).frames, reference)
                        bar.update()
                    rows.append({"steps": steps, "speedup": speedup, "caption": caption, "seed": seed,
                                 "guidance_scale": args.guidance, "constants": dict(args.constant),
                                 "corrected_estimates": not args.uncorrected_estimates, "psnr": scores})
    bar.close()
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(rows, indent=1))
    print_scores(rows, args.methods, args.per_setting)
    print(f"rows: {output}")


if __name__ == "__main__":
    main()
