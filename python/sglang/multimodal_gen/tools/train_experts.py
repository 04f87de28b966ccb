"""Make a tiny Wan2.2 T2V-A14B-style reference: two experts fine-tuned from one trained Wan model.

Wan2.2's two experts are the same architecture trained for two ranges of noise: ``transformer``
for the steps whose timestep is at least ``boundary_ratio * 1000`` (high noise: layout and
motion), ``transformer_2`` for the rest (low noise: detail). The reference here does the same at
tiny scale: both experts start from the transformer of a trained Wan folder (by default the
hard-world model, ``wan2.1-t2v-tiny-hard``) and each is fine-tuned by rectified flow only on the
noise levels of its range (the scheduler's shifted sigmas, restricted to one side of the
boundary). The text encoder, tokenizer, VAE and scheduler are the source's, shared and frozen as
in Wan2.2, so the caption embeddings are computed once per caption.

    python -m sglang.multimodal_gen.tools.train_experts --checkpoint-dir ckpt/experts \
        --output python/sglang/multimodal_gen/builtin/wan2.2-t2v-tiny

``--checkpoint-dir`` keeps the encoded latents and the fine-tuning state every
``--checkpoint-every`` steps; ``--resume`` continues from there bit for bit. See
docs/reference-model.md ("The two-expert model").
"""

from __future__ import annotations

import copy
import json
import logging
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sglang.multimodal_gen.tools.reference_architectures import encode_umt5
from sglang.multimodal_gen.tools.synthetic_videos import WORLDS, sample_batch
from sglang.multimodal_gen.tools.tiny_models import WAN_COMPONENTS, write_model_index
from sglang.multimodal_gen.tools.train_reference import cosine_lr, ema_update, shifted_sigmas
from sglang.multimodal_gen.tools.training_checkpoint import TrainingCheckpoint, encoded_once, fine_tune_main

logger = logging.getLogger("train_experts")

# The experts in the order they are trained, with the folder each is saved to.
EXPERT_FOLDERS: dict[str, str] = {"high_noise": "transformer", "low_noise": "transformer_2"}


@dataclass
class FineTuneConfig:
    """What every fine-tuning run from a trained Wan model sets (``train_experts``, ``train_i2v``)."""

    seed: int = 0
    # The trained Wan model (built-in name or folder) the run starts from.
    source: str = "wan2.1-t2v-tiny-hard"
    world: str = "hard-cued"
    num_videos: int = 2000
    steps: int = 4000
    batch: int = 16
    # A lower learning rate than training from scratch, so the model stays close to the source
    # outside what the new task teaches it.
    lr: float = 3e-4
    warmup: int = 100
    weight_decay: float = 0.01
    ema_decay: float = 0.998
    caption_dropout: float = 0.1
    log_every: int = 500


@dataclass
class ExpertTrainConfig(FineTuneConfig):
    """Every knob of an expert fine-tuning run; the defaults make the shipped ``wan2.2-t2v-tiny``
    (``steps`` per expert)."""

    # Wan2.2 T2V-A14B's boundary: timesteps >= 875 of 1000 go to the high-noise expert.
    boundary_ratio: float = 0.875


def boundary_quantile(boundary_ratio: float, shift: float) -> float:
    """The uniform draw whose shifted sigma is the boundary: the inverse of :func:`shifted_sigmas`."""
    return boundary_ratio / (shift - (shift - 1) * boundary_ratio)


def expert_sigmas(expert: str, count: int, gen: torch.Generator, boundary_ratio: float, shift: float) -> torch.Tensor:
    """Noise levels drawn as the scheduler's shifted sigmas, restricted to the expert's side of the boundary."""
    split = boundary_quantile(boundary_ratio, shift)
    u = torch.rand(count, generator=gen)
    u = split + (1 - split) * u if expert == "high_noise" else split * u
    return shifted_sigmas(u, shift)


@dataclass
class SourceModel:
    folder: Path
    tokenizer: object
    text_encoder: torch.nn.Module
    transformer: torch.nn.Module
    vae: torch.nn.Module
    flow_shift: float


def load_source(cfg: ExpertTrainConfig) -> SourceModel:
    from diffusers import AutoencoderKLWan, WanTransformer3DModel
    from transformers import AutoTokenizer, UMT5EncoderModel

    from sglang.multimodal_gen.errors import ModelNotFoundError
    from sglang.multimodal_gen.runtime.models.loader import resolve_model_path

    try:
        folder = resolve_model_path(cfg.source)
    except ModelNotFoundError as exc:
        raise SystemExit(f"--source: {exc}") from None
    if not (folder / "transformer" / "config.json").is_file() or (folder / "transformer_2").exists():
        raise SystemExit(f"--source {folder}: not a one-transformer Wan folder")
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    return SourceModel(
        folder=folder,
        tokenizer=AutoTokenizer.from_pretrained(folder / "tokenizer"),
        text_encoder=UMT5EncoderModel.from_pretrained(folder / "text_encoder").eval().requires_grad_(False),
        transformer=WanTransformer3DModel.from_pretrained(folder / "transformer"),
        vae=AutoencoderKLWan.from_pretrained(folder / "vae").eval(),
        flow_shift=float(scheduler["flow_shift"]),
    )


