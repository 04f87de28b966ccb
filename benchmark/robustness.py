"""The planner off its calibrated conditions: size, frames, guidance, step count, captions, dtype.

    python benchmark/robustness.py                                   # built-in Wan model
    python benchmark/robustness.py --model-path hunyuanvideo-t2v-tiny
    python benchmark/robustness.py --model-path wan2.1-t2v-tiny-hard --cells "calibrated;20 steps"

For every cell of ``robustness_configs.cells`` and each speedup (2x, 3x): 3 held-out captions x 2
seeds (the out-of-world cell: 3 captions outside the world); the uncached run of the same request is
the reference, and the planner (``--cache-speedup X``), plain steps (``round(steps / X)``) and the
planner with ``--cache-estimator reuse`` are scored by PSNR of decoded frames against it, at equal
transformer passes. The report (``robustness_report.py``) gives mean and worst per method and whether
the planner meets the bar; rows go to JSON. One torch thread.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from frontier_configs import model_prompts  # noqa: E402
from metrics import psnr  # noqa: E402
from robustness_configs import CAPTION_PICKS, METHODS, OUT_OF_WORLD, SEEDS, SPEEDUPS, Cell, cells  # noqa: E402
from robustness_report import markdown_table, summarise  # noqa: E402

from sglang.multimodal_gen.configs.cache_params import CacheParams  # noqa: E402
from sglang.multimodal_gen.configs.sampling_params import SamplingParams  # noqa: E402
from sglang.multimodal_gen.runtime.cache.budget import PASSES_ONLY, budget_passes  # noqa: E402
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator  # noqa: E402
from sglang.multimodal_gen.runtime.pipelines.base import VideoGeometry  # noqa: E402


def cell_request(cell: Cell, defaults: SamplingParams, geometry: VideoGeometry) -> dict:
    """The request fields of a cell: the folder's defaults moved as the cell says, sizes kept on the
    model's spatial multiple and frame counts on its temporal stride (``4k + 1`` stays ``4k + 1``)."""
    multiple = geometry.spatial_multiple
    return {
        "height": round(defaults.height * cell.scale / multiple) * multiple,
        "width": round(defaults.width * cell.scale / multiple) * multiple,
        "num_frames": (defaults.num_frames - 1) * cell.frame_factor + 1,
        "num_inference_steps": defaults.num_inference_steps,
        "guidance_scale": defaults.guidance_scale,
        **cell.overrides,
    }


def method_params(method: str, base: SamplingParams, speedup: float) -> SamplingParams:
    if method == "plain steps":
        return dataclasses.replace(base, num_inference_steps=budget_passes(base.num_inference_steps, speedup))
    estimator = "reuse" if method == "planner, reuse" else None
    return dataclasses.replace(base, cache=CacheParams(strategy="planner", speedup=speedup, estimator=estimator,
                                                       step_costs=PASSES_ONLY))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default="wan2.1-t2v-tiny", help="a Wan or HunyuanVideo folder or a built-in model's name")
    parser.add_argument("--cells", default=None, help="subset of the cell names, separated by ';'")
    parser.add_argument("--seeds", type=int, default=len(SEEDS), help=f"seeds per caption, from 0 (default {len(SEEDS)})")
    parser.add_argument("--output", default=None, help="JSON rows (default: benchmark/results/robustness-MODEL.json)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    generators = {False: DiffGenerator.from_pretrained(args.model_path, device="cpu")}
    info = generators[False].pipeline.model_info
    all_cells = cells(info.family.name)
    chosen = None if args.cells is None else [name.strip() for name in args.cells.split(";")]
    unknown = sorted(set(chosen or ()) - {c.name for c in all_cells})
    if unknown:
        parser.error(f"unknown cell(s) {unknown}; choose from: {'; '.join(c.name for c in all_cells)}")
    selected = [c for c in all_cells if chosen is None or c.name in chosen]
    held_out, _ = model_prompts(info.path)
    captions = [held_out[i % len(held_out)] for i in CAPTION_PICKS]
    defaults = generators[False].validate(SamplingParams(prompt=captions[0]))
    output = Path(args.output or REPO / f"benchmark/results/robustness-{Path(info.path).name}.json")
    rows: list[dict] = []
    seeds = range(args.seeds)
    cell_captions = {cell.name: OUT_OF_WORLD if cell.out_of_world else captions for cell in selected}
    runs = sum(len(c) for c in cell_captions.values()) * len(seeds) * (1 + len(SPEEDUPS) * len(METHODS))
    bar = tqdm(total=runs, desc="robustness", unit="run")
    for cell in selected:
        if cell.bfloat16 not in generators:
            generators[cell.bfloat16] = DiffGenerator.from_pretrained(args.model_path, device="cpu", dtype="bfloat16")
        gen = generators[cell.bfloat16]
        request = cell_request(cell, defaults, gen.geometry)
        for caption in cell_captions[cell.name]:
            for seed in seeds:
                base = SamplingParams(prompt=caption, seed=seed, **request)
                reference = gen.generate(base).frames
                bar.update()
                for speedup in SPEEDUPS:
                    scores = {}
                    for method in METHODS:
                        scores[method] = psnr(gen.generate(method_params(method, base, speedup)).frames, reference)
                        bar.update()
                    rows.append({"cell": cell.name, "speedup": speedup, "caption": caption, "seed": seed,
                                 "request": request, "psnr": scores})
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(json.dumps(rows, indent=1))
    bar.close()
    print(markdown_table(summarise(rows), METHODS))
    print(f"rows: {output}")


if __name__ == "__main__":
    main()
