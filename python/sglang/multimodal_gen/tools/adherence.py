"""Does a generated video show what its caption says? Measured from the decoded pixels.

For the synthetic world of ``tools/synthetic_videos.py`` every attribute a caption names can be
read back from the frames, without any learned classifier:

- background colour: the palette colour most pixels are nearest to;
- shape colour: the palette colour most of the remaining (non-background) pixels are nearest to;
- direction: the displacement of the shape's centroid from the first frames to the last ones;
- shape: which of the three shapes, drawn with the same area and centroid, overlaps the shape's
  pixels best (intersection over union, averaged over the frames); unlike a ratio of the bounding
  box, this does not flip when a decoder softens a corner.

The hard world (``render_hard``) adds distractors, a pan, a gradient, gain and flicker, so
:func:`read_hard_video` reads it differently: pixels are matched to the palette up to a
brightness factor (gain and flicker scale every pixel), and the named object is the largest
connected region of one colour (it is always larger than any distractor), followed frame by frame.

    python -m sglang.multimodal_gen.tools.adherence --model-path DIR

prints per-attribute accuracy on the held-out captions (never seen in training; the model folder's
``heldout_prompts.txt`` where it has one) with seeds that were not used either. A model that ignores its prompt scores chance: 1/6 per colour, 1/3 for the
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

from pathlib import Path

from sglang.multimodal_gen.tools.synthetic_videos import (
    PALETTE,
    VIDEO_FRAMES,
    VIDEO_SHAPES,
    VIDEO_SIZE,
    WORLDS,
    Scene,
    parse_caption,
    shape_mask,
)

logger = logging.getLogger(__name__)

ATTRIBUTES = ("color", "shape", "direction", "background")
CHANCE = {"color": 1 / len(PALETTE), "shape": 1 / 3, "direction": 1 / 4, "background": 1 / len(PALETTE)}
_NAMES = list(PALETTE)
_RGB = np.array([PALETTE[n] for n in _NAMES], dtype=np.float32) / 255.0
# Smallest shape (in pixels per frame) and travel (in pixels) that count as "a shape that moves".
MIN_SHAPE_PIXELS = 12
MIN_TRAVEL = 6.0
# Area of each shape over its half-width squared, to draw a template of a given pixel count.
_AREA_PER_HALF_SQUARED = {"circle": np.pi, "square": 4.0, "triangle": 2.0}
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
    centroids, overlaps = [], []
    for f in range(mask.shape[0]):
        ys, xs = np.nonzero(mask[f])
        if len(ys) < MIN_SHAPE_PIXELS:
            continue
        centroids.append((f, xs.mean(), ys.mean()))
        overlaps.append(_template_overlaps(mask[f], len(ys), xs.mean() + 0.5, ys.mean() + 0.5))
    shape = None
    if overlaps:
        mean = np.mean(overlaps, axis=0)
        shape = VIDEO_SHAPES[int(mean.argmax())]
    return Reading(_NAMES[color], shape, _direction(centroids), _NAMES[background])


# Brightness factors a palette colour may appear at in the hard world (gain x flicker, with margin).
_BRIGHTNESS = (0.7, 1.25)
# A pixel farther than this (squared RGB distance, [0, 1] scale) from every scaled palette colour is unlabelled.
_MAX_COLOR_DISTANCE = 0.06


def palette_labels(frames: np.ndarray) -> np.ndarray:
    """Per-pixel palette index, matching each colour up to a brightness factor in ``_BRIGHTNESS``; -1 if none is near.

    Black and white lie on one ray, so the factor's range is what tells them apart.
    """
    norms = (_RGB**2).sum(-1)
    factor = np.clip(frames @ _RGB.T / norms, *_BRIGHTNESS)
    dist = ((frames[..., None, :] - factor[..., None] * _RGB) ** 2).sum(-1)
    labels = dist.argmin(-1)
    labels[dist.min(-1) > _MAX_COLOR_DISTANCE] = -1
    return labels


def largest_components(mask: np.ndarray) -> np.ndarray:
    """The largest 4-connected region of each frame of ``mask`` (frames, H, W), as a mask of the same shape."""
    frames, height, width = mask.shape
    big = height * width
    ids = np.where(mask, np.arange(big).reshape(1, height, width), big)
    while True:
        low = ids.copy()
        low[:, 1:] = np.minimum(low[:, 1:], ids[:, :-1])
        low[:, :-1] = np.minimum(low[:, :-1], ids[:, 1:])
        low[:, :, 1:] = np.minimum(low[:, :, 1:], ids[:, :, :-1])
        low[:, :, :-1] = np.minimum(low[:, :, :-1], ids[:, :, 1:])
        low = np.where(mask, low, big)
        if np.array_equal(low, ids):
            break
        ids = low
    out = np.zeros_like(mask)
    for f in range(frames):
        present = ids[f][mask[f]]
        if present.size:
            values, counts = np.unique(present, return_counts=True)
            out[f] = ids[f] == values[counts.argmax()]
    return out


def read_hard_video(frames: np.ndarray) -> Reading:
    """Classify a hard-world video (frames, H, W, 3), float in [0, 1]: background, then the largest object.

    The object's colour is the one whose largest connected region, in the median frame, is the
    largest; its shape and direction are read from that region in every frame where it is big
    enough to be a shape.
    """
    frames = np.asarray(frames, dtype=np.float32)
    labels = palette_labels(frames)
    counts = np.bincount(labels[labels >= 0].ravel(), minlength=len(_NAMES))
    background = int(counts.argmax())
    regions: dict[int, np.ndarray] = {}
    sizes: dict[int, float] = {}
    for color in range(len(_NAMES)):
        if color == background or counts[color] < MIN_SHAPE_PIXELS:
            continue
        regions[color] = largest_components(labels == color)
        sizes[color] = float(np.median(regions[color].sum(axis=(1, 2))))
    if not sizes or max(sizes.values()) < MIN_SHAPE_PIXELS:
        return Reading(None, None, None, _NAMES[background])
    color = max(sizes, key=sizes.get)
    centroids, overlaps = [], []
    for f, region in enumerate(regions[color]):
        ys, xs = np.nonzero(region)
        if len(ys) < MIN_SHAPE_PIXELS:
            continue
        centroids.append((f, xs.mean(), ys.mean()))
        overlaps.append(_template_overlaps(region, len(ys), xs.mean() + 0.5, ys.mean() + 0.5))
    shape = VIDEO_SHAPES[int(np.mean(overlaps, axis=0).argmax())] if overlaps else None
    return Reading(_NAMES[color], shape, _direction(centroids), _NAMES[background])


READERS = {"simple": read_video, "hard": read_hard_video, "hard-cued": read_hard_video}


def model_world(model_path: Path) -> str:
    """The synthetic world a reference model was trained on (its ``training_summary.json``), ``simple`` if unknown."""
    summary = Path(model_path) / "training_summary.json"
    if summary.is_file():
        return json.loads(summary.read_text()).get("config", {}).get("world", "simple")
    return "simple"


def listed_held_out(model_path: Path) -> list[Scene] | None:
    """The scenes of the model folder's ``heldout_prompts.txt``, ``None`` if it has none (an
    image-to-video model's lines, ``IMAGE_PATH<TAB>caption``, give their captions)."""
    listed = Path(model_path) / "heldout_prompts.txt"
    if not listed.is_file():
        return None
    lines = listed.read_text().splitlines()
    return [parse_caption(line.rpartition("\t")[2]) for line in lines if line.strip()]


