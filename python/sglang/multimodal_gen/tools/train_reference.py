"""Train a built-in reference model: a tiny Wan2.1 or HunyuanVideo T2V pipeline on synthetic captioned videos.

Random weights make every cache look harmless (skipping half the steps changes the output by less
than 1e-3), so the built-in models are trained until they behave like real ones: their block
residuals evolve over the steps and skipping them costs fidelity. The phases are the same for
both architectures (``--architecture``; what differs lives in ``tools/reference_architectures.py``),
all with fixed seeds and a fixed number of steps so that a rerun reproduces the weights:

1. the VAE (``AutoencoderKLWan`` / ``AutoencoderKLHunyuanVideo``, tiny configs) on 32x32 crops (it
   is convolutional) of the varied videos (``render(varied=True)``), first of 5-frame clips, then
   of whole 17-frame videos: L1 + MSE reconstruction of the posterior mean and a small KL term;
   then the latent normalisation of the VAE config is set from the encoded training set (Wan: per
   channel mean and std; HunyuanVideo: one scaling factor), so the pipeline's is right;
2. the encoding of a fixed set of 17-frame training videos into normalised latents;
3. the transformer and the text encoders together, by rectified flow in that latent space (sigma
   drawn like the scheduler's shifted sigmas, ``timestep = 1000 * sigma``, target ``noise - x0``,
   what both the UniPC and the Euler flow schedulers expect), with 10% of the captions replaced by
   the empty prompt for guidance, and an EMA of all;
4. HunyuanVideo only, guidance distillation: HunyuanVideo takes its guidance scale as an input
   (one branch per step) instead of running classifier-free guidance. A student, started from
   phase 3's EMA, learns to predict ``uncond + w (cond - uncond)`` of the phase-3 model (the
   teacher, frozen with its text encoders) from the caption alone with ``w`` as its guidance input,
   ``w`` drawn uniformly from [1, ``distill_max_guidance``].

    python -m sglang.multimodal_gen.tools.train_reference --output python/sglang/multimodal_gen/builtin/wan2.1-t2v-tiny
    python -m sglang.multimodal_gen.tools.train_reference --architecture hunyuan \
        --output python/sglang/multimodal_gen/builtin/hunyuanvideo-t2v-tiny
    python -m sglang.multimodal_gen.tools.train_reference --world hard --checkpoint-dir ckpt/hard \
        --output python/sglang/multimodal_gen/builtin/wan2.1-t2v-tiny-hard

About 57 minutes each (Wan, HunyuanVideo) on one CPU thread (``--vae-from`` skips phase 1). The
hard world (``--world hard``, ``tools/synthetic_videos.py``) fine-tunes the shipped Wan VAE on its
videos (``vae_init``) and trains the transformer longer (``WORLD_DEFAULTS``), which takes hours:
``--checkpoint-dir`` keeps the finished phases and the transformer's state every
``--checkpoint-every`` steps, and ``--resume`` continues from there, giving the weights an
uninterrupted run gives (``--stop-after-steps`` ends a run early at a checkpoint, e.g. to split it
over sessions). See docs/reference-model.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sglang.multimodal_gen.tools.reference_architectures import ARCHITECTURES, TextPath
from sglang.multimodal_gen.tools.training_checkpoint import TrainingCheckpoint
from sglang.multimodal_gen.tools.synthetic_videos import VIDEO_FRAMES, VIDEO_SIZE, WORLDS, sample_batch

logger = logging.getLogger("train_reference")


@dataclass
class TrainConfig:
    """Every knob of a training run; the defaults make the shipped Wan model (see HUNYUAN_DEFAULTS, WORLD_DEFAULTS)."""

    seed: int = 0
    # Which synthetic world the videos come from (tools/synthetic_videos.WORLDS).
    world: str = "simple"
    # A model (built-in name or folder) whose VAE phase 1 fine-tunes instead of starting from random weights.
    vae_init: str = ""
    vae_base_dim: int = 16
    vae_steps: int = 4000
    vae_batch: int = 8
    vae_clip_frames: int = 5
    vae_full_clips_from: int = 1500
    vae_crop: int = 32
    vae_lr: float = 3e-3
    vae_kl_weight: float = 1e-4
    num_videos: int = 6000
    dit_steps: int = 13000
    dit_batch: int = 16
    dit_lr: float = 1e-3
    dit_warmup: int = 300
    weight_decay: float = 0.01
    ema_decay: float = 0.998
    caption_dropout: float = 0.1
    # Guidance distillation (architectures with embedded guidance only; 0 skips it).
    distill_steps: int = 0
    distill_lr: float = 3e-4
    distill_max_guidance: float = 8.0
    log_every: int = 500


# The shipped HunyuanVideo model's settings where they differ from Wan's: a VAE that costs more
# per step (mid-block attention, temporal tiles) trains fewer, smaller-batch steps; the DiT's
# double-stream blocks cost more per step too, and part of the hour goes to distillation.
HUNYUAN_DEFAULTS: dict = dict(vae_steps=4000, vae_batch=4, vae_full_clips_from=2000, num_videos=3000,
                              dit_steps=6000, distill_steps=1200)
ARCHITECTURE_DEFAULTS: dict[str, dict] = {"wan": {}, "hunyuan": HUNYUAN_DEFAULTS}
# The hard world: the shipped Wan VAE as it is (fine-tuning it on the hard world at lr 1e-3 moved
# its reconstruction loss from 0.167 to 0.152 in 600 steps at 1.7 s each: too slow to pay for
# here, see docs/reference-model.md), 4,000 videos, the transformer trained longer, since the
# flow's curvature grows with training (an undertrained model predicts smooth averages and looks
# easier than it is).
HARD_WORLD_DEFAULTS: dict = dict(world="hard", vae_init="wan2.1-t2v-tiny", vae_steps=0, num_videos=4000, dit_steps=16000)
# The hard-cued world (the object starts on the side it leaves, so a frame tells the direction):
# the hard world's recipe. The hard model did not learn direction from motion alone (docs).
WORLD_DEFAULTS: dict[str, dict] = {"simple": {}, "hard": HARD_WORLD_DEFAULTS,
                                   "hard-cued": {**HARD_WORLD_DEFAULTS, "world": "hard-cued"}}


def default_config(architecture: str, world: str = "simple", **overrides) -> TrainConfig:
    if world not in WORLDS:
        raise SystemExit(f"--world {world}: not one of {', '.join(WORLDS)}")
    return TrainConfig(**{**ARCHITECTURE_DEFAULTS[architecture], **WORLD_DEFAULTS[world], **overrides})


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def shifted_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The scheduler's shift of uniform sigmas, so training sees the noise levels sampling uses."""
    return shift * u / (1 + (shift - 1) * u)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of two videos in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a, b).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def train_vae(cfg: TrainConfig, rng: np.random.Generator, arch):
    """Phase 1; returns the VAE and its recent reconstruction loss (``None`` for ``vae_init`` with no steps: used as is)."""
    torch.manual_seed(cfg.seed)
    vae = arch.new_vae(cfg.vae_base_dim) if not cfg.vae_init else initial_vae(cfg, arch).train()
    if cfg.vae_steps == 0 and cfg.vae_init:
        return vae.eval(), None
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    bar = tqdm(range(cfg.vae_steps), desc="vae", file=sys.stdout, mininterval=15)
    recent: list[float] = []
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.vae_steps, cfg.vae_lr, 50)
        # Short clips first (fast, the spatial code); then whole videos, so that the causal
        # cache of every later 4-frame chunk is trained too (else frames past the fifth degrade).
        full = step >= cfg.vae_full_clips_from
        videos, _ = sample_batch(rng, cfg.vae_batch // 2 if full else cfg.vae_batch, WORLDS[cfg.world].train_scenes,
                                 varied=True, world=cfg.world)
        frames = VIDEO_FRAMES if full else cfg.vae_clip_frames
        start = int(rng.integers(0, VIDEO_FRAMES - frames + 1))
        top, left = rng.integers(0, VIDEO_SIZE - cfg.vae_crop + 1, size=2)
        clip = videos[:, :, start : start + frames, top : top + cfg.vae_crop, left : left + cfg.vae_crop]
        x = torch.from_numpy(np.ascontiguousarray(clip))
        posterior, recon = arch.reconstruct(vae, x)
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1 - posterior.logvar).mean()
        rec = F.l1_loss(recon, x) + F.mse_loss(recon, x)
        loss = rec + cfg.vae_kl_weight * kl
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        opt.step()
        recent = (recent + [rec.item()])[-50:]
        bar.set_postfix(rec=f"{np.mean(recent):.4f}", kl=f"{kl.item():.2f}", refresh=False)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.vae_steps:
            logger.info("vae step %d/%d reconstruction loss %.4f kl %.3f", step + 1, cfg.vae_steps, np.mean(recent), kl.item())
    bar.close()
    vae.eval()
    return vae, float(np.mean(recent))


