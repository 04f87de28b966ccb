"""Our pipelines against diffusers' own on folders configured unlike our fixtures, one factor at a time.

Each cell copies a base tiny folder, changes one thing a real checkpoint may ship differently
(the scheduler, the tokenizer's ``model_max_length``, a transformer config field) or runs it in
another dtype, and compares our latents and frames with diffusers' WanPipeline /
HunyuanVideoPipeline on that same folder, with diffusers' default ``max_sequence_length``.

Tolerance: 1e-5 in every dtype, on latents (unit scale) and on frames in [0, 1] (decoded by an
fp32 VAE on both sides). In bf16 and fp16 that is below half an ulp (2**-9 = 0.002 for bf16,
2**-12 for fp16 at 1.0), so a half-precision cell must agree bit for bit where values are
stored in half precision. That is what we measured (a difference of exactly 0 in every cell): both
sides run the same modules on the same inputs in the same order in one process, so any real
divergence (an input cast in another place, a timestep rounded differently, a VAE whose weights
went through bf16) shows up as whole ulps, e.g. 0.03 on the latents when the HunyuanVideo
timestep was not rounded to bf16 as diffusers rounds it, and 0.006 on the frames with a VAE cast
to bf16 and back.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from conftest import HUNYUAN_SCHEDULERS, TINY_REQUEST, WAN_SCHEDULERS, set_scheduler

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.models import read_model_info
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.cache.base import COND
from sglang.multimodal_gen.runtime.cache.magcache import preset_ratio_table
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator
from sglang.multimodal_gen.runtime.stages.hunyuan_text_encoding import HUNYUAN_PROMPT_TEMPLATE

PROMPT = "a red circle moving left on a blue background"
NEGATIVE = "blurry, low quality"
HUNYUAN_REQUEST = {**TINY_REQUEST, "guidance_scale": 6.0}
HUNYUAN_TEMPLATE = HUNYUAN_PROMPT_TEMPLATE["template"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# (rtol, atol); see the module docstring.
TOLERANCE = (1e-5, 1e-5)

# A cell: (family, factor, change). A change is applied to a copy of the family's base folder.
CELLS = [
    *[("wan", "scheduler", name) for name in WAN_SCHEDULERS],
    ("wan", "tokenizer_cap", 16),      # below the 512 text length (the base tokenizer caps at 32)
    ("wan", "tokenizer_cap", 1024),    # above it
    ("wan", "transformer", {"cross_attn_norm": False}),
    ("wan", "transformer", {"eps": 1e-5, "num_layers": 3}),
    ("wan", "dtype", "bf16"),
    ("wan", "dtype", "fp16"),
    *[("hunyuan", "scheduler", name) for name in HUNYUAN_SCHEDULERS],
    ("hunyuan", "tokenizer_cap", "below_crop"),  # model_max_length under the template's crop_start
    ("hunyuan", "tokenizer_cap", 1024),
    ("hunyuan", "transformer", {"qk_norm": "layer_norm"}),
    ("hunyuan", "transformer", {"num_layers": 1, "num_single_layers": 3}),
    ("hunyuan", "dtype", "bf16"),
    ("hunyuan", "dtype", "fp16"),
    # Wan2.2's two experts (the switch computed on the scheduler's own timesteps).
    ("wan22", "scheduler", "flow_euler"),
    ("wan22", "tokenizer_cap", 16),
]


def _pipeline_family(family: str) -> str:
    """The diffusers pipeline (and request) a cell's family runs: Wan2.2 folders name WanPipeline."""
    return "wan" if family == "wan22" else family


def _cell_id(cell) -> str:
    family, factor, change = cell
    if isinstance(change, dict):
        change = "-".join(f"{k}={v}" for k, v in change.items())
    return f"{family}-{factor}-{change}"


def _set_tokenizer_cap(folder: Path, cap: int) -> None:
    config_file = folder / "tokenizer" / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["model_max_length"] = cap
    config_file.write_text(json.dumps(config, indent=2))


