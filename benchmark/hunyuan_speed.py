"""HunyuanVideo: the measured denoising speedup of timestep caching next to its ideal (random weights).

    python benchmark/hunyuan_speed.py                 # 9 configurations, 50 steps, 3 rounds: about a minute
    python benchmark/hunyuan_speed.py --rounds 5
    python benchmark/hunyuan_speed.py --quick         # 3 configurations, 10 steps, 64x64, 1 round (a smoke run)

EasyCache skips the whole model call (embed, blocks, head); MagCache and TeaCache skip only the
transformer blocks, so their skipped steps still pay for the embedding (with HunyuanVideo's token
refiner) and the head. This measures what that difference is worth. A random-weight HunyuanVideo
folder is built in a temporary directory (``SPEED_TRANSFORMER``: the blocks are most of a step on
one CPU thread); random weights make fidelity meaningless, so only speed is reported.

Per configuration: transformer passes computed (HunyuanVideo runs one branch, ``cond``), the ideal
speedup ``steps / passes``, and the measured one: the median uncached denoising time over the
configuration's median. One unmeasured uncached warm-up run, then ``--rounds`` rounds that each
run every configuration once in a fixed order, one prompt and seed, one torch thread. Other load
on the machine shows in the ratios; the load average at the start and end goes into the JSON.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import statistics
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from bench_harness import machine_info  # noqa: E402

from sglang.multimodal_gen.configs.cache_params import CacheParams  # noqa: E402
from sglang.multimodal_gen.configs.sampling_params import SamplingParams  # noqa: E402
from sglang.multimodal_gen.runtime.cache.base import COND, get_cache_class  # noqa: E402
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator  # noqa: E402
from sglang.multimodal_gen.tools.tiny_models import build_tiny_hunyuan  # noqa: E402

# Hidden size 128 (4 heads x 32), 2 double-stream + 6 single-stream blocks: at REQUEST the blocks take
# about 85% of an uncached step on one thread (the embedding with the token refiner and the head the
# rest), and a 50-step run's denoising 2.5-3 s.
SPEED_TRANSFORMER = dict(num_attention_heads=4, attention_head_dim=32, rope_axes_dim=(8, 12, 12), num_layers=2,
                         num_single_layers=6, mlp_ratio=4.0)
# 128x128 pixels, 5 frames -> 2x16x16 latents, 128 image tokens; cache preset key hunyuan_544p.
REQUEST = dict(height=128, width=128, num_frames=5)
QUICK_REQUEST = dict(height=64, width=64, num_frames=5)
PROMPT, SEED, STEPS, ROUNDS = "a red circle moving left on a blue background", 0, 50, 3


@dataclass(frozen=True)
class SpeedConfig:
    name: str
    cache: CacheParams | None = None  # None: uncached

    @property
    def skips(self) -> str:
        """What a skipped step leaves out: the whole model call or only the blocks."""
        if self.cache is None:
            return ""
        return "whole model" if get_cache_class(self.cache.strategy).skips_whole_model else "blocks"


CONFIGS = [
    SpeedConfig("uncached"),
    SpeedConfig("easycache 0.025 (release default)", CacheParams("easycache")),  # warm-up 5 on HunyuanVideo
    *(SpeedConfig(f"easycache {t:g}", CacheParams("easycache", threshold=t)) for t in (0.05, 0.1, 0.2)),
    *(SpeedConfig(f"{strategy} preset {preset}", CacheParams(strategy, preset=preset))
      for strategy in ("magcache", "teacache") for preset in ("default", "fast")),
]
QUICK_CONFIGS = [c for c in CONFIGS if c.name in ("uncached", "easycache 0.2", "magcache preset default")]


class _NoSkipReasons(logging.Handler):
    """Keeps the denoising stage's 'skipped no step' warning of the last run (the strategy's own reason)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.last: str | None = None

    def emit(self, record: logging.LogRecord) -> None:
        self.last = record.getMessage()

    @contextlib.contextmanager
    def capture(self):
        """Takes the stage's warnings for the run; the report prints them once, after the table."""
        stage = logging.getLogger("sglang.multimodal_gen.runtime.stages.denoising")
        saved = stage.level, stage.propagate
        stage.addHandler(self)
        stage.setLevel(logging.WARNING)
        stage.propagate = False
        try:
            yield self
        finally:
            stage.removeHandler(self)
            stage.setLevel(saved[0])
            stage.propagate = saved[1]