@torch.no_grad()
def encode_dataset(vae, cfg: TrainConfig, rng: np.random.Generator, arch) -> tuple[torch.Tensor, list[str], dict]:
    """Encode ``num_videos`` training videos (posterior means) and measure the VAE on 17 frames."""
    latents, captions, psnrs = [], [], []
    chunk = min(16, cfg.num_videos)
    for _ in tqdm(range(0, cfg.num_videos, chunk), desc="encode", file=sys.stdout, mininterval=15):
        videos, scenes = sample_batch(rng, chunk, WORLDS[cfg.world].train_scenes, world=cfg.world)
        x = torch.from_numpy(videos)
        z = vae.encode(x).latent_dist.mode()
        if len(psnrs) < 8:
            psnrs.append(psnr(vae.decode(z).sample.clamp(-1, 1), x))
        latents.append(z)
        captions += [s.caption for s in scenes]
    normalised = arch.normalise_latents(vae, torch.cat(latents)[: cfg.num_videos])
    logger.info("vae reconstruction of 17-frame videos: %.2f dB PSNR", float(np.mean(psnrs)))
    return normalised, captions[: cfg.num_videos], {"vae_psnr_db_17_frames": round(float(np.mean(psnrs)), 2)}


@dataclass
class Checkpointing:
    """Where and how often the transformer phase saves its state, and where this run stops."""

    checkpoint: TrainingCheckpoint
    every: int
    stop_after: int | None = None


