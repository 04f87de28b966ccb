"""TeaCache at step counts other than its calibration's: which rule to use, measured.

    python benchmark/teacache_step_counts.py             # presets x rules, 20/30/50 steps: ~9 min, 2 cores
    python benchmark/teacache_step_counts.py --frontier  # every pass count, poly(x) vs r*poly(x/r): ~14 min
    python benchmark/teacache_step_counts.py --quick     # 20 steps, 1 prompt, 1 seed: under a minute

The built-in model's TeaCache polynomial comes from its calibration file (made at 50 steps) and
the preset thresholds (slow 0.05, fast 0.08) were tuned at 50 steps. With r = calibration steps /
request steps, the rules compared are:

- ``release``: ``poly(x)`` against the threshold (``calibration_steps`` null);
- ``threshold*r``: ``poly(x)`` against ``threshold * r`` (what TeaCache does now);
- ``r*poly(x/r)``: one coarse step as r calibration steps of ``x / r`` each, against the threshold;
- ``poly(x/r)``: the same change per calibration step (``r*poly(x/r)`` against ``threshold * r``).

``r*poly(x/r)`` is itself a polynomial in x (coefficient of x^k times r^(1-k)), so both polynomial
rules run as ``release`` with those coefficients. At 50 steps (r = 1) all four are the same run.

For each row: transformer passes per CFG branch and the PSNR of the decoded frames against the
uncached run of the same prompt, seed and step count (mean and worst over samples); the same for
a plain uncached run with as many steps as the cached run made passes, and in how many samples
the cache beat it. ``--frontier`` instead finds, for 20 and 30 steps, the threshold that gives
each pass count under ``poly(x)`` and under ``r*poly(x/r)``, to compare the two polynomials at
equal cost. Prompts are held-out captions, none in the model's calibration_prompts.txt.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from sglang.multimodal_gen.configs.cache_params import CacheParams  # noqa: E402
from sglang.multimodal_gen.configs.sampling_params import SamplingParams  # noqa: E402
from sglang.multimodal_gen.runtime.cache import COND, StepFeatures, TeaCache, TeaCacheConfig  # noqa: E402
from sglang.multimodal_gen.runtime.cache.calibration import CalibrationResult  # noqa: E402
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator  # noqa: E402
from sglang.multimodal_gen.tools.synthetic_videos import HELD_OUT  # noqa: E402

from metrics import psnr  # noqa: E402  (benchmark/metrics.py, next to this script)

PROMPTS = [HELD_OUT[i].caption for i in (0, 9, 22, 31)]
SEEDS = [0, 1, 2]
STEP_COUNTS = [20, 30, 50]
FRONTIER_STEP_COUNTS = [20, 30]
PRESETS = {"slow": 0.05, "fast": 0.08}
RULES = ("release", "threshold*r", "r*poly(x/r)", "poly(x/r)")


class Bench:
    """The built-in model, its calibration, and uncached runs kept for reuse."""

    def __init__(self, model_path: str | None, prompts: list[str], seeds: list[int]) -> None:
        self.gen = DiffGenerator.from_pretrained(model_path, device="cpu")
        calibration = CalibrationResult.load(self.gen.pipeline.model_info.calibration_file)
        self.coefficients = list(calibration.teacache_coefficients)
        self.calibration_steps = calibration.num_inference_steps
        self.samples = [(p, s) for p in prompts for s in seeds]
        self._uncached: dict[tuple[str, int, int], np.ndarray] = {}

    def uncached(self, prompt: str, seed: int, steps: int) -> np.ndarray:
        key = (prompt, seed, steps)
        if key not in self._uncached:
            params = SamplingParams(prompt=prompt, seed=seed, num_inference_steps=steps)
            self._uncached[key] = self.gen.generate(params).frames
        return self._uncached[key]

    def params(self, rule: str, threshold: float, steps: int) -> CacheParams:
        r = self.calibration_steps / steps
        coefficients = self.coefficients
        if rule in ("r*poly(x/r)", "poly(x/r)"):
            top = len(coefficients) - 1
            coefficients = [c * r ** (1 - (top - i)) for i, c in enumerate(coefficients)]
        if rule in ("threshold*r", "poly(x/r)"):
            threshold *= r
        # calibration_steps null: the rule is all here (the model's calibration file would set it).
        return CacheParams("teacache", threshold=threshold,
                           options={"coefficients": coefficients, "calibration_steps": None})

    def row(self, steps: int, cache: CacheParams) -> dict:
        """Run every sample with ``cache``; passes, PSNR, and the uncached run of as many steps."""
        passes, cached, fewer, wins = set(), [], [], 0
        for prompt, seed in self.samples:
            reference = self.uncached(prompt, seed, steps)
            result = self.gen.generate(SamplingParams(prompt=prompt, seed=seed, num_inference_steps=steps, cache=cache))
            computed = tuple(b.num_computed for b in result.cache_stats.branches.values())
            passes.add(computed)
            cached.append(psnr(result.frames, reference))
            fewer.append(psnr(self.uncached(prompt, seed, max(computed)), reference))
            wins += cached[-1] > fewer[-1]
        return {"steps": steps, "passes": sorted(passes), "psnr": cached, "fewer_steps_psnr": fewer, "wins": wins}

    def indicator_changes(self, steps: int) -> list[float]:
        """TeaCache's per-step indicator change at ``steps`` (on Wan it depends on the schedule only)."""
        prompt, seed = self.samples[0]
        params = SamplingParams(prompt=prompt, seed=seed, num_inference_steps=steps, cache=CacheParams("teacache"))
        return self.gen.generate(params, calibrate=True).cache.calibration_records()[COND].input_change


