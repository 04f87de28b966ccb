"""How much the guidance term moves between steps, against each branch's output: why the planner
reuses under guidance where its computed steps lie far apart (``GUIDED_FORECAST_MAX_SPACING``).

    python benchmark/guidance_term.py                                   # built-in Wan, 20 and 50 steps
    python benchmark/guidance_term.py --model-path wan2.1-t2v-tiny-hard --steps 20

Uncached runs of the captions ``planner_tuning.py`` tunes on by default (its first two tuning
captions, seed 11). At each step
``k`` and spacing ``s`` (the steps between two computed ones: 2 at 2x, 3 at 3x) it takes the
relative change ``|x_k - x_{k-s}| / |x_k|`` of the guidance term ``x = cond - uncond`` and of the
cond output ``x = cond``: what reusing the output ``s`` steps old gets wrong, against the size of
what it stands for. The guided prediction multiplies the first by the guidance scale. Printed as
the median and the range over steps and captions. One torch thread.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from frontier_configs import model_prompts  # noqa: E402
from planner_tuning import CAPTIONS, SEED  # noqa: E402

from sglang.multimodal_gen.configs.sampling_params import SamplingParams  # noqa: E402
from sglang.multimodal_gen.runtime.cache.branches import COND, UNCOND  # noqa: E402
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator, denoising_stage  # noqa: E402

SPACINGS = (1, 2, 3)


def branch_outputs(generator: DiffGenerator, request: SamplingParams) -> list[dict[str, torch.Tensor]]:
    """Each step's model output per branch, from one uncached run (the stage's own predictions)."""
    stage = denoising_stage(generator.pipeline)
    outputs: dict[int, dict[str, torch.Tensor]] = {}
    predict = stage._predict

    def recording(current, branches, *args):
        predicted = predict(current, branches, *args)
        outputs.setdefault(current.step, {}).update({b: p.float().clone() for b, p in predicted.items()})
        return predicted

    stage._predict = recording
    try:
        generator.generate(request)
    finally:
        del stage._predict
    return [outputs[step] for step in sorted(outputs)]


def relative_changes(series: list[torch.Tensor], spacing: int) -> list[float]:
    return [float((series[k] - series[k - spacing]).norm() / series[k].norm()) for k in range(spacing, len(series))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default="wan2.1-t2v-tiny", help="a Wan folder with CFG or a built-in model's name")
    parser.add_argument("--steps", type=int, nargs="+", default=[20, 50])
    args = parser.parse_args()
    torch.set_num_threads(1)
    generator = DiffGenerator.from_pretrained(args.model_path, device="cpu")
    _, tuning = model_prompts(generator.pipeline.model_info.path)
    for steps in args.steps:
        runs = [branch_outputs(generator, SamplingParams(prompt=caption, seed=SEED, num_inference_steps=steps))
                for caption in tuning[:CAPTIONS]]
        if any(UNCOND not in step for run in runs for step in run):
            raise SystemExit("error: this model runs without classifier-free guidance (no uncond branch)")
        for spacing in SPACINGS:
            guidance = [c for run in runs for c in relative_changes([s[COND] - s[UNCOND] for s in run], spacing)]
            cond = [c for run in runs for c in relative_changes([s[COND] for s in run], spacing)]
            print(f"{steps} steps, {spacing} apart: guidance term {statistics.median(guidance):.2f} "
                  f"({min(guidance):.2f}-{max(guidance):.2f}), cond output {statistics.median(cond):.2f} "
                  f"({min(cond):.2f}-{max(cond):.2f})")


if __name__ == "__main__":
    main()
