"""The fidelity table of docs/calibration.md: each cache setting on the built-in model, with its calibration.

    python benchmark/calibration_table.py [--model-path DIR]

For every row, the built-in model generates two held-out prompts (seed 11, 50 steps, its default
64x64x17 and guidance 5) with and without the cache; the row gives the steps skipped per branch
and the PSNR of the decoded float frames against the uncached ones. MagCache and TeaCache use the
model's shipped calibration (its ``sglang_config.json`` names it) unless the row says otherwise.
About 2 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path


sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "python"))

from sglang.multimodal_gen.configs.cache_params import CacheParams  # noqa: E402
from sglang.multimodal_gen.configs.sampling_params import SamplingParams  # noqa: E402
from sglang.multimodal_gen.runtime.cache.magcache import preset_ratio_table  # noqa: E402
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator  # noqa: E402
from sglang.multimodal_gen.tools.synthetic_videos import HELD_OUT  # noqa: E402

from metrics import psnr  # noqa: E402  (benchmark/metrics.py, next to this script)

PROMPTS = [HELD_OUT[0].caption, HELD_OUT[20].caption]
SEED = 11
STEPS = 50


def rows() -> list[tuple[str, CacheParams]]:
    published = {"mag_ratios": preset_ratio_table()["wan21_t2v_1.3b"]}

    def mag(threshold: float, k: int, label: str = "", **options) -> tuple[str, CacheParams]:
        name = f"MagCache {threshold} / K{k}{label}"
        return name, CacheParams(strategy="magcache", threshold=threshold, max_skip_steps=k, options=options)

    def tea(threshold: float) -> tuple[str, CacheParams]:
        return f"TeaCache {threshold}, fitted polynomial", CacheParams(strategy="teacache", threshold=threshold)

    return [
        mag(0.06, 2),
        mag(0.12, 2, " (release default)"),
        mag(0.12, 4),
        mag(0.12, 4, ", `scale_residual`", scale_residual=True),
        mag(0.24, 6),
        mag(0.24, 6, ", `scale_residual`", scale_residual=True),
        mag(0.12, 4, " with the *published 1.3B* ratios instead", **published),
        tea(0.05),
        tea(0.10),
        tea(0.20),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default=None, help="model folder (default: the built-in model)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    generator = DiffGenerator.from_pretrained(args.model_path, device="cpu")
    uncached = {p: generator.generate(SamplingParams(prompt=p, seed=SEED, num_inference_steps=STEPS)).frames for p in PROMPTS}
    print("prompts:", "; ".join(PROMPTS))
    print("| strategy | skipped steps per branch (of 50) | PSNR (dB) |")
    print("|---|---|---|")
    for name, cache in rows():
        skipped, scores = set(), []
        for prompt in PROMPTS:
            result = generator.generate(SamplingParams(prompt=prompt, seed=SEED, num_inference_steps=STEPS, cache=cache))
            skipped.add(result.cache_stats.branches["cond"].num_skipped)
            scores.append(f"{psnr(result.frames, uncached[prompt]):.1f}")
        print(f"| {name} | {'/'.join(str(s) for s in sorted(skipped))} | {', '.join(scores)} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