def passes_at(cache: CacheParams, changes: list[float]) -> int:
    """Steps TeaCache computes for indicators with these per-step changes (exact up to float rounding)."""
    config = TeaCacheConfig(coefficients=cache.options["coefficients"], threshold=cache.threshold)
    tea, value = TeaCache(config, len(changes), (COND,)), torch.ones(1, 4, dtype=torch.float64)
    for step, change in enumerate(changes):
        value = value * (1.0 + change) if step else value
        if tea.should_compute(step, COND, StepFeatures(timestep=torch.zeros(1), modulated_input=value)):
            tea.store(step, COND, torch.zeros(1))
    return tea.stats.branches[COND].num_computed


def presets_table(bench: Bench, step_counts: list[int]) -> list[dict]:
    rows = []
    for steps in step_counts:
        for preset, threshold in PRESETS.items():
            for rule in RULES:
                row = bench.row(steps, bench.params(rule, threshold, steps))
                rows.append({**row, "preset": preset, "threshold": threshold, "rule": rule})
                logging.info("%d steps, %s, %s: passes %s", steps, preset, rule, row["passes"])
    return rows


def frontier_table(bench: Bench, step_counts: list[int]) -> list[dict]:
    rows = []
    for steps in step_counts:
        changes = bench.indicator_changes(steps)
        for rule in ("release", "r*poly(x/r)"):
            by_passes: dict[int, float] = {}
            for threshold in np.arange(0.0025, 0.6, 0.0025):
                by_passes.setdefault(passes_at(bench.params(rule, float(threshold), steps), changes), float(threshold))
            for count, threshold in sorted(by_passes.items()):
                if 0.3 * steps <= count < steps:
                    row = bench.row(steps, bench.params(rule, threshold, steps))
                    rows.append({**row, "rule": "poly(x)" if rule == "release" else rule, "threshold": threshold})
                    logging.info("%d steps, %s, threshold %.4f: passes %s", steps, rule, threshold, row["passes"])
    return rows


def _db(values: list[float]) -> str:
    mean, worst = np.mean(values), np.min(values)  # inf: identical frames in some (mean) or all (worst) samples
    return f"{mean:.2f} | {worst:.2f}" if np.isfinite(mean) else f"inf | {worst:.2f}"


def markdown(rows: list[dict], frontier: bool) -> str:
    label = "threshold" if frontier else "preset"
    lines = [f"| steps | {label} | rule | passes/branch | PSNR mean | worst | uncached as many steps: mean | worst | "
             "cache better |", "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        passes = ", ".join("/".join(str(n) for n in p) if len(set(p)) > 1 else str(p[0]) for p in row["passes"])
        setting = f"{row['threshold']:.4g}" if frontier else f"{row['preset']} {row['threshold']:g}"
        lines.append(f"| {row['steps']} | {setting} | {row['rule']} | {passes} | {_db(row['psnr'])} | "
                     f"{_db(row['fewer_steps_psnr'])} | {row['wins']}/{len(row['psnr'])} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default=None, help="model folder (default: the built-in model)")
    parser.add_argument("--quick", action="store_true", help="20 steps, one prompt, one seed")
    parser.add_argument("--frontier", action="store_true", help="every pass count at 20 and 30 steps instead")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    parser.add_argument("--output", type=Path, default=None, help="also write every number as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("sglang").setLevel(logging.ERROR)  # no-skip and resampling warnings are expected here
    torch.set_num_threads(args.threads)
    prompts, seeds = (PROMPTS[:1], SEEDS[:1]) if args.quick else (PROMPTS, SEEDS)
    bench = Bench(args.model_path, prompts, seeds)
    if args.frontier:
        rows = frontier_table(bench, [20] if args.quick else FRONTIER_STEP_COUNTS)
    else:
        rows = presets_table(bench, [20] if args.quick else STEP_COUNTS)
    print(f"prompts: {'; '.join(prompts)}; seeds {seeds}")
    print(markdown(rows, args.frontier))
    if args.output is not None:
        args.output.parent.mkdir(parents=True, exist_ok=True)
        finite = [{k: [None if isinstance(x, float) and np.isinf(x) else x for x in v] if k.endswith("psnr") else v
                   for k, v in row.items()} for row in rows]  # inf (identical frames) as null, as bench_cache does
        args.output.write_text(json.dumps({"prompts": prompts, "seeds": seeds, "rows": finite}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
