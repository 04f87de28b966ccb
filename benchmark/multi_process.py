"""Time one request on 1 process against N processes (CFG parallel, or Ulysses), median of rounds.

    python benchmark/multi_process.py                          # built-in Wan, CFG parallel, 2 gloo processes
    python benchmark/multi_process.py --steps 20 --rounds 3 --cache magcache
    python benchmark/multi_process.py --ulysses                # 2 processes as Ulysses instead
    python benchmark/multi_process.py --device cuda --num-gpus 2   # NCCL, one process per GPU

What a CPU run shows: that the processes split the transformer passes (each CFG rank runs one
branch, so denoising takes about half as long when each process has a free core) and what the
per-step collective costs (one all_gather of the prediction per step, plus a one-bool broadcast
per step for EasyCache); with two processes on two shared cores the ratio is bounded by the
machine's other load (the load average goes into the output). Every rank encodes the text and only
rank 0 decodes, so end-to-end time gains less than denoising. It also times the group's start and
a rebuild (what a failed rank costs the next request: on the CPU the workers fork from a fork
server that has the libraries imported). What only GPUs can show:
NCCL's collective cost against a real 1.3B/14B step (milliseconds against seconds, so the
denoising speedup approaches N), the memory per rank under Ulysses, and the interconnect's effect.
One process per GPU: a machine with one GPU can only run ``--num-gpus 1`` on the NCCL path.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))


def _time(generator, params, rounds: int) -> dict[str, float]:
    generator.generate(params)  # warm-up, unmeasured
    denoise, total = [], []
    for _ in range(rounds):
        start = time.perf_counter()
        result = generator.generate(params)
        total.append(time.perf_counter() - start)
        denoise.append(result.timings["denoising"])
    return {"denoising_s": statistics.median(denoise), "total_s": statistics.median(total)}


def main(argv: list[str] | None = None) -> int:
    from sglang.multimodal_gen.configs.cache_params import CacheParams
    from sglang.multimodal_gen.configs.sampling_params import SamplingParams
    from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="default: the built-in tiny Wan2.1")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--num-gpus", type=int, default=2)
    parser.add_argument("--ulysses", action="store_true", help="split the sequence instead of the CFG branches")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", default="none")
    parser.add_argument("--height", type=int, default=None, help="pixels (default: the model's)")
    parser.add_argument("--width", type=int, default=None)
    parser.add_argument("--num-frames", type=int, default=None)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)

    params = SamplingParams(prompt="a red circle moving left on a blue background", seed=0,
                            num_inference_steps=args.steps, cache=CacheParams(strategy=args.cache),
                            height=args.height, width=args.width, num_frames=args.num_frames)
    out: dict = {"load_average_start": os.getloadavg(), "steps": args.steps, "cache": args.cache,
                 "device": args.device, "num_gpus": args.num_gpus,
                 "size": [args.height, args.width, args.num_frames]}
    single = DiffGenerator.from_pretrained(args.model_path, device=args.device)
    out["1 process"] = _time(single, params, args.rounds)
    del single
    flags = dict(ulysses_degree=args.num_gpus) if args.ulysses else dict(enable_cfg_parallel=True, ulysses_degree=1)
    label = f"{args.num_gpus} processes ({'ulysses' if args.ulysses else 'cfg parallel'})"
    start = time.perf_counter()
    with DiffGenerator.from_pretrained(args.model_path, device=args.device, num_gpus=args.num_gpus, **flags) as multi:
        out["group start s"] = round(time.perf_counter() - start, 2)
        out[label] = _time(multi, params, args.rounds)
        start = time.perf_counter()
        multi.workers.restart()  # what a failed rank costs the next request
        out["group rebuild s"] = round(time.perf_counter() - start, 2)
    out["denoising speedup"] = round(out["1 process"]["denoising_s"] / out[label]["denoising_s"], 2)
    out["total speedup"] = round(out["1 process"]["total_s"] / out[label]["total_s"], 2)
    out["load_average_end"] = os.getloadavg()
    print(json.dumps(out, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
