"""The hard synthetic world: what it draws, its held-out captions, and the pixel reader that checks adherence on it."""

from __future__ import annotations

import numpy as np

from sglang.multimodal_gen.tools.adherence import evaluate_renders, palette_labels, read_hard_video, score
from sglang.multimodal_gen.tools.synthetic_videos import (
    HARD_HELD_OUT,
    HARD_TRAIN_SCENES,
    PALETTE,
    VIDEO_COLORS,
    VIDEO_DIRECTIONS,
    VIDEO_SHAPES,
    WORLDS,
    render_hard,
)


def test_held_out_captions_span_every_value_and_are_never_trained_on():
    for attribute, values in (("color", VIDEO_COLORS), ("shape", VIDEO_SHAPES), ("direction", VIDEO_DIRECTIONS),
                              ("background", VIDEO_COLORS)):
        assert {getattr(s, attribute) for s in HARD_HELD_OUT} == set(values), attribute
    assert not set(HARD_HELD_OUT) & set(HARD_TRAIN_SCENES)
    assert len(set(HARD_HELD_OUT)) == 12 and all(s.color != s.background for s in HARD_HELD_OUT)


def test_the_noise_decides_more_than_the_caption():
    """Two seeds of one caption differ in where the object goes, what else is there and how bright it is."""
    scene = HARD_HELD_OUT[0]
    a, b = (render_hard(scene, np.random.default_rng(seed)) for seed in (0, 1))
    assert a.shape == (17, 64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, render_hard(scene, np.random.default_rng(0)))
    assert np.mean(a != b) > 0.1
    # Flicker: the background's mean brightness changes from frame to frame.
    labels = palette_labels(a / 255.0)
    background = list(PALETTE).index(scene.background)
    means = [a[f][labels[f] == background].mean() for f in range(a.shape[0])]
    assert np.ptp(means) > 3


def test_reader_is_right_on_the_worlds_own_renders():
    """The adherence tool's accuracy on true hard-world videos: every attribute at least 95%."""
    result = evaluate_renders(list(HARD_HELD_OUT) + list(HARD_TRAIN_SCENES[::29]), [0, 1], "hard")
    assert result["samples"] == 48
    assert min(result["accuracy"].values()) >= 0.95, result["accuracy"]


def test_reader_tolerates_a_decoders_softened_edges():
    """A 3x3 box blur of every frame, as a small VAE decoder softens them; the reading holds."""
    for i, scene in enumerate(HARD_HELD_OUT[::2]):
        video = render_hard(scene, np.random.default_rng(100 + i)).astype(np.float32) / 255.0
        padded = np.pad(video, ((0, 0), (1, 1), (1, 1), (0, 0)), mode="edge")
        blurred = np.mean([padded[:, dy : dy + 64, dx : dx + 64] for dy in range(3) for dx in range(3)], axis=0)
        assert all(score(read_hard_video(blurred), scene).values()), scene


def test_a_flat_video_reads_as_background_only():
    reading = read_hard_video(np.full((17, 64, 64, 3), np.array(PALETTE["blue"]) / 255.0, dtype=np.float32))
    assert reading.background == "blue" and reading.color is None and reading.direction is None


def test_the_simple_world_is_unchanged_behind_the_world_table():
    scene = WORLDS["simple"].held_out[0]
    from sglang.multimodal_gen.tools.synthetic_videos import render

    assert np.array_equal(WORLDS["simple"].render(scene, np.random.default_rng(3)), render(scene, np.random.default_rng(3)))
