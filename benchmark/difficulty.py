"""How curved is a model's flow? Fewer plain steps against 50, the measure the published anchors use.

    python benchmark/difficulty.py --model-path wan2.1-t2v-tiny-hard --guidance 5 8
    python benchmark/difficulty.py --model-path wan2.1-t2v-tiny --seeds 2

For every held-out caption (the folder's ``heldout_prompts.txt`` when it has one) and seed, at each
guidance scale: the uncached run at ``--reference-steps`` (50) is the reference, and runs with 35,
25, 20 and 17 plain steps are scored against it by PSNR of their decoded frames (peak 1) and of
their latents (peak: the reference latents' peak-to-peak range). Published figures on the same
measure: Wan2.1-1.3B at 20 steps 14.50 dB, Wan2.1-14B at 25 steps 15.82 dB, HunyuanVideo at 25
steps 17.57 dB (docs/reference-model.md). It also averages the model's MagCache magnitude ratios
(50-step calibration runs of the first ``--ratio-prompts`` captions, ``reference_model.own_ratios``)
and plots them beside the published curve of its architecture (``--plot``, ``reference_model.ratio_plot``). One torch thread; results do not depend on the load.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from frontier_configs import model_prompts  # noqa: E402
from metrics import psnr  # noqa: E402
from reference_model import ARCHITECTURES, own_ratios, ratio_plot  # noqa: E402

from sglang.multimodal_gen.configs.sampling_params import SamplingParams  # noqa: E402
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator  # noqa: E402

def latent_psnr(test: torch.Tensor, reference: torch.Tensor) -> float:
    peak = float(reference.max() - reference.min())
    return psnr(test.float().numpy() / peak, reference.float().numpy() / peak)


def measure(gen: DiffGenerator, prompts: list[str], seeds: list[int], guidance: float, step_counts: list[int],
            reference_steps: int) -> dict:
    """``{steps: {"decoded": [...], "latent": [...]}}`` over prompts x seeds at one guidance scale."""
    scores = {n: {"decoded": [], "latent": []} for n in step_counts}
    bar = tqdm(total=len(prompts) * len(seeds) * (1 + len(step_counts)), desc=f"guidance {guidance:g}", unit="run")
    for prompt in prompts:
        for seed in seeds:
            request = dict(prompt=prompt, seed=seed, guidance_scale=guidance)
            reference = gen.generate(SamplingParams(**request, num_inference_steps=reference_steps))
            bar.update()
            for n in step_counts:
                run = gen.generate(SamplingParams(**request, num_inference_steps=n))
                scores[n]["decoded"].append(psnr(run.frames, reference.frames))
                scores[n]["latent"].append(latent_psnr(run.latents, reference.latents))
                bar.update()
    bar.close()
    return scores


def summary_table(results: dict) -> str:
    lines = ["| guidance | " + " | ".join(f"{n} steps decoded" for n in results["step_counts"]) + " | "
             + " | ".join(f"{n} latent" for n in results["step_counts"]) + " |",
             "|---" * (1 + 2 * len(results["step_counts"])) + "|"]
    for guidance, scores in results["by_guidance"].items():
        decoded = [f"{s['decoded']['mean']:.1f} / {s['decoded']['worst']:.1f}" for s in scores.values()]
        latent = [f"{s['latent']['mean']:.1f} / {s['latent']['worst']:.1f}" for s in scores.values()]
        lines.append(f"| {guidance} | " + " | ".join(decoded + latent) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="a model folder or built-in name (default: the built-in Wan model)")
    parser.add_argument("--guidance", type=float, nargs="+", default=None, help="guidance scales (default: the model's own)")
    parser.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per caption (default 3)")
    parser.add_argument("--step-counts", default="35,25,20,17", help="plain step counts to score (default 35,25,20,17)")
    parser.add_argument("--reference-steps", type=int, default=50)
    parser.add_argument("--ratio-prompts", type=int, default=4, help="captions averaged for the ratio curve (0: none)")
    parser.add_argument("--output", default=None, help="JSON (default benchmark/results/difficulty-<model>.json)")
    parser.add_argument("--plot", default=None, help="ratio curve PNG (default docs/images/ratios-<model>.png)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    torch.set_num_threads(1)
    try:
        step_counts = [int(n) for n in args.step_counts.split(",")]
    except ValueError:
        parser.error(f"--step-counts {args.step_counts}: give step counts separated by commas, e.g. 35,25,20")
    gen = DiffGenerator.from_pretrained(args.model_path, device="cpu")
    info = gen.pipeline.model_info
    prompts, _ = model_prompts(info.path)
    seeds = list(range(args.seeds))
    default_guidance = gen.validate(SamplingParams(prompt=prompts[0])).guidance_scale
    guidances = args.guidance or [default_guidance]
    by_guidance = {}
    for guidance in guidances:
        scores = measure(gen, prompts, seeds, guidance, step_counts, args.reference_steps)
        by_guidance[f"{guidance:g}"] = {
            str(n): {kind: {"mean": round(float(np.mean(v)), 2), "worst": round(float(np.min(v)), 2), "all": [round(x, 2) for x in v]}
                     for kind, v in s.items()}
            for n, s in scores.items()}
    model = gen.model_name
    results = {"model": model, "default_guidance": default_guidance, "prompts": prompts, "seeds": seeds,
               "reference_steps": args.reference_steps, "step_counts": step_counts, "by_guidance": by_guidance}
    if args.ratio_prompts:
        ratios = own_ratios(gen, prompts[: args.ratio_prompts])
        results["magnitude_ratios"] = ratios
        plot = Path(args.plot or REPO / f"docs/images/ratios-{model}.png")
        latent_stage = next(st for st in gen.pipeline.stages if st.name == "latent_preparation")
        scheduler = type(latent_stage.scheduler).__name__.removesuffix("Scheduler")
        ratio_plot(ratios, plot, ARCHITECTURES[info.family.name], scheduler)
        print(f"wrote {plot}")
    print(f"{model}: plain steps against {args.reference_steps}, {len(prompts)} held-out captions x {len(seeds)} seeds, "
          "PSNR dB mean / worst")
    print(summary_table(results))
    output = Path(args.output or REPO / f"benchmark/results/difficulty-{model}.json")
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
