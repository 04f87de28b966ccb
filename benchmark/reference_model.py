"""Measure a built-in reference model for docs/reference-model.md.

    python benchmark/reference_model.py                                    # the Wan model
    python benchmark/reference_model.py --model-path hunyuanvideo-t2v-tiny  # the HunyuanVideo model

Writes the numbers (JSON, ``benchmark/results/reference_model[_hunyuan].json``) and two figures to
docs/images/: a strip of frames for a few held-out prompts and the per-step magnitude-ratio curve
next to the published one of its architecture (Wan2.1 T2V 1.3B, HunyuanVideo 544p).

- adherence per attribute (tools/adherence.py) of the trained model and of random weights of the
  same shape (``build_tiny_wan`` / ``build_tiny_hunyuan``), on the held-out captions with unused seeds;
- the model's own magnitude ratios (a calibration run, averaged over prompts);
- PSNR against the uncached output of the same seed for MagCache with its own ratios and with the
  published ratios at about half the steps skipped, for even skipping of the same number of
  steps, and for broken caches (tools/probe_caches.py); and the same MagCache on random weights.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "python"))

from sglang.multimodal_gen.configs.cache_params import CacheParams  # noqa: E402
from sglang.multimodal_gen.configs.sampling_params import SamplingParams  # noqa: E402
from sglang.multimodal_gen.runtime.cache.magcache import preset_ratio_table  # noqa: E402
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator  # noqa: E402
from sglang.multimodal_gen.tools import adherence  # noqa: E402
from sglang.multimodal_gen.tools.probe_caches import register_probe_caches  # noqa: E402
from sglang.multimodal_gen.tools.synthetic_videos import HELD_OUT, TRAIN_SCENES  # noqa: E402

from metrics import psnr  # noqa: E402  (benchmark/metrics.py, next to this script)

logger = logging.getLogger("reference_model")
STEPS = 50
K = 4
RETENTION = 0.2
THRESHOLDS = [round(float(x), 3) for x in np.arange(0.005, 0.6, 0.005)]
GEOMETRY = dict(height=64, width=64, num_frames=17, num_inference_steps=STEPS)


@dataclass(frozen=True)
class Architecture:
    """What the measurements need to know of a model family: its published ratio curve and branches."""

    published_key: str  # the MagCache preset of the published checkpoint (its 64x64 requests use it too)
    published_label: str
    branches: tuple[str, ...]
    image_prefix: str
    results_name: str


ARCHITECTURES = {
    "wan": Architecture("wan21_t2v_1.3b", "Wan2.1 T2V 1.3B", ("cond", "uncond"), "reference-model", "reference_model.json"),
    "hunyuan": Architecture("hunyuan_544p", "HunyuanVideo 544p", ("cond",), "reference-model-hunyuan",
                            "reference_model_hunyuan.json"),
}


def run(gen: DiffGenerator, prompt: str, seed: int, cache: CacheParams | None = None, calibrate: bool = False):
    params = SamplingParams(prompt=prompt, seed=seed, cache=cache or CacheParams(), **GEOMETRY)
    return gen.generate(params, calibrate=calibrate)


def own_ratios(gen: DiffGenerator, prompts: list[str]) -> dict[str, list[float]]:
    """Mean per-step magnitude ratio per branch over calibration runs of ``prompts``."""
    curves: dict[str, list[list[float]]] = {}
    for i, prompt in enumerate(prompts):
        records = run(gen, prompt, seed=i, calibrate=True).cache.calibration_records()
        for branch, record in records.items():
            curves.setdefault(branch, []).append(record.mag_ratio)
    return {b: [round(float(v), 5) for v in np.mean(c, axis=0)] for b, c in curves.items()}


def magcache_params(threshold: float, ratios: dict[str, list[float]] | None, strategy: str = "magcache") -> CacheParams:
    options = {"mag_ratios": ratios} if ratios is not None else {}
    return CacheParams(strategy=strategy, threshold=threshold, max_skip_steps=K, retention_ratio=RETENTION, options=options)


def skipped_per_branch(threshold: float, ratios: dict[str, list[float]] | None, arch: Architecture) -> float:
    """Mean skipped steps per branch of MagCache's plan (known up front, no generation needed)."""
    from sglang.multimodal_gen.runtime.cache import build_cache

    cache = build_cache(magcache_params(threshold, ratios), STEPS, arch.published_key, arch.branches)
    plan = cache.plan()
    return float(np.mean([p.count(False) for p in plan.values()]))


