"""What the frontier benchmark compares: the methods a user has for a speedup, and the samples.

Every method is asked for the same speedups and so (where it can hit them) the same number of
transformer passes per branch, ``round(steps / speedup)``. A method is a name, what it turns a
speedup into (``request``), and its plot style; add a method by adding a ``FrontierMethod`` to
``METHODS``. ``taylorseer`` runs in diffusers' own pipeline of the model's family (``WanPipeline`` or
``HunyuanVideoPipeline``, the harness's ``DiffusersTaylorSeer``), the others in our pipeline.
``planner, boundary-blind`` is for two-expert models (Wan2.2): the planner with one state across
the switch, the comparison that shows what keeping the state per expert is worth. On an
image-to-video model every request takes the first frame its prompts file gives its caption
(:func:`prompt_images`).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.models import IMAGE_REQUIRED, read_model_info
from sglang.multimodal_gen.runtime.cache.base import budget_passes
from sglang.multimodal_gen.runtime.entrypoints.calibrate import read_prompt_lines, split_prompt_lines
from sglang.multimodal_gen.tools.adherence import listed_held_out, model_world
from sglang.multimodal_gen.tools.synthetic_videos import HELD_OUT, WORLDS

SPEEDUPS = (1.5, 2.0, 2.5, 3.0)
STEPS = 50
# Held-out captions (never trained on; the calibration prompts are training captions), spread over
# shapes, colours and directions; two seeds each. A model folder's heldout_prompts.txt replaces them.
PROMPTS = [HELD_OUT[i].caption for i in (0, 5, 9, 14, 19, 23, 28, 33)]
SEEDS = (0, 1)
# Training captions (never scored) on which a strategy without a budget is tuned to each pass count.
TUNING_SCENE_INDICES = (7, 160, 250)


def model_prompts(model_folder: Path) -> tuple[list[str], list[str]]:
    """The scored and the tuning captions for a model: its folder's ``heldout_prompts.txt`` when it
    has one (else :data:`PROMPTS`), and training captions of the world it was trained on (an
    image-to-video model's: the first of its ``calibration_prompts.txt``, which have first frames)."""
    listed = listed_held_out(Path(model_folder))
    scored = PROMPTS if listed is None else [scene.caption for scene in listed]
    if read_model_info(Path(model_folder)).image_to_video:
        calibration = read_i2v_prompts(Path(model_folder) / "calibration_prompts.txt")
        return scored, [caption for caption, _ in calibration[:len(TUNING_SCENE_INDICES)]]
    train_scenes = WORLDS[model_world(Path(model_folder))].train_scenes
    return scored, [train_scenes[i].caption for i in TUNING_SCENE_INDICES]


def read_i2v_prompts(path: Path) -> list[tuple[str, Path]]:
    """``(caption, image)`` of each ``IMAGE_PATH<TAB>caption`` line of an image-to-video prompts file."""
    captions, images = split_prompt_lines(path, read_prompt_lines(path), IMAGE_REQUIRED)
    return list(zip(captions, images))


def prompt_images(model_folder: Path) -> dict[str, Path]:
    """An image-to-video model's first frame of each caption its ``heldout_prompts.txt`` and
    ``calibration_prompts.txt`` list; empty for a text-to-video model. Requests take
    ``image=prompt_images(...).get(caption)``."""
    if not read_model_info(Path(model_folder)).image_to_video:
        return {}
    images: dict[str, Path] = {}
    for name in ("heldout_prompts.txt", "calibration_prompts.txt"):
        images.update(read_i2v_prompts(Path(model_folder) / name))
    return images


@dataclass(frozen=True)
class Request:
    """How one method runs at one speedup: our pipeline's step count and cache, or diffusers' hook."""

    num_inference_steps: int
    cache: CacheParams | None = None
    taylorseer: dict | None = None  # diffusers TaylorSeerCacheConfig settings
    tune_threshold: bool = False  # the harness sets cache.threshold: passes nearest the budget on the tuning captions
    # Two-expert models only: one cache state across both experts, planned on a calibration of the
    # whole run, as caching that ignores the switch does (the harness's ``boundary_blind``).
    boundary_blind: bool = False


@dataclass(frozen=True)
class FrontierMethod:
    name: str
    request: Callable[[float, int], Request]
    style: str  # matplotlib format of its line


def _cached(strategy: str, **knobs) -> Callable[[float, int], Request]:
    return lambda speedup, steps: Request(steps, CacheParams(strategy=strategy, speedup=speedup, **knobs))


def _tuned(strategy: str, **knobs) -> Callable[[float, int], Request]:
    return lambda speedup, steps: Request(steps, CacheParams(strategy=strategy, **knobs), tune_threshold=True)


def taylorseer_settings(passes: int, steps: int) -> dict:
    """diffusers' TaylorSeer (lite: the whole blocks skipped, the output forecast to first order)
    at the settings nearest ``passes``: the shortest interval whose warm-up length gives exactly
    ``passes`` computed steps, else the nearest count."""

    def computed(interval: int, warmup: int) -> int:  # diffusers' own rule, in steps 0..steps-1
        return sum(1 for s in range(steps) if s < warmup or (s - warmup - 1) % interval == 0)

    candidates = [(abs(computed(i, w) - passes), i, -w) for i in range(2, 8) for w in range(1, steps)]
    _, interval, warmup = min(candidates)
    return {"cache_interval": interval, "disable_cache_before_step": -warmup, "max_order": 1, "use_lite_mode": True}


METHODS = [
    FrontierMethod("plain steps", lambda speedup, steps: Request(budget_passes(steps, speedup)), "k--"),
    FrontierMethod("even skip", _cached("even"), "c:"),
    FrontierMethod("magcache", _cached("magcache"), "o-"),
    FrontierMethod("teacache", _cached("teacache"), "s-"),
    FrontierMethod("diffusers taylorseer", lambda s, n: Request(n, taylorseer=taylorseer_settings(budget_passes(n, s), n)), "v:"),
    FrontierMethod("planner, reuse", _cached("planner", estimator="reuse"), "^-."),
    FrontierMethod("easycache", _tuned("easycache"), "P-"),
    FrontierMethod("easycache, forecast1", _tuned("easycache", estimator="forecast1"), "X-"),
    FrontierMethod("easycache, forecast1_sigma", _tuned("easycache", estimator="forecast1_sigma"), "X:"),
    FrontierMethod("planner, forecast1", _cached("planner", estimator="forecast1"), "^:"),
    FrontierMethod("planner, forecast1_sigma", _cached("planner", estimator="forecast1_sigma"), "v-."),
    FrontierMethod("planner, blend", _cached("planner", estimator="blend"), "d:"),
    FrontierMethod("planner", _cached("planner"), "D-"),
    FrontierMethod("planner, boundary-blind",
                   lambda speedup, steps: Request(steps, CacheParams(strategy="planner", speedup=speedup), boundary_blind=True),
                   "D:"),
]
