"""The DiT adapter contract: a transformer's forward split into embed -> blocks -> head.

The split lets the denoising stage run or skip the expensive blocks alone. Adapters wrap the
diffusers module without copying its weights and know nothing of caching; they expose a few
conditioning signals (``modulated_input``, ``timestep_projection``) that strategies may read.
"""

from __future__ import annotations

import abc
import dataclasses
import logging
from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

logger = logging.getLogger(__name__)

#: Field metadata of a context tensor whose first dimension is the batch (one row per CFG branch
#: when the branches run as one batch); :meth:`DiTStepContext.select` takes rows of these only.
PER_ITEM = {"per_item": True}


@dataclass
class DiTStepContext:
    """What ``blocks`` and ``head`` need besides the hidden states, for one step and branch (or a
    batch of branches).

    Attributes:
        timestep: The timestep fed to the model (shape ``(batch,)``).
        modulated_input: The timestep-modulated input of the first block's conditioning, exposed
            for input-aware strategies (TeaCache).
        timestep_projection: The per-block modulation projection, where the model has one (Wan).
    """

    timestep: torch.Tensor = field(metadata=PER_ITEM)
    modulated_input: torch.Tensor | None = field(default=None, metadata=PER_ITEM)
    timestep_projection: torch.Tensor | None = field(default=None, metadata=PER_ITEM)

    def select(self, rows: Sequence[int]) -> "DiTStepContext":
        """This context for the batch items ``rows``: with the CFG branches in one batch, the blocks
        run for the branches that compute only. Fields marked :data:`PER_ITEM` are cut; the rest
        (rotary tables, shapes) is shared by every item."""
        changes = {
            f.name: take_rows(getattr(self, f.name), rows)
            for f in dataclasses.fields(self)
            if f.metadata.get("per_item") and getattr(self, f.name) is not None
        }
        return dataclasses.replace(self, **changes)


def take_rows(tensor: torch.Tensor, rows: Sequence[int]) -> torch.Tensor:
    """``tensor[rows]`` by slicing (views, no index tensor to copy to the device)."""
    rows = list(rows)
    if rows == list(range(tensor.shape[0])):
        return tensor
    if len(rows) == 1:
        return tensor[rows[0]:rows[0] + 1]
    return torch.cat([tensor[i:i + 1] for i in rows])


class DiTAdapter(abc.ABC):
    """Wraps one diffusers transformer. ``head(blocks(*embed(...)))`` equals its own forward.

    An adapter has no dtype of its own: diffusers keeps some modules of a half-precision model in
    fp32 (Wan's time embedder and norms), so no parameter tells the compute dtype. The pipeline,
    which chose it, hands it to the stage that prepares the adapter's inputs.

    Under Ulysses sequence parallelism (``runtime/distributed/sequence_parallel.py``) ``embed``
    returns this rank's shard of the image tokens, ``blocks`` maps a shard to a shard (a cached
    residual is the rank's own) and ``head`` returns the whole prediction on every rank.
    """

    def __init__(self, transformer: torch.nn.Module) -> None:
        self.transformer = transformer

    def request_constants(
        self, latents: torch.Tensor, encoder_hidden_states: torch.Tensor, **kwargs
    ) -> dict[str, Any]:
        """Inputs of ``embed`` that stay the same for every step of a request: computed once per
        request and branch (or batch of branches) before the first step and passed back to
        ``embed`` as keyword arguments, so a step does not redo them. ``embed`` without them
        computes them itself; either way the output is the same. The default hoists nothing.

        Args:
            latents: The first step's model input (only its shape may be used: it changes per step).
            encoder_hidden_states, kwargs: What ``embed`` gets at every step.
        """
        return {}

    @abc.abstractmethod
    def embed(
        self, latents: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, **kwargs
    ) -> tuple[torch.Tensor, DiTStepContext]:
        """Patchify and condition: the cheap part before the blocks. Returns (hidden, context)."""

    @abc.abstractmethod
    def blocks(self, hidden_states: torch.Tensor, ctx: DiTStepContext) -> torch.Tensor:
        """The transformer blocks: the expensive part a cache may skip."""

    @abc.abstractmethod
    def head(self, hidden_states: torch.Tensor, ctx: DiTStepContext) -> torch.Tensor:
        """Output norm, projection and unpatchify back to latent shape."""

    @abc.abstractmethod
    def block_modules(self) -> list[torch.nn.Module]:
        """The repeated transformer blocks ``blocks`` runs, in order: what :meth:`compile_blocks` compiles."""

    def compile_blocks(self, **compile_kwargs: Any) -> None:
        """Regional compilation: ``torch.compile`` each transformer block in place, nothing else.

        ``embed``, ``head`` and whatever runs between them (a cache's decision and its state) stay
        eager, so a cached run compiles the same graphs as an uncached one. Blocks of one class
        share one graph (torch inlines built-in modules and passes their weights as inputs), so a
        model compiles one graph per block class, input memory layout and shape, on the first
        call of that shape.
        ``compile_kwargs`` go to ``torch.compile`` (``backend``, ``mode``, ``dynamic``, ...).
        diffusers' ``compile_repeated_blocks`` is not used: HunyuanVideo's ``_repeated_blocks``
        also names modules that run in ``embed`` (the patch embedding and the token refiner).
        """
        blocks = self.block_modules()
        kinds = ", ".join(sorted({type(block).__name__ for block in blocks}))
        logger.info("torch.compile: %d transformer blocks (%s); the first request of each new shape compiles them",
                    len(blocks), kinds)
        for block in blocks:
            block.compile(**compile_kwargs)

    def forward(
        self, latents: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor, **kwargs
    ) -> torch.Tensor:
        hidden, ctx = self.embed(latents, timestep, encoder_hidden_states, **kwargs)
        return self.head(self.blocks(hidden, ctx), ctx)
