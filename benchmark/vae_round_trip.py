"""What a model's VAE keeps of its world: 17-frame round trips of rendered videos, PSNR and a picture.

    python benchmark/vae_round_trip.py --model-path wan2.1-t2v-tiny-hard

Renders every held-out caption of the model's world (its ``heldout_prompts.txt`` when it has one)
with ``--seeds`` seeds, encodes and decodes each with the model's VAE (posterior mean, no
transformer) and reports PSNR of the decoded frames (peak 1), mean and worst, with the per-frame
mean brightness of render and round trip (does the VAE keep the world's gain and flicker?). The
picture (``--image``) shows frames 0, 8 and 16 of the first captions, render left, round trip right.
A transformer cannot draw more than its VAE decodes: check this before training on a new world.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from metrics import psnr  # noqa: E402

from sglang.multimodal_gen.runtime.models.loader import load_component, resolve_model_path  # noqa: E402
from sglang.multimodal_gen.tools.adherence import held_out_scenes, model_world, round_trip  # noqa: E402
from sglang.multimodal_gen.tools.synthetic_videos import WORLDS  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default="wan2.1-t2v-tiny", help="a model folder or built-in name")
    parser.add_argument("--world", choices=sorted(WORLDS), default=None, help="default: the world the model was trained on")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--rows", type=int, default=4, help="captions shown in the picture")
    parser.add_argument("--image", default=None, help="PNG (default docs/images/vae-round-trip-<model>.png)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    folder = resolve_model_path(args.model_path)
    world = args.world or model_world(folder)
    scenes = held_out_scenes(folder, world) if args.world is None else list(WORLDS[world].held_out)
    vae = load_component(folder, "vae").eval()
    scores, flicker_kept, rows = [], [], []
    for scene in scenes:
        for seed in range(args.seeds):
            video = WORLDS[world].render(scene, np.random.default_rng(seed))
            back = round_trip(vae, video)
            scores.append(psnr(back, video / 255.0))
            # Frame-to-frame brightness changes of the render that the round trip reproduces (correlation).
            steps_in, steps_out = np.diff(video.mean(axis=(1, 2, 3))), np.diff(back.mean(axis=(1, 2, 3)) * 255)
            if steps_in.std() > 0 and steps_out.std() > 0:
                flicker_kept.append(float(np.corrcoef(steps_in, steps_out)[0, 1]))
            if seed == 0 and len(rows) < args.rows:
                frames = (0, video.shape[0] // 2, video.shape[0] - 1)
                rows.append(np.concatenate([video[f] for f in frames] + [np.rint(back[f] * 255).astype(np.uint8) for f in frames], axis=1))
    name = folder.name
    image = Path(args.image or REPO / f"docs/images/vae-round-trip-{name}.png")
    image.parent.mkdir(parents=True, exist_ok=True)
    import imageio.v3 as iio

    iio.imwrite(image, np.kron(np.concatenate(rows, axis=0), np.ones((2, 2, 1), dtype=np.uint8)))
    result = {"model": name, "world": world, "videos": len(scores), "psnr_mean": round(float(np.mean(scores)), 2),
              "psnr_worst": round(float(np.min(scores)), 2),
              "brightness_change_correlation_mean": round(float(np.mean(flicker_kept)), 3) if flicker_kept else None}
    print(json.dumps(result))
    print(f"wrote {image}")


if __name__ == "__main__":
    main()
