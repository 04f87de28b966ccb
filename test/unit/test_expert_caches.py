"""Caching across an expert switch (Wan2.2): one strategy instance per expert, nothing crossing
the switch, the first step of each expert computed, one budget split between the experts by steps."""

from __future__ import annotations

import pytest
import torch

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.runtime.cache import COND, UNCOND, CacheConfigError, StepFeatures, TimestepCache, build_cache
from sglang.multimodal_gen.runtime.cache.experts import ExpertCaches, expert_segments, proportional_split, split_budget

HIGH, LOW = "high_noise", "low_noise"
SCHEDULE = [HIGH] * 3 + [LOW] * 5


class SkipsWheneverItMay(TimestepCache):
    """Skips every step it is allowed to: only a missing residual makes it compute."""

    name = "skips-whenever-it-may"

    def _decide(self, step: int, branch: str, features: StepFeatures) -> bool:
        return False


def expert_caches(cls=SkipsWheneverItMay, schedule=SCHEDULE) -> ExpertCaches:
    caches = {e: cls(None, len(steps), (COND, UNCOND)) for e, steps in expert_segments(schedule).items()}
    return ExpertCaches(caches, schedule)


def test_no_residual_crosses_the_switch_and_each_experts_first_step_computes():
    """Residuals tagged with the expert that stored them: every skipped step adds its own expert's,
    and the first low-noise step computes although the strategy would skip it."""
    cache = expert_caches()
    added = []
    for step, expert in enumerate(SCHEDULE):
        for branch in (COND, UNCOND):
            features = StepFeatures(timestep=torch.tensor([1000.0 - step]))
            if cache.should_compute(step, branch, features):
                cache.store(step, branch, torch.full((2,), 1.0 if expert == HIGH else 2.0))
            else:
                added.append((expert, cache.reuse(step, branch)[0].item()))
    assert all(value == (1.0 if expert == HIGH else 2.0) for expert, value in added)
    assert cache.stats.branches[COND].computed_steps == [0, 3]
    assert cache.stats.branches[UNCOND].skipped_steps == [1, 2, 4, 5, 6, 7]


def test_one_instance_across_the_switch_would_reuse_the_other_experts_residual():
    """The boundary-blind alternative, for contrast: one state over both experts skips step 3."""
    blind = SkipsWheneverItMay(None, len(SCHEDULE), (COND,))
    computed = [step for step in range(len(SCHEDULE))
                if blind.should_compute(step, COND, StepFeatures(timestep=torch.tensor([0.0])))
                and blind.store(step, COND, torch.zeros(1)) is None]
    assert computed == [0]


def test_stats_report_per_expert():
    cache = expert_caches()
    for step in range(len(SCHEDULE)):
        for branch in (COND, UNCOND):
            if cache.should_compute(step, branch, StepFeatures(timestep=torch.tensor([0.0]))):
                cache.store(step, branch, torch.zeros(1))
    stats = cache.stats
    assert stats.summary() == ("skips-whenever-it-may: high-noise computed 1 of 3, low-noise 1 of 5 steps per branch "
                               "(4.00x fewer transformer passes)")
    report = stats.to_dict()["experts"]
    assert report[HIGH]["num_inference_steps"] == 3 and report[LOW]["branches"][COND]["computed_steps"] == [3]
    assert report[LOW]["branches"][UNCOND]["skipped_steps"] == [4, 5, 6, 7]
    assert "experts" not in SkipsWheneverItMay(None, 4).stats.to_dict()


def test_plan_is_the_experts_plans_end_to_end():
    caches = {e: SkipsWheneverItMay(None, len(s), (COND,)) for e, s in expert_segments(SCHEDULE).items()}
    for cache in caches.values():
        cache.plan = lambda n=cache.num_inference_steps: {COND: [True] + [False] * (n - 1)}
    assert ExpertCaches(caches, SCHEDULE).plan() == {COND: [True, False, False, True, False, False, False, False]}


@pytest.mark.parametrize("schedule, message", [
    ([HIGH, LOW, HIGH], "two separate stretches"),
])
def test_an_expert_must_run_one_stretch(schedule, message):
    with pytest.raises(ValueError, match=message):
        expert_segments(schedule)


@pytest.mark.parametrize("steps, passes, expected", [
    ({HIGH: 3, LOW: 5}, 4, {HIGH: 2, LOW: 2}),   # 1.5 / 2.5: the larger remainder wins the odd pass
    ({HIGH: 13, LOW: 37}, 25, {HIGH: 7, LOW: 18}),
    ({HIGH: 1, LOW: 9}, 5, {HIGH: 1, LOW: 4}),    # at most an expert's steps, at least one
    ({HIGH: 2, LOW: 2}, 2, {HIGH: 1, LOW: 1}),
])
def test_proportional_split(steps, passes, expected):
    assert proportional_split(steps, passes) == expected == split_budget(steps, passes)


def test_fewer_passes_than_experts_is_one_line():
    with pytest.raises(CacheConfigError, match="cannot be shared by 2 experts") as refused:
        split_budget({HIGH: 3, LOW: 5}, 1)
    assert refused.value.param == "cache_speedup"


def test_a_strategy_that_needs_model_data_is_refused_without_an_experts_calibration():
    with pytest.raises(CacheConfigError) as refused:
        build_cache(CacheParams(strategy="magcache"), len(SCHEDULE), "wan21_t2v_1.3b", experts=SCHEDULE)
    assert "sglang calibrate" in str(refused.value) and "--cache easycache" in str(refused.value)
    assert isinstance(build_cache(CacheParams(strategy="easycache"), len(SCHEDULE), "wan21_t2v_1.3b",
                                  experts=SCHEDULE), ExpertCaches)
    own_data = CacheParams(strategy="teacache", threshold=0.1, options={"coefficients": [1.0, 0.0]})
    assert isinstance(build_cache(own_data, len(SCHEDULE), "wan21_t2v_1.3b", experts=SCHEDULE), ExpertCaches)
    assert not isinstance(build_cache(CacheParams(strategy="easycache"), 8, "wan21_t2v_1.3b", experts=[HIGH] * 8),
                          ExpertCaches)
