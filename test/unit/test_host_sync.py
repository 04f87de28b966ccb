"""The host-sync detector (test/host_sync.py) records what it documents, in and out of inference
mode (the pipeline runs in it, and there the reads dispatch other ops), records nothing for
device-side work, watches only between the first and last progress call, and always pops its modes."""

from __future__ import annotations

from typing import Callable

import numpy as np
import pytest
import torch
from host_sync import HostSyncDetector
from torch.overrides import _get_current_function_mode_stack
from torch.utils._python_dispatch import _get_current_dispatch_mode_stack

SYNCING: dict[str, Callable[[torch.Tensor], object]] = {
    "item": lambda x: x[0].item(),
    "float": lambda x: float(x[0]),
    "int": lambda x: int(x[0]),
    "bool": lambda x: bool(x[0] > 0),
    "if_any": lambda x: 1 if (x > 0).any() else 0,
    "format": lambda x: f"{x[0]:.2f}",
    "index_by_tensor": lambda x: x[x.argmax()],
    "tolist": lambda x: x.tolist(),
    "cpu": lambda x: x.cpu(),
    "to_cpu": lambda x: x.to("cpu"),
    "numpy": lambda x: x.numpy(),
    "np_asarray": lambda x: np.asarray(x),
    "nonzero": lambda x: x.nonzero(),
    "where_one_arg": lambda x: torch.where(x > 0),
    "nonzero_as_tuple": lambda x: x.nonzero(as_tuple=True),
    "argwhere": lambda x: torch.argwhere(x),
    "bincount": lambda x: torch.bincount(torch.ones(3, dtype=torch.long)),
    "repeat_interleave_method": lambda x: x.repeat_interleave(torch.ones(4, dtype=torch.long)),
    "mask_index": lambda x: x[x > 0],
    "mask_assign": lambda x: x.clone().__setitem__(x > 0, 0.0),
    "masked_select": lambda x: x.masked_select(x > 0),
    "unique": lambda x: x.unique(),
    "repeat_interleave": lambda x: torch.repeat_interleave(torch.ones(2, dtype=torch.long)),
    "equal": lambda x: torch.equal(x, x),
    "allclose": lambda x: torch.allclose(x, x),
    "tensor_to_device": lambda x: torch.tensor([1.0], device=x.device),
    "linalg_solve": lambda x: torch.linalg.solve(torch.eye(2) * 2, x[:2]),
    "linalg_inv": lambda x: torch.linalg.inv(torch.eye(2) * 2),
}

SYNC_FREE: dict[str, Callable[[torch.Tensor], object]] = {
    "arithmetic": lambda x: (x * 0.5 + x).abs().mean(),
    "to_dtype": lambda x: x.to(torch.float64),
    "to_own_device": lambda x: x.to(x.device),
    "shape": lambda x: x.shape[0] + x.numel(),
    "factories": lambda x: torch.ones(3, device=x.device) + torch.arange(3, device=x.device),
    "mask_fill": lambda x: x.masked_fill(x > 0, 0.0),
    "where_three_args": lambda x: torch.where(x > 0, x, 0.0),
    "repeat_interleave_sized": lambda x: torch.repeat_interleave(x, torch.ones(4, dtype=torch.long), output_size=4),
    "nonzero_static": lambda x: torch.nonzero_static(x, size=2),
    "host_scalar": lambda x: torch.tensor(0.5),
    "linalg_solve_ex": lambda x: torch.linalg.solve_ex(torch.eye(2) * 2, x[:2]).result,
}


@pytest.mark.parametrize("inference", [False, True], ids=["grad_mode", "inference_mode"])
@pytest.mark.parametrize("name", SYNCING)
def test_each_syncing_call_is_recorded(name, inference):
    x = torch.randn(4)
    detector = HostSyncDetector()
    with torch.inference_mode(inference), detector.watching():
        SYNCING[name](x)
    assert len(detector.events) >= 1, name
    assert all(event.caller.startswith(__file__) for event in detector.events), detector.report()


@pytest.mark.parametrize("inference", [False, True], ids=["grad_mode", "inference_mode"])
@pytest.mark.parametrize("name", SYNC_FREE)
def test_device_side_work_records_nothing(name, inference):
    x = torch.randn(4)
    detector = HostSyncDetector()
    with torch.inference_mode(inference), detector.watching():
        SYNC_FREE[name](x)
    assert detector.events == [], detector.report()


def test_progress_watches_from_the_first_to_the_last_call_and_names_the_step():
    x = torch.randn(4)
    detector = HostSyncDetector()
    with detector:
        x.tolist()  # before the loop
        for done in range(3):
            detector.progress(done, 3)
            x[0].item()
        detector.progress(3, 3)
        x.tolist()  # after it
    assert [event.step for event in detector.events] == [0, 1, 2]
    assert detector.steps_watched == 3


def test_the_modes_are_popped_when_the_loop_raises():
    detector = HostSyncDetector()
    with pytest.raises(RuntimeError, match="stop"), detector:
        detector.progress(0, 5)
        raise RuntimeError("stop")
    assert _get_current_function_mode_stack() == [] and _get_current_dispatch_mode_stack() == []
