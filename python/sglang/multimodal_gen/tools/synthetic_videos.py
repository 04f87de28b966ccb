"""Captioned synthetic videos: a coloured shape moving in a named direction on a coloured background.

The reference model is trained on these, so that its outputs can be checked from the pixels
(see ``tools/adherence.py``). The world is chosen to be learnable by a tiny model in minutes:

- six well separated colours (a subset of ``tiny_models.COLORS``), three shapes, four directions;
- the shape crosses the middle half of the frame (2 px per frame over 17 frames), starting on the
  side it moves away from, so every frame, not only the motion, tells the direction;
- its size (16-18 px) and its position across the motion (+-6 px) jitter per video (seeded); the
  VAE also sees a more varied version (``render(varied=True)``).

A fixed tenth of the (colour, shape, direction, background) combinations never appears in training
(:data:`HELD_OUT`), so adherence can be measured on captions the model has not seen.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import numpy as np

from sglang.multimodal_gen.tools.tiny_models import COLORS, DIRECTIONS, SHAPES

# RGB of each colour the videos use; far apart so a decoded pixel maps back to one name.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "green": (35, 190, 60),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 40),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
VIDEO_COLORS: tuple[str, ...] = tuple(c for c in COLORS if c in PALETTE)
VIDEO_SHAPES: tuple[str, ...] = tuple(SHAPES)
VIDEO_DIRECTIONS: tuple[str, ...] = tuple(DIRECTIONS)
# Unit step of each direction in image coordinates (x right, y down).
DIRECTION_VECTORS: dict[str, tuple[int, int]] = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)}

VIDEO_SIZE = 64
VIDEO_FRAMES = 17


@dataclass(frozen=True)
class Scene:
    """What a caption names: the shape's colour, the shape, its direction and the background."""

    color: str
    shape: str
    direction: str
    background: str

    @property
    def caption(self) -> str:
        return f"a {self.color} {self.shape} moving {self.direction} on a {self.background} background"


def all_scenes() -> list[Scene]:
    """Every combination with a shape colour different from the background, in a fixed order."""
    return [
        Scene(c, s, d, bg)
        for c, s, d, bg in itertools.product(VIDEO_COLORS, VIDEO_SHAPES, VIDEO_DIRECTIONS, VIDEO_COLORS)
        if c != bg
    ]


# Every tenth combination (offset 3, so each colour, shape, direction and background appears).
HELD_OUT: tuple[Scene, ...] = tuple(s for i, s in enumerate(all_scenes()) if i % 10 == 3)
TRAIN_SCENES: tuple[Scene, ...] = tuple(s for s in all_scenes() if s not in set(HELD_OUT))


def parse_caption(caption: str) -> Scene:
    """The inverse of :attr:`Scene.caption`; raises ValueError on any other sentence."""
    words = caption.strip().lower().split()
    if len(words) != 9 or words[0] != "a" or words[3] != "moving" or words[5:7] != ["on", "a"]:
        raise ValueError(f"not a synthetic-world caption: {caption!r}")
    return Scene(color=words[1], shape=words[2], direction=words[4], background=words[7])


def shape_mask(shape: str, cx: float, cy: float, half: float, size: int) -> np.ndarray:
    """Boolean (size, size) mask of ``shape`` centred on its bounding box (cx, cy), ``half`` its half-width."""
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= half**2
    if shape == "square":
        return (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    if shape == "triangle":
        # Apex up, base down, filling the same bounding box as the square (half its area).
        rel_y = (ys - (cy - half)) / (2 * half)
        return (rel_y >= 0) & (rel_y <= 1) & (np.abs(xs - cx) <= rel_y * half)
    raise ValueError(f"unknown shape {shape!r}")


def render(
    scene: Scene,
    rng: np.random.Generator,
    num_frames: int = VIDEO_FRAMES,
    size: int = VIDEO_SIZE,
    varied: bool = False,
) -> np.ndarray:
    """One video of ``scene``, uint8 of shape (frames, size, size, 3), jittered by ``rng``.

    The captioned world (``varied=False``, what the transformer learns and adherence is read on)
    keeps the path fixed per direction: the shape, 16-18 px wide, crosses the middle 32 px at
    2 px per frame, and only its size and its position across the motion (+-6 px) vary. A tiny
    model learns that in minutes, and every seed still gives a different video. ``varied=True``
    draws size (14-20 px), travel (28-36 px) and both positions from wide ranges; the VAE trains
    on those, so it reconstructs whatever the transformer draws, not only the captioned paths.
    """
    scale = size / 64
    if varied:
        half = rng.uniform(7.0, 10.0) * scale
        travel = rng.uniform(28.0, 36.0) * scale * (num_frames - 1) / (VIDEO_FRAMES - 1)
        margin = half + 2
        # Along the motion: start so the whole path stays inside the frame, near the side it leaves.
        along_start = rng.uniform(margin, max(margin, size - margin - travel))
        across = rng.uniform(margin, size - margin)
    else:
        half = rng.uniform(8.0, 9.0) * scale
        travel = 32.0 * scale * (num_frames - 1) / (VIDEO_FRAMES - 1)
        along_start = (size - travel) / 2
        across = size / 2 + rng.uniform(-6.0, 6.0) * scale
    dx, dy = DIRECTION_VECTORS[scene.direction]
    frames = np.empty((num_frames, size, size, 3), dtype=np.uint8)
    frames[:] = PALETTE[scene.background]
    for f in range(num_frames):
        along = along_start + travel * f / max(1, num_frames - 1)
        pos = along if (dx + dy) > 0 else size - along
        cx, cy = (pos, across) if dx else (across, pos)
        frames[f][shape_mask(scene.shape, cx, cy, half, size)] = PALETTE[scene.color]
    return frames


def sample_batch(
    rng: np.random.Generator,
    batch_size: int,
    scenes: tuple[Scene, ...] = TRAIN_SCENES,
    num_frames: int = VIDEO_FRAMES,
    varied: bool = False,
) -> tuple[np.ndarray, list[Scene]]:
    """``batch_size`` random scenes and their videos as float32 (B, 3, F, H, W) in [-1, 1]."""
    picked = [scenes[i] for i in rng.integers(0, len(scenes), size=batch_size)]
    videos = np.stack([render(s, rng, num_frames, varied=varied) for s in picked])
    return videos.transpose(0, 4, 1, 2, 3).astype(np.float32) / 127.5 - 1.0, picked
