"""Frames of a model's held-out captions at several guidance scales, side by side, to look at.

    python benchmark/frame_grid.py --model-path wan2.1-t2v-tiny-hard --guidance 5 8 --image docs/images/hard-frames.png

One row per held-out caption (the folder's ``heldout_prompts.txt`` when it has one), one column
group per guidance scale (frames 0, 8 and 16 of the uncached 50-step video, seed ``--seed``). What
numbers miss shows here: over-guidance blotches (saturated patches the world never draws), a
colour the caption did not ask for, a background that follows the seed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from frontier_configs import model_prompts  # noqa: E402

from sglang.multimodal_gen.configs.sampling_params import SamplingParams  # noqa: E402
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator  # noqa: E402

SHOWN_FRAMES = (0, 8, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default=None, help="a model folder or built-in name")
    parser.add_argument("--guidance", type=float, nargs="+", required=True, help="guidance scales, one column group each")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-prompts", type=int, default=None, help="first N held-out captions (default: all)")
    parser.add_argument("--image", required=True, help="PNG to write")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    gen = DiffGenerator.from_pretrained(args.model_path, device="cpu")
    prompts = model_prompts(gen.pipeline.model_info.path)[0][: args.num_prompts]
    rows = []
    for prompt in prompts:
        groups = []
        for guidance in args.guidance:
            frames = gen.generate(SamplingParams(prompt=prompt, seed=args.seed, guidance_scale=guidance)).frames
            groups.append(np.concatenate([frames[f] for f in SHOWN_FRAMES], axis=1))
            groups.append(np.ones((frames.shape[1], 4, 3), dtype=np.float32))
        rows.append(np.concatenate(groups[:-1], axis=1))
    fig, ax = plt.subplots(figsize=(1.2 * len(SHOWN_FRAMES) * len(args.guidance) + 2.5, 1.05 * len(prompts) + 0.6))
    ax.imshow(np.clip(np.concatenate(rows, axis=0), 0, 1), interpolation="nearest")
    height, width = rows[0].shape[0], (rows[0].shape[1] + 4) / len(args.guidance)
    ax.set_yticks([height * (i + 0.5) for i in range(len(prompts))],
                  [p.replace("a ", "", 1).replace(" background", "") for p in prompts], fontsize=6)
    ax.set_xticks([width * (i + 0.5) for i in range(len(args.guidance))], [f"guidance {g:g}" for g in args.guidance], fontsize=7)
    ax.set_title(f"{gen.model_name}: held-out captions, seed {args.seed}, frames {', '.join(map(str, SHOWN_FRAMES))}", fontsize=8)
    fig.tight_layout()
    Path(args.image).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.image, dpi=120)
    print(f"wrote {args.image}")


if __name__ == "__main__":
    main()
