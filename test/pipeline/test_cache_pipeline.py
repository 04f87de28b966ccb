"""Timestep caching inside the real Wan pipeline: identity when nothing is skipped, no state
leaks between requests, the same skips and outputs as diffusers' own MagCache hook, TeaCache's
schedule-only decisions on Wan, and the CLI's summary line and errors."""

from __future__ import annotations

import logging
import re

import pytest
import torch
from conftest import TINY_REQUEST

from sglang.cli.main import main
from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.cache.base import COND, UNCOND
from sglang.multimodal_gen.runtime.cache.magcache import preset_ratio_table

PROMPT = "a green square moving up on a black background"
STEPS = 12
# Published Wan2.1 1.3B cond curve for both branches: diffusers' hook takes one array for all contexts.
WAN_COND_RATIOS = preset_ratio_table()["wan21_t2v_1.3b"][COND]
HOOK_SETTINGS = dict(threshold=0.3, max_skip_steps=3, retention_ratio=0.2)
# Measured times differ between runs; every other figure of ``CacheStats.to_dict()`` must not.
MEASURED = {"denoising_seconds", "blocks_pass_seconds", "uncached_estimate_seconds", "measured_speedup"}


def _decisions(stats) -> dict:
    return {k: v for k, v in stats.to_dict().items() if k not in MEASURED}


def _params(seed: int = 3, cache: CacheParams | None = None, **overrides) -> SamplingParams:
    request = {**TINY_REQUEST, "num_inference_steps": STEPS, **overrides}
    return SamplingParams(prompt=PROMPT, negative_prompt="blurry", seed=seed, cache=cache or CacheParams(), **request)


def _magcache(**knobs) -> CacheParams:
    return CacheParams(strategy="magcache", **knobs)


def test_cache_none_and_never_skipping_strategies_equal_uncached(wan_generator):
    uncached = wan_generator.generate(_params()).latents
    assert torch.equal(wan_generator.generate(_params(cache=CacheParams(strategy="none"))).latents, uncached)
    for cache in (_magcache(threshold=0.0), CacheParams(strategy="teacache", threshold=0.0)):
        result = wan_generator.generate(_params(cache=cache))
        assert result.cache_stats.total_skipped == 0
        assert torch.equal(result.latents, uncached), cache.strategy


def test_skipping_changes_output_and_requests_share_no_state(wan_generator):
    cached = _params(cache=_magcache(**HOOK_SETTINGS))
    first = wan_generator.generate(cached)
    plain = wan_generator.generate(_params())
    third = wan_generator.generate(cached)
    assert first.cache_stats.total_skipped > 0
    assert not torch.equal(first.latents, plain.latents)
    assert torch.equal(first.latents, third.latents)
    assert _decisions(first.cache_stats) == _decisions(third.cache_stats)


def test_skip_plan_is_per_request_step_count(wan_generator):
    for steps in (8, 20):
        result = wan_generator.generate(_params(cache=_magcache(**HOOK_SETTINGS), num_inference_steps=steps))
        stats = result.cache_stats
        assert set(stats.branches) == {COND, UNCOND}
        for branch in stats.branches.values():
            assert sorted(branch.computed_steps + branch.skipped_steps) == list(range(steps))
        assert [not c for c in result.cache.plan()[COND]].count(True) == stats.branches[COND].num_skipped


def _record_diffusers_decisions(transformer) -> tuple[list[bool], list]:
    """True per transformer call when its middle block really ran (the hook skips whole blocks)."""
    computed: list[bool] = []
    handles = [
        transformer.register_forward_pre_hook(lambda module, args: computed.append(False)),
        transformer.blocks[1].attn1.register_forward_hook(lambda module, args, out: computed.__setitem__(-1, True)),
    ]
    return computed, handles


