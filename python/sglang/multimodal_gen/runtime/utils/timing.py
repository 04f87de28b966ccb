"""Timing device work from the host without a host sync per measurement."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Union

import torch

# A point in time: a recorded CUDA event, or a perf_counter reading where the device is the host.
_Mark = Union[torch.cuda.Event, float]


@dataclass(frozen=True)
class PassTiming:
    """What a :class:`PassTimer` measured.

    Attributes:
        total_seconds: From :meth:`PassTimer.start` to :meth:`PassTimer.finish`.
        pass_seconds: One entry per item of every :meth:`PassTimer.time_pass`, in the order
            they ran: a pass over a batch of ``count`` CFG branches gives ``count`` entries of a
            ``count``-th of its time each, so their mean is the time of one branch's pass.
    """

    total_seconds: float
    pass_seconds: list[float]


class PassTimer:
    """Times a loop and each of its repeated passes (the DiT blocks), syncing once at the end.

    On CUDA every mark is a ``torch.cuda.Event`` recorded on the device's current stream, so the
    loop never waits for the GPU; :meth:`finish` synchronizes on the last event and only then reads
    every ``elapsed_time``. On other devices the work runs on the host thread and
    ``time.perf_counter`` around a call is its cost.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._cuda = device.type == "cuda"
        self._start: _Mark | None = None
        self._passes: list[tuple[_Mark, _Mark, int]] = []

    def start(self) -> None:
        """Mark the start of the loop and forget passes timed before."""
        self._passes = []
        self._start = self._mark()

    @contextmanager
    def time_pass(self, count: int = 1) -> Iterator[None]:
        """Time the body as one pass over ``count`` branches (a pass that raises is not recorded)."""
        begin = self._mark()
        yield
        self._passes.append((begin, self._mark(), count))

    def finish(self) -> PassTiming:
        """Mark the end of the loop, wait for the device once, and return every measurement."""
        if self._start is None:
            raise RuntimeError("PassTimer.finish() called before start()")
        end = self._mark()
        if self._cuda:
            end.synchronize()
        timing = PassTiming(
            total_seconds=self._seconds(self._start, end),
            pass_seconds=[self._seconds(begin, stop) / count
                          for begin, stop, count in self._passes for _ in range(count)],
        )
        self._start, self._passes = None, []
        return timing

    def _mark(self) -> _Mark:
        if not self._cuda:
            return time.perf_counter()
        event = torch.cuda.Event(enable_timing=True)
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _seconds(self, begin: _Mark, end: _Mark) -> float:
        if self._cuda:
            return begin.elapsed_time(end) / 1000.0
        return end - begin
