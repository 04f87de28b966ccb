"""The frontier benchmark's arithmetic: the TaylorSeer setting nearest a pass count (by diffusers'
own rule, counted from its hook) and the report's summary and bold marks."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benchmark"))

from frontier_configs import taylorseer_settings  # noqa: E402
from frontier_report import markdown_table, summarise  # noqa: E402


def diffusers_computed_steps(settings: dict, steps: int) -> int:
    """Steps on which diffusers' TaylorSeer hook runs the module, asked of the hook itself."""
    from diffusers.hooks.taylorseer_cache import TaylorSeerCacheHook, TaylorSeerState

    hook = TaylorSeerCacheHook(settings["cache_interval"], settings["disable_cache_before_step"], torch.float32,
                               state_manager=None)
    state = TaylorSeerState()
    hook.state_manager = type("Manager", (), {"get_state": staticmethod(lambda: state)})()
    return sum(hook._measure_should_compute()[0] for _ in range(steps))


@pytest.mark.parametrize("steps", [20, 50])
@pytest.mark.parametrize("speedup", [1.5, 2.0, 2.5, 3.0])
def test_taylorseer_settings_hit_the_pass_count_by_diffusers_rule(steps, speedup):
    passes = int(steps / speedup + 0.5)
    settings = taylorseer_settings(passes, steps)
    assert settings["use_lite_mode"] and settings["max_order"] == 1
    assert diffusers_computed_steps(settings, steps) == passes


def test_summary_is_mean_and_worst_with_pass_ranges_and_bold_bests():
    rows = [dict(method=m, speedup=2.0, passes=p, psnr=v, ssim=0.9, seconds=s, uncached_seconds=2.0)
            for m, p, v, s in [("a", 25, 40.0, 1.0), ("a", 25, 30.0, 1.0), ("b", 24, 38.0, None), ("b", 26, 36.0, None),
                               ("b", 26, 37.0, None)]]
    summary = {e["method"]: e for e in summarise(rows)}
    assert summary["a"]["psnr_mean"] == 35.0 and summary["a"]["psnr_worst"] == 30.0
    assert summary["a"]["measured"] == 2.0 and summary["b"]["measured"] is None
    assert summary["b"]["passes"] == [24, 26] and summary["b"]["passes_mean"] == pytest.approx(76 / 3)
    assert summary["b"]["psnr_worst"] == 36.0
    table = markdown_table(list(summary.values()), ["a", "b"])
    assert "| 2x | a | 25 | 2.00x | 35.0 | 30.0 |" in table
    assert "| 2x | b | 25.3 (24-26) |  | **37.0** | **36.0** |" in table