def train_dit(cfg: TrainConfig, latents: torch.Tensor, captions: list[str], arch, output: Path,
              checkpointing: Checkpointing | None = None):
    """Phase 3: transformer and text encoders by rectified flow; returns their EMA copies and the loss.

    With ``checkpointing`` the state is saved every ``every`` steps and at the end, a saved state
    is continued from, and the run returns ``None`` once it has saved step ``stop_after``.
    """
    torch.manual_seed(cfg.seed + 1)
    text = arch.new_text_path(output)
    transformer = arch.new_transformer(text)
    ema_text, ema_dit = [copy.deepcopy(m) for m in text.modules], copy.deepcopy(transformer)
    params = list(transformer.parameters()) + [p for m in text.modules for p in m.parameters()]
    opt = torch.optim.AdamW(params, lr=cfg.dit_lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    recent: list[float] = []
    first = 0
    models = {"transformer": transformer, "ema_transformer": ema_dit,
              **{f"text_{i}": m for i, m in enumerate(text.modules)}, **{f"ema_text_{i}": m for i, m in enumerate(ema_text)}}
    saved = checkpointing.checkpoint.load_dit() if checkpointing else None
    if saved is not None:
        for name, module in models.items():
            module.load_state_dict(saved["models"][name])
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        recent, first = saved["recent"], saved["step"]
        logger.info("dit: resuming at step %d/%d", first, cfg.dit_steps)

    def save(step: int) -> None:
        checkpointing.checkpoint.save_dit({
            "step": step, "models": {name: m.state_dict() for name, m in models.items()}, "optimizer": opt.state_dict(),
            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "recent": recent,
        })
        logger.info("dit: checkpoint at step %d", step)

    bar = tqdm(range(first, cfg.dit_steps), desc="dit", file=sys.stdout, mininterval=15, initial=first, total=cfg.dit_steps)
    for step in bar:
        lr = cosine_lr(step, cfg.dit_steps, cfg.dit_lr, cfg.dit_warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(latents), (cfg.dit_batch,), generator=gen)
        drop = torch.rand(cfg.dit_batch, generator=gen) < cfg.caption_dropout
        batch_captions = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = shifted_sigmas(torch.rand(cfg.dit_batch, generator=gen), arch.flow_shift)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        pred = arch.predict(transformer, xt, sigma, text.encode(text.modules, batch_captions), None)
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema_dit, transformer, cfg.ema_decay)
        for ema, model in zip(ema_text, text.modules):
            ema_update(ema, model, cfg.ema_decay)
        recent = (recent + [loss.item()])[-200:]
        bar.set_postfix(loss=f"{np.mean(recent):.4f}", lr=f"{lr:.1e}", refresh=False)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.dit_steps:
            logger.info("dit step %d/%d flow-matching loss %.4f (last 200 steps) lr %.2e", step + 1, cfg.dit_steps, np.mean(recent), lr)
        if checkpointing and ((step + 1) % checkpointing.every == 0 or step + 1 in (cfg.dit_steps, checkpointing.stop_after)):
            save(step + 1)
            if step + 1 == checkpointing.stop_after and step + 1 < cfg.dit_steps:
                bar.close()
                return None
    bar.close()
    trained = TextPath([m.eval() for m in ema_text], text.encode, text.state)
    return trained, ema_dit.eval(), float(np.mean(recent))


