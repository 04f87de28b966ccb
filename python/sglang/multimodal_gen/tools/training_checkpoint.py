"""A training run's checkpoint folder, so a run of hours can stop and continue bit for bit.

``tools/train_reference.py`` runs its phases in order; this folder keeps what each finished phase
made and, during the transformer phase, everything its next step depends on:

- ``config.json``: the run's :class:`TrainConfig`; a resume with any other config is refused;
- ``vae/``: the VAE after phase 1 (and, once phase 2 ran, with its latent normalisation);
- ``latents.pt``: phase 2's normalised latents, captions and VAE measurements;
- ``dit.pt``: the transformer phase at a step: weights, EMA copies, optimizer state, the batch
  generator's and torch's global random state, the recent losses and the minutes spent so far.

Each file is written to a temporary name and renamed, so a run killed while writing leaves the
previous checkpoint whole.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from dataclasses import asdict, fields
from pathlib import Path
from typing import Any, Callable

import torch


class TrainingCheckpoint:
    """The checkpoint folder of one run; ``resume`` says whether what it holds may be used."""

    def __init__(self, folder: Path, config: Any, resume: bool):
        self.folder = folder
        config_file = folder / "config.json"
        wanted = asdict(config)
        if config_file.is_file():
            if not resume:
                raise SystemExit(f"--checkpoint-dir {folder} holds a run already; pass --resume to continue it, or another folder")
            saved = json.loads(config_file.read_text())
            if saved != wanted:
                differ = sorted(k for k in set(saved) | set(wanted) if saved.get(k) != wanted.get(k))
                raise SystemExit(f"--resume: {folder} holds a run with other settings ({', '.join(differ)}); rerun with its settings")
        elif resume:
            raise SystemExit(f"--resume: no checkpoint in {folder}")
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(config_file, lambda path: path.write_text(json.dumps(wanted, indent=2) + "\n"))

    @property
    def vae_folder(self) -> Path:
        return self.folder / "vae"

    def has_vae(self) -> bool:
        return (self.vae_folder / "config.json").is_file()

    def save_vae(self, vae) -> None:
        tmp = self.folder / "vae.tmp"
        vae.save_pretrained(tmp)
        if self.vae_folder.exists():
            for child in self.vae_folder.iterdir():
                child.unlink()
            self.vae_folder.rmdir()
        tmp.rename(self.vae_folder)

    def has_latents(self) -> bool:
        return (self.folder / "latents.pt").is_file()

    def save_latents(self, latents: torch.Tensor, captions: list[str], metrics: dict) -> None:
        _write_atomic(self.folder / "latents.pt",
                      lambda path: torch.save({"latents": latents, "captions": captions, "metrics": metrics}, path))

    def load_latents(self) -> tuple[torch.Tensor, list[str], dict]:
        saved = torch.load(self.folder / "latents.pt", weights_only=True)
        return saved["latents"], saved["captions"], saved["metrics"]

    def load_dit(self) -> dict | None:
        path = self.folder / "dit.pt"
        return torch.load(path, weights_only=False) if path.is_file() else None

    def save_dit(self, state: dict) -> None:
        _write_atomic(self.folder / "dit.pt", lambda path: torch.save(state, path))


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def encoded_once(checkpoint: TrainingCheckpoint | None, encode: Callable[[], tuple]) -> tuple:
    """``(latents, captions, inputs)``: the checkpoint's, or ``encode()``'s, kept in the checkpoint
    so a resumed run trains on the same encoded videos."""
    if checkpoint is not None and checkpoint.has_latents():
        return checkpoint.load_latents()
    encoded = encode()
    if checkpoint is not None:
        checkpoint.save_latents(*encoded)
    return encoded


def fine_tune_main(description: str, config_class: type, train: Callable[..., Any], output_help: str,
                   checkpoint_every: int, argv: list[str] | None = None) -> int:
    """The command line of a fine-tuning script (``train_experts``, ``train_i2v``): ``--output``,
    ``--threads``, checkpointing and ``--resume``, and one flag per field of ``config_class``; calls
    ``train(output, config, checkpoint_dir, resume, checkpoint_every)``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--output", required=True, type=Path, help=output_help)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (results depend on it)")
    parser.add_argument("--checkpoint-dir", type=Path, default=None, help="keep the inputs and the training state here")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --checkpoint-dir")
    parser.add_argument("--checkpoint-every", type=int, default=checkpoint_every,
                        help=f"steps between checkpoints (default {checkpoint_every})")
    for field in fields(config_class):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default,
                            help=f"default {field.default}")
    args = parser.parse_args(argv)
    if args.checkpoint_every < 1:
        parser.error("--checkpoint-every must be at least 1")
    if args.resume and args.checkpoint_dir is None:
        parser.error("--resume needs --checkpoint-dir")
    from sglang.multimodal_gen.tools.synthetic_videos import WORLDS

    if getattr(args, "world", None) is not None and args.world not in WORLDS:
        parser.error(f"--world {args.world}: not one of {', '.join(WORLDS)}")
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stdout)
    import torch

    torch.set_num_threads(args.threads)
    config = config_class(**{f.name: getattr(args, f.name) for f in fields(config_class)})
    train(args.output, config, args.checkpoint_dir, args.resume, args.checkpoint_every)
    return 0
