"""The robustness benchmark's arithmetic: a cell's request geometry and the report's verdicts,
at their exact edges (a tie with plain steps at 2x fails; at 3x it passes; 1 dB below reuse passes)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmark"))

from robustness import cell_request  # noqa: E402
from robustness_configs import METHODS, Cell, cells  # noqa: E402
from robustness_report import markdown_table, summarise  # noqa: E402

from sglang.multimodal_gen.configs.sampling_params import SamplingParams  # noqa: E402
from sglang.multimodal_gen.runtime.pipelines.base import VideoGeometry  # noqa: E402

DEFAULTS = SamplingParams(prompt="p", height=64, width=64, num_frames=17, num_inference_steps=50, guidance_scale=5.0)
WAN = VideoGeometry(spatial_multiple=16, temporal_stride=4)


def test_cells_move_one_condition_each():
    assert cell_request(Cell("calibrated"), DEFAULTS, WAN) == {"height": 64, "width": 64, "num_frames": 17,
                                                               "num_inference_steps": 50, "guidance_scale": 5.0}
    assert cell_request(Cell("half", scale=0.5), DEFAULTS, WAN)["height"] == 32
    assert cell_request(Cell("1.5x", scale=1.5), DEFAULTS, WAN)["width"] == 96
    assert cell_request(Cell("1.5x", scale=1.5), DEFAULTS, VideoGeometry(40, 4))["width"] == 80  # 96 -> 2 x 40
    assert cell_request(Cell("double", frame_factor=2), DEFAULTS, WAN)["num_frames"] == 33  # 4k + 1 stays 4k + 1
    assert cell_request(Cell("g", {"guidance_scale": 9.0}), DEFAULTS, WAN)["guidance_scale"] == 9.0
    names = [c.name for c in cells("hunyuan")]
    assert "guidance 1" in names and "guidance 6" in names and len(names) == len(set(names)) == 11


def _rows(speedup: float, planner: list[float], plain: list[float], reuse: list[float]) -> list[dict]:
    return [{"cell": "c", "speedup": speedup, "psnr": dict(zip(METHODS, scores))}
            for scores in zip(planner, plain, reuse)]


@pytest.mark.parametrize(("speedup", "planner", "plain", "beats"), [
    (2.0, [40.0, 30.0], [39.0, 29.0], True),
    (2.0, [40.0, 29.0], [39.0, 29.0], False),  # the worst case ties: not beaten
    (2.0, [50.0, 28.0], [39.0, 29.0], False),  # a better mean does not hide a worse worst case
    (3.0, [39.0, 20.0], [38.0, 21.0], True),   # at 3x the mean alone: equal means pass
    (3.0, [37.0, 20.0], [39.0, 19.0], False),
])
def test_plain_steps_verdict(speedup, planner, plain, beats):
    (entry,) = summarise(_rows(speedup, planner, plain, planner))
    assert entry["beats_plain"] is beats and entry["near_reuse"] is True


def test_reuse_verdict_allows_one_db():
    (at_edge,) = summarise(_rows(2.0, [40.0, 40.0], [1.0, 1.0], [41.0, 41.0]))
    (beyond,) = summarise(_rows(2.0, [40.0, 40.0], [1.0, 1.0], [41.0, 41.1]))
    assert at_edge["near_reuse"] is True and beyond["near_reuse"] is False
    table = markdown_table([at_edge, beyond], METHODS)
    assert "| c | 2x | 40.0 / 40.0 | 1.0 / 1.0 | 41.0 / 41.0 | yes |" in table and "no: reuse" in table
