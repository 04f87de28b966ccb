"""What the robustness benchmark varies: the conditions a request may move away from calibration.

A planner table is calibrated at one size, frame count, guidance, step count, caption set and dtype
(the model folder's defaults). Every ``Cell`` moves one of them; each is scored at ``SPEEDUPS``
on 3 held-out captions (``CAPTION_PICKS``) x ``SEEDS`` (the out-of-world cell takes
:data:`OUT_OF_WORLD` instead of held-out captions). Add a condition by adding a ``Cell``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

SPEEDUPS = (2.0, 3.0)
SEEDS = (0, 1)
#: Which of the model's held-out captions are scored (spread over its list).
CAPTION_PICKS = (0, 3, 6)
#: Captions no world was trained on: the model has never seen their words.
OUT_OF_WORLD = (
    "a photo of a cat on a sofa",
    "a busy street in the rain at night, cars and umbrellas",
    "an astronaut riding a horse on the moon",
)
#: The guidance a request may ask for instead of the folder's default, per model family: below and
#: above the default (Wan's classifier-free guidance; HunyuanVideo's embedded guidance).
GUIDANCE = {"wan": (2.0, 9.0), "hunyuan": (1.0, 6.0)}


@dataclass(frozen=True)
class Cell:
    """One condition: the request fields it changes from the folder's defaults (``scale`` multiplies
    height and width, ``frame_factor`` the frame count), whether it runs in bf16, and whether its
    captions come from outside the world."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    scale: float = 1.0
    frame_factor: int = 1
    bfloat16: bool = False
    out_of_world: bool = False


def cells(family: str) -> list[Cell]:
    low, high = GUIDANCE[family]
    return [
        Cell("calibrated"),
        Cell("half size", scale=0.5),
        Cell("1.5x size", scale=1.5),
        Cell("double frames", frame_factor=2),
        Cell(f"guidance {low:g}", {"guidance_scale": low}),
        Cell(f"guidance {high:g}", {"guidance_scale": high}),
        Cell("20 steps", {"num_inference_steps": 20}),
        Cell("40 steps", {"num_inference_steps": 40}),
        Cell("100 steps", {"num_inference_steps": 100}),
        Cell("out of world", out_of_world=True),
        Cell("bf16", bfloat16=True),
    ]


#: What each sample is scored for, besides the uncached reference: the methods at equal passes.
#: ``reuse`` is the planner asked for ``--cache-estimator reuse`` (it plans for that estimator).
METHODS = ("planner", "plain steps", "planner, reuse")
