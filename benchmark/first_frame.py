"""How close an image-to-video model's first frame is to the image it was given, against the VAE's
own round trip of that image (the most a frame made in its latent space can score).

    python benchmark/first_frame.py                                  # wan2.1-i2v-tiny, its 12 held-out frames
    python benchmark/first_frame.py --model-path /models/my-i2v --output first-frame.json

For each ``IMAGE_PATH<TAB>caption`` line of the folder's ``heldout_prompts.txt``: PSNR against the
image of (a) its VAE round trip (encoded alone, decoded), (b) the first frame of the video made at
the model's defaults, (c) the same frame read back from the saved mp4. Mean, worst and best; one
torch thread.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import imageio.v3 as iio
import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from metrics import psnr  # noqa: E402

from sglang.multimodal_gen.configs.models import IMAGE_REQUIRED  # noqa: E402
from sglang.multimodal_gen.configs.sampling_params import SamplingParams  # noqa: E402
from sglang.multimodal_gen.runtime.entrypoints.calibrate import read_prompt_lines, split_prompt_lines  # noqa: E402
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator  # noqa: E402
from sglang.multimodal_gen.runtime.stages.image_conditioning import WanImageConditioningStage  # noqa: E402

COLUMNS = ("vae_round_trip", "first_frame", "first_frame_mp4")


def vae_round_trip(stage: WanImageConditioningStage, vae, image: Image.Image, height: int, width: int) -> np.ndarray:
    frame = stage.video_processor.preprocess(image, height=height, width=width).unsqueeze(2)
    with torch.no_grad():
        decoded = vae.decode(vae.encode(frame).latent_dist.mode()).sample
    return (decoded[0, :, 0].permute(1, 2, 0).numpy() / 2 + 0.5).clip(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-path", default="wan2.1-i2v-tiny", help="an image-to-video folder or built-in name")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=str(REPO / "benchmark/results/first-frame-i2v.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    gen = DiffGenerator.from_pretrained(args.model_path, device="cpu")
    folder = Path(gen.pipeline.model_info.path)
    stage = next(s for s in gen.pipeline.stages if isinstance(s, WanImageConditioningStage))
    listed = folder / "heldout_prompts.txt"
    captions, images = split_prompt_lines(listed, read_prompt_lines(listed), IMAGE_REQUIRED)
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        for caption, path in zip(captions, images):
            image = Image.open(path).convert("RGB")
            out = Path(scratch) / "video.mp4"
            result = gen.generate(SamplingParams(prompt=caption, image=image, seed=args.seed, output_path=str(out)))
            height, width = result.frames.shape[1:3]
            target = np.asarray(image.resize((width, height)), dtype=np.float32) / 255
            mp4_first = iio.imread(out, index=None)[0].astype(np.float32) / 255
            scores = (psnr(vae_round_trip(stage, gen.pipeline.vae, image, height, width), target),
                      psnr(result.frames[0], target), psnr(mp4_first, target))
            rows.append({"image": str(path.relative_to(folder)), "caption": caption, **dict(zip(COLUMNS, scores))})
            print(f"{rows[-1]['image']}  " + "  ".join(f"{c} {s:.1f}" for c, s in zip(COLUMNS, scores)))
    summary = {c: {"mean": float(np.mean([r[c] for r in rows])), "worst": float(min(r[c] for r in rows)),
                   "best": float(max(r[c] for r in rows))} for c in COLUMNS}
    print("| | mean | worst | best |\n|---|---|---|---|")
    for column, s in summary.items():
        print(f"| {column} | {s['mean']:.1f} | {s['worst']:.1f} | {s['best']:.1f} |")
    Path(args.output).write_text(json.dumps({"model": gen.model_name, "seed": args.seed, "summary": summary,
                                             "rows": rows}, indent=1) + "\n")
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
