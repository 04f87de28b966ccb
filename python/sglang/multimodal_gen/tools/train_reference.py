"""Train the built-in reference model: a tiny Wan2.1 T2V pipeline on synthetic captioned videos.

Random weights make every cache look harmless (skipping half the steps changes the output by less
than 1e-3), so the built-in model is trained until it behaves like a real one: its block residuals
evolve over the steps and skipping them costs fidelity. Three phases, all with fixed seeds and a
fixed number of steps so that a rerun reproduces the weights:

1. the VAE (``AutoencoderKLWan``, tiny config with base dim 16) on 32x32 crops (it is
   convolutional) of the varied videos (``render(varied=True)``), first of 5-frame clips, then of
   whole 17-frame videos: L1 + MSE reconstruction of the posterior mean
   and a small KL term; then ``latents_mean`` / ``latents_std`` are set from the encoded training set,
   so the pipeline's latent normalisation is right;
2. the encoding of a fixed set of 17-frame training videos into normalised latents;
3. the transformer (``WanTransformer3DModel``) and the UMT5 text encoder together, by rectified
   flow in that latent space (sigma drawn like the scheduler's shifted sigmas, ``timestep = 1000 *
   sigma``, target ``noise - x0``, the ``flow_prediction`` the UniPC scheduler expects), with 10%
   of the captions replaced by the empty prompt (the default negative prompt) for guidance, and
   an EMA of both.

    python -m sglang.multimodal_gen.tools.train_reference --output python/sglang/multimodal_gen/builtin/wan2.1-t2v-tiny

About 57 minutes on one CPU thread (22 of them the VAE; ``--vae-from`` skips it). See
docs/reference-model.md.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import math
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from sglang.multimodal_gen.tools.synthetic_videos import HELD_OUT, TRAIN_SCENES, VIDEO_FRAMES, VIDEO_SIZE, sample_batch
from sglang.multimodal_gen.tools.tiny_models import (
    TINY_TEXT_LENGTH,
    TINY_UMT5,
    TINY_WAN_TRANSFORMER,
    TINY_WAN_VAE,
    WAN_SCHEDULER,
    save_wan_components,
    train_tokenizer,
)

logger = logging.getLogger("train_reference")

# The test models' transformer, a third wider (4 heads, ffn 384: 1.1M parameters), which learned
# the captions' shapes better than the narrower one given the same training time.
REFERENCE_TRANSFORMER: dict = {**TINY_WAN_TRANSFORMER, "num_attention_heads": 4, "ffn_dim": 384}
REFERENCE_VAE_BASE_DIM = 16

# Defaults the trained model is sampled with; written to its sglang_config.json.
SAMPLING_DEFAULTS = dict(
    num_inference_steps=50, guidance_scale=5.0, height=VIDEO_SIZE, width=VIDEO_SIZE, num_frames=VIDEO_FRAMES, fps=8
)


@dataclass
class TrainConfig:
    """Every knob of a training run; the defaults make the shipped model."""

    seed: int = 0
    vae_base_dim: int = REFERENCE_VAE_BASE_DIM
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
    log_every: int = 500


def cosine_lr(step: int, total: int, base: float, warmup: int) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))


def shifted_sigmas(u: torch.Tensor, shift: float) -> torch.Tensor:
    """The scheduler's ``flow_shift`` warp of uniform sigmas, so training sees the noise levels sampling uses."""
    return shift * u / (1 + (shift - 1) * u)


