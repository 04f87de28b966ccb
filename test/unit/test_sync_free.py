"""SolveWithoutErrorCheck: torch.linalg.solve bit for bit, without the host-side error check."""

from __future__ import annotations

import pytest
import torch
from host_sync import HostSyncDetector

from sglang.multimodal_gen.runtime.utils.sync_free import SolveWithoutErrorCheck


@pytest.mark.parametrize("a_shape, b_shape, left", [
    ((2, 2), (2,), True),        # UniPC's corrector at order 2
    ((3, 3), (3,), True),
    ((4, 3, 3), (4, 3, 5), True),
    ((3, 3), (5, 3), False),
])
@pytest.mark.parametrize("inference", [False, True])
def test_same_result_as_linalg_solve_without_a_sync(a_shape, b_shape, left, inference):
    generator = torch.Generator().manual_seed(0)
    a = torch.randn(a_shape, generator=generator) + 4 * torch.eye(a_shape[-1])
    b = torch.randn(b_shape, generator=generator)
    expected = torch.linalg.solve(a, b, left=left)
    detector = HostSyncDetector()
    with torch.inference_mode(inference), detector.watching(), SolveWithoutErrorCheck():
        result = torch.linalg.solve(a, b, left=left)
        other = torch.linalg.inv(a)  # anything else runs as it is
    assert torch.equal(result, expected)
    assert [event.op for event in detector.events] == ["aten.linalg_inv.default" if inference else
                                                       "aten._linalg_check_errors.default"], detector.report()
    assert torch.equal(other, torch.linalg.inv(a))
