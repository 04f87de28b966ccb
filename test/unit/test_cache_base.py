"""The TimestepCache contract: per-branch state, forced first compute, stats, calibration, registry."""

from __future__ import annotations

import pytest
import torch

from sglang.multimodal_gen.runtime.cache import (
    COND,
    UNCOND,
    CacheConfigError,
    StepFeatures,
    TimestepCache,
    get_cache_class,
    register_cache,
)
from sglang.multimodal_gen.runtime.cache.base import BranchStats, CacheStats, format_steps, threshold_above


class EveryOther(TimestepCache):
    """Skips odd steps; counts its own decisions to show reset() reaches subclass state."""

    name = "every-other"

    def _reset_strategy_state(self) -> None:
        self.decisions = 0

    def _decide(self, step: int, branch: str, features: StepFeatures) -> bool:
        self.decisions += 1
        return step % 2 == 0


def feats(step: int = 0) -> StepFeatures:
    return StepFeatures(timestep=torch.tensor([1000.0 - step]), modulated_input=torch.full((1, 4), 1.0 + step))


def drive(cache: TimestepCache, residual_of) -> dict[str, list[torch.Tensor]]:
    used: dict[str, list[torch.Tensor]] = {b: [] for b in cache.branches}
    for step in range(cache.num_inference_steps):
        for branch in cache.branches:
            if cache.should_compute(step, branch, feats(step)):
                residual = residual_of(step, branch)
                cache.store(step, branch, residual)
            else:
                residual = cache.reuse(step, branch)
            used[branch].append(residual)
    return used


def test_residuals_stay_per_branch():
    cache = EveryOther(None, 6)
    used = drive(cache, lambda step, branch: torch.full((1, 2, 3), step + (100.0 if branch == UNCOND else 0.0)))
    assert [r[0, 0, 0].item() for r in used[COND]] == [0, 0, 2, 2, 4, 4]
    assert [r[0, 0, 0].item() for r in used[UNCOND]] == [100, 100, 102, 102, 104, 104]


def test_stats_and_summary():
    cache = EveryOther(None, 6)
    drive(cache, lambda step, branch: torch.ones(1, 2, 3))
    stats = cache.stats
    assert stats.branches[COND].computed_steps == [0, 2, 4] and stats.branches[COND].skipped_steps == [1, 3, 5]
    assert (stats.total_computed, stats.total_skipped, stats.pass_reduction) == (6, 6, 2.0)
    assert stats.summary() == "every-other: computed 3 of 6 steps per branch (2.00x fewer transformer passes)"
    assert stats.to_dict()["branches"][UNCOND] == {
        "computed": 3, "skipped": 3, "computed_steps": [0, 2, 4], "skipped_steps": [1, 3, 5]
    }



def _stats(cond_skipped: list[int], uncond_skipped: list[int], steps: int = 20) -> CacheStats:
    def branch(skipped: list[int]) -> BranchStats:
        return BranchStats(computed_steps=[s for s in range(steps) if s not in skipped], skipped_steps=list(skipped))

    return CacheStats("magcache", steps, {COND: branch(cond_skipped), UNCOND: branch(uncond_skipped)})


def test_uncached_estimate_adds_skipped_passes_at_the_mean_pass_time():
    stats = _stats([10, 12, 14, 15, 16], [10, 12])  # 7 skipped, 33 computed passes
    assert stats.uncached_estimate_seconds is None and stats.measured_speedup is None
    assert stats.timing_line() is None and stats.to_dict()["measured_speedup"] is None
    stats.record_timing(4.0, [0.1, 0.3] * 16 + [0.2])  # mean 0.2 s over 33 passes
    assert stats.timed_passes == 33 and stats.blocks_pass_seconds == pytest.approx(0.2)
    assert stats.uncached_estimate_seconds == pytest.approx(4.0 + 7 * 0.2)
    assert stats.measured_speedup == pytest.approx(5.4 / 4.0)
    assert stats.timing_line() == "denoising 4.00 s, uncached estimate 5.40 s (1.35x measured)"
    figures = stats.to_dict()
    assert figures["denoising_seconds"] == 4.0 and figures["blocks_pass_seconds"] == pytest.approx(0.2)
    assert figures["timed_passes"] == 33 and figures["uncached_estimate_seconds"] == pytest.approx(5.4)
    assert figures["measured_speedup"] == pytest.approx(1.35)
    assert figures["pass_reduction"] == round(40 / 33, 4)  # the ideal figure stays


def test_a_compiling_pass_is_not_charged_to_every_skipped_step():
    """The first request with --enable-torch-compile: one pass took 20 s to compile, the rest 0.1 s."""
    stats = _stats([10, 12, 14, 15, 16], [10, 12])  # 7 skipped, 33 computed passes
    stats.record_timing(24.0, [20.0] + [0.1] * 30 + [0.4, 0.41])  # 0.4 is within 4x the median; 0.41 is not
    assert stats.timed_passes == 33 and stats.blocks_pass_seconds == pytest.approx((3.0 + 0.4) / 31)
    assert stats.uncached_estimate_seconds == pytest.approx(24.0 + 7 * 3.4 / 31)