def distill_guidance(cfg: TrainConfig, latents: torch.Tensor, captions: list[str], arch, text: TextPath, teacher):
    """Phase 4: a student that takes the guidance scale as input reproduces the teacher's CFG.

    The teacher's two branches (caption and empty prompt, guidance input 1 as in phase 3) give
    the target ``uncond + w (cond - uncond)``; the student sees the caption and ``w``. The text
    encoders stay the teacher's, frozen. Returns the student's EMA and its final loss.
    """
    teacher.requires_grad_(False)
    for module in text.modules:
        module.requires_grad_(False)
    student = copy.deepcopy(teacher).train().requires_grad_(True)
    ema_student = copy.deepcopy(student)
    opt = torch.optim.AdamW(student.parameters(), lr=cfg.distill_lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 4)
    batch = cfg.dit_batch
    bar = tqdm(range(cfg.distill_steps), desc="distill", file=sys.stdout, mininterval=15)
    recent: list[float] = []
    for step in bar:
        lr = cosine_lr(step, cfg.distill_steps, cfg.distill_lr, min(cfg.dit_warmup, cfg.distill_steps // 10 + 1))
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(latents), (batch,), generator=gen)
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = shifted_sigmas(torch.rand(batch, generator=gen), arch.flow_shift)
        scale = 1 + (cfg.distill_max_guidance - 1) * torch.rand(batch, generator=gen)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        batch_captions = [captions[i] for i in idx.tolist()]
        with torch.no_grad():
            both = text.encode(text.modules, batch_captions + [""] * batch)
            cond_uncond = arch.predict(teacher, torch.cat([xt, xt]), torch.cat([sigma, sigma]), both, None)
            cond, uncond = cond_uncond.chunk(2)
            target = uncond + scale.view(-1, 1, 1, 1, 1) * (cond - uncond)
            cond_text = {k: v[:batch] for k, v in both.items()}
        pred = arch.predict(student, xt, sigma, cond_text, scale)
        loss = F.mse_loss(pred, target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        ema_update(ema_student, student, cfg.ema_decay)
        recent = (recent + [loss.item()])[-200:]
        bar.set_postfix(loss=f"{np.mean(recent):.4f}", lr=f"{lr:.1e}", refresh=False)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.distill_steps:
            logger.info("distill step %d/%d guidance-distillation loss %.4f (last 200 steps) lr %.2e",
                        step + 1, cfg.distill_steps, np.mean(recent), lr)
    bar.close()
    return ema_student.eval(), float(np.mean(recent))


def initial_vae(cfg: TrainConfig, arch):
    """The VAE ``vae_init`` names (a built-in model's name or a model folder), to fine-tune in phase 1."""
    from sglang.multimodal_gen.runtime.models.loader import resolve_model_path

    from sglang.multimodal_gen.errors import ModelNotFoundError

    try:
        folder = resolve_model_path(cfg.vae_init)
    except ModelNotFoundError as exc:
        raise SystemExit(f"--vae-init: {exc}") from None
    return load_trained_vae(folder / "vae", cfg, arch, option="--vae-init")


def load_trained_vae(folder: Path, cfg: TrainConfig, arch, option: str = "--vae-from"):
    """A VAE saved by an earlier run, checked against ``cfg`` so a mismatch fails before the long phase."""
    if not (folder / "config.json").is_file():
        raise SystemExit(f"{option} {folder}: no config.json there; pass the vae/ folder of a finished run")
    class_name = json.loads((folder / "config.json").read_text()).get("_class_name")
    if class_name != arch.vae_class_name:
        raise SystemExit(f"{option} {folder}: a {class_name}, not a {arch.name} VAE ({arch.vae_class_name})")
    vae = arch.load_vae(folder)
    if arch.vae_base_dim(vae) != cfg.vae_base_dim:
        raise SystemExit(f"{option} {folder}: base dim {arch.vae_base_dim(vae)}, but this run's --vae-base-dim is {cfg.vae_base_dim}")
    return vae.eval()


def train(
    output: Path,
    cfg: TrainConfig,
    vae_from: Path | None = None,
    architecture: str = "wan",
    checkpoint_dir: Path | None = None,
    resume: bool = False,
    checkpoint_every: int = 1000,
    stop_after_steps: int | None = None,
) -> dict:
    """Run the phases and write the pipeline to ``output`` in the diffusers layout.

    ``vae_from`` (a ``vae/`` folder of an earlier run with the same VAE settings) skips phase 1;
    the result is the same as a full run's, since the later phases draw from their own seeds.
    ``checkpoint_dir`` keeps each finished phase and the transformer's state (see
    ``tools/training_checkpoint.py``); ``resume`` continues from it. A run that stops early
    (``stop_after_steps``) writes no pipeline and returns ``{"stopped_at_step": N}``.
    """
    arch = ARCHITECTURES[architecture]
    if cfg.distill_steps and not arch.guidance_distilled:
        raise SystemExit(f"--distill-steps: {architecture} runs classifier-free guidance, it has no guidance input to distill")
    if cfg.world not in WORLDS:
        raise SystemExit(f"--world {cfg.world}: not one of {', '.join(WORLDS)}")
    if (resume or stop_after_steps is not None) and checkpoint_dir is None:
        raise SystemExit("--resume and --stop-after-steps need --checkpoint-dir")
    start = time.time()
    output.mkdir(parents=True, exist_ok=True)
    checkpoint = TrainingCheckpoint(checkpoint_dir, cfg, resume) if checkpoint_dir is not None else None
    world = WORLDS[cfg.world]
    rng = np.random.default_rng(cfg.seed)
    logger.info("%s, %s world: %d training captions, %d held out", architecture, cfg.world, len(world.train_scenes), len(world.held_out))

    vae_loss = None
    if checkpoint is not None and checkpoint.has_vae():
        vae = load_trained_vae(checkpoint.vae_folder, cfg, arch, option="--resume")
        logger.info("vae: from the checkpoint")
    elif vae_from is None:
        vae, vae_loss = train_vae(cfg, rng, arch)
        if checkpoint is not None:
            checkpoint.save_vae(vae)
    else:
        vae = load_trained_vae(vae_from, cfg, arch)
    vae_time = time.time() - start
    if checkpoint is not None and checkpoint.has_latents():
        latents, captions, vae_metrics = checkpoint.load_latents()
        # The normalisation phase 2 wrote into the VAE config came back with the saved VAE.
    else:
        # Its own generator, so that a run reusing a VAE (--vae-from) encodes the same videos.
        latents, captions, vae_metrics = encode_dataset(vae, cfg, np.random.default_rng(cfg.seed + 3), arch)
        vae_metrics = {**vae_metrics, "vae_final_reconstruction_loss": None if vae_loss is None else round(vae_loss, 5)}
        if checkpoint is not None:
            checkpoint.save_vae(vae)
            checkpoint.save_latents(latents, captions, vae_metrics)
    checkpointing = Checkpointing(checkpoint, checkpoint_every, stop_after_steps) if checkpoint is not None else None
    trained = train_dit(cfg, latents, captions, arch, output, checkpointing)
    if trained is None:
        logger.info("stopped after dit step %d in %.1f min; continue with --resume", stop_after_steps, (time.time() - start) / 60)
        return {"stopped_at_step": stop_after_steps}
    text, transformer, dit_loss = trained
    distill_loss = None
    if cfg.distill_steps:
        transformer, distill_loss = distill_guidance(cfg, latents, captions, arch, text, transformer)

    arch.save(output, text, transformer, vae)
    if world.ships_held_out:
        (output / "heldout_prompts.txt").write_text("".join(f"{s.caption}\n" for s in world.held_out))
    summary = {
        "architecture": architecture,
        "config": asdict(cfg),
        "vae_from": None if vae_from is None else str(vae_from),
        **vae_metrics,
        "dit_final_flow_matching_loss": round(dit_loss, 5),
        "distill_final_loss": None if distill_loss is None else round(distill_loss, 5),
        "vae_minutes": None if vae_from is not None else round(vae_time / 60, 1),
        "total_minutes": round((time.time() - start) / 60, 1),
        "resumed": resume,
        "torch_threads": torch.get_num_threads(),
    }
    (output / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("done in %.1f min: %s", (time.time() - start) / 60, json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, type=Path, help="folder to write the diffusers layout to")
    parser.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="wan",
                        help="which pipeline to train (its defaults: HUNYUAN_DEFAULTS for hunyuan)")
    parser.add_argument("--world", choices=sorted(WORLDS), default="simple",
                        help="which synthetic world to train on (its defaults: WORLD_DEFAULTS)")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    parser.add_argument("--vae-from", type=Path, default=None, help="reuse the vae/ folder of an earlier run with the same VAE settings (skips phase 1)")
    parser.add_argument("--checkpoint-dir", type=Path, default=None,
                        help="keep finished phases and the transformer's state here, to --resume after a stop")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --checkpoint-dir")
    parser.add_argument("--checkpoint-every", type=int, default=1000, help="transformer steps between checkpoints (default 1000)")
    parser.add_argument("--stop-after-steps", type=int, default=None,
                        help="save a checkpoint after this transformer step and stop (continue later with --resume)")
    for field in fields(TrainConfig):
        if field.name == "world":
            continue
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=None,
                            help=f"default {field.default} (wan), {HUNYUAN_DEFAULTS.get(field.name, field.default)} (hunyuan), "
                                 f"{HARD_WORLD_DEFAULTS.get(field.name, field.default)} (wan, hard world)")
    args = parser.parse_args(argv)
    if args.checkpoint_every < 1:
        parser.error("--checkpoint-every must be at least 1")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    given = {f.name: getattr(args, f.name) for f in fields(TrainConfig) if f.name != "world" and getattr(args, f.name) is not None}
    cfg = default_config(args.architecture, args.world, **given)
    train(args.output, cfg, args.vae_from, args.architecture, args.checkpoint_dir, args.resume,
          args.checkpoint_every, args.stop_after_steps)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