def threshold_for_half(ratios: dict[str, list[float]] | None, arch: Architecture) -> tuple[float, float]:
    """The smallest threshold whose plan skips at least half the steps per branch."""
    for t in THRESHOLDS:
        skipped = skipped_per_branch(t, ratios, arch)
        if skipped >= STEPS / 2:
            return t, skipped
    return THRESHOLDS[-1], skipped_per_branch(THRESHOLDS[-1], ratios, arch)


def fidelity(gen: DiffGenerator, prompts: list[str], variants: dict[str, CacheParams]) -> dict[str, dict]:
    """Mean PSNR (dB) vs the uncached output of the same seed, and skipped steps, per variant."""
    out: dict[str, dict] = {name: {"psnr": [], "skipped": []} for name in variants}
    for i, prompt in enumerate(prompts):
        seed = adherence.SEED_OFFSET + i
        reference = run(gen, prompt, seed).frames
        for name, cache in variants.items():
            result = run(gen, prompt, seed, cache)
            out[name]["psnr"].append(psnr(result.frames, reference))
            out[name]["skipped"].append(result.cache_stats.total_skipped / len(result.cache_stats.branches))
    return {
        name: {"psnr_db": round(float(np.mean(v["psnr"])), 2), "psnr_min_db": round(float(np.min(v["psnr"])), 2),
               "skipped_per_branch": round(float(np.mean(v["skipped"])), 1)}
        for name, v in out.items()
    }


