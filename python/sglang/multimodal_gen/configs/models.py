"""Which model families the runtime serves, how to recognise them and their sampling defaults.

The family is read from ``model_index.json``'s ``_class_name`` (the diffusers pipeline name), so
any folder in the diffusers layout of a supported checkpoint is recognised. A folder may carry an
``sglang_config.json`` that overrides sampling defaults and names its cache preset key (the
built-in model does), may declare the prompt length its text path was trained with
(``text_max_length``, default: the family's, as diffusers' pipelines pad to it), and may pass
``pipeline_options`` to its family's pipeline (HunyuanVideo: ``{"prompt_template": {"crop_start":
N}}`` for a tokenizer other than the published one). Within a family the ``_class_name`` also
says whether a first frame is wanted (Wan: ``WanPipeline`` text to video, ``WanImageToVideoPipeline``
image to video; a Wan2.2 TI2V-5B folder makes either).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sglang.multimodal_gen.errors import ModelNotFoundError

OVERRIDES_FILE = "sglang_config.json"


@dataclass(frozen=True)
class ModelFamily:
    """A supported architecture.

    Attributes:
        name: Short family name ("wan", "hunyuan").
        title: The architecture's published name ("Wan", "HunyuanVideo"), for messages.
        diffusers_pipelines: ``_class_name`` values of model_index.json that mean this family.
        pipeline_module: Module of ``runtime/pipelines`` that builds the stages for it.
        sampling_defaults: Defaults of the published checkpoints (overridable per folder).
        text_max_length: Prompt tokens the text encoder's output is padded to, the
            ``max_sequence_length`` default of the family's diffusers pipeline (Wan 512;
            HunyuanVideo 256 after the template's ``crop_start``). It never depends on the
            tokenizer's ``model_max_length``, since diffusers' pipelines ignore that too.
        cfg_branches: DiT passes per step under guidance: 2 (cond, uncond) for classifier-free
            guidance (Wan), 1 for a guidance-distilled model (HunyuanVideo). CFG parallel
            needs 2.
    """

    name: str
    title: str
    diffusers_pipelines: tuple[str, ...]
    pipeline_module: str
    text_max_length: int
    sampling_defaults: dict[str, Any] = field(default_factory=dict)
    cfg_branches: int = 2


#: diffusers' WanPipeline defaults (Wan2.1), fps 16 as the Wan release saves its videos.
WAN_DEFAULTS: dict[str, Any] = dict(
    negative_prompt="", num_inference_steps=50, guidance_scale=5.0, height=480, width=832, num_frames=81, fps=16,
)
#: Wan2.2 T2V-A14B's (the Wan2.2 release's ``wan_t2v_A14B`` config): 40 steps, guidance 4.0 for the
#: high-noise expert and 3.0 for the low-noise one, 1280x720; frames and fps as Wan2.1's.
WAN22_TWO_EXPERT_DEFAULTS: dict[str, Any] = {
    **WAN_DEFAULTS, "num_inference_steps": 40, "guidance_scale": 4.0, "guidance_scale_2": 3.0, "height": 720,
    "width": 1280,
}
#: Wan2.2 TI2V-5B's (the Wan2.2 release's ``ti2v_5B`` config, as the diffusers model card runs it):
#: 50 steps and guidance 5.0 as Wan2.1's; 1280x704 (width x height), 121 frames at 24 fps.
WAN22_TI2V_DEFAULTS: dict[str, Any] = {**WAN_DEFAULTS, "height": 704, "width": 1280, "num_frames": 121, "fps": 24}
#: Wan2.1 I2V 480P's: diffusers' WanImageToVideoPipeline defaults (480x832, 81 frames, 50 steps,
#: guidance 5.0), which the Wan-AI/Wan2.1-I2V-14B-480P-Diffusers model card runs, at the release's
#: 16 fps. The Wan2.1 release's generate.py samples I2V with 40 steps; diffusers' 50 are kept, as
#: every family here takes its diffusers pipeline's defaults. A 720P checkpoint has the same
#: layout, so it gets these too: ask for 720x1280 (or put it in its ``sglang_config.json``).
WAN21_I2V_DEFAULTS: dict[str, Any] = dict(WAN_DEFAULTS)
#: The text tokens an image-conditioned Wan transformer takes: diffusers' ``WanAttnProcessor``
#: cuts the image tokens off the cross-attention context at ``length - 512``.
WAN_I2V_TEXT_LENGTH = 512
WAN_I2V_PIPELINE = "WanImageToVideoPipeline"
#: Wan2.2 I2V-A14B's (the Wan2.2 release's ``i2v_A14B`` config): 40 steps, guidance 3.5 for both
#: experts (switching at ``boundary_ratio`` 0.9, which its model_index.json sets), 1280x720 as the
#: release's default size; frames and fps as Wan2.1's.
WAN22_I2V_DEFAULTS: dict[str, Any] = {
    **WAN_DEFAULTS, "num_inference_steps": 40, "guidance_scale": 3.5, "guidance_scale_2": 3.5, "height": 720,
    "width": 1280,
}

#: ``ModelInfo.image_input``: whether a request gives a first frame.
NO_IMAGE, IMAGE_OPTIONAL, IMAGE_REQUIRED = "none", "optional", "required"

MODEL_FAMILIES: tuple[ModelFamily, ...] = (
    ModelFamily(
        name="wan",
        title="Wan",
        diffusers_pipelines=("WanPipeline", WAN_I2V_PIPELINE),
        pipeline_module="sglang.multimodal_gen.runtime.pipelines.wan",
        text_max_length=512,
        sampling_defaults=WAN_DEFAULTS,
    ),
    ModelFamily(
        name="hunyuan",
        title="HunyuanVideo",
        diffusers_pipelines=("HunyuanVideoPipeline",),
        pipeline_module="sglang.multimodal_gen.runtime.pipelines.hunyuan",
        text_max_length=256,
        cfg_branches=1,
        # diffusers' HunyuanVideoPipeline defaults; fps 24 as the HunyuanVideo release saves its videos.
        # guidance_scale is the embedded (distilled) guidance; there is no negative-prompt branch.
        sampling_defaults=dict(
            negative_prompt="",
            num_inference_steps=50,
            guidance_scale=6.0,
            height=720,
            width=1280,
            num_frames=129,
            fps=24,
        ),
    ),
)


@dataclass(frozen=True)
class ModelInfo:
    """A resolved model folder: its family, defaults and folder-level overrides.

    ``num_attention_heads`` is the transformer's (``transformer/config.json``; ``None`` when that
    file does not say): the process flags are checked against it before any process starts.
    ``boundary_ratio`` is set for a Wan2.2 two-expert folder (``transformer`` runs the steps whose
    timestep is at least ``boundary_ratio * num_train_timesteps``, ``transformer_2`` the rest, as
    diffusers' ``WanPipeline`` chooses); ``None`` for one transformer. ``expand_timesteps`` is set
    for a Wan2.2 TI2V-5B folder: its transformer takes a timestep per token, not per video.
    ``image_input`` says whether a request gives a first frame (``SamplingParams.image``):
    ``"required"`` for an image-to-video model (a ``WanImageToVideoPipeline`` folder), ``"optional"``
    for Wan2.2 TI2V-5B loaded as ``WanPipeline`` (text to video without one, image to video with
    one), ``"none"`` for text-to-video models, which refuse an image. ``diffusers_pipeline`` is
    model_index.json's ``_class_name``.
    """

    path: Path
    family: ModelFamily
    sampling_defaults: dict[str, Any]
    text_max_length: int
    cache_model_key: str | None
    calibration_file: Path | None
    pipeline_options: dict[str, Any] = field(default_factory=dict)
    num_attention_heads: int | None = None
    boundary_ratio: float | None = None
    expand_timesteps: bool = False
    image_input: str = NO_IMAGE
    diffusers_pipeline: str = ""

    @property
    def two_experts(self) -> bool:
        return self.boundary_ratio is not None

    @property
    def image_to_video(self) -> bool:
        """Every request gives a first frame."""
        return self.image_input == IMAGE_REQUIRED


def _transformer_config(path: Path) -> dict[str, Any]:
    """``path/transformer/config.json``, or ``{}`` when it is missing or not a JSON object: loading
    the transformer reports a broken folder in its own words."""
    try:
        config = json.loads((path / "transformer" / "config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _attention_heads(path: Path) -> int | None:
    """``num_attention_heads`` of the transformer's config (Wan and HunyuanVideo name it so), or
    ``None`` when the config does not say."""
    heads = _transformer_config(path).get("num_attention_heads")
    return heads if isinstance(heads, int) and not isinstance(heads, bool) and heads >= 1 else None


def read_model_info(path: Path) -> ModelInfo:
    index_file = path / "model_index.json"
    if not index_file.is_file():
        raise ModelNotFoundError(
            f"{path} is not a diffusers model folder (no model_index.json); point --model-path at the folder "
            "that holds model_index.json, transformer/, vae/, text_encoder/, tokenizer/ and scheduler/"
        )
    try:
        index = json.loads(index_file.read_text())
        class_name = index["_class_name"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ModelNotFoundError(f"{index_file} is not a valid model_index.json ({exc})") from None
    family = next((f for f in MODEL_FAMILIES if class_name in f.diffusers_pipelines), None)
    if family is None:
        supported = ", ".join(p for f in MODEL_FAMILIES for p in f.diffusers_pipelines)
        raise ModelNotFoundError(f"{path} holds a {class_name}, which is not supported; supported: {supported}")
    overrides: dict[str, Any] = {}
    if (path / OVERRIDES_FILE).is_file():
        try:
            overrides = json.loads((path / OVERRIDES_FILE).read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelNotFoundError(f"{path / OVERRIDES_FILE} is not valid JSON ({exc})") from None
        if not isinstance(overrides, dict):
            raise ModelNotFoundError(f"{path / OVERRIDES_FILE} must hold a JSON object")
    boundary_ratio = _wan22_boundary_ratio(index, index_file) if family.name == "wan" else None
    expand_timesteps = family.name == "wan" and _wan22_expand_timesteps(index, index_file, boundary_ratio)
    image_to_video = class_name == WAN_I2V_PIPELINE
    image_input = IMAGE_REQUIRED if image_to_video else IMAGE_OPTIONAL if expand_timesteps else NO_IMAGE
    defaults = family.sampling_defaults
    if expand_timesteps:
        defaults = WAN22_TI2V_DEFAULTS
    elif boundary_ratio is not None:
        defaults = WAN22_I2V_DEFAULTS if image_to_video else WAN22_TWO_EXPERT_DEFAULTS
    elif image_to_video:
        defaults = WAN21_I2V_DEFAULTS
    calibration = overrides.get("cache_calibration_file")
    text_max_length = overrides.get("text_max_length", family.text_max_length)
    if isinstance(text_max_length, bool) or not isinstance(text_max_length, int) or text_max_length < 1:
        raise ModelNotFoundError(
            f"{path / OVERRIDES_FILE}: text_max_length must be a whole number of tokens >= 1, got {text_max_length!r}"
        )
    if image_to_video:
        _check_wan_i2v(path, index, boundary_ratio, expand_timesteps, text_max_length)
    return ModelInfo(
        path=path,
        family=family,
        sampling_defaults={**defaults, **overrides.get("sampling_defaults", {})},
        text_max_length=text_max_length,
        cache_model_key=overrides.get("cache_model_key"),
        calibration_file=(path / calibration) if calibration else None,
        pipeline_options=overrides.get("pipeline_options", {}),
        num_attention_heads=_attention_heads(path),
        boundary_ratio=boundary_ratio,
        expand_timesteps=expand_timesteps,
        image_input=image_input,
        diffusers_pipeline=class_name,
    )


def _is_component(entry: Any) -> bool:
    """A model_index.json component entry that names a class (diffusers writes ``[null, null]``
    for an optional component a folder does not have)."""
    return isinstance(entry, list) and len(entry) == 2 and all(isinstance(part, str) for part in entry)


def _wan22_boundary_ratio(index: dict[str, Any], index_file: Path) -> float | None:
    """The expert boundary of a Wan2.2 two-expert folder (``transformer_2`` and ``boundary_ratio``),
    ``None`` for one transformer; a folder with only one of the two is refused in one line."""
    second, ratio = _is_component(index.get("transformer_2")), index.get("boundary_ratio")
    if not second and ratio is None:
        return None
    if not second:
        raise ModelNotFoundError(f"{index_file} sets boundary_ratio but names no transformer_2 (the low-noise "
                                 "expert); a Wan2.2 two-expert folder has both")
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)) or not 0 < ratio < 1:
        raise ModelNotFoundError(f"{index_file} names a transformer_2 but its boundary_ratio is {ratio!r}; a Wan2.2 "
                                 "two-expert folder gives a number between 0 and 1 (0.875 for T2V-A14B)")
    return float(ratio)


def _wan22_expand_timesteps(index: dict[str, Any], index_file: Path, boundary_ratio: float | None) -> bool:
    """Whether a Wan folder is Wan2.2 TI2V-5B (``expand_timesteps``: one transformer fed a timestep
    per token). No published checkpoint pairs it with two experts, and no test here runs such a
    folder, so it is refused in one line rather than run untried."""
    expand = index.get("expand_timesteps", False)
    if expand is None:
        return False
    if not isinstance(expand, bool):
        raise ModelNotFoundError(f"{index_file}: expand_timesteps must be true or false, got {expand!r}")
    if expand and boundary_ratio is not None:
        raise ModelNotFoundError(
            f"{index_file} sets expand_timesteps (Wan2.2 TI2V-5B, one transformer) and names a transformer_2 with a "
            "boundary_ratio (Wan2.2 T2V-A14B, two experts); a Wan2.2 folder is one or the other")
    return expand


def _check_wan_i2v(path: Path, index: dict[str, Any], boundary_ratio: float | None, expand_timesteps: bool,
                   text_max_length: int) -> None:
    """The ``WanImageToVideoPipeline`` checkpoints, told apart as that pipeline tells them:
    Wan2.1 I2V (one transformer with ``image_dim``, fed the CLIP embedding of the first frame and
    16 noise + 4 mask + 16 condition channels), Wan2.2 I2V-A14B (two experts, no image encoder, the
    same 36 channels) and Wan2.2 TI2V-5B (``expand_timesteps``: the first latent frame replaced by
    the image's). Wan2.1 FLF2V (a first and a last frame: ``pos_embed_seq_len``) and a folder
    missing what its kind needs are refused in one line."""
    where = path / "model_index.json"
    config = _transformer_config(path)
    if config.get("pos_embed_seq_len") is not None:
        raise ModelNotFoundError(f"{path}: first-and-last-frame models (Wan2.1 FLF2V, pos_embed_seq_len) are not "
                                 "supported; Wan2.1 I2V, Wan2.2 I2V-A14B and TI2V-5B are")
    if not config or config.get("image_dim") is None:
        if boundary_ratio is None and not expand_timesteps:
            raise ModelNotFoundError(
                f"{path / 'transformer' / 'config.json'} sets no image_dim: the transformer takes no image "
                "embedding, so it is not a Wan2.1 I2V transformer (nor Wan2.2's: two experts or expand_timesteps)")
        return
    missing = [name for name in ("image_encoder", "image_processor") if not _is_component(index.get(name))]
    if missing:
        raise ModelNotFoundError(f"{where} names no {' or '.join(missing)}: a Wan2.1 I2V folder has the CLIP "
                                 "image_encoder and image_processor that embed the first frame")
    if text_max_length != WAN_I2V_TEXT_LENGTH:
        raise ModelNotFoundError(
            f"{path / OVERRIDES_FILE}: text_max_length must be {WAN_I2V_TEXT_LENGTH} for image to video, got "
            f"{text_max_length}: the transformer's cross-attention splits the image tokens from the last "
            f"{WAN_I2V_TEXT_LENGTH} (the text) as diffusers' WanAttnProcessor does")
