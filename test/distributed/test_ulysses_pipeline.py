"""Ulysses sequence parallelism through the whole pipeline: ``DiffGenerator(num_gpus=2,
ulysses_degree=2)`` over two gloo processes gives the single-process video, uncached and with
every strategy, and every rank takes the single process's cache decisions.

One worker group per model serves its test class (a process holds one group at a time) (this process is rank 0, one spawned worker rank 1).
Each rank runs the text encoders, the scheduler and the VAE whole and the DiT on its half of the
image tokens (heads exchanged in attention, the prediction gathered in the head), so the frames
must match. Tolerance: the DiT forward of a shard is bit-identical to one process's on our CPUs
(test_sequence_parallel.py); a BLAS that blocks the smaller products differently would move the
latents by fp32 ulps per step, ~1e-6 after 10 steps, so latents are compared to 1e-5 and frames
(in [0, 1]) to 1e-4, and the cache decisions exactly. A real error (a wrong shard, rotary slice or
head) moves the latents by 1e-2 or more.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import TINY_REQUEST, skipping_strategies

from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.entrypoints.generator import BUILTIN_MODEL_PATH, DiffGenerator, denoising_stage

PROMPT = "a red circle moving left on a blue background"
STEPS = 10
# The test's tiny Wan (tiny_wan_dir) has 3 heads; Ulysses over 2 ranks needs an even count.
WAN_HEADS = {"num_attention_heads": 4, "attention_head_dim": 16}

STRATEGIES = skipping_strategies(str(BUILTIN_MODEL_PATH / "calibration.json"))
HUNYUAN_STRATEGIES = {
    **{k: v for k, v in STRATEGIES.items() if k not in ("planner", "teacache")},
    # HunyuanVideo's TeaCache indicator is per token: the statistic the sp group must reduce.
    "teacache": CacheParams(strategy="teacache", threshold=0.2, options={"coefficients": [1.0, 0.0]}),
}


@pytest.fixture(scope="module")
def wan_dir(tmp_path_factory):
    from sglang.multimodal_gen.tools.tiny_models import build_tiny_wan

    return build_tiny_wan(tmp_path_factory.mktemp("models") / "tiny-wan-4heads", seed=0, transformer_config=WAN_HEADS)


@pytest.fixture(scope="class")
def wan_pair(wan_dir):
    single = DiffGenerator.from_pretrained(str(wan_dir), device="cpu")
    group = DiffGenerator.from_pretrained(str(wan_dir), device="cpu", num_gpus=2, ulysses_degree=2, dist_timeout_s=60)
    yield single, group
    group.close()


@pytest.fixture(scope="class")
def wan_batched_pair(wan_dir):
    single = DiffGenerator.from_pretrained(str(wan_dir), device="cpu", batched_cfg=True)
    group = DiffGenerator.from_pretrained(str(wan_dir), device="cpu", num_gpus=2, ulysses_degree=2, dist_timeout_s=60,
                                          batched_cfg=True)
    yield single, group
    group.close()


@pytest.fixture(scope="class")
def hunyuan_pair(tiny_hunyuan_dir, hunyuan_generator):
    group = DiffGenerator.from_pretrained(
        str(tiny_hunyuan_dir), device="cpu", num_gpus=2, ulysses_degree=2, dist_timeout_s=60
    )
    yield hunyuan_generator, group
    group.close()


def _params(cache: CacheParams, negative: bool, **overrides) -> SamplingParams:
    fields = {"prompt": PROMPT, "seed": 3, **TINY_REQUEST, "num_inference_steps": STEPS, **overrides}
    if negative:
        fields["negative_prompt"] = "blurry"
    return SamplingParams(cache=cache, **fields)


def _steps(result) -> dict[str, tuple[list[int], list[int]]]:
    return {name: (b.computed_steps, b.skipped_steps) for name, b in result.cache_stats.branches.items()}


def _check(single_generator, group, cache: CacheParams, negative: bool, **overrides) -> None:
    single = single_generator.generate(_params(cache, negative, **overrides))
    parallel = group.generate(_params(cache, negative, **overrides))
    torch.testing.assert_close(parallel.latents, single.latents, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(parallel.frames, single.frames, atol=1e-4)
    assert [(r["rank"], r["sp_rank"]) for r in parallel.rank_reports] == [(0, 0), (1, 1)]
    transformer = group.pipeline.transformer  # rank 0's: its attention exchanged heads
    attention = transformer.blocks[0].attn1 if hasattr(transformer, "blocks") else transformer.transformer_blocks[0].attn
    assert "Ulysses" in type(attention.processor).__name__
    if single.cache_stats is None:
        assert parallel.cache_stats is None
        return
    expected = _steps(single)
    assert _steps(parallel) == expected
    for report in parallel.rank_reports:  # every rank took the single process's decisions
        assert report["steps"] == expected, report
    assert single.cache_stats.total_skipped > 0, f"{cache.strategy} skips nothing here; the test would prove little"


class TestWan:
    @pytest.mark.parametrize("strategy", list(STRATEGIES))
    def test_ulysses_gives_the_single_process_video(self, wan_pair, strategy):
        _check(*wan_pair, STRATEGIES[strategy], negative=True)

    def test_ulysses_pads_an_odd_token_count(self, wan_pair):
        # 80 x 48 px, 9 frames -> 3 latent frames of 5 x 3 patches: 45 image tokens, odd.
        _check(*wan_pair, STRATEGIES["teacache"], negative=True, height=80, num_frames=9)


class TestWanBatchedCfg:
    """Both CFG branches as one batch on every rank: the shard, the exchange and the gather carry a
    batch of 2 (``--batched-cfg`` with ``--ulysses-degree``)."""

    @pytest.mark.parametrize("strategy", ["none", "magcache", "easycache"])
    def test_ulysses_gives_the_single_process_video(self, wan_batched_pair, strategy):
        assert all(denoising_stage(g.pipeline).batched_cfg for g in wan_batched_pair)
        _check(*wan_batched_pair, STRATEGIES[strategy], negative=True)


class TestHunyuan:
    @pytest.mark.parametrize("strategy", list(HUNYUAN_STRATEGIES))
    def test_ulysses_gives_the_single_process_video(self, hunyuan_pair, strategy):
        _check(*hunyuan_pair, HUNYUAN_STRATEGIES[strategy], negative=False)

    def test_ulysses_pads_an_odd_token_count(self, hunyuan_pair):
        # 80 x 48 px, 9 frames -> 3 latent frames of 5 x 3 patches: 45 image tokens, odd.
        _check(*hunyuan_pair, HUNYUAN_STRATEGIES["teacache"], negative=False, height=80, num_frames=9)


def test_heads_the_degree_does_not_divide_are_refused_at_load(tiny_wan_dir, monkeypatch):
    from sglang.multimodal_gen.errors import InvalidRequestError
    from sglang.multimodal_gen.runtime.entrypoints import generator as generator_module

    def no_workers(*args, **kwargs):
        raise AssertionError("worker processes were started for a degree the heads refuse")

    # The test's tiny Wan has 3 heads: refused from transformer/config.json, before any process starts.
    monkeypatch.setattr(generator_module, "WorkerGroup", no_workers)
    with pytest.raises(InvalidRequestError, match="--ulysses-degree 2 does not divide the 3 attention heads of this Wan"):
        DiffGenerator.from_pretrained(str(tiny_wan_dir), device="cpu", num_gpus=2, ulysses_degree=2, dist_timeout_s=30)
