"""How an error in the latents grows: the probe's trace and perturbation, the curve from two
traces, its average over prompts and its file form."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from sglang.multimodal_gen.runtime.cache.error_growth import (
    PERTURBATION_SIZE,
    TRACED_ENTRIES,
    ErrorGrowth,
    LatentProbe,
    growth_from_traces,
)
from sglang.multimodal_gen.runtime.cache.validation import CacheConfigError


def test_the_probe_perturbs_after_the_first_step_by_its_relative_size_and_alike_for_the_same_seed():
    latents = torch.randn(2, 4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    first, again, other = LatentProbe(perturb=True, seed=3), LatentProbe(perturb=True, seed=3), LatentProbe(seed=3)
    perturbed = first.after_step(0, 0.9, latents)
    assert (perturbed - latents).norm() / latents.norm() == pytest.approx(PERTURBATION_SIZE, rel=1e-4)
    assert torch.equal(again.after_step(0, 0.9, latents), perturbed)  # every rank adds the same
    assert torch.equal(first.after_step(1, 0.8, latents), latents)  # once only
    assert torch.equal(other.after_step(0, 0.9, latents), latents)  # a tracing probe changes nothing
    assert len(first.trace) == 2 and first.sigmas == [0.9, 0.8]


def test_the_probe_keeps_the_same_subset_of_a_large_latent_at_every_step():
    latents = torch.arange(TRACED_ENTRIES * 3, dtype=torch.float32).reshape(3, -1)
    probe = LatentProbe(seed=1)
    probe.after_step(0, None, latents)
    probe.after_step(1, None, latents + 1)
    assert probe.trace[0].numel() == TRACED_ENTRIES
    assert torch.equal(probe.trace[1], probe.trace[0] + 1)
    assert probe.run_sigmas() == [1.0, 0.5, 0.0]  # no scheduler sigmas: 1 down to 0, as the planner assumes


def test_growth_is_the_final_distance_over_the_distance_entering_each_step():
    """Distances 1, 0.2, 0.5, 2, 4 after steps 0-4: an error entering step k (after step k-1) ends
    ``4 / d[k-1]`` times larger; the perturbed step and the one after it have not settled and take
    the first settled value; the final latents' growth is 1."""
    distances = [1.0, 0.2, 0.5, 2.0, 4.0]
    reference = [torch.zeros(3) for _ in distances]
    perturbed = [torch.tensor([d, 0.0, 0.0]) for d in distances]
    growth = growth_from_traces(reference, perturbed)
    assert growth == pytest.approx([20.0, 20.0, 20.0, 8.0, 2.0, 1.0])


def test_the_average_over_prompts_is_the_root_mean_square():
    growth = ErrorGrowth.from_runs([1.0, 0.5, 0.0], [[1.0, 3.0, 1.0], [7.0, 1.0, 1.0]])
    assert growth.growth == pytest.approx((5.0, math.sqrt(5.0), 1.0))


def test_growth_is_read_between_and_beyond_its_sigmas():
    growth = ErrorGrowth(sigmas=(1.0, 0.5, 0.0), growth=(9.0, 3.0, 1.0))
    assert growth.at([1.2, 0.75, 0.25, 0.0, -0.1]) == pytest.approx([9.0, 6.0, 2.0, 1.0, 1.0])
    assert np.array_equal(ErrorGrowth().at([0.9, 0.1]), [1.0, 1.0])  # none measured: every step weighs the same


def test_growth_round_trips_through_its_file_form_and_refuses_a_damaged_one():
    growth = ErrorGrowth(sigmas=(1.0, 0.5, 0.0), growth=(9.0, 3.0, 1.0))
    assert ErrorGrowth.from_dict(growth.to_dict()) == growth
    assert ErrorGrowth.from_dict({}) == ErrorGrowth()
    for damaged in ({"sigmas": [1.0, 0.0]}, {"sigmas": [1.0, 0.0], "growth": [2.0]},
                    {"sigmas": [1.0, 0.0], "growth": [2.0, float("nan")]}, {"sigmas": "1", "growth": [1.0]}):
        with pytest.raises(CacheConfigError):
            ErrorGrowth.from_dict(damaged)