@torch.no_grad()
def encode_videos(source: SourceModel, cfg: ExpertTrainConfig) -> tuple[torch.Tensor, list[str]]:
    """``num_videos`` videos of the world as the pipeline's latents (normalised with the VAE's own mean and std)."""
    rng = np.random.default_rng(cfg.seed + 3)
    mean = torch.tensor(source.vae.config.latents_mean).view(1, -1, 1, 1, 1)
    std = torch.tensor(source.vae.config.latents_std).view(1, -1, 1, 1, 1)
    latents, captions = [], []
    chunk = min(16, cfg.num_videos)
    for _ in tqdm(range(0, cfg.num_videos, chunk), desc="encode", file=sys.stdout, mininterval=15):
        videos, scenes = sample_batch(rng, chunk, WORLDS[cfg.world].train_scenes, world=cfg.world)
        latents.append((source.vae.encode(torch.from_numpy(videos)).latent_dist.mode() - mean) / std)
        captions += [s.caption for s in scenes]
    return torch.cat(latents)[: cfg.num_videos], captions[: cfg.num_videos]


@torch.no_grad()
def caption_embeddings(source: SourceModel, captions: list[str]) -> tuple[torch.Tensor, list[int]]:
    """Each distinct caption (and the empty one, last) encoded once: the text encoder is frozen."""
    distinct = sorted(set(captions)) + [""]
    index = {c: i for i, c in enumerate(distinct)}
    embeddings = torch.cat([encode_umt5(source.tokenizer, source.text_encoder, distinct[i : i + 64])
                            for i in range(0, len(distinct), 64)])
    return embeddings, [index[c] for c in captions]


def fine_tune(expert: str, source: SourceModel, cfg: ExpertTrainConfig, latents: torch.Tensor,
              embeddings: torch.Tensor, caption_ids: list[int], checkpoint: TrainingCheckpoint | None,
              every: int, done: dict) -> tuple[torch.nn.Module, float]:
    """One expert from the source transformer; returns its EMA copy and its recent loss."""
    torch.manual_seed(cfg.seed + 10 + list(EXPERT_FOLDERS).index(expert))
    model = copy.deepcopy(source.transformer).train().requires_grad_(True)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 20 + list(EXPERT_FOLDERS).index(expert))
    ids = torch.tensor(caption_ids)
    empty = len(embeddings) - 1
    recent: list[float] = []
    first = 0
    saved = checkpoint.load_dit() if checkpoint else None
    if saved is not None and saved["expert"] == expert:
        model.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        recent, first = saved["recent"], saved["step"]
        logger.info("%s: resuming at step %d/%d", expert, first, cfg.steps)

    def save(step: int) -> None:
        checkpoint.save_dit({
            "expert": expert, "step": step, "model": model.state_dict(), "ema": ema.state_dict(),
            "optimizer": opt.state_dict(), "generator": gen.get_state(), "torch_rng": torch.get_rng_state(),
            "recent": recent, "done": done,
        })

    bar = tqdm(range(first, cfg.steps), desc=expert, file=sys.stdout, mininterval=15, initial=first, total=cfg.steps)
    for step in bar:
        lr = cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(latents), (cfg.batch,), generator=gen)
        drop = torch.rand(cfg.batch, generator=gen) < cfg.caption_dropout
        text = embeddings[torch.where(drop, torch.full_like(idx, empty), ids[idx])]
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = expert_sigmas(expert, cfg.batch, gen, cfg.boundary_ratio, source.flow_shift)
        s = sigma.view(-1, 1, 1, 1, 1)
        pred = model((1 - s) * x0 + s * noise, sigma * 1000, text, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, cfg.ema_decay)
        recent = (recent + [loss.item()])[-200:]
        bar.set_postfix(loss=f"{np.mean(recent):.4f}", lr=f"{lr:.1e}", refresh=False)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            logger.info("%s step %d/%d flow-matching loss %.4f (last 200 steps)", expert, step + 1, cfg.steps, np.mean(recent))
        if checkpoint and ((step + 1) % every == 0 or step + 1 == cfg.steps):
            save(step + 1)
    bar.close()
    return ema.eval(), float(np.mean(recent))