def run_rounds(gen: DiffGenerator, configs: Sequence[SpeedConfig], request: dict, steps: int,
               rounds: int) -> list[dict]:
    """One row per configuration: denoising seconds of every round, passes, mean timed pass, no-skip reason."""
    rows = [dict(name=c.name, strategy=c.cache.strategy if c.cache else "none", skips=c.skips, seconds=[],
                 passes=set(), pass_ms=[], no_skip_reason=None) for c in configs]
    gen.generate(SamplingParams(prompt=PROMPT, seed=SEED, num_inference_steps=steps, **request))  # warm-up
    with _NoSkipReasons().capture() as reasons:
        for round_index in range(rounds):
            for config, row in zip(configs, rows):
                reasons.last = None
                params = SamplingParams(prompt=PROMPT, seed=SEED, num_inference_steps=steps, **request,
                                        cache=config.cache or CacheParams())
                result = gen.generate(params)
                stats = result.cache_stats
                row["seconds"].append(result.timings["denoising"])
                row["passes"].add(stats.branches[COND].num_computed if stats else steps)
                if stats is not None and stats.blocks_pass_seconds is not None:
                    row["pass_ms"].append(1000 * stats.blocks_pass_seconds)
                row["no_skip_reason"] = reasons.last
                logging.info("round %d %s: %.3f s", round_index + 1, config.name, row["seconds"][-1])
    return rows


def summarise(rows: list[dict], steps: int) -> list[dict]:
    """Medians, ideal and measured speedups; a configuration's passes must not change between rounds."""
    uncached = statistics.median(rows[0]["seconds"])
    for row in rows:
        if len(row["passes"]) != 1:
            raise RuntimeError(f"{row['name']} computed {sorted(row['passes'])} passes in different rounds")
        (passes,) = row["passes"]
        median = statistics.median(row["seconds"])
        ideal, measured = steps / passes, uncached / median
        row.update(passes=passes, median_s=median, ideal=ideal, measured=measured, measured_over_ideal=measured / ideal,
                   pass_ms=statistics.median(row["pass_ms"]) if row["pass_ms"] else None)
    return rows


def _settings(cache: CacheParams) -> dict:
    """The knobs a configuration sets (unset ones take the model's release or preset values)."""
    return {knob: value for knob, value in dataclasses.asdict(cache).items() if value not in (None, {})}


def markdown_table(rows: list[dict], steps: int) -> str:
    lines = [f"| config | skips | passes of {steps} | ideal | measured | measured/ideal | denoise s (median) | "
             "timed pass ms |", "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        pass_ms = "" if r["pass_ms"] is None else f"{r['pass_ms']:.1f}"
        lines.append(f"| {r['name']} | {r['skips']} | {r['passes']} | {r['ideal']:.2f}x | {r['measured']:.2f}x | "
                     f"{r['measured_over_ideal']:.2f} | {r['median_s']:.3f} | {pass_ms} |")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=None, help=f"timed rounds (default {ROUNDS}; 1 with --quick)")
    parser.add_argument("--steps", type=int, default=None, help=f"denoising steps (default {STEPS}; 10 with --quick)")
    parser.add_argument("--quick", action="store_true", help="uncached, easycache 0.2 and magcache at 64x64, one round")
    parser.add_argument("--output", type=Path, default=REPO / "benchmark/results/hunyuan-speed.json")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    steps = args.steps or (10 if args.quick else STEPS)
    rounds = args.rounds or (1 if args.quick else ROUNDS)
    configs, request = (QUICK_CONFIGS, QUICK_REQUEST) if args.quick else (CONFIGS, REQUEST)
    machine = machine_info(torch.device("cpu"), torch.get_num_threads())
    with tempfile.TemporaryDirectory() as tmp:
        folder = build_tiny_hunyuan(Path(tmp) / "hunyuan-speed", seed=0, transformer_config=SPEED_TRANSFORMER)
        gen = DiffGenerator.from_pretrained(str(folder), device="cpu")
        rows = summarise(run_rounds(gen, configs, request, steps, rounds), steps)
    machine["load_average_end"] = list(os.getloadavg())
    command = " ".join(["python benchmark/hunyuan_speed.py", *(sys.argv[1:] if argv is None else argv)])
    start, end = machine["load_average_start"][0], machine["load_average_end"][0]
    print(f"HunyuanVideo, random weights, {request['width']}x{request['height']}, {request['num_frames']} frames, "
          f"{steps} steps, {rounds} interleaved rounds, 1 torch thread; load average {start:.2f} at the start, "
          f"{end:.2f} at the end")
    print(markdown_table(rows, steps))
    for row in rows:
        if row["no_skip_reason"]:
            print(f"{row['name']}: {row['no_skip_reason']}")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    report = dict(command=command, machine=machine, transformer=SPEED_TRANSFORMER, request=request, prompt=PROMPT,
                  seed=SEED, steps=steps, rounds=rounds,
                  configs={c.name: c.cache and _settings(c.cache) for c in configs}, rows=rows)
    args.output.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
