"""Does a generated video show what its caption says? Measured from the decoded pixels.

For the synthetic world of ``tools/synthetic_videos.py`` every attribute a caption names can be
read back from the frames, without any learned classifier:

- background colour: the palette colour most pixels are nearest to;
- shape colour: the palette colour most of the remaining (non-background) pixels are nearest to;
- direction: the displacement of the shape's centroid from the first frames to the last ones;
- shape: how much of its bounding box the shape fills (square ~1, circle ~0.79, triangle ~0.5).

    python -m sglang.multimodal_gen.tools.adherence --model-path DIR

prints per-attribute accuracy on the held-out captions (never seen in training) with seeds that
were not used either. A model that ignores its prompt scores chance: 1/6 per colour, 1/3 for the
shape, 1/4 for the direction.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from dataclasses import asdict, dataclass
from typing import Iterable, Sequence

import numpy as np

from sglang.multimodal_gen.tools.synthetic_videos import (
    HELD_OUT,
    PALETTE,
    TRAIN_SCENES,
    VIDEO_FRAMES,
    VIDEO_SIZE,
    Scene,
)

logger = logging.getLogger(__name__)

ATTRIBUTES = ("color", "shape", "direction", "background")
CHANCE = {"color": 1 / len(PALETTE), "shape": 1 / 3, "direction": 1 / 4, "background": 1 / len(PALETTE)}
_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], dtype=np.float32) / 255.0
# Smallest shape (in pixels per frame) and travel (in pixels) that count as "a shape that moves".
MIN_SHAPE_PIXELS = 12
MIN_TRAVEL = 6.0
# Bounding-box fill ratios between the shapes: triangle 0.5 < circle 0.79 < square 1.
TRIANGLE_BELOW = 0.65
SQUARE_ABOVE = 0.89
SEED_OFFSET = 10_000


@dataclass(frozen=True)
class Reading:
    """What the pixels show; ``None`` where nothing could be read (no shape, no motion)."""

    color: str | None
    shape: str | None
    direction: str | None
    background: str | None


def read_video(frames: np.ndarray) -> Reading:
    """Classify a video of shape (frames, H, W, 3), float in [0, 1], against the palette."""
    frames = np.asarray(frames, dtype=np.float32)
    dist = ((frames[..., None, :] - _RGB) ** 2).sum(-1)
    labels = dist.argmin(-1)
    counts = np.bincount(labels.ravel(), minlength=len(_NAMES))
    background = int(counts.argmax())
    counts[background] = 0
    if counts.max() < MIN_SHAPE_PIXELS:
        return Reading(None, None, None, _NAMES[background])
    color = int(counts.argmax())
    mask = labels == color
    centroids, fills = [], []
    for f in range(mask.shape[0]):
        ys, xs = np.nonzero(mask[f])
        if len(ys) < MIN_SHAPE_PIXELS:
            continue
        centroids.append((f, xs.mean(), ys.mean()))
        box = (ys.max() - ys.min() + 1) * (xs.max() - xs.min() + 1)
        fills.append(len(ys) / box)
    shape = None
    if fills:
        fill = float(np.median(fills))
        shape = "triangle" if fill < TRIANGLE_BELOW else "square" if fill > SQUARE_ABOVE else "circle"
    return Reading(_NAMES[color], shape, _direction(centroids), _NAMES[background])


def _direction(centroids: Sequence[tuple[int, float, float]]) -> str | None:
    if len(centroids) < 2:
        return None
    quarter = max(1, len(centroids) // 4)
    first = np.mean([c[1:] for c in centroids[:quarter]], axis=0)
    last = np.mean([c[1:] for c in centroids[-quarter:]], axis=0)
    dx, dy = last - first
    if max(abs(dx), abs(dy)) < MIN_TRAVEL:
        return None
    if abs(dx) >= abs(dy):
        return "right" if dx > 0 else "left"
    return "down" if dy > 0 else "up"


def score(reading: Reading, scene: Scene) -> dict[str, bool]:
    return {a: getattr(reading, a) == getattr(scene, a) for a in ATTRIBUTES}


def evaluate(
    generator,
    scenes: Iterable[Scene],
    seeds: Sequence[int],
    num_inference_steps: int = 50,
    guidance_scale: float = 5.0,
) -> dict:
    """Generate every (scene, seed) with ``generator`` and return accuracy per attribute.

    The geometry is fixed to the training videos' (64x64, 17 frames), so models without the
    reference model's defaults (random weights of the same shape) are measured the same way.
    """
    from sglang.multimodal_gen.configs.sampling_params import SamplingParams

    hits = {a: 0 for a in ATTRIBUTES}
    all_hit, total, samples = 0, 0, []
    for scene in scenes:
        for seed in seeds:
            params = SamplingParams(
                prompt=scene.caption,
                seed=seed,
                height=VIDEO_SIZE,
                width=VIDEO_SIZE,
                num_frames=VIDEO_FRAMES,
                num_inference_steps=num_inference_steps,
                guidance_scale=guidance_scale,
            )
            reading = read_video(generator.generate(params).frames)
            result = score(reading, scene)
            for a, ok in result.items():
                hits[a] += ok
            all_hit += all(result.values())
            total += 1
            samples.append({"caption": scene.caption, "seed": seed, "read": asdict(reading)})
    return {
        "samples": total,
        "accuracy": {a: hits[a] / total for a in ATTRIBUTES},
        "all_attributes": all_hit / total,
        "chance": dict(CHANCE),
        "readings": samples,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Per-attribute prompt adherence of a model, read from its pixels.")
    parser.add_argument("--model-path", default=None, help="model folder (default: the built-in model)")
    parser.add_argument("--split", choices=["held-out", "train"], default="held-out", help="which captions to use")
    parser.add_argument("--num-prompts", type=int, default=None, help="first N captions of the split (default: all held-out, 36 train)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per caption (taken from 10000 on, unused in training)")
    parser.add_argument("--num-inference-steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=5.0)
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator

    scenes = list(HELD_OUT) if args.split == "held-out" else list(TRAIN_SCENES[::9])
    if args.num_prompts is not None:
        scenes = scenes[: args.num_prompts]
    generator = DiffGenerator.from_pretrained(args.model_path, device="cpu")
    seeds = [SEED_OFFSET + i for i in range(args.seeds)]
    result = evaluate(generator, scenes, seeds, args.num_inference_steps, args.guidance_scale)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['samples']} videos ({len(scenes)} {args.split} captions x {len(seeds)} seeds)")
    for a in ATTRIBUTES:
        print(f"  {a:<11} {result['accuracy'][a]:6.1%}   (chance {CHANCE[a]:.1%})")
    print(f"  {'all four':<11} {result['all_attributes']:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