def _set_transformer_config(folder: Path, family: str, changes: dict[str, Any]) -> None:
    import diffusers

    class_name = "WanTransformer3DModel" if family == "wan" else "HunyuanVideoTransformer3DModel"
    cls = getattr(diffusers, class_name)
    config = {**cls.load_config(folder / "transformer"), **changes}
    torch.manual_seed(1)
    shutil.rmtree(folder / "transformer")
    cls.from_config(config).save_pretrained(folder / "transformer", safe_serialization=True)


def _hunyuan_crop_start(folder: Path) -> int:
    return read_model_info(folder).pipeline_options["prompt_template"]["crop_start"]


@pytest.fixture(scope="module")
def variant_folder(tmp_path_factory, tiny_wan_dir, tiny_hunyuan_dir, tiny_wan22_dir):
    """Builds (once per module) the folder of a cell: the base folder with one factor changed."""
    made: dict[str, Path] = {}

    def build(cell) -> Path:
        family, factor, change = cell
        base = {"wan": tiny_wan_dir, "hunyuan": tiny_hunyuan_dir, "wan22": tiny_wan22_dir}[family]
        if factor == "dtype":
            return base
        key = _cell_id(cell)
        if key not in made:
            folder = tmp_path_factory.mktemp("variants") / key
            shutil.copytree(base, folder)
            if factor == "scheduler":
                set_scheduler(folder, *(HUNYUAN_SCHEDULERS if family == "hunyuan" else WAN_SCHEDULERS)[change])
            elif factor == "tokenizer_cap":
                _set_tokenizer_cap(folder, _hunyuan_crop_start(folder) // 2 if change == "below_crop" else change)
            else:
                _set_transformer_config(folder, family, change)
            made[key] = folder
        return made[key]

    return build


def _diffusers_pipeline(family: str, folder: Path, dtype: torch.dtype, ours: DiffGenerator):
    """diffusers' own pipeline on ``folder`` in ``dtype``, its VAE loaded in fp32 as ours is.

    (Loading the VAE in half precision and casting it back would round its weights.)
    """
    from diffusers import AutoencoderKLHunyuanVideo, AutoencoderKLWan, HunyuanVideoPipeline, WanPipeline

    if family == "wan":
        vae = AutoencoderKLWan.from_pretrained(folder / "vae", dtype=torch.float32)
        pipe = WanPipeline.from_pretrained(folder, vae=vae, dtype=dtype)
    else:
        # transformers 5 rebuilds a byte-level Llama vocabulary SentencePiece-style under its
        # LlamaTokenizerFast name; diffusers gets the tokenizer as our loader reads it.
        text_stage = next(s for s in ours.pipeline.stages if s.name == "text_encoding")
        vae = AutoencoderKLHunyuanVideo.from_pretrained(folder / "vae", dtype=torch.float32)
        pipe = HunyuanVideoPipeline.from_pretrained(folder, tokenizer=text_stage.tokenizer, vae=vae, dtype=dtype)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _diffusers_run(family: str, pipe, folder: Path, seed: int, output_type: str, steps: int | None = None,
                   **call_kwargs):
    if family == "wan":
        kwargs = dict(negative_prompt=NEGATIVE, **TINY_REQUEST)
    else:
        template = {"template": HUNYUAN_TEMPLATE, "crop_start": _hunyuan_crop_start(folder)}
        kwargs = dict(prompt_template=template, **HUNYUAN_REQUEST)
    if steps is not None:
        kwargs["num_inference_steps"] = steps
    return pipe(
        prompt=PROMPT, generator=torch.Generator().manual_seed(seed), output_type=output_type, **kwargs, **call_kwargs
    ).frames


def _diffusers_latents_and_frames(family: str, pipe, folder: Path, seed: int) -> tuple[torch.Tensor, np.ndarray]:
    """One diffusers run: the latents after its last step (what ``output_type="latent"`` returns,
    taken from its step-end callback) and its decoded frames."""
    final: dict[str, torch.Tensor] = {}

    def keep_latents(pipeline, step: int, timestep, tensors: dict) -> dict:
        final["latents"] = tensors["latents"]
        return tensors

    frames = _diffusers_run(family, pipe, folder, seed, "np", callback_on_step_end=keep_latents,
                            callback_on_step_end_tensor_inputs=["latents"])[0]
    return final["latents"], frames


def _our_params(family: str, seed: int, cache: CacheParams | None = None, steps: int | None = None) -> SamplingParams:
    if family == "wan":
        request = dict(negative_prompt=NEGATIVE, **TINY_REQUEST)
    else:
        request = dict(HUNYUAN_REQUEST)
    if steps is not None:
        request["num_inference_steps"] = steps
    return SamplingParams(prompt=PROMPT, seed=seed, cache=cache or CacheParams(), **request)


def _assert_match(ours, reference_latents, reference_frames) -> None:
    rtol, atol = TOLERANCE
    assert ours.latents.shape == reference_latents.shape
    torch.testing.assert_close(ours.latents, reference_latents.to(ours.latents.dtype), rtol=rtol, atol=atol)
    assert ours.frames.shape == reference_frames.shape
    np.testing.assert_allclose(ours.frames, reference_frames, rtol=rtol, atol=atol)


@pytest.mark.parametrize("cell", CELLS, ids=_cell_id)
def test_pipeline_matches_diffusers(cell, variant_folder):
    family, factor, change = cell
    dtype_name = change if factor == "dtype" else "fp32"
    folder = variant_folder(cell)
    family = _pipeline_family(family)
    ours = DiffGenerator.from_pretrained(str(folder), device="cpu", dtype=dtype_name, batched_cfg=False)
    pipe = _diffusers_pipeline(family, folder, DTYPES[dtype_name], ours)

    result = ours.generate(_our_params(family, seed=5))
    assert np.isfinite(result.frames).all()
    reference_latents, reference_frames = _diffusers_latents_and_frames(family, pipe, folder, seed=5)
    _assert_match(result, reference_latents, reference_frames)


# --------------------------------------------------------------------------- MagCache vs diffusers' hook
MAG_STEPS = 12
MAG_SETTINGS = dict(threshold=0.3, max_skip_steps=3, retention_ratio=0.2)


def _mag_ratios(family: str) -> list[float]:
    key = "wan21_t2v_1.3b" if family == "wan" else "hunyuan_544p"
    return list(preset_ratio_table()[key][COND])


def _record_block_runs(transformer, family: str) -> list[bool]:
    """True per transformer call when a middle block really ran (the hook skips whole blocks)."""
    ran: list[bool] = []
    middle = transformer.blocks[1].attn1 if family == "wan" else transformer.transformer_blocks[1].attn
    transformer.register_forward_pre_hook(lambda module, args: ran.append(False))
    middle.register_forward_hook(lambda module, args, out: ran.__setitem__(-1, True))
    return ran


@pytest.mark.parametrize("family", ["wan", "hunyuan"])
@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_magcache_matches_diffusers_hook(family, dtype_name, tiny_wan_dir, tiny_hunyuan_dir):
    """Same skips and output as diffusers' MagCache hook, with one ratio curve for every branch."""
    from diffusers.hooks import MagCacheConfig as HookConfig
    from diffusers.hooks import apply_mag_cache

    folder = tiny_wan_dir if family == "wan" else tiny_hunyuan_dir
    ours = DiffGenerator.from_pretrained(str(folder), device="cpu", dtype=dtype_name, batched_cfg=False)
    pipe = _diffusers_pipeline(family, folder, DTYPES[dtype_name], ours)
    ratios = _mag_ratios(family)
    apply_mag_cache(
        pipe.transformer,
        HookConfig(mag_ratios=torch.tensor(ratios), num_inference_steps=MAG_STEPS, **MAG_SETTINGS),
    )
    ran = _record_block_runs(pipe.transformer, family)
    reference_latents = _diffusers_run(family, pipe, folder, seed=3, output_type="latent", steps=MAG_STEPS)

    cache = CacheParams(strategy="magcache", options={"mag_ratios": {b: ratios for b in ("cond", "uncond")}},
                        **MAG_SETTINGS)
    result = ours.generate(_our_params(family, seed=3, cache=cache, steps=MAG_STEPS))
    branches = list(result.cache_stats.branches)
    assert result.cache.plan() == {b: ran[i :: len(branches)] for i, b in enumerate(branches)}
    assert result.cache_stats.total_skipped >= 3
    rtol, atol = TOLERANCE
    torch.testing.assert_close(result.latents, reference_latents.to(result.latents.dtype), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- EasyCache vs the release rule
EASY_STEPS = 12
EASY_SETTINGS = dict(threshold=0.3, warmup_steps=3)


class ReleaseEasyCacheForward:
    """The release's ``easycache_forward`` rule (H-EmbodVis/EasyCache) around a diffusers
    transformer's forward, written apart from ours: one counter over the model calls, the decision
    on the first call of each step, the cached output-minus-input per call slot."""

    def __init__(self, transformer, steps: int, calls_per_step: int, threshold: float, warmup_steps: int) -> None:
        self.forward, self.calls = transformer.forward, calls_per_step
        self.num_calls, self.thresh = steps * calls_per_step, threshold
        self.ret_calls, self.cutoff_calls = warmup_steps * calls_per_step, steps * calls_per_step - calls_per_step
        self.cnt, self.k, self.acc, self.calc = 0, None, 0.0, True
        self.prev_in = self.prev_out = self.prev_prev_in = None
        self.cache: dict[int, torch.Tensor] = {}
        self.decisions: list[bool] = []
        transformer.forward = self

    def __call__(self, hidden_states, *args, **kwargs):
        slot, raw = self.cnt % self.calls, hidden_states.clone()
        if slot == 0:
            if self.cnt < self.ret_calls or self.cnt >= self.cutoff_calls:
                self.calc, self.acc = True, 0.0
            elif self.prev_in is not None and self.prev_out is not None and self.k is not None:
                self.acc += self.k * ((raw - self.prev_in).abs().mean() / self.prev_out.abs().mean())
                self.calc = not self.acc < self.thresh
                if self.calc:
                    self.acc = 0.0
            else:
                self.calc = True
            self.prev_in = raw
            self.decisions.append(self.calc)
        self.cnt += 1
        if not self.calc:
            return ((raw + self.cache[slot]).to(hidden_states.dtype),)
        output = self.forward(hidden_states, *args, **kwargs)[0]
        if slot == 0:
            if self.prev_out is not None and self.prev_prev_in is not None:
                self.k = (output - self.prev_out).abs().mean() / (self.prev_in - self.prev_prev_in).abs().mean()
            self.prev_prev_in, self.prev_out = self.prev_in, output.clone()
        self.cache[slot] = output - raw
        return (output,)


# One transformer: diffusers' hook caches the transformer it is put on, not a Wan2.2 expert pair.
@pytest.mark.parametrize("cell", [c for c in CELLS if c[1] != "dtype" and c[0] != "wan22"], ids=_cell_id)
def test_easycache_matches_the_release_rule_around_diffusers(cell, variant_folder):
    """Our whole-model skipping against diffusers' pipeline with the release rule around its
    transformer, on every folder of the matrix: same skipped steps, same latents."""
    family = cell[0]
    folder = variant_folder(cell)
    ours = DiffGenerator.from_pretrained(str(folder), device="cpu", batched_cfg=False)
    pipe = _diffusers_pipeline(family, folder, torch.float32, ours)
    release = ReleaseEasyCacheForward(pipe.transformer, EASY_STEPS, 2 if family == "wan" else 1, **EASY_SETTINGS)
    reference_latents = _diffusers_run(family, pipe, folder, seed=4, output_type="latent", steps=EASY_STEPS)

    cache = CacheParams(strategy="easycache", threshold=EASY_SETTINGS["threshold"],
                        options={"warmup_steps": EASY_SETTINGS["warmup_steps"]})
    result = ours.generate(_our_params(family, seed=4, cache=cache, steps=EASY_STEPS))
    computed = [step in result.cache_stats.branches[COND].computed_steps for step in range(EASY_STEPS)]
    assert computed == release.decisions
    assert 2 <= computed.count(False)
    for stats in result.cache_stats.branches.values():
        assert stats.computed_steps == result.cache_stats.branches[COND].computed_steps
    rtol, atol = TOLERANCE
    torch.testing.assert_close(result.latents, reference_latents.to(result.latents.dtype), rtol=rtol, atol=atol)