def held_out_scenes(model_path: Path, world: str) -> list[Scene]:
    """The model folder's ``heldout_prompts.txt`` when it has one, else the world's held-out scenes."""
    listed = listed_held_out(model_path)
    return list(WORLDS[world].held_out) if listed is None else listed


def _template_overlaps(mask: np.ndarray, pixels: int, cx: float, cy: float) -> list[float]:
    """IoU of ``mask`` with each of :data:`VIDEO_SHAPES` drawn with its pixel count and centroid."""
    ious = []
    for shape in VIDEO_SHAPES:
        half = float(np.sqrt(pixels / _AREA_PER_HALF_SQUARED[shape]))
        # shape_mask centres the bounding box; a triangle's centroid lies a third of half below it.
        box_cy = cy - half / 3 if shape == "triangle" else cy
        template = shape_mask(shape, cx, box_cy, half, mask.shape[0])
        ious.append(float((mask & template).sum() / (mask | template).sum()))
    return ious


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
    guidance_scale: float | None = None,
    world: str = "simple",
) -> dict:
    """Generate every (scene, seed) with ``generator`` and return accuracy per attribute.

    The geometry is fixed to the training videos' (64x64, 17 frames), so models without the
    reference model's defaults (random weights of the same shape) are measured the same way.
    ``guidance_scale`` defaults to the model's own (5 for the Wan model's CFG, 6 embedded for
    HunyuanVideo's).
    """
    from sglang.multimodal_gen.configs.sampling_params import SamplingParams

    def videos():
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
                yield scene, seed, generator.generate(params).frames

    return _tally(videos(), READERS[world])