@torch.no_grad()
def range_loss(transformer: torch.nn.Module, expert: str, source: SourceModel, cfg: ExpertTrainConfig,
               latents: torch.Tensor, embeddings: torch.Tensor, caption_ids: list[int], batches: int = 8) -> float:
    """Flow-matching loss on the expert's range over fixed draws, to compare an expert with the source."""
    gen = torch.Generator().manual_seed(cfg.seed + 99)
    ids = torch.tensor(caption_ids)
    losses = []
    for _ in range(batches):
        idx = torch.randint(0, len(latents), (cfg.batch,), generator=gen)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = expert_sigmas(expert, cfg.batch, gen, cfg.boundary_ratio, source.flow_shift)
        s = sigma.view(-1, 1, 1, 1, 1)
        pred = transformer((1 - s) * x0 + s * noise, sigma * 1000, embeddings[ids[idx]], return_dict=False)[0]
        losses.append(F.mse_loss(pred, noise - x0).item())
    return float(np.mean(losses))


def save_folder(output: Path, source: SourceModel, experts: dict[str, torch.nn.Module], cfg: ExpertTrainConfig) -> None:
    """The Wan2.2 T2V-A14B diffusers layout: the source's shared parts, the experts, ``boundary_ratio``."""
    output.mkdir(parents=True, exist_ok=True)
    for part in ("text_encoder", "tokenizer", "vae", "scheduler"):
        shutil.copytree(source.folder / part, output / part, dirs_exist_ok=True)
    for name in ("heldout_prompts.txt", "calibration_prompts.txt"):
        if (source.folder / name).is_file():
            shutil.copy(source.folder / name, output / name)
    for expert, folder in EXPERT_FOLDERS.items():
        experts[expert].save_pretrained(output / folder, safe_serialization=True)
    write_model_index(output, components={**WAN_COMPONENTS, "transformer_2": ["diffusers", "WanTransformer3DModel"]},
                      extra={"boundary_ratio": cfg.boundary_ratio})
    source_config = json.loads((source.folder / "sglang_config.json").read_text())
    source_config.pop("cache_calibration_file", None)
    (output / "sglang_config.json").write_text(json.dumps(source_config, indent=2) + "\n")


def train_experts(output: Path, cfg: ExpertTrainConfig, checkpoint_dir: Path | None = None, resume: bool = False,
                  checkpoint_every: int = 500) -> dict:
    if not 0 < cfg.boundary_ratio < 1:
        raise SystemExit(f"--boundary-ratio {cfg.boundary_ratio}: must lie strictly between 0 and 1")
    start = time.time()
    source = load_source(cfg)
    checkpoint = TrainingCheckpoint(checkpoint_dir, cfg, resume) if checkpoint_dir is not None else None
    latents, captions, _ = encoded_once(checkpoint, lambda: (*encode_videos(source, cfg), {}))
    embeddings, caption_ids = caption_embeddings(source, captions)
    saved = checkpoint.load_dit() if checkpoint else None
    done: dict = dict(saved["done"]) if saved is not None else {}
    experts, summary = {}, {}
    for expert in EXPERT_FOLDERS:
        if expert in done:
            model = copy.deepcopy(source.transformer)
            model.load_state_dict(done[expert]["ema"])
            experts[expert], loss = model.eval(), done[expert]["loss"]
        else:
            experts[expert], loss = fine_tune(expert, source, cfg, latents, embeddings, caption_ids, checkpoint,
                                              checkpoint_every, done)
            done[expert] = {"ema": experts[expert].state_dict(), "loss": loss}
            if checkpoint is not None:
                checkpoint.save_dit({"expert": None, "done": done})
        before = range_loss(source.transformer.eval(), expert, source, cfg, latents, embeddings, caption_ids)
        after = range_loss(experts[expert], expert, source, cfg, latents, embeddings, caption_ids)
        logger.info("%s: flow-matching loss on its range %.4f (source model) -> %.4f", expert, before, after)
        summary[expert] = {"final_training_loss": round(loss, 5), "range_loss_source": round(before, 5),
                           "range_loss_expert": round(after, 5)}
    save_folder(output, source, experts, cfg)
    summary = {"config": asdict(cfg), "experts": summary, "total_minutes": round((time.time() - start) / 60, 1),
               "resumed": resume, "torch_threads": torch.get_num_threads()}
    (output / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("done in %.1f min: %s", (time.time() - start) / 60, json.dumps(summary["experts"]))
    return summary


def main(argv: list[str] | None = None) -> int:
    return fine_tune_main(__doc__.split("\n\n")[0], ExpertTrainConfig, train_experts,
                          output_help="folder to write the two-expert diffusers layout to", checkpoint_every=500, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
