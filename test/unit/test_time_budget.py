"""A speedup as a time budget: passes from what a skipped step still costs, the step costs'
arithmetic from a timed run, and the refusal when no pass count meets the budget."""

from __future__ import annotations

import pytest

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.runtime.cache import build_cache
from sglang.multimodal_gen.runtime.cache.branches import COND, UNCOND
from sglang.multimodal_gen.runtime.cache.budget import (
    StepCosts,
    budget_passes,
    checked_budget_passes,
    predicted_speedup,
)
from sglang.multimodal_gen.runtime.cache.validation import CacheConfigError


def test_free_skipped_steps_count_passes_only():
    assert [budget_passes(50, x) for x in (1.5, 2, 2.5, 3)] == [33, 25, 20, 17]
    assert [budget_passes(50, x, 0.0) for x in (1.5, 2, 2.5, 3)] == [33, 25, 20, 17]


@pytest.mark.parametrize("steps, speedup, cost, passes", [
    # P = N (1/X - c) / (1 - c), rounded to the nearest: 50 (0.5 - 0.1) / 0.9 = 22.2
    (50, 2, 0.1, 22),
    # 50 (1/3 - 0.1) / 0.9 = 12.96
    (50, 3, 0.1, 13),
    # 20 (0.5 - 0.02) / 0.98 = 9.796
    (20, 2, 0.02, 10),
    # exactly half way, 30 (1/1.5 - 0.2) / 0.8 = 17.5: halves up
    (30, 1.5, 0.2, 18),
])
def test_a_skipped_steps_cost_buys_fewer_passes(steps, speedup, cost, passes):
    assert budget_passes(steps, speedup, cost) == passes
    # the rounding leaves the predicted speedup within half a pass of the asked one
    low, high = predicted_speedup(steps, passes + 1, cost), predicted_speedup(steps, passes - 1, cost)
    assert low <= speedup <= high


def test_predicted_speedup_counts_skipped_steps_at_their_cost():
    assert predicted_speedup(50, 25) == 2.0
    assert predicted_speedup(50, 25, 0.2) == pytest.approx(50 / (25 + 25 * 0.2))
    assert predicted_speedup(10, 10, 0.5) == 1.0


def test_a_budget_that_even_one_pass_cannot_meet_says_the_fastest_it_can_do():
    # one pass of 10 at a cost of 0.3: 10 / (1 + 9 * 0.3) = 2.70x < 3x
    with pytest.raises(CacheConfigError) as refused:
        checked_budget_passes(10, 3, 0.3)
    assert refused.value.param == "cache_speedup"
    message = str(refused.value)
    assert "\n" not in message
    assert "one pass per branch gives 2.70x" in message and "30% of a computed one" in message


def test_a_budget_just_within_tolerance_runs():
    # 7 passes of 20 at 3x: 2.857x, 4.8% short: runs as before
    assert checked_budget_passes(20, 3) == 7


def test_skipped_step_cost_of_each_kind_of_skip():
    costs = StepCosts(embed_and_head=0.1, step_tail=0.2, device="cpu")
    # whole model call skipped: only the tail remains of a step of two branches (2 calls + tail)
    assert costs.skipped_step_cost(2, whole_model=True) == pytest.approx(0.2 / 2.2)
    # blocks skipped: embed and head of each branch remain too
    assert costs.skipped_step_cost(2, whole_model=False) == pytest.approx((0.2 + 2 * 0.1) / 2.2)
    assert costs.skipped_step_cost(1, whole_model=False) == pytest.approx(0.3 / 1.2)


def test_step_costs_from_a_timed_run_take_medians_over_steps():
    # three steps of two branches: each branch's blocks 0.4 s and embed + head 0.1 s, tail 0.2 s;
    # the first step compiled (10 s of blocks) and is left out by the medians
    step_seconds = [20.2 + 0.2, 1.2, 1.2]
    step_passes = [[10.0, 10.0], [0.4, 0.4], [0.4, 0.4]]
    step_rest = [[0.1, 0.1], [0.1, 0.1], [0.1, 0.1]]
    costs = StepCosts.from_timing(step_seconds, step_passes, step_rest, "cpu")
    assert costs.embed_and_head == pytest.approx(0.1 / 0.5)
    assert costs.step_tail == pytest.approx(0.2 / 0.5)
    assert costs.device == "cpu"


def test_step_costs_round_trip_through_a_dict_and_refuse_nonsense():
    costs = StepCosts(0.05, 0.125, "NVIDIA H100 80GB HBM3")
    assert StepCosts.from_dict(costs.to_dict()) == costs
    for bad in ({"embed_and_head": -1, "step_tail": 0}, {"embed_and_head": "x", "step_tail": 0}, {"step_tail": 0.1}):
        with pytest.raises(CacheConfigError):
            StepCosts.from_dict(bad)


def test_build_cache_plans_fewer_passes_when_skips_cost_time():
    """The even strategy skips the blocks (embed and head still run): at 2x with both branches a
    skipped step costs (0.2 + 2 * 0.1) / 2.2 of a computed one, so 50 steps get 19 passes, not 25."""
    costs = StepCosts(embed_and_head=0.1, step_tail=0.2)
    cache = build_cache(CacheParams(strategy="even", speedup=2, step_costs=costs), 50, None, (COND, UNCOND))
    assert sum(cache.plan()[COND]) == budget_passes(50, 2, 0.4 / 2.2) == 19
    assert cache.asked_speedup == 2
    plain = build_cache(CacheParams(strategy="even", speedup=2), 50, None, (COND, UNCOND))
    assert sum(plain.plan()[COND]) == 25


def test_cache_params_take_step_costs_as_a_json_object():
    params = CacheParams.from_dict({"strategy": "even", "speedup": 2,
                                    "step_costs": {"embed_and_head": 0.1, "step_tail": 0.2, "device": "cpu"}})
    assert params.step_costs == StepCosts(0.1, 0.2, "cpu")
    with pytest.raises(CacheConfigError):
        CacheParams(strategy="even", speedup=2, step_costs=3)


@pytest.mark.parametrize("steps, speedup, cost, passes", [
    # nearest 5 of 10 gives 1.87x, 6.7% short: one fewer, 2.26x, within the overshoot
    (10, 2, 0.072, 4),
    # nearest 4 of 8 gives 1.87x: 3 of 8, 2.38x
    (8, 2, 0.072, 3),
])
def test_one_pass_fewer_where_the_nearest_falls_short(steps, speedup, cost, passes):
    assert checked_budget_passes(steps, speedup, cost) == passes


def test_one_pass_fewer_that_overshoots_far_is_refused():
    """2x at 3 steps: 2 passes give 1.5x, 1 pass 3x: neither is 2x."""
    with pytest.raises(CacheConfigError, match="give 1.50x \\(2 of 3\\) or 3.00x \\(1 of 3\\)"):
        checked_budget_passes(3, 2)