def evaluate_renders(scenes: Iterable[Scene], seeds: Sequence[int], world: str) -> dict:
    """Accuracy on the world's own renders: how often the reader itself is right (the tool's validation)."""

    def videos():
        for scene in scenes:
            for seed in seeds:
                yield scene, seed, WORLDS[world].render(scene, np.random.default_rng(seed)) / 255.0

    return _tally(videos(), READERS[world])


def round_trip(vae, video: np.ndarray) -> np.ndarray:
    """A uint8 video (frames, H, W, 3) encoded (posterior mean) and decoded by ``vae``: float frames in [0, 1]."""
    import torch

    x = torch.from_numpy(video.transpose(3, 0, 1, 2)[None].astype(np.float32) / 127.5 - 1)
    with torch.no_grad():
        decoded = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    return (decoded[0].permute(1, 2, 3, 0).numpy() + 1) / 2


def evaluate_vae_round_trip(model_path, scenes: Iterable[Scene], seeds: Sequence[int], world: str = "simple") -> dict:
    """Accuracy on rendered videos passed through the model's VAE alone: the ceiling a transformer can reach."""
    from sglang.multimodal_gen.runtime.models.loader import load_component

    vae = load_component(model_path, "vae").eval()

    def videos():
        for scene in scenes:
            for seed in seeds:
                yield scene, seed, round_trip(vae, WORLDS[world].render(scene, np.random.default_rng(seed)))

    return _tally(videos(), READERS[world])


def _tally(videos: Iterable[tuple[Scene, int, np.ndarray]], reader=read_video) -> dict:
    hits = {a: 0 for a in ATTRIBUTES}
    all_hit, total, samples = 0, 0, []
    for scene, seed, frames in videos:
        reading = reader(frames)
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
    parser.add_argument("--model-path", default=None, help="model folder or built-in name (default: the built-in model)")
    parser.add_argument("--split", choices=["held-out", "train"], default="held-out", help="which captions to use")
    parser.add_argument("--num-prompts", type=int, default=None, help="first N captions of the split (default: all held-out, 36 train)")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per caption")
    parser.add_argument("--first-seed", type=int, default=SEED_OFFSET, help=f"first seed (default {SEED_OFFSET}; sampling seeds are never used in training)")
    parser.add_argument("--num-inference-steps", type=int, default=50)
    parser.add_argument("--guidance-scale", type=float, default=None, help="default: the model's own")
    parser.add_argument("--json", action="store_true", help="print the full result as JSON")
    source = parser.add_mutually_exclusive_group()
    source.add_argument(
        "--vae-round-trip",
        action="store_true",
        help="read rendered videos passed through the model's VAE instead of generating (the VAE's ceiling)",
    )
    source.add_argument("--renders", action="store_true", help="read the world's own renders (the reader's own accuracy)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)

    from sglang.multimodal_gen.errors import ModelNotFoundError
    from sglang.multimodal_gen.runtime.entrypoints.generator import BUILTIN_MODEL_PATH, DiffGenerator
    from sglang.multimodal_gen.runtime.models.loader import resolve_model_path

    try:
        model_path = resolve_model_path(str(args.model_path or BUILTIN_MODEL_PATH))
    except ModelNotFoundError as exc:
        parser.exit(2, f"error: {exc}\n")
    world = model_world(model_path)
    scenes = held_out_scenes(model_path, world) if args.split == "held-out" else list(WORLDS[world].train_scenes[::9])
    if args.num_prompts is not None:
        scenes = scenes[: args.num_prompts]
    seeds = [args.first_seed + i for i in range(args.seeds)]
    if args.renders:
        result = evaluate_renders(scenes, seeds, world)
    elif args.vae_round_trip:
        result = evaluate_vae_round_trip(model_path, scenes, seeds, world)
    else:
        generator = DiffGenerator.from_pretrained(str(model_path), device="cpu")
        result = evaluate(generator, scenes, seeds, args.num_inference_steps, args.guidance_scale, world)
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{result['samples']} videos ({len(scenes)} {args.split} captions x {len(seeds)} seeds, {world} world)")
    for a in ATTRIBUTES:
        print(f"  {a:<11} {result['accuracy'][a]:6.1%}   (chance {CHANCE[a]:.1%})")
    print(f"  {'all four':<11} {result['all_attributes']:6.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
