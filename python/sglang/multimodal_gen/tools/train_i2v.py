"""Make a tiny Wan2.1 I2V-style reference: an image-to-video model fine-tuned from a trained T2V model.

Wan2.1 I2V is the T2V transformer with two additions: the patch embedding takes 36 channels (16
noise, then a 4-channel mask and the 16 normalised VAE latents of the first frame followed by black
frames), and the cross-attention also attends to the CLIP vision model's ``hidden_states[-2]`` of
the first frame. Here the transformer starts from a trained Wan folder (by default
``wan2.1-t2v-tiny-hard``): every source weight is copied, the 20 new input channels and the image
attention's value projection start at zero, so step 0 behaves as the T2V model; a tiny random
``CLIPVisionModel`` stays frozen (its features still carry the image). Training is rectified flow
on videos of the world, each conditioned on its own first frame, prepared by
:class:`WanImageConditioningStage` exactly as the pipeline prepares it at inference.

    python -m sglang.multimodal_gen.tools.train_i2v --checkpoint-dir ckpt/i2v \
        --output python/sglang/multimodal_gen/builtin/wan2.1-i2v-tiny

``--checkpoint-dir`` keeps the encoded latents, conditions and CLIP embeddings and the training
state every ``--checkpoint-every`` steps; ``--resume`` continues from there bit for bit.
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
from PIL import Image
from tqdm.auto import tqdm

from sglang.multimodal_gen.configs.models import WAN_I2V_TEXT_LENGTH
from sglang.multimodal_gen.tools.tiny_models import TINY_CLIP_VISION, WAN_COMPONENTS, write_model_index
from sglang.multimodal_gen.tools.train_experts import FineTuneConfig, SourceModel, caption_embeddings, load_source
from sglang.multimodal_gen.tools.train_reference import cosine_lr, ema_update, shifted_sigmas
from sglang.multimodal_gen.tools.synthetic_videos import WORLDS, parse_caption, sample_batch
from sglang.multimodal_gen.tools.training_checkpoint import TrainingCheckpoint, encoded_once, fine_tune_main

logger = logging.getLogger("train_i2v")

# Noise channels (the VAE's z_dim) plus the 4-channel mask and the condition latents.
MASK_CHANNELS = 4
# Seeds of the renders of the shipped first frames (held-out and calibration scenes).
HELDOUT_SEED = 1234
CALIBRATION_SEED = 4321


@dataclass
class I2VTrainConfig(FineTuneConfig):
    """Every knob of an I2V fine-tuning run; the defaults make the shipped ``wan2.1-i2v-tiny``."""

    # About 75 minutes on one CPU thread at the measured 1.77 it/s (batch 16), after about 10
    # minutes of encoding the videos.
    steps: int = 8000
    log_every: int = 250


@dataclass
class ImageSide:
    """The frozen CLIP image encoder and its processor, as the I2V folder ships them."""

    image_encoder: torch.nn.Module
    image_processor: object


def new_image_side(cfg: I2VTrainConfig) -> ImageSide:
    """A tiny random ``CLIPVisionModel`` and a processor resizing and cropping to its size, as
    ``build_tiny_wan21_i2v`` makes them."""
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModel

    torch.manual_seed(cfg.seed + 1)
    encoder = CLIPVisionModel(CLIPVisionConfig(**TINY_CLIP_VISION)).eval().requires_grad_(False)
    side = TINY_CLIP_VISION["image_size"]
    processor = CLIPImageProcessor(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
    return ImageSide(encoder, processor)


def i2v_transformer(source: SourceModel, cfg: I2VTrainConfig) -> torch.nn.Module:
    """The source transformer widened to take the image, starting as the source model behaves.

    Every source weight of the same shape is copied; the patch embedding's first ``z_dim`` input
    channels are the source's and the rest zero; the image attention's value projection is zero,
    so the image branch adds nothing until training moves it.
    """
    from diffusers import WanTransformer3DModel

    config = dict(source.transformer.config)
    z_dim = config["in_channels"]
    width = config["num_attention_heads"] * config["attention_head_dim"]
    config.update(in_channels=2 * z_dim + MASK_CHANNELS, image_dim=TINY_CLIP_VISION["hidden_size"],
                  added_kv_proj_dim=width)
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(cfg.seed + 2)
    model = WanTransformer3DModel(**config)
    state = model.state_dict()
    copied = 0
    for name, value in source.transformer.state_dict().items():
        if name == "patch_embedding.weight":
            state[name].zero_()
            state[name][:, :z_dim] = value
        elif state[name].shape == value.shape:
            state[name].copy_(value)
        else:
            raise SystemExit(f"--source: {name} is {tuple(value.shape)}, the I2V model's {tuple(state[name].shape)}")
        copied += 1
    for name in state:
        if ".attn2.add_v_proj." in name:
            state[name].zero_()
    model.load_state_dict(state)
    logger.info("transformer: %d source tensors copied, %d new", copied, len(state) - copied)
    return model


@torch.no_grad()
def encode_videos(source: SourceModel, image: ImageSide, cfg: I2VTrainConfig
                  ) -> tuple[torch.Tensor, list[str], dict[str, torch.Tensor]]:
    """The videos' normalised latents, captions, and their first frames' conditions and CLIP
    embeddings as :class:`WanImageConditioningStage` makes them (the encoders are frozen)."""
    from sglang.multimodal_gen.runtime.stages.image_conditioning import WanImageConditioningStage

    stage = WanImageConditioningStage(source.vae, torch.device("cpu"), torch.float32, geometry=None,
                                      image_processor=image.image_processor, image_encoder=image.image_encoder)
    rng = np.random.default_rng(cfg.seed + 3)
    latents, captions, conditions, image_embeds = [], [], [], []
    chunk = min(16, cfg.num_videos)
    for _ in tqdm(range(0, cfg.num_videos, chunk), desc="encode", file=sys.stdout, mininterval=15):
        videos, scenes = sample_batch(rng, chunk, WORLDS[cfg.world].train_scenes, world=cfg.world)
        latents.append(stage.encode_video(torch.from_numpy(videos)))
        captions += [s.caption for s in scenes]
        _, _, frames, height, width = videos.shape
        for video in videos:
            first = first_frame(video)
            frame = stage.video_processor.preprocess(first, height=height, width=width)
            conditions.append(stage.encode_condition(frame, frames))
            image_embeds.append(stage.encode_image(first))
    n = cfg.num_videos
    return (torch.cat(latents)[:n], captions[:n],
            {"conditions": torch.cat(conditions)[:n], "image_embeds": torch.cat(image_embeds)[:n]})


def first_frame(video: np.ndarray) -> Image.Image:
    """Frame 0 of a ``(3, F, H, W)`` video in [-1, 1] as the RGB image it was rendered as."""
    pixels = np.rint((video[:, 0].transpose(1, 2, 0) + 1.0) * 127.5).clip(0, 255).astype(np.uint8)
    return Image.fromarray(pixels)


def pad_text(embeddings: torch.Tensor) -> torch.Tensor:
    """Caption embeddings zero-padded to the I2V text length, as the pipeline pads them."""
    return F.pad(embeddings, (0, 0, 0, WAN_I2V_TEXT_LENGTH - embeddings.shape[1]))


def train(source: SourceModel, cfg: I2VTrainConfig, latents: torch.Tensor, inputs: dict[str, torch.Tensor],
          embeddings: torch.Tensor, caption_ids: list[int], checkpoint: TrainingCheckpoint | None,
          every: int) -> tuple[torch.nn.Module, float]:
    """The I2V transformer by rectified flow; returns its EMA copy and its recent loss."""
    torch.manual_seed(cfg.seed + 10)
    model = i2v_transformer(source, cfg).train().requires_grad_(True)
    ema = copy.deepcopy(model).requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(cfg.seed + 20)
    ids = torch.tensor(caption_ids)
    empty = len(embeddings) - 1
    recent: list[float] = []
    first = 0
    saved = checkpoint.load_dit() if checkpoint else None
    if saved is not None:
        model.load_state_dict(saved["model"])
        ema.load_state_dict(saved["ema"])
        opt.load_state_dict(saved["optimizer"])
        gen.set_state(saved["generator"])
        torch.set_rng_state(saved["torch_rng"])
        recent, first = saved["recent"], saved["step"]
        logger.info("resuming at step %d/%d", first, cfg.steps)

    def save(step: int) -> None:
        checkpoint.save_dit({
            "step": step, "model": model.state_dict(), "ema": ema.state_dict(), "optimizer": opt.state_dict(),
            "generator": gen.get_state(), "torch_rng": torch.get_rng_state(), "recent": recent,
        })

    bar = tqdm(range(first, cfg.steps), desc="i2v", file=sys.stdout, mininterval=15, initial=first, total=cfg.steps)
    for step in bar:
        lr = cosine_lr(step, cfg.steps, cfg.lr, cfg.warmup)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.randint(0, len(latents), (cfg.batch,), generator=gen)
        drop = torch.rand(cfg.batch, generator=gen) < cfg.caption_dropout
        text = pad_text(embeddings[torch.where(drop, torch.full_like(idx, empty), ids[idx])])
        x0 = latents[idx]
        noise = torch.randn(x0.shape, generator=gen)
        sigma = shifted_sigmas(torch.rand(cfg.batch, generator=gen), source.flow_shift)
        s = sigma.view(-1, 1, 1, 1, 1)
        noisy = torch.cat([(1 - s) * x0 + s * noise, inputs["conditions"][idx]], dim=1)
        pred = model(noisy, sigma * 1000, text, inputs["image_embeds"][idx], return_dict=False)[0]
        loss = F.mse_loss(pred, noise - x0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        ema_update(ema, model, cfg.ema_decay)
        recent = (recent + [loss.item()])[-200:]
        bar.set_postfix(loss=f"{np.mean(recent):.4f}", lr=f"{lr:.1e}", refresh=False)
        if (step + 1) % cfg.log_every == 0 or step + 1 == cfg.steps:
            logger.info("step %d/%d flow-matching loss %.4f (last 200 steps)", step + 1, cfg.steps, np.mean(recent))
        if checkpoint and ((step + 1) % every == 0 or step + 1 == cfg.steps):
            save(step + 1)
    bar.close()
    return ema.eval(), float(np.mean(recent))


def write_prompt_images(output: Path, name: str, scenes, seed: int, world_name: str) -> None:
    """Each scene's first frame (rendered with a fixed seed, so the PNGs are reproducible) as
    ``NAME/NNN.png`` and ``NAME_prompts.txt`` lines ``NAME/NNN.png<TAB>caption``, the I2V
    prompts-file format."""
    world = WORLDS[world_name]
    rng = np.random.default_rng(seed)
    (output / name).mkdir(parents=True, exist_ok=True)
    lines = []
    for i, scene in enumerate(scenes):
        frames = world.render(scene, rng)
        Image.fromarray(frames[0]).save(output / name / f"{i:03d}.png")
        lines.append(f"{name}/{i:03d}.png\t{scene.caption}\n")
    (output / f"{name}_prompts.txt").write_text("".join(lines))


def write_prompts(output: Path, source: SourceModel, cfg: I2VTrainConfig) -> None:
    """``heldout_prompts.txt`` (the world's held-out scenes, never trained on) and
    ``calibration_prompts.txt`` (the source model's calibration captions, training scenes), each
    with its first frames."""
    write_prompt_images(output, "heldout", WORLDS[cfg.world].held_out, HELDOUT_SEED, cfg.world)
    captions = (source.folder / "calibration_prompts.txt").read_text().splitlines()
    scenes = [parse_caption(caption) for caption in captions if caption.strip()]
    write_prompt_images(output, "calibration", scenes, CALIBRATION_SEED, cfg.world)


def save_folder(output: Path, source: SourceModel, image: ImageSide, transformer: torch.nn.Module,
                cfg: I2VTrainConfig) -> None:
    """The ``WanImageToVideoPipeline`` diffusers layout, as ``build_tiny_wan21_i2v`` writes it."""
    output.mkdir(parents=True, exist_ok=True)
    for part in ("text_encoder", "tokenizer", "vae", "scheduler"):
        shutil.copytree(source.folder / part, output / part, dirs_exist_ok=True)
    transformer.save_pretrained(output / "transformer", safe_serialization=True)
    image.image_encoder.save_pretrained(output / "image_encoder", safe_serialization=True)
    image.image_processor.save_pretrained(output / "image_processor")
    components = {**WAN_COMPONENTS, "image_encoder": ["transformers", "CLIPVisionModel"],
                  "image_processor": ["transformers", "CLIPImageProcessor"]}
    write_model_index(output, "WanImageToVideoPipeline", dict(sorted(components.items())))
    source_config = json.loads((source.folder / "sglang_config.json").read_text())
    source_config.pop("cache_calibration_file", None)
    # The transformer splits the image tokens from the last 512 (the text), as diffusers does.
    source_config["text_max_length"] = WAN_I2V_TEXT_LENGTH
    (output / "sglang_config.json").write_text(json.dumps(source_config, indent=2) + "\n")
    write_prompts(output, source, cfg)


def train_i2v(output: Path, cfg: I2VTrainConfig, checkpoint_dir: Path | None = None, resume: bool = False,
              checkpoint_every: int = 250) -> dict:
    start = time.time()
    source = load_source(cfg)
    image = new_image_side(cfg)
    checkpoint = TrainingCheckpoint(checkpoint_dir, cfg, resume) if checkpoint_dir is not None else None
    latents, captions, inputs = encoded_once(checkpoint, lambda: encode_videos(source, image, cfg))
    embeddings, caption_ids = caption_embeddings(source, captions)
    train_start = time.time()
    transformer, loss = train(source, cfg, latents, inputs, embeddings, caption_ids, checkpoint, checkpoint_every)
    train_seconds = time.time() - train_start
    save_folder(output, source, image, transformer, cfg)
    summary = {"config": asdict(cfg), "final_training_loss": round(loss, 5),
               "total_minutes": round((time.time() - start) / 60, 1),
               "training_minutes_this_session": round(train_seconds / 60, 1),
               "resumed": resume, "torch_threads": torch.get_num_threads()}
    (output / "training_summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    logger.info("done in %.1f min, final loss %.4f", (time.time() - start) / 60, loss)
    return summary


def main(argv: list[str] | None = None) -> int:
    return fine_tune_main(__doc__.split("\n\n")[0], I2VTrainConfig, train_i2v,
                          output_help="folder to write the I2V diffusers layout to", checkpoint_every=250, argv=argv)


if __name__ == "__main__":
    raise SystemExit(main())