def test_same_skips_and_output_as_diffusers_mag_cache_hook(tiny_wan_dir, wan_generator):
    from diffusers import WanPipeline
    from diffusers.hooks import MagCacheConfig, apply_mag_cache

    pipe = WanPipeline.from_pretrained(tiny_wan_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    apply_mag_cache(
        pipe.transformer,
        MagCacheConfig(
            mag_ratios=torch.tensor(WAN_COND_RATIOS),
            num_inference_steps=STEPS,
            threshold=HOOK_SETTINGS["threshold"],
            max_skip_steps=HOOK_SETTINGS["max_skip_steps"],
            retention_ratio=HOOK_SETTINGS["retention_ratio"],
        ),
    )
    computed, handles = _record_diffusers_decisions(pipe.transformer)
    reference = pipe(
        prompt=PROMPT, negative_prompt="blurry", generator=torch.Generator().manual_seed(3), output_type="latent",
        **{**TINY_REQUEST, "num_inference_steps": STEPS},
    ).frames
    for handle in handles:
        handle.remove()
    diffusers_plan = {COND: computed[0::2], UNCOND: computed[1::2]}

    ours = wan_generator.generate(
        _params(cache=_magcache(options={"mag_ratios": {COND: WAN_COND_RATIOS, UNCOND: WAN_COND_RATIOS}},
                                **HOOK_SETTINGS))
    )
    assert ours.cache.plan() == diffusers_plan
    assert ours.cache_stats.total_skipped >= 4
    torch.testing.assert_close(ours.latents, reference, rtol=1e-5, atol=1e-5)


def test_teacache_on_wan_decides_from_the_timestep_schedule_only(wan_generator):
    # The published polynomials are fitted to the real Wan models' embedding changes; this random tiny
    # model's timestep embedding changes far more per step, so the test rescales with the identity.
    def skipped(seed: int, prompt: str, threshold: float) -> dict:
        cache = CacheParams(strategy="teacache", threshold=threshold, options={"coefficients": [1.0, 0.0]})
        params = _params(seed=seed, cache=cache)
        params.prompt = prompt
        return {b: s.skipped_steps for b, s in wan_generator.generate(params).cache_stats.branches.items()}

    first = skipped(1, PROMPT, 1.0)
    assert any(first.values())
    assert skipped(2, "a white circle moving right on a red background", 1.0) == first
    counts = [sum(len(s) for s in skipped(1, PROMPT, t).values()) for t in (0.3, 0.8, 1.5, 3.0)]
    assert counts == sorted(counts) and counts[-1] > counts[0]


def test_cli_prints_cache_summary(tiny_wan_dir, tmp_path, capsys):
    code = main(["generate", "--model-path", str(tiny_wan_dir), "--prompt", PROMPT, "--output-path",
                 str(tmp_path / "a.npy"), "--height", "32", "--width", "32", "--num-frames", "5",
                 "--num-inference-steps", "20", "--cache", "magcache", "--cache-preset", "fast"])
    assert code == 0
    line = next(l for l in capsys.readouterr().out.splitlines() if l.startswith("magcache:"))
    assert "of 20 steps per branch" in line and "x fewer transformer passes" in line
    assert "computed 20 of" not in line


def test_cached_run_reports_measured_pass_time_and_uncached_estimate(wan_generator):
    result = wan_generator.generate(_params(cache=_magcache(**HOOK_SETTINGS)))
    stats = result.cache_stats
    assert stats.total_skipped > 0
    assert stats.timed_passes == stats.total_computed  # every blocks pass that ran, and only those
    assert stats.blocks_pass_seconds > 0
    assert 0 < stats.denoising_seconds <= result.timings["denoising"]  # the loop is inside the stage
    assert stats.uncached_estimate_seconds == pytest.approx(
        stats.denoising_seconds + stats.total_skipped * stats.blocks_pass_seconds
    )
    assert stats.uncached_estimate_seconds > stats.denoising_seconds and stats.measured_speedup > 1


def _expand(text: str) -> list[int]:
    """'3,5-7' -> [3, 5, 6, 7]: reads the CLI's compact ranges back."""
    if text == "none":
        return []
    steps: list[int] = []
    for part in text.split(","):
        first, _, last = part.partition("-")
        steps.extend(range(int(first), int(last or first) + 1))
    return steps


def test_cli_prints_measured_time_and_skipped_steps_after_the_summary(tiny_wan_dir, wan_generator, tmp_path,
                                                                     capsys):
    code = main(["generate", "--model-path", str(tiny_wan_dir), "--prompt", PROMPT, "--negative-prompt", "blurry",
                 "--seed", "3", "--output-path", str(tmp_path / "a.npy"), "--height", "64", "--width", "48",
                 "--num-frames", "5", "--num-inference-steps", str(STEPS), "--guidance-scale", "5.0",
                 "--cache", "magcache", "--cache-threshold", "0.3", "--cache-max-skip-steps", "3",
                 "--cache-retention-ratio", "0.2"])
    assert code == 0
    lines = capsys.readouterr().out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.startswith("magcache:"))
    summary, timing, skipped = lines[at:at + 3]
    # The same request through the generator: its skips are what the CLI must list.
    stats = wan_generator.generate(_params(cache=_magcache(**HOOK_SETTINGS))).cache_stats
    assert summary == stats.summary()  # the documented line, unchanged
    assert re.fullmatch(r"  denoising \d+\.\d\d s, uncached estimate \d+\.\d\d s \(\d+\.\d\dx measured\)", timing)
    measured, estimate = (float(x) for x in re.findall(r"(\d+\.\d\d) s", timing))
    assert estimate >= measured
    assert skipped.startswith("  skipped steps: cond ")
    listed = dict(part.split(" ", 1) for part in skipped.removeprefix("  skipped steps: ").split(" | "))
    assert {branch: _expand(text) for branch, text in listed.items()} == {
        branch: s.skipped_steps for branch, s in stats.branches.items()
    }


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--cache", "magcache", "--cache-threshold", "-0.1"], "threshold"),
        (["--cache", "magcache", "--cache-max-skip-steps", "-1"], "max_skip_steps"),
        (["--cache", "magcache", "--cache-retention-ratio", "1.5"], "retention_ratio"),
        (["--cache", "fastcache"], "unknown cache strategy 'fastcache'"),
        (["--cache", "magcache", "--cache-preset", "turbo"], "unknown magcache preset 'turbo'"),
        (["--cache", "magcache", "--cache-params", '{"mag_ratios": {"cond": [1.0], "uncond": [1.0]}}'],
         "at least 2"),
        (["--cache", "magcache", "--cache-params", "{not json"], "JSON"),
        (["--cache", "teacache", "--cache-params", '{"warp": 1}'], "warp"),
        (["--cache", "magcache", "--cache-estimator", "linear"],
         "unknown cache estimator 'linear'; choose one of: blend, fitted, forecast1, forecast1_sigma, forecast2, "
         "forecast2_sigma, reuse, scale"),
        (["--cache-estimator", "forecast1"], "the cache strategy is 'none'"),
        (["--cache", "magcache", "--cache-estimator", "forecast1", "--cache-params", '{"scale_residual": true}'],
         "scale_residual: true means estimator 'scale', but estimator 'forecast1' was asked"),
        (["--cache", "teacache", "--cache-params", '{"blend_alpha": 0.3}'], "--cache-estimator blend"),
    ],
)
def test_invalid_cache_settings_give_one_clear_line(tiny_wan_dir, capsys, flags, message):
    code = main(["generate", "--model-path", str(tiny_wan_dir), "--prompt", PROMPT, "--num-inference-steps", "4",
                 "--height", "32", "--width", "32", "--num-frames", "5", *flags])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and message in err and len(err.splitlines()) == 1



