"""What a model's calibration predicts for the planner's estimators: fitted against reuse, per step count and speedup.

    python benchmark/planner_predictions.py                              # the three text-to-video models
    python benchmark/planner_predictions.py --model-path wan2.1-i2v-tiny --steps 20 50

For each step count's planner table (the one a request at that count plans from) and each speedup,
the planner's best plan is found for ``fitted`` and for ``reuse`` at equal passes, and the ratio of
their predicted errors (root of the summed squared gap costs, error growth included) is printed:
below 1, the calibration expects the fitted forecast to beat reuse by that factor. Set against
``planner_tuning.py``'s measured PSNR on the same settings, it says how far the prediction can be
trusted to choose between them. No generation is run.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from sglang.multimodal_gen.runtime.cache.budget import budget_passes  # noqa: E402
from sglang.multimodal_gen.runtime.cache.calibration import load_calibration  # noqa: E402
from sglang.multimodal_gen.runtime.cache.planner import BudgetPlanner, GapCosts, PlannerConfig, best_plan  # noqa: E402
from sglang.multimodal_gen.runtime.models.loader import resolve_model_path  # noqa: E402

MODELS = ("wan2.1-t2v-tiny", "wan2.1-t2v-tiny-hard", "hunyuanvideo-t2v-tiny")
STEP_COUNTS = (20, 30, 50)
SPEEDUPS = (1.5, 2.0, 3.0)


def predicted_ratio(config: PlannerConfig, steps: int, speedup: float) -> float:
    """Predicted error of the best ``fitted`` plan over that of the best ``reuse`` plan."""
    costs = [GapCosts(config.gram[b], config.sigmas, steps, config.growth) for b in config.gram]
    passes = budget_passes(steps, speedup)
    fitted, _ = best_plan(costs, passes, config.max_skip_steps, "fitted")
    reuse, _ = best_plan(costs, passes, config.max_skip_steps, "reuse")
    return math.sqrt(fitted / reuse) if reuse > 0 else math.nan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", action="append", default=None,
                        help="a model folder or a built-in model's name (repeatable; default: the three text-to-video models)")
    parser.add_argument("--steps", type=int, nargs="+", default=list(STEP_COUNTS))
    parser.add_argument("--speedups", type=float, nargs="+", default=list(SPEEDUPS))
    args = parser.parse_args()
    print("| model | steps | " + " | ".join(f"{s:g}x" for s in args.speedups) + " |")
    print("|---|---|" + "---|" * len(args.speedups))
    for model in args.model_path or MODELS:
        calibration = load_calibration(Path(resolve_model_path(model)) / "calibration.json")
        for steps in args.steps:
            options = BudgetPlanner.options_from_calibration(calibration, steps)
            table = calibration.nearest_planner_table(steps)["num_inference_steps"]
            config = PlannerConfig(**options)
            ratios = " | ".join(f"{predicted_ratio(config, steps, s):.2f}" for s in args.speedups)
            print(f"| {Path(model).name} | {steps} (table {table}) | {ratios} |")


if __name__ == "__main__":
    main()