def frame_strip(gen: DiffGenerator, scenes, path: Path, guidance: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [0, 4, 8, 12, 16]
    fig, axes = plt.subplots(len(scenes), len(shown), figsize=(1.3 * len(shown), 1.45 * len(scenes)))
    for r, scene in enumerate(scenes):
        frames = run(gen, scene.caption, adherence.SEED_OFFSET).frames
        for c, f in enumerate(shown):
            ax = axes[r, c]
            ax.imshow(frames[f], interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"frame {f}", fontsize=7)
        axes[r, 0].set_ylabel(scene.caption.replace(" moving", "\nmoving").replace("a ", "", 1), fontsize=5.5)
    fig.suptitle(f"held-out prompts (never seen in training), seed 10000, 50 steps, {guidance}", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def ratio_plot(ratios: dict[str, list[float]], path: Path, arch: Architecture, scheduler: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    published = preset_ratio_table()[arch.published_key]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    steps = np.arange(STEPS)
    for branch, ours, theirs in (("cond", "tab:blue", "black"), ("uncond", "tab:orange", "tab:gray")):
        if branch not in arch.branches:
            continue
        ax.plot(steps, published[branch], "--", color=theirs, label=f"{arch.published_label} (published), {branch}")
        ax.plot(steps, ratios[branch], "-", color=ours, label=f"reference model, {branch}")
    ax.axhline(1.0, color="black", lw=0.5)
    ax.set_xlabel(f"denoising step (50 {scheduler} steps)")
    ax.set_ylabel("|r_t| / |r_t-1|")
    ax.set_title("MagCache magnitude ratio of the block residual", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def random_weights_twin(family: str, folder: Path) -> DiffGenerator:
    """Random weights of the trained model's shapes: what every test saw before the model was trained."""
    from sglang.multimodal_gen.tools.reference_architectures import (
        ARCHITECTURES as REFERENCE_ARCHITECTURES,
        REFERENCE_HUNYUAN_TRANSFORMER,
        REFERENCE_TRANSFORMER,
        REFERENCE_VAE_BASE_DIM,
    )
    from sglang.multimodal_gen.tools.tiny_models import build_tiny_hunyuan, build_tiny_wan

    build, transformer = {"wan": (build_tiny_wan, REFERENCE_TRANSFORMER),
                          "hunyuan": (build_tiny_hunyuan, REFERENCE_HUNYUAN_TRANSFORMER)}[family]
    vae = REFERENCE_ARCHITECTURES[family].vae_config(REFERENCE_VAE_BASE_DIM)
    return DiffGenerator.from_pretrained(str(build(folder, seed=0, transformer_config=transformer, vae_config=vae)),
                                         device="cpu")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", default=None, help="model folder or built-in name (default: the built-in Wan model)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default: benchmark/results/reference_model[_hunyuan].json)")
    parser.add_argument("--images", type=Path, default=REPO / "docs" / "images")
    parser.add_argument("--seeds", type=int, default=2, help="seeds per held-out caption for adherence")
    parser.add_argument("--psnr-prompts", type=int, default=8)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    logging.getLogger("sglang").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    register_probe_caches()
    start = time.time()

    trained = DiffGenerator.from_pretrained(args.model_path, device="cpu")
    family = trained.pipeline.model_info.family.name
    arch = ARCHITECTURES[family]
    out = args.out or REPO / "benchmark" / "results" / arch.results_name
    args.images.mkdir(parents=True, exist_ok=True)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        random_gen = random_weights_twin(family, Path(tmp) / "random")
    seeds = [adherence.SEED_OFFSET + i for i in range(args.seeds)]
    results: dict = {}
    logger.info("adherence")
    results["adherence"] = {
        "trained_held_out": _strip(adherence.evaluate(trained, HELD_OUT, seeds)),
        "trained_train_captions": _strip(adherence.evaluate(trained, TRAIN_SCENES[::9], seeds[:1])),
        "random_held_out": _strip(adherence.evaluate(random_gen, HELD_OUT, seeds)),
    }
    logger.info("%s", json.dumps(results["adherence"]))

    logger.info("magnitude ratios")
    ratios = own_ratios(trained, [s.caption for s in TRAIN_SCENES[::27]])
    random_ratios = own_ratios(random_gen, [s.caption for s in TRAIN_SCENES[::54]])
    results["mag_ratios"] = {"trained": ratios, "random": random_ratios}
    latent_stage = next(s for s in trained.pipeline.stages if s.name == "latent_preparation")
    scheduler = type(latent_stage.scheduler).__name__.removesuffix("Scheduler")
    ratio_plot(ratios, args.images / f"{arch.image_prefix}-mag-ratios.png", arch, scheduler)
    guidance = trained.validate(SamplingParams(prompt=HELD_OUT[0].caption)).guidance_scale
    frame_strip(trained, [HELD_OUT[i] for i in (0, 9, 18, 27, 35)], args.images / f"{arch.image_prefix}-frames.png",
                f"guidance {guidance:g}" + (" (CFG)" if len(arch.branches) == 2 else " (embedded)"))

    logger.info("fidelity")
    own_t, own_skip = threshold_for_half(ratios, arch)
    pub_t, pub_skip = threshold_for_half(None, arch)
    num_skip = int(round(own_skip))
    variants = {
        f"magcache own ratios (E{own_t}K{K}R{RETENTION})": magcache_params(own_t, ratios),
        f"magcache published {arch.published_label} ratios (E{pub_t}K{K}R{RETENTION})": magcache_params(pub_t, None),
        f"even skipping of {num_skip} steps": CacheParams(strategy="probe_even_skip", options={"num_skip": num_skip, "start_step": int(RETENTION * STEPS + 0.5)}),
        "zero residual (magcache own plan)": magcache_params(own_t, ratios, "probe_zero_residual"),
        "stale residual (magcache own plan)": magcache_params(own_t, ratios, "probe_stale_residual"),
    }
    if "uncond" in arch.branches:
        variants["swapped cond/uncond residuals (magcache own plan)"] = magcache_params(own_t, ratios, "probe_swapped_residual")
    prompts = [s.caption for s in HELD_OUT[:: max(1, len(HELD_OUT) // args.psnr_prompts)]][: args.psnr_prompts]
    results["fidelity"] = {"trained": fidelity(trained, prompts, variants)}
    random_t, _ = threshold_for_half(random_ratios, arch)
    results["fidelity"]["random"] = fidelity(
        random_gen, prompts[:4],
        {f"magcache own ratios (E{random_t}K{K}R{RETENTION})": magcache_params(random_t, random_ratios),
         f"even skipping of {num_skip} steps": variants[f"even skipping of {num_skip} steps"]},
    )
    results["thresholds"] = {"own": own_t, "published": pub_t, "random_own": random_t}
    results["minutes"] = round((time.time() - start) / 60, 1)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps({k: v for k, v in results.items() if k != "mag_ratios"}, indent=2))
    return 0


def _strip(result: dict) -> dict:
    return {k: v for k, v in result.items() if k != "readings"}


if __name__ == "__main__":
    raise SystemExit(main())