@torch.no_grad()
def ema_update(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def encode_text(tokenizer, text_encoder, captions: list[str]) -> torch.Tensor:
    """Batched version of the pipeline's T5 encoding: pad to the tokenizer's length, zero past the end."""
    tokens = tokenizer(
        captions, padding="max_length", max_length=TINY_TEXT_LENGTH, truncation=True, return_tensors="pt"
    )
    hidden = text_encoder(tokens.input_ids, tokens.attention_mask).last_hidden_state
    return hidden * tokens.attention_mask.unsqueeze(-1).to(hidden.dtype)


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR of two videos in [-1, 1] (peak-to-peak 2)."""
    mse = F.mse_loss(a, b).item()
    return 10 * math.log10(4.0 / max(mse, 1e-12))


def decode_unclamped(vae, z: torch.Tensor) -> torch.Tensor:
    """``AutoencoderKLWan.decode`` without its final clamp to [-1, 1], which stalls training.

    Colours near the ends of the range overshoot early on, and the clamp gives them no gradient.
    Same frame-by-frame causal decoding as diffusers' ``_decode`` (no tiling at these sizes).
    """
    vae.clear_cache()
    x = vae.post_quant_conv(z)
    frames = []
    for i in range(z.shape[2]):
        vae._conv_idx = [0]
        frames.append(vae.decoder(x[:, :, i : i + 1], feat_cache=vae._feat_map, feat_idx=vae._conv_idx, first_chunk=i == 0))
    vae.clear_cache()
    return torch.cat(frames, dim=2)


def train_vae(cfg: TrainConfig, rng: np.random.Generator):
    from diffusers import AutoencoderKLWan

    torch.manual_seed(cfg.seed)
    vae = AutoencoderKLWan(**{**TINY_WAN_VAE, "base_dim": cfg.vae_base_dim})
    opt = torch.optim.AdamW(vae.parameters(), lr=cfg.vae_lr, weight_decay=0.0)
    bar = tqdm(range(cfg.vae_steps), desc="vae", file=sys.stdout, mininterval=15)
    recent: list[float] = []
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = cosine_lr(step, cfg.vae_steps, cfg.vae_lr, 50)
        # Short clips first (fast, the spatial code); then whole videos, so that the causal
        # cache of every later 4-frame chunk is trained too (else frames past the fifth degrade).
        full = step >= cfg.vae_full_clips_from
        videos, _ = sample_batch(rng, cfg.vae_batch // 2 if full else cfg.vae_batch, varied=True)
        frames = VIDEO_FRAMES if full else cfg.vae_clip_frames
        start = int(rng.integers(0, VIDEO_FRAMES - frames + 1))
        top, left = rng.integers(0, VIDEO_SIZE - cfg.vae_crop + 1, size=2)
        clip = videos[:, :, start : start + frames, top : top + cfg.vae_crop, left : left + cfg.vae_crop]
        x = torch.from_numpy(np.ascontiguousarray(clip))
        posterior = vae.encode(x).latent_dist
        recon = decode_unclamped(vae, posterior.mode())
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
def encode_dataset(vae, cfg: TrainConfig, rng: np.random.Generator) -> tuple[torch.Tensor, list[str], dict]:
    """Encode ``num_videos`` training videos (posterior means) and measure the VAE on 17 frames."""
    latents, captions, psnrs = [], [], []
    chunk = 16
    for _ in tqdm(range(0, cfg.num_videos, chunk), desc="encode", file=sys.stdout, mininterval=15):
        videos, scenes = sample_batch(rng, chunk)
        x = torch.from_numpy(videos)
        z = vae.encode(x).latent_dist.mode()
        if len(psnrs) < 8:
            psnrs.append(psnr(vae.decode(z).sample.clamp(-1, 1), x))
        latents.append(z)
        captions += [s.caption for s in scenes]
    latents = torch.cat(latents)[: cfg.num_videos]
    mean = latents.mean(dim=(0, 2, 3, 4))
    std = latents.std(dim=(0, 2, 3, 4))
    vae.register_to_config(latents_mean=[round(v, 5) for v in mean.tolist()], latents_std=[round(v, 5) for v in std.tolist()])
    normalised = (latents - mean.view(1, -1, 1, 1, 1)) / std.view(1, -1, 1, 1, 1)
    logger.info("vae reconstruction of 17-frame videos: %.2f dB PSNR", float(np.mean(psnrs)))
    return normalised, captions[: cfg.num_videos], {"vae_psnr_db_17_frames": round(float(np.mean(psnrs)), 2)}


def train_dit(cfg: TrainConfig, latents: torch.Tensor, captions: list[str], tokenizer):
    from diffusers import WanTransformer3DModel
    from transformers import UMT5Config, UMT5EncoderModel

    torch.manual_seed(cfg.seed + 1)
    text_encoder = UMT5EncoderModel(UMT5Config(vocab_size=len(tokenizer), **TINY_UMT5))
    transformer = WanTransformer3DModel(**{**REFERENCE_TRANSFORMER, "text_dim": text_encoder.config.d_model})
    ema_text, ema_dit = copy.deepcopy(text_encoder), copy.deepcopy(transformer)
    params = list(transformer.parameters()) + list(text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=cfg.dit_lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 2)
    shift = WAN_SCHEDULER["flow_shift"]
    bar = tqdm(range(cfg.dit_steps), desc="dit", file=sys.stdout, mininterval=15)
    recent: list[float] = []
    for step in bar:
        lr = cosine_lr(step, cfg.dit_steps, cfg.dit_lr, cfg.dit_warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(latents), (cfg.dit_batch,), generator=gen)
        drop = torch.rand(cfg.dit_batch, generator=gen) < cfg.caption_dropout
        batch_captions = ["" if d else captions[i] for i, d in zip(idx.tolist(), drop.tolist())]
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = shifted_sigmas(torch.rand(cfg.dit_batch, generator=gen), shift)
        s = sigma.view(-1, 1, 1, 1, 1)
        xt = (1 - s) * x0 + s * noise
        text = encode_text(tokenizer, text_encoder, batch_captions)
        pred = transformer(xt, sigma * 1000, text, return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_update(ema_dit, transformer, cfg.ema_decay)
        ema_update(ema_text, text_encoder, cfg.ema_decay)
        recent = (recent + [loss.item()])[-200:]
        bar.set_postfix(loss=f"{np.mean(recent):.4f}", lr=f"{lr:.1e}", refresh=False)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.dit_steps:
            logger.info("dit step %d/%d flow-matching loss %.4f (last 200 steps) lr %.2e", step + 1, cfg.dit_steps, np.mean(recent), lr)
    bar.close()
    return ema_text.eval(), ema_dit.eval(), float(np.mean(recent))


def load_trained_vae(folder: Path, cfg: TrainConfig):
    """A VAE saved by an earlier run, checked against ``cfg`` so a mismatch fails before the long phase."""
    from diffusers import AutoencoderKLWan

    if not (folder / "config.json").is_file():
        raise SystemExit(f"--vae-from {folder}: no config.json there; pass the vae/ folder of a finished run")
    vae = AutoencoderKLWan.from_pretrained(folder)
    if vae.config.base_dim != cfg.vae_base_dim:
        raise SystemExit(f"--vae-from {folder}: base dim {vae.config.base_dim}, but this run's --vae-base-dim is {cfg.vae_base_dim}")
    return vae.eval()


def train(output: Path, cfg: TrainConfig, vae_from: Path | None = None) -> dict:
    """Run the three phases and write the pipeline to ``output`` in the diffusers layout.

    ``vae_from`` (a ``vae/`` folder of an earlier run with the same VAE settings) skips phase 1;
    the result is the same as a full run's, since the later phases draw from their own seeds.
    """
    from transformers import AutoTokenizer

    start = time.time()
    output.mkdir(parents=True, exist_ok=True)
    train_tokenizer(output / "tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(output / "tokenizer")
    rng = np.random.default_rng(cfg.seed)
    logger.info("%d training captions, %d held out", len(TRAIN_SCENES), len(HELD_OUT))

    if vae_from is None:
        vae, vae_loss = train_vae(cfg, rng)
    else:
        vae, vae_loss = load_trained_vae(vae_from, cfg), None
    vae_time = time.time() - start
    # Its own generator, so that a run reusing a VAE (--vae-from) encodes the same videos.
    latents, captions, vae_metrics = encode_dataset(vae, cfg, np.random.default_rng(cfg.seed + 3))
    text_encoder, transformer, dit_loss = train_dit(cfg, latents, captions, tokenizer)

    save_wan_components(output, text_encoder, transformer, vae)
    # The prompt length it was trained with, so our pipeline (and a parity run) pad to it.
    overrides = {"sampling_defaults": SAMPLING_DEFAULTS, "text_max_length": TINY_TEXT_LENGTH}
    (output / "sglang_config.json").write_text(json.dumps(overrides, indent=2) + "\n")
    summary = {
        "config": asdict(cfg),
        "vae_final_reconstruction_loss": None if vae_loss is None else round(vae_loss, 5),
        "vae_from": None if vae_from is None else str(vae_from),
        **vae_metrics,
        "dit_final_flow_matching_loss": round(dit_loss, 5),
        "vae_minutes": None if vae_from is not None else round(vae_time / 60, 1),
        "total_minutes": round((time.time() - start) / 60, 1),
        "torch_threads": torch.get_num_threads(),
    }
    (output / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("done in %.1f min: %s", (time.time() - start) / 60, json.dumps(summary))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", required=True, type=Path, help="folder to write the diffusers layout to")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    parser.add_argument("--vae-from", type=Path, default=None, help="reuse the vae/ folder of an earlier run with the same VAE settings (skips phase 1)")
    for name, value in asdict(TrainConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(**{k: getattr(args, k) for k in asdict(TrainConfig())})
    train(args.output, cfg, args.vae_from)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
