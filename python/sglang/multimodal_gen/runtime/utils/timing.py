"""Timing device work from the host without a host sync per measurement."""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, field
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
        step_seconds: Per step closed by :meth:`PassTimer.end_step`, its time.
        step_passes: Per such step, the entries of ``pass_seconds`` timed within it.
        step_rest: Per such step, the entries of every :meth:`PassTimer.time_rest` within it
            (the model's work outside the passes, per branch, counted as ``pass_seconds`` are).
    """

    total_seconds: float
    pass_seconds: list[float]
    step_seconds: list[float] = field(default_factory=list)
    step_passes: list[list[float]] = field(default_factory=list)
    step_rest: list[list[float]] = field(default_factory=list)


class PassTimer:
    """Times a loop, its steps, each of its repeated passes (the DiT blocks) and the model's work
    around them (embed, head), syncing once at the end.

    On CUDA every mark is a ``torch.cuda.Event`` recorded on the device's current stream, so the
    loop never waits for the GPU; :meth:`finish` synchronizes on the last event and only then reads
    every ``elapsed_time``. On other devices the work runs on the host thread and
    ``time.perf_counter`` around a call is its cost.
    """

    def __init__(self, device: torch.device, per_step: bool = True) -> None:
        """``per_step=False``: :meth:`time_rest` and :meth:`end_step` mark nothing (a loop that
        needs only its total and its passes records no more events than that)."""
        self.device = device
        self._cuda = device.type == "cuda"
        self._per_step = per_step
        self._start: _Mark | None = None
        self._passes: list[tuple[_Mark, _Mark, int, int]] = []
        self._rest: list[tuple[_Mark, _Mark, int, int]] = []
        self._step_ends: list[_Mark] = []

    def start(self) -> None:
        """Mark the start of the loop and forget what was timed before."""
        self._passes, self._rest, self._step_ends = [], [], []
        self._start = self._mark()

    @contextmanager
    def time_pass(self, count: int = 1) -> Iterator[None]:
        """Time the body as one pass over ``count`` branches (a pass that raises is not recorded)."""
        begin = self._mark()
        yield
        self._passes.append((begin, self._mark(), count, len(self._step_ends)))

    @contextmanager
    def time_rest(self, count: int = 1) -> Iterator[None]:
        """Time the body as model work outside the passes (embed or head) over ``count`` branches."""
        if not self._per_step:
            yield
            return
        begin = self._mark()
        yield
        self._rest.append((begin, self._mark(), count, len(self._step_ends)))

    def end_step(self) -> None:
        """Mark the end of a step of the loop."""
        if self._per_step:
            self._step_ends.append(self._mark())

    def finish(self) -> PassTiming:
        """Mark the end of the loop, wait for the device once, and return every measurement."""
        if self._start is None:
            raise RuntimeError("PassTimer.finish() called before start()")
        end = self._mark()
        if self._cuda:
            end.synchronize()
        bounds = [self._start, *self._step_ends]
        steps = len(self._step_ends)

        def per_item(spans: list[tuple[_Mark, _Mark, int, int]]) -> list[tuple[int, float]]:
            return [(step, self._seconds(begin, stop) / count)
                    for begin, stop, count, step in spans for _ in range(count)]

        def by_step(items: list[tuple[int, float]]) -> list[list[float]]:
            grouped: list[list[float]] = [[] for _ in range(steps)]
            for step, seconds in items:
                if step < steps:
                    grouped[step].append(seconds)
            return grouped

        passes, rest = per_item(self._passes), per_item(self._rest)
        timing = PassTiming(
            total_seconds=self._seconds(self._start, end),
            pass_seconds=[seconds for _, seconds in passes],
            step_seconds=[self._seconds(bounds[k], bounds[k + 1]) for k in range(steps)],
            step_passes=by_step(passes),
            step_rest=by_step(rest),
        )
        self._start, self._passes, self._rest, self._step_ends = None, [], [], []
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


def device_label(device: torch.device) -> str:
    """What a timing was measured on: ``cpu``, or the CUDA device's name (timings of one kind of
    GPU do not carry over to another)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return device.type