def test_no_skips_estimate_equals_measured_time():
    stats = _stats([], [])
    stats.record_timing(3.0, [0.15] * 40)
    assert stats.uncached_estimate_seconds == 3.0 and stats.measured_speedup == 1.0
    assert stats.timing_line() == "denoising 3.00 s, uncached estimate 3.00 s (1.00x measured)"


def test_format_steps_as_compact_ranges():
    assert format_steps([10, 12, 14, 15, 16]) == "10,12,14-16"
    assert format_steps([16, 14, 15, 3]) == "3,14-16"
    assert format_steps([4, 5, 7, 8, 19]) == "4-5,7-8,19"
    assert format_steps([7]) == "7"
    assert format_steps([]) == "none"


def test_skipped_line_per_branch():
    assert _stats([10, 12, 14, 15, 16], [10, 12, 14, 15, 16]).skipped_line() == (
        "skipped steps: cond 10,12,14-16 | uncond 10,12,14-16"
    )
    assert _stats([3, 4], []).skipped_line() == "skipped steps: cond 3-4 | uncond none"
    assert _stats([], []).skipped_line() == "skipped steps: cond none | uncond none"
    assert CacheStats("magcache", 4).skipped_line() == "skipped steps: none"

def test_first_step_is_forced_without_residual():
    class NeverCompute(EveryOther):
        def _decide(self, step, branch, features):
            return False

    cache = NeverCompute(None, 3, branches=(COND,))
    assert cache.should_compute(0, COND, feats())
    with pytest.raises(RuntimeError, match="before any residual"):
        cache.reuse(0, COND)
    cache.store(0, COND, torch.ones(2))
    assert not cache.should_compute(1, COND, feats(1))


def test_reset_gives_a_fresh_state():
    cache = EveryOther(None, 4)
    drive(cache, lambda step, branch: torch.ones(2))
    assert cache.decisions == 8
    cache.reset()
    assert cache.decisions == 0 and cache.stats.total_computed == 0
    assert cache.should_compute(0, COND, feats())  # no residual left over
    with pytest.raises(RuntimeError):
        cache.reuse(1, UNCOND)


def test_calibration_never_skips_and_records_per_branch():
    cache = EveryOther(None, 5, calibrate=True)
    drive(cache, lambda step, branch: torch.full((1, 3, 4), 2.0 ** step if branch == COND else 1.0))
    assert cache.stats.total_skipped == 0 and cache.decisions == 0
    cond, uncond = cache.calibration_records()[COND], cache.calibration_records()[UNCOND]
    for record in (cond, uncond):
        for values in (record.mag_ratio, record.mag_ratio_std, record.cosine_distance, record.input_change,
                       record.output_change):
            assert len(values) == 5
    assert cond.mag_ratio == pytest.approx([1.0, 2.0, 2.0, 2.0, 2.0])
    assert uncond.mag_ratio == pytest.approx([1.0] * 5)
    assert cond.input_change[1] == pytest.approx(1.0)  # modulated input 1 -> 2
    assert cond.cosine_distance == pytest.approx([0.0] * 5, abs=1e-6)


def test_contract_errors():
    cache = EveryOther(None, 3)
    with pytest.raises(KeyError, match="unknown CFG branch 'neg'"):
        cache.should_compute(0, "neg", feats())
    with pytest.raises(IndexError, match=r"step 3 outside \[0, 3\)"):
        cache.should_compute(3, COND, feats())
    with pytest.raises(CacheConfigError, match="at least 1"):
        EveryOther(None, 0)
    with pytest.raises(CacheConfigError, match="distinct"):
        EveryOther(None, 3, branches=(COND, COND))


def test_registry():
    with pytest.raises(CacheConfigError, match=r"unknown cache strategy 'x'; choose one of: none, .*magcache"):
        get_cache_class("x")
    assert get_cache_class("magcache").name == "magcache"
    with pytest.raises(TypeError, match="already registered"):
        register_cache(type("Other", (EveryOther,), {"name": "magcache"}))
    with pytest.raises(TypeError, match="non-empty"):
        register_cache(type("Nameless", (EveryOther,), {"name": ""}))


def test_relative_l1_and_mean_abs_in_one_process():
    cache = EveryOther(None, 4)
    assert cache.relative_l1(torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0])) == pytest.approx(1.0)
    assert cache.relative_l1(torch.zeros(3), torch.zeros(3)) == 0.0
    values = torch.randn(5, 7, generator=torch.Generator().manual_seed(0))
    # One process: exactly the float32 means the release code takes.
    assert cache.mean_abs(values, values[:2]) == [values.abs().mean().item(), values[:2].abs().mean().item()]
    assert cache.relative_l1(values, values.flip(0)) == (
        (values - values.flip(0)).abs().mean() / values.flip(0).abs().mean()).item()


def test_a_strategy_without_its_own_no_skip_reason_reports_none():
    cache = EveryOther(None, 2)
    drive(cache, lambda step, branch: torch.ones(1))
    assert cache.no_skip_reason() is None


@pytest.mark.parametrize(
    "value, suggested",
    [(0.25, 0.26), (0.2134, 0.22), (0.22, 0.23), (0.0732, 0.074), (0.0699999, 0.07), (0.999, 1.0), (0.0, 0.01)],
)
def test_threshold_above_is_the_next_two_digit_value_strictly_above(value, suggested):
    assert threshold_above(value) == suggested
    assert threshold_above(value) > value
