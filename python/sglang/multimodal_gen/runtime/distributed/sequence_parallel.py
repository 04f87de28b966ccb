"""Ulysses sequence parallelism: image tokens sharded over the sp group, heads exchanged in attention.

As DeepSpeed-Ulysses (Jacobs et al., 2023) and xDiT's USP do it. Every rank of the sp group holds
one contiguous shard of the image-token sequence, ``ceil(S / U)`` tokens (fewer on the last
rank(s) when ``U`` does not divide ``S``: ``embed`` returns and a cache stores only real tokens;
the adapter's ``blocks`` pads its shard with zero tokens to ``ceil(S / U)`` and cuts the padding
off its output, and the head pads for its one all-gather). Everything per token (norms, projections,
feed-forward, modulation) runs on the shard. Attention is the one place tokens meet: there one
all-to-all turns each rank's ``(S/U tokens, H heads)`` of q, k and v into ``(S tokens, H/U
heads)``, the padding is cut off so attention sees exactly the ``S`` real tokens (no mask, the
same keys as one process), and a second all-to-all turns the output back. Nothing gathers the
whole sequence of activations; only the model's output is gathered, once, in the adapter's head.

Text tokens are replicated on every rank. Wan's cross-attention needs no exchange (queries are
independent of each other; keys and values come from the text). HunyuanVideo's joint attention
appends each rank's slice of the text heads after the exchanged image tokens and gathers the text
output over heads (:meth:`UlyssesExchange.head_slice`, :meth:`UlyssesExchange.gather_heads`).

The model adapters (``runtime/models/wan.py``, ``hunyuan.py``) shard in ``embed``, install their
Ulysses attention processors for ``blocks`` and gather in ``head``; this module holds what is not
model-specific: the shard layout and the exchange. A cache statistic over tokens (TeaCache's
relative L1 on HunyuanVideo's per-token indicator) is taken per shard and summed over the sp group
by the reducer ``cfg_parallel.BranchPlacement.attach`` installs (``get_sp_group().all_reduce``).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch

from sglang.multimodal_gen.errors import InvalidRequestError
from sglang.multimodal_gen.runtime.distributed.parallel_state import GroupCoordinator, get_sp_group


def check_heads(num_heads: int, degree: int, model: str) -> None:
    """Refuse, in one line, a Ulysses degree that does not divide the attention heads: each rank
    attends over ``heads / degree`` of them. The one wording of the rule: the generator checks it
    before any process starts, an adapter again when it runs inside an sp group."""
    if num_heads % degree:
        raise InvalidRequestError(
            f"--ulysses-degree {degree} does not divide the {num_heads} attention heads of {model}; "
            f"use a degree that divides {num_heads}",
            param="ulysses_degree",
        )


@dataclass(frozen=True)
class SequenceShard:
    """One rank's contiguous part of a ``seq_len``-token sequence split over ``world_size`` ranks.

    Rank ``r`` holds tokens ``[r * local_len, (r + 1) * local_len)`` of the sequence padded to
    ``world_size * local_len``: the padding (zero tokens) sits at the end of the whole sequence,
    so on the last rank(s) only; ``real_len`` of a shard's ``local_len`` tokens are real.
    """

    seq_len: int
    world_size: int = 1
    rank: int = 0

    @property
    def local_len(self) -> int:
        return math.ceil(self.seq_len / self.world_size)

    @property
    def padded_len(self) -> int:
        return self.local_len * self.world_size

    @property
    def start(self) -> int:
        return min(self.rank * self.local_len, self.seq_len)

    @property
    def real_len(self) -> int:
        return min(self.start + self.local_len, self.seq_len) - self.start

    def take(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's real tokens of a whole-sequence tensor (no padding)."""
        return tensor.narrow(dim, self.start, self.real_len)

    def pad(self, tensor: torch.Tensor, dim: int = 1, length: int | None = None) -> torch.Tensor:
        """``tensor`` zero-padded along ``dim`` to ``length`` (default ``local_len``) tokens."""
        missing = (self.local_len if length is None else length) - tensor.shape[dim]
        if missing == 0:
            return tensor
        shape = list(tensor.shape)
        shape[dim] = missing
        return torch.cat([tensor, tensor.new_zeros(shape)], dim=dim)

    def shard(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This rank's ``local_len`` tokens of a whole-sequence tensor, padded."""
        return self.pad(self.take(tensor, dim), dim)

    def unpad(self, tensor: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """A shard (``local_len`` tokens) without its padding (``real_len`` tokens)."""
        return tensor.narrow(dim, 0, self.real_len)


class UlyssesExchange:
    """The head exchange of one sp group, for tensors laid out ``(batch, tokens, heads, head_dim)``.

    Attention processors call :meth:`to_heads` on q, k and v and :meth:`to_tokens` on the output,
    inside :meth:`sequence`, which the adapter opens around its blocks to say how long the real
    sequence is. Every collective goes through the group coordinator (``parallel_state``).
    """

    def __init__(self, group: GroupCoordinator) -> None:
        self.group = group
        self._shard: SequenceShard | None = None

    @property
    def degree(self) -> int:
        return self.group.world_size

    @contextlib.contextmanager
    def sequence(self, shard: SequenceShard) -> Iterator[None]:
        """The sequence layout of the blocks run inside this block."""
        previous, self._shard = self._shard, shard
        try:
            yield
        finally:
            self._shard = previous

    @property
    def shard(self) -> SequenceShard:
        if self._shard is None:
            raise RuntimeError("Ulysses attention ran outside UlyssesExchange.sequence(): the adapter must open it")
        return self._shard

    def to_heads(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(B, local_len, H, D)`` on each rank -> ``(B, seq_len, H/U, D)``: the whole real sequence
        for this rank's heads (one all-to-all; the padding is cut off)."""
        full = self.group.all_to_all(tensor, scatter_dim=2, gather_dim=1)
        return full.narrow(1, 0, self.shard.seq_len)

    def to_tokens(self, tensor: torch.Tensor) -> torch.Tensor:
        """``(B, seq_len, H/U, D)`` -> ``(B, local_len, H, D)``: back to this rank's tokens, every head."""
        padded = self.shard.pad(tensor, dim=1, length=self.shard.padded_len)
        return self.group.all_to_all(padded.contiguous(), scatter_dim=1, gather_dim=2)

    def head_slice(self, tensor: torch.Tensor) -> torch.Tensor:
        """This rank's heads of a replicated ``(B, T, H, D)`` tensor (text tokens)."""
        heads = tensor.shape[2] // self.degree
        return tensor.narrow(2, self.group.rank_in_group * heads, heads)

    def gather_heads(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's heads of a ``(B, T, H/U, D)`` tensor, in order (the text's attention output)."""
        return self.group.all_gather(tensor.contiguous(), dim=2)


def gather_sequence(tensor: torch.Tensor, shard: SequenceShard, group: GroupCoordinator | None = None) -> torch.Tensor:
    """The whole sequence from every rank's real tokens (padded for one all-gather along the tokens)."""
    group = group or get_sp_group()
    if group.world_size == 1:
        return tensor
    return group.all_gather(shard.pad(tensor, dim=1).contiguous(), dim=1).narrow(1, 0, shard.seq_len)


def local_shard(seq_len: int, group: GroupCoordinator | None = None) -> SequenceShard:
    """This process's shard of a ``seq_len``-token sequence over the sp group."""
    group = group or get_sp_group()
    return SequenceShard(seq_len, group.world_size, group.rank_in_group)


class UlyssesAttention:
    """An adapter's attention modules under Ulysses: while the sp group has more than one rank they
    run ``make(exchange, backend)`` processors (``backend``: the stock processor's attention
    backend), otherwise their stock processors. The adapter calls :meth:`follow_sp_group` at each
    ``embed``: in the driver process the groups are active only while a request runs.

    Args:
        attentions: The diffusers attention modules whose processor is swapped.
        make: Builds the Ulysses processor of one module.
        num_heads: The model's attention heads, which the degree must divide.
        model: What the model is, for the refusal (``"this Wan transformer"``).
    """

    def __init__(self, attentions: Sequence[Any], make: Callable[[UlyssesExchange, Any], Any], num_heads: int,
                 model: str) -> None:
        self.attentions = list(attentions)
        self.stock = [attention.processor for attention in self.attentions]
        self.make, self.num_heads, self.model = make, num_heads, model
        self.exchange: UlyssesExchange | None = None

    def follow_sp_group(self) -> UlyssesExchange | None:
        """Install the processors for the current sp group; its exchange, or None without one."""
        group = get_sp_group()
        if self.exchange is not None and self.exchange.group is group:
            return self.exchange
        if group.world_size == 1:
            if self.exchange is not None:
                for attention, processor in zip(self.attentions, self.stock):
                    attention.set_processor(processor)
                self.exchange = None
            return None
        check_heads(self.num_heads, group.world_size, self.model)
        self.exchange = UlyssesExchange(group)
        for attention, stock in zip(self.attentions, self.stock):
            attention.set_processor(self.make(self.exchange, getattr(stock, "_attention_backend", None)))
        return self.exchange