def _no_skip_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and " no step at " in r.getMessage()]


@pytest.mark.parametrize(
    "cache, first_words, before_run",
    [
        (_magcache(threshold=0.004), "magcache skips no step at 6 steps: the accumulated error reaches", True),
        (_magcache(retention_ratio=1.0), "magcache skips no step at 6 steps: 6 steps of retention cover", True),
        (CacheParams(strategy="teacache"), "teacache skipped no step at 6 steps: the smallest rescaled change", False),
    ],
)
def test_a_cache_that_skips_nothing_says_why_in_one_warning(wan_generator, caplog, cache, first_words, before_run):
    seen_at_first_step: list[int] = []

    def progress(step: int, total: int) -> None:
        if step == 1:
            seen_at_first_step.append(len(_no_skip_warnings(caplog)))

    with caplog.at_level(logging.WARNING):
        result = wan_generator.generate(_params(cache=cache, num_inference_steps=6), progress=progress)
    assert result.cache_stats.total_skipped == 0
    (line,) = _no_skip_warnings(caplog)
    assert line.startswith(first_words)
    assert "--cache-" in line  # names the knob
    assert seen_at_first_step == [1 if before_run else 0]  # a plan is known before the run, TeaCache's after


@pytest.mark.parametrize(
    "cache",
    [_magcache(**HOOK_SETTINGS), CacheParams(strategy="teacache", threshold=1.0, options={"coefficients": [1.0, 0.0]})],
)
def test_a_cache_that_skips_logs_no_such_warning(wan_generator, caplog, cache):
    with caplog.at_level(logging.WARNING):
        result = wan_generator.generate(_params(cache=cache, num_inference_steps=6))
    assert result.cache_stats.total_skipped > 0
    assert _no_skip_warnings(caplog) == []
