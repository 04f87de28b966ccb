"""Is `--cache-speedup X` the speedup you get? The denoising loop's measured speedup per strategy.

    python benchmark/time_budget.py                                   # both built-in models
    python benchmark/time_budget.py --models hunyuanvideo-t2v-tiny --rounds 5

For each model at its default size and step count, each strategy that takes a budget (the planner,
MagCache, TeaCache) is asked for 1.5x, 2x, 2.5x and 3x. Per round, interleaved: one uncached run,
then every (strategy, speedup). Reported per cell: the summary's own ``(N.NNx measured)`` (its
uncached estimate over the loop's time; the median over rounds), and, from the fastest run of
each over the rounds (this machine's wall clock varies by a quarter from run to run under load;
the fastest is the one load touched least), the speedup against the real uncached runs and how far
the summary's uncached estimate is from the real uncached time; the passes. One torch thread.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from sglang.multimodal_gen.configs.cache_params import CacheParams  # noqa: E402
from sglang.multimodal_gen.configs.sampling_params import SamplingParams  # noqa: E402
from sglang.multimodal_gen.runtime.cache.validation import CacheConfigError  # noqa: E402
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator  # noqa: E402

MODELS = ("wan2.1-t2v-tiny", "hunyuanvideo-t2v-tiny")
STRATEGIES = ("planner", "magcache", "teacache")
SPEEDUPS = (1.5, 2.0, 2.5, 3.0)
PROMPT = "a red circle moving right on a blue background"
#: The Done-means bar: the measured speedup at least this fraction of the one asked for.
BAR = 0.95


def measure(model: str, rounds: int) -> list[dict]:
    gen = DiffGenerator.from_pretrained(model, device="cpu")
    gen.generate(SamplingParams(prompt=PROMPT))  # warm-up
    cells = [(s, x) for s in STRATEGIES for x in SPEEDUPS]
    runs: dict[tuple[str, float], list | CacheConfigError] = {cell: [] for cell in cells}
    uncached = []
    for _ in range(rounds):
        uncached.append(gen.pipeline.run(gen.validate(SamplingParams(prompt=PROMPT)), stop_after="denoising"))
        for strategy, speedup in cells:
            if isinstance(runs[(strategy, speedup)], CacheConfigError):
                continue
            cache = CacheParams(speedup=speedup) if strategy == "planner" else CacheParams(strategy, speedup=speedup)
            try:
                runs[(strategy, speedup)].append(gen.generate(SamplingParams(prompt=PROMPT, cache=cache)).cache_stats)
            except CacheConfigError as refused:  # e.g. MagCache's retained steps exceed the passes a budget leaves
                runs[(strategy, speedup)] = refused
    real = min(r.timings["denoising"] for r in uncached)
    rows = []
    for (strategy, speedup), stats in runs.items():
        if isinstance(stats, CacheConfigError):
            rows.append(dict(model=gen.model_name, strategy=strategy, asked=speedup, refused=str(stats)))
            continue
        loop = min(s.denoising_seconds for s in stats)
        rows.append(dict(model=gen.model_name, strategy=strategy, asked=speedup,
                         passes=stats[0].branches["cond"].num_computed, steps=stats[0].num_inference_steps,
                         measured=statistics.median(s.measured_speedup for s in stats),
                         against_uncached=real / loop,
                         estimate_error=min(s.uncached_estimate_seconds for s in stats) / real - 1))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | strategy | asked | passes | measured (summary) | against real uncached runs | "
             "uncached estimate vs real | >= 0.95x asked |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "refused" in r:
            lines.append(f"| {r['model']} | {r['strategy']} | {r['asked']:g}x | refused: {r['refused']} | | | | |")
            continue
        ok = "yes" if r["measured"] >= BAR * r["asked"] else "**no**"
        lines.append(f"| {r['model']} | {r['strategy']} | {r['asked']:g}x | {r['passes']} of {r['steps']} | "
                     f"{r['measured']:.2f}x | {r['against_uncached']:.2f}x | {r['estimate_error']:+.1%} | {ok} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians over them (default 3)")
    parser.add_argument("--output", default=str(REPO / "benchmark/results/time-budget.json"))
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    rows = [row for model in args.models for row in measure(model, args.rounds)]
    print(markdown(rows))
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps({"rounds": args.rounds, "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
