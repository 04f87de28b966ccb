"""PassTimer: one entry per timed pass, passes inside the loop's span, reusable per request."""

from __future__ import annotations

import pytest
import torch

from sglang.multimodal_gen.runtime.utils.timing import PassTimer


def _run(timer: PassTimer, device: torch.device, passes: int) -> None:
    x = torch.randn(64, 64, device=device)
    timer.start()
    for _ in range(passes):
        _ = x @ x  # untimed work between passes, as embed and head are
        with timer.time_pass():
            x = torch.tanh(x @ x)


@pytest.mark.parametrize(
    "device",
    ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"))],
)
def test_passes_are_counted_and_lie_within_the_span(device):
    timer = PassTimer(torch.device(device))
    _run(timer, torch.device(device), passes=5)
    timing = timer.finish()
    assert len(timing.pass_seconds) == 5
    assert all(s > 0 for s in timing.pass_seconds)
    assert timing.total_seconds >= sum(timing.pass_seconds)


def test_start_forgets_earlier_passes_and_a_failed_pass_is_not_recorded():
    timer = PassTimer(torch.device("cpu"))
    _run(timer, torch.device("cpu"), passes=3)
    _run(timer, torch.device("cpu"), passes=2)
    with pytest.raises(ValueError):
        with timer.time_pass():
            raise ValueError("blocks failed")
    assert len(timer.finish().pass_seconds) == 2


def test_finish_needs_start():
    timer = PassTimer(torch.device("cpu"))
    with pytest.raises(RuntimeError, match="before start"):
        timer.finish()
    _run(timer, torch.device("cpu"), passes=1)
    timer.finish()
    with pytest.raises(RuntimeError, match="before start"):
        timer.finish()


def test_a_pass_over_a_batch_counts_once_per_branch_at_its_share_of_the_time():
    timer = PassTimer(torch.device("cpu"))
    x = torch.randn(64, 64)
    timer.start()
    with timer.time_pass(count=2):
        x = torch.tanh(x @ x)
    with timer.time_pass():
        x = torch.tanh(x @ x)
    timing = timer.finish()
    assert len(timing.pass_seconds) == 3
    assert timing.pass_seconds[0] == timing.pass_seconds[1] > 0
    assert timing.total_seconds >= sum(timing.pass_seconds)


def test_steps_collect_their_passes_and_the_work_around_them():
    timer = PassTimer(torch.device("cpu"))
    x = torch.randn(64, 64)
    timer.start()
    for _ in range(3):
        with timer.time_rest(count=2):
            x = torch.tanh(x @ x)
        with timer.time_pass(count=2):
            x = torch.tanh(x @ x)
        _ = x @ x  # the step's tail: timed only as part of the step
        timer.end_step()
    timing = timer.finish()
    assert len(timing.step_seconds) == 3
    assert [len(p) for p in timing.step_passes] == [2, 2, 2]
    assert [len(r) for r in timing.step_rest] == [2, 2, 2]
    for total, passes, rest in zip(timing.step_seconds, timing.step_passes, timing.step_rest):
        assert total >= sum(passes) + sum(rest) > 0
    assert timing.total_seconds >= sum(timing.step_seconds)


def test_without_per_step_detail_only_the_loop_and_its_passes_are_timed():
    timer = PassTimer(torch.device("cpu"), per_step=False)
    x = torch.randn(64, 64)
    timer.start()
    for _ in range(3):
        with timer.time_rest():
            x = torch.tanh(x @ x)
        with timer.time_pass():
            x = torch.tanh(x @ x)
        timer.end_step()
    timing = timer.finish()
    assert len(timing.pass_seconds) == 3
    assert timing.step_seconds == [] and timing.step_passes == [] and timing.step_rest == []
