"""Captioned synthetic videos: a coloured shape moving in a named direction on a coloured background.

The reference model is trained on these, so that its outputs can be checked from the pixels
(see ``tools/adherence.py``). The world is chosen to be learnable by a tiny model in minutes:

- six well separated colours (a subset of ``tiny_models.COLORS``), three shapes, four directions;
- the shape crosses the middle half of the frame (2 px per frame over 17 frames), starting on the
  side it moves away from, so every frame, not only the motion, tells the direction;
- its size (16-18 px) and its position across the motion (+-6 px) jitter per video (seeded); the
  VAE also sees a more varied version (``render(varied=True)``).

A fixed tenth of the (colour, shape, direction, background) combinations never appears in training
(:data:`HELD_OUT`), so adherence can be measured on captions the model has not seen. Those scenes
have only white and yellow backgrounds and left and up motion; the hard world's held-out set
(:data:`HARD_HELD_OUT`) spans every value of every attribute.

Two worlds share the captions (:data:`WORLDS`). ``simple`` is the one above: a caption fixes almost
the whole video, so the sampling flow is nearly straight and fewer steps cost little. ``hard``
(:func:`render_hard`) leaves more to the noise, as real video models' captions do: the named
object's size, speed, start and path, 1-3 smaller distractor shapes, a camera pan, a low-frequency
background gradient, per-video gain and per-frame flicker.
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


# Every tenth combination (offset 3): every colour and shape, but only white and yellow backgrounds
# and left and up motion (the hard world's HARD_HELD_OUT spans every value).
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


# The hard world's ranges, in pixels of a 64x64, 17-frame video (scaled for other sizes).
# The named object is always larger than any distractor (its smallest area, a triangle of half
# 7, is 98 px; the largest distractor, a square of half 4.5, 81 px), moves at least 1.25 px per
# frame along its direction and the pan at most 0.4 across it, so the caption stays readable
# from the pixels (tools/adherence.py) while everything else is left to the noise.
HARD_OBJECT_HALF = (7.0, 9.5)
HARD_OBJECT_SPEED = (1.25, 2.25)
HARD_DISTRACTORS = (1, 3)
HARD_DISTRACTOR_HALF = (3.0, 4.5)
HARD_DISTRACTOR_SPEED = 2.0
HARD_PAN = 0.4
HARD_GRADIENT = 30.0
HARD_GAIN = (0.85, 1.1)
HARD_FLICKER = 0.08


def _spanning_held_out() -> tuple[Scene, ...]:
    """Twelve scenes in which every colour, shape, direction and background appears at least once."""
    scenes = []
    for i in range(12):
        color = VIDEO_COLORS[i % len(VIDEO_COLORS)]
        background = VIDEO_COLORS[(i + 1 + 2 * (i // len(VIDEO_COLORS))) % len(VIDEO_COLORS)]
        scenes.append(Scene(color, VIDEO_SHAPES[i % len(VIDEO_SHAPES)], VIDEO_DIRECTIONS[i % len(VIDEO_DIRECTIONS)], background))
    return tuple(scenes)


HARD_HELD_OUT: tuple[Scene, ...] = _spanning_held_out()
HARD_TRAIN_SCENES: tuple[Scene, ...] = tuple(s for s in all_scenes() if s not in set(HARD_HELD_OUT))


def _fitting_start(rng: np.random.Generator, travel: float, margin: float, size: int, side: float = 1.0) -> float:
    """A start coordinate from which a path of signed length ``travel`` stays ``margin`` inside the frame,
    within the first ``side`` fraction of the possible starts counted from the side the path leaves."""
    low, high = margin - min(0.0, travel), size - margin - max(0.0, travel)
    if high <= low:
        return (low + high) / 2
    if side >= 1.0:
        return float(rng.uniform(low, high))
    offset = rng.uniform(0.0, side) * (high - low)
    return float(low + offset if travel >= 0 else high - offset)


def render_hard(scene: Scene, rng: np.random.Generator, num_frames: int = VIDEO_FRAMES, size: int = VIDEO_SIZE,
                start_side: float = 1.0) -> np.ndarray:
    """One video of ``scene`` in the hard world, uint8 (frames, size, size, 3); see the module docstring.

    Drawn back to front: the background with its gradient, the distractors (each a colour other
    than the background's, the named object's and each other's), the named object on top; then
    the camera's gain and flicker scale every pixel. The pan moves everything, the gradient too.
    ``start_side`` < 1 starts the named object within that fraction of its possible starts on the
    side it moves away from, so that every frame, not only the motion, tells the direction (the
    ``hard-cued`` world; ``hard`` starts it anywhere).
    """
    scale = size / 64
    span = max(1, num_frames - 1)
    pan = rng.uniform(-HARD_PAN, HARD_PAN, size=2) * scale
    dx, dy = DIRECTION_VECTORS[scene.direction]
    half = rng.uniform(*HARD_OBJECT_HALF) * scale
    velocity = np.array([dx, dy], dtype=np.float64) * rng.uniform(*HARD_OBJECT_SPEED) * scale + pan
    along = 0 if dx else 1
    start = np.array([_fitting_start(rng, velocity[a] * span, half + 1, size, start_side if a == along else 1.0)
                      for a in (0, 1)])

    others = [c for c in VIDEO_COLORS if c not in (scene.color, scene.background)]
    count = int(rng.integers(HARD_DISTRACTORS[0], HARD_DISTRACTORS[1] + 1))
    distractors = []
    for color in rng.choice(others, size=count, replace=False):
        distractors.append((
            str(color),
            VIDEO_SHAPES[int(rng.integers(0, len(VIDEO_SHAPES)))],
            rng.uniform(*HARD_DISTRACTOR_HALF) * scale,
            rng.uniform(0, size, size=2),
            rng.uniform(-HARD_DISTRACTOR_SPEED, HARD_DISTRACTOR_SPEED, size=2) * scale + pan,
        ))

    angle = rng.uniform(0, 2 * np.pi)
    amplitude = rng.uniform(0, HARD_GRADIENT)
    gain = rng.uniform(*HARD_GAIN)
    flicker = rng.uniform(-HARD_FLICKER, HARD_FLICKER, size=num_frames)
    ys, xs = np.mgrid[0:size, 0:size].astype(np.float32) + 0.5
    frames = np.empty((num_frames, size, size, 3), dtype=np.float32)
    for f in range(num_frames):
        gx, gy = xs - size / 2 - pan[0] * f, ys - size / 2 - pan[1] * f
        ramp = amplitude * (gx * np.cos(angle) + gy * np.sin(angle)) / (size / 2)
        frame = np.asarray(PALETTE[scene.background], dtype=np.float32) + ramp[..., None]
        for color, shape, d_half, d_start, d_velocity in distractors:
            cx, cy = d_start + d_velocity * f
            frame[shape_mask(shape, cx, cy, d_half, size)] = PALETTE[color]
        cx, cy = start + velocity * f
        frame[shape_mask(scene.shape, cx, cy, half, size)] = PALETTE[scene.color]
        frames[f] = frame * gain * (1 + flicker[f])
    return np.clip(np.rint(frames), 0, 255).astype(np.uint8)


@dataclass(frozen=True)
class World:
    """A captioned world: which scenes train, which are held out, and how a video is drawn.

    ``ships_held_out``: a model trained on it carries ``heldout_prompts.txt`` (the whole held-out
    set), which benchmarks and the adherence tool read instead of their own selection.
    ``start_side``: for the hard worlds, :func:`render_hard`'s argument.
    """

    name: str
    train_scenes: tuple[Scene, ...]
    held_out: tuple[Scene, ...]
    ships_held_out: bool = False
    start_side: float | None = None

    def render(self, scene: Scene, rng: np.random.Generator, num_frames: int = VIDEO_FRAMES, varied: bool = False) -> np.ndarray:
        """``varied`` widens the simple world's ranges for the VAE; the hard worlds are always varied."""
        if self.start_side is not None:
            return render_hard(scene, rng, num_frames, start_side=self.start_side)
        return render(scene, rng, num_frames, varied=varied)


# The hard-cued world's start: the first 35% of the possible starts (about 6 px of range).
HARD_CUED_START_SIDE = 0.35
WORLDS: dict[str, World] = {
    "simple": World("simple", TRAIN_SCENES, HELD_OUT),
    "hard": World("hard", HARD_TRAIN_SCENES, HARD_HELD_OUT, ships_held_out=True, start_side=1.0),
    "hard-cued": World("hard-cued", HARD_TRAIN_SCENES, HARD_HELD_OUT, ships_held_out=True, start_side=HARD_CUED_START_SIDE),
}


def sample_batch(
    rng: np.random.Generator,
    batch_size: int,
    scenes: tuple[Scene, ...] = TRAIN_SCENES,
    num_frames: int = VIDEO_FRAMES,
    varied: bool = False,
    world: str = "simple",
) -> tuple[np.ndarray, list[Scene]]:
    """``batch_size`` random scenes of ``world`` and their videos as float32 (B, 3, F, H, W) in [-1, 1]."""
    picked = [scenes[i] for i in rng.integers(0, len(scenes), size=batch_size)]
    videos = np.stack([WORLDS[world].render(s, rng, num_frames, varied=varied) for s in picked])
    return videos.transpose(0, 4, 1, 2, 3).astype(np.float32) / 127.5 - 1.0, picked
