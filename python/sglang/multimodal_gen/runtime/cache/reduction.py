"""Statistics over tokens wherever they are held: on one process, or summed over the processes
that hold a sequence's shards (Ulysses), so that every rank takes the same decision.

A statistic is a per-process float32 mean; it goes through the installed reducer as a sum
(``mean x count``, in float64) with its count, and is divided back after. In one process the
reducer returns its input and every statistic is the plain float32 mean, bit for bit.
"""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

#: Sums over tokens -> the same sums over every process holding part of the tokens.
Reducer = Callable[[torch.Tensor], torch.Tensor]


def local_statistic(sums: torch.Tensor) -> torch.Tensor:
    """The statistic reducer of a single process: this process holds every tensor whole."""
    return sums


def local_decision(step: int, decision: bool | None) -> bool | None:
    """The decision exchange of a single process: every branch's decision is taken here."""
    return decision


def to_float32(value: float) -> float:
    """``value`` rounded to float32, as a Python float (what ``.item()`` of a float32 tensor gives)."""
    return torch.tensor(value, dtype=torch.float32).item()


class TokenStatistics:
    """The statistics a strategy or calibration takes over tokens, through one reducer.

    Args:
        reducer: Where the sums go before they are divided (:data:`local_statistic` in one
            process; a multi-process run installs an all-reduce over a sequence shard's processes).
    """

    def __init__(self, reducer: Reducer = local_statistic) -> None:
        self.reducer = reducer

    def mean_abs(self, *tensors: torch.Tensor) -> list[float]:
        """The mean absolute value of each tensor, over all of it wherever its parts are held:
        each process's float32 ``abs().mean()`` (as the release code takes it), combined in one
        host sync."""
        return self.float32_means([t.detach().float().abs().mean() for t in tensors], [t.numel() for t in tensors])

    def relative_l1(self, current: torch.Tensor, previous: torch.Tensor) -> float:
        """TeaCache's ``mean|current - previous| / mean|previous|``, over all tokens wherever held.

        The two means are taken per process in float32, as the release's ``teacache_forward`` does:
        in one process the result is the release's bit for bit; over a sequence shard's processes
        it is the whole sequence's.
        """
        previous = previous.float()
        change, scale = self.float32_means(
            [(current.float() - previous).abs().mean(), previous.abs().mean()], [previous.numel()] * 2
        )
        scale_tensor = torch.tensor(scale, dtype=torch.float32).clamp_min(1e-12)
        return (torch.tensor(change, dtype=torch.float32) / scale_tensor).item()

    def sums(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        """Per-process sums (0-dim tensors) -> the sums over every process, in float64 and left on
        the device: for statistics the loop keeps as tensors, so nothing is read back to the host."""
        return self.reducer(torch.stack([v.double() for v in values]))

    def float32_means(self, means: Sequence[torch.Tensor], counts: Sequence[int]) -> list[float]:
        """Per-process float32 means, ``means[i]`` over ``counts[i]`` elements -> the means over
        every process: the one place a statistic over tokens meets the reducer.

        Each mean goes through the reducer as a sum, ``mean x count`` in float64, with its count
        (one host sync), and is divided back after and rounded to float32. In one process the
        round trip returns each float32 mean exactly (``mean x count`` is exact in float64 below
        2**29 elements and rounds back to the same float32 beyond); a process holding no element
        adds nothing (its mean would be nan).
        """
        local = torch.stack(list(means)).double()
        n = torch.tensor([float(c) for c in counts], dtype=torch.float64, device=local.device)
        local = torch.where(n > 0, local * n, torch.zeros_like(local))
        reduced = self.reducer(torch.cat([local, n])).tolist()
        k = len(counts)
        return [to_float32(total / c) if c else 0.0 for total, c in zip(reduced[:k], reduced[k:])]

    def float32_std(self, values: torch.Tensor, local_mean: torch.Tensor, mean: float) -> float:
        """The standard deviation (unbiased) of ``values`` over every process, given the mean over
        every process: each process's squared deviations from it, from its own float32 std and
        mean (Chan et al.'s parallel rule), summed by the reducer. In one process the correction
        term is 0 and the result is ``values.std()`` bit for bit (0.0 for fewer than 2 values)."""
        n = values.numel()
        squares = torch.zeros((), dtype=torch.float64, device=values.device)
        if n > 1:
            squares = values.std().double() ** 2 * (n - 1)
        if n > 0:
            squares = squares + n * (local_mean.double() - mean) ** 2
        count = torch.tensor(float(n), dtype=torch.float64, device=values.device)
        total, total_n = self.reducer(torch.stack([squares, count])).tolist()
        return to_float32(math.sqrt(total / (total_n - 1))) if total_n > 1 else 0.0
