"""Ulysses sequence parallelism over 2 gloo processes: the adapters' forward, the head exchange,
and a token statistic that must agree across the shards.

The two ranks are started once for the module (torch.multiprocessing spawn, a free loopback port),
run every scenario and save what they saw; the tests compare it with this process's single-process
results on the same seeded models and inputs. Token counts are odd (45 image tokens over 2 ranks)
so the padding path runs.

Tolerance (fp32): a rank computes every per-token operation on its own rows and attention on a
slice of the heads over the same keys, so the only difference from one process is the order of
floating-point sums inside the matrix products (fewer rows, fewer heads per call), which a BLAS
may block differently. On our CPUs the outputs come out bit-identical; a blocking that differs
would move each value by a few fp32 ulps per layer, ~1e-6 after the tiny models' 2-4 blocks on
outputs of order 1. ``atol = rtol = 1e-5`` leaves that margin and stays far below any real error
(a wrong rotary slice, a missing head or an unmasked padded key changes outputs by 1e-2 or more).
"""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sglang.multimodal_gen.tools.tiny_models import TINY_HUNYUAN_TRANSFORMER, TINY_WAN_TRANSFORMER

WORLD = 2
ATOL = RTOL = 1e-5
# Wan's tiny model has 3 heads; Ulysses over 2 ranks needs an even count.
WAN_CONFIG = {**TINY_WAN_TRANSFORMER, "num_attention_heads": 4, "attention_head_dim": 16, "num_layers": 2}
HUNYUAN_CONFIG = dict(TINY_HUNYUAN_TRANSFORMER)  # 2 heads of 16
# (batch, channels, frames, height, width): 3 x 3 x 5 = 45 tokens after the 1x2x2 / 2x2 patches.
LATENT_SHAPE = (2, 16, 3, 6, 10)
TEXT_LEN = 11


def build_wan(**overrides):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(0)
    return WanTransformer3DModel(**{**WAN_CONFIG, **overrides}).eval()


def build_hunyuan():
    from diffusers import HunyuanVideoTransformer3DModel

    torch.manual_seed(0)
    return HunyuanVideoTransformer3DModel(**HUNYUAN_CONFIG).eval()


def wan_inputs(transformer):
    gen = torch.Generator().manual_seed(1)
    latents = torch.randn(*LATENT_SHAPE, generator=gen)
    text = torch.randn(LATENT_SHAPE[0], TEXT_LEN, transformer.config.text_dim, generator=gen)
    return latents, torch.tensor([999.0, 421.0]), text, {}


def wan_token_timestep_inputs(transformer):
    """Wan2.2 TI2V's input: a timestep per token, a different one for every token (as an image's
    first frame will have its own), so a rank that embedded another shard's timesteps shows."""
    latents, _, text, kwargs = wan_inputs(transformer)
    tokens = LATENT_SHAPE[2] * (LATENT_SHAPE[3] // 2) * (LATENT_SHAPE[4] // 2)
    timestep = torch.stack([torch.linspace(999.0, 500.0, tokens), torch.linspace(0.0, 421.0, tokens)])
    return latents, timestep, text, kwargs


def wan_token_timestep_adapter(transformer):
    from sglang.multimodal_gen.runtime.models.wan import WanDiTAdapter

    return WanDiTAdapter(transformer, expand_timesteps=True)


def hunyuan_inputs(transformer, scale_second_half: float = 1.0):
    gen = torch.Generator().manual_seed(2)
    latents = torch.randn(*LATENT_SHAPE, generator=gen)
    latents[..., LATENT_SHAPE[-1] // 2:] *= scale_second_half
    text = torch.randn(LATENT_SHAPE[0], TEXT_LEN, transformer.config.text_embed_dim, generator=gen)
    mask = torch.zeros(LATENT_SHAPE[0], TEXT_LEN)
    mask[0, :7], mask[1, :3] = 1, 1
    pooled = torch.randn(LATENT_SHAPE[0], transformer.config.pooled_projection_dim, generator=gen)
    kwargs = dict(encoder_attention_mask=mask, pooled_projections=pooled, guidance=torch.tensor([6000.0, 3500.0]))
    return latents, torch.tensor([999.0, 421.0]), text, kwargs


def teacache(threshold: float = 0.3):
    from sglang.multimodal_gen.runtime.cache.teacache import TeaCache, TeaCacheConfig

    # The identity polynomial: the accumulated value is the relative L1 change itself.
    config = TeaCacheConfig(coefficients=[1.0, 0.0], threshold=threshold, warmup_steps=1, end_steps=0)
    return TeaCache(config, num_inference_steps=4, branches=("cond",))


def strong_shard_indicators() -> tuple[torch.Tensor, torch.Tensor]:
    """Two consecutive whole indicators (batch 1, 40 tokens, 8 channels) whose first half of tokens
    (rank 0's shard) changes by 1% and second half (rank 1's) by 100%: about 0.5 over the whole."""
    previous = torch.randn(1, 40, 8, generator=torch.Generator().manual_seed(3))
    current = previous.clone()
    current[:, :20] *= 1.01
    current[:, 20:] *= 2.0
    return previous, current


def teacache_decisions(previous: torch.Tensor, current: torch.Tensor, reducer=None) -> tuple[bool, float]:
    """TeaCache's decision at step 1 after ``previous`` at step 0, and the change it measured."""
    from sglang.multimodal_gen.runtime.cache.base import StepFeatures

    cache = teacache()
    if reducer is not None:
        cache.set_statistic_reducer(reducer)
    t = torch.tensor([1.0])
    assert cache.should_compute(0, "cond", StepFeatures(timestep=t, modulated_input=previous))
    cache.store(0, "cond", torch.zeros(1))
    change = cache.relative_l1(current, previous)
    return cache.should_compute(1, "cond", StepFeatures(timestep=t, modulated_input=current)), change


def calibration_records(rank: int | None = None, reducer=None):
    """Calibration records of 6 steps of residuals and indicators (45 tokens) whose two halves
    change at different rates; with ``rank``, fed only that rank's 23 / 22 tokens of each."""
    from sglang.multimodal_gen.runtime.cache.base import StepFeatures, TimestepCache
    from sglang.multimodal_gen.runtime.distributed.sequence_parallel import SequenceShard

    class ComputeAll(TimestepCache):
        name = "compute_all"

        def _decide(self, step, branch, features):
            return True

    cache = ComputeAll(None, 6, ("cond",), calibrate=True)
    if reducer is not None:
        cache.set_statistic_reducer(reducer)
    gen = torch.Generator().manual_seed(4)
    residual, indicator = torch.randn(2, 45, 8, generator=gen), torch.randn(2, 45, 8, generator=gen)
    rates = torch.cat([torch.full((23, 1), 0.9), torch.full((22, 1), 1.6)])
    for step in range(6):
        residual = residual * rates + 0.1 * torch.randn(2, 45, 8, generator=gen)
        indicator = indicator * rates.flip(0)
        r, x = residual, indicator
        if rank is not None:
            shard = SequenceShard(45, WORLD, rank)
            r, x = shard.take(residual), shard.take(indicator)
        cache.should_compute(step, "cond", StepFeatures(timestep=torch.tensor([1.0]), modulated_input=x))
        cache.store(step, "cond", r)
        cache.record_output(step, "cond", residual[:, :9] * 0.5)  # the model output: whole on every rank
    return cache.calibration_records()["cond"]


# ----------------------------------------------------------------------------- the ranks
def _record_collectives(group, log: list) -> None:
    """Wrap the sp group's collectives to log (name, input shape) of every call."""
    for name in ("all_to_all", "all_gather", "all_reduce"):
        original = getattr(group, name)

        def logged(tensor, *args, _original=original, _name=name, **kwargs):
            log.append((_name, tuple(tensor.shape)))
            return _original(tensor, *args, **kwargs)

        setattr(group, name, logged)


def _record_attention(log: list):
    """Log the (q, k) shapes of every attention call made through diffusers' dispatcher (the
    stock processors hold their own reference to it, so their modules are patched too)."""
    import diffusers.models.attention_dispatch as dispatch
    import diffusers.models.transformers.transformer_hunyuan_video as hunyuan
    import diffusers.models.transformers.transformer_wan as wan

    original = dispatch.dispatch_attention_fn

    def logged(query, key, value, *args, **kwargs):
        log.append((tuple(query.shape), tuple(key.shape)))
        return original(query, key, value, *args, **kwargs)

    for module in (dispatch, wan, hunyuan):
        module.dispatch_attention_fn = logged


def _rank_main(rank: int, port: int, out_dir: str) -> None:
    from sglang.multimodal_gen.runtime.distributed import parallel_state as ps
    from sglang.multimodal_gen.runtime.distributed.cfg_parallel import BranchPlacement
    from sglang.multimodal_gen.runtime.models.hunyuan import HunyuanDiTAdapter
    from sglang.multimodal_gen.runtime.models.wan import WanDiTAdapter

    torch.set_num_threads(1)
    ps.init_parallel_state(rank, WORLD, f"tcp://127.0.0.1:{port}", sp_degree=WORLD, backend="gloo", timeout_s=60)
    results: dict = {}
    sp = ps.get_sp_group()
    collectives: list = []
    attention: list = []
    _record_collectives(sp, collectives)
    _record_attention(attention)
    with torch.no_grad():
        for name, build, inputs, adapter_class in (
            ("wan", build_wan, wan_inputs, WanDiTAdapter),
            ("hunyuan", build_hunyuan, hunyuan_inputs, HunyuanDiTAdapter),
            ("wan_token_timesteps", build_wan, wan_token_timestep_inputs, wan_token_timestep_adapter),
        ):
            transformer = build()
            adapter = adapter_class(transformer)
            latents, timestep, text, kwargs = inputs(transformer)
            hidden, ctx = adapter.embed(latents, timestep, text, **kwargs)
            del collectives[:], attention[:]
            out = adapter.blocks(hidden, ctx)
            block_collectives, block_attention = list(collectives), list(attention)
            del collectives[:]
            prediction = adapter.head(out, ctx)
            results[name] = dict(
                prediction=prediction, hidden_shape=tuple(hidden.shape), block_collectives=block_collectives,
                block_attention=block_attention, head_collectives=list(collectives),
                modulated_input=ctx.modulated_input,
            )

        # The statistic: each rank holds its half of the tokens of two consecutive indicators.
        previous, current = strong_shard_indicators()
        mine = slice(rank * 20, (rank + 1) * 20)
        results["unreduced"] = teacache_decisions(previous[:, mine], current[:, mine])
        cache = teacache()
        BranchPlacement(("cond",)).attach(cache)  # what the denoising stage installs
        results["reduced"] = teacache_decisions(previous[:, mine], current[:, mine], cache._statistic_reducer)
        results["calibration"] = calibration_records(rank, sp.all_reduce)
        results["calibration_unreduced"] = calibration_records(rank)

        # HunyuanVideo's own indicator: the first block's modulated input of two latents whose
        # second half of tokens differs much more than the first; each rank sees its shard only.
        transformer = build_hunyuan()
        adapter = HunyuanDiTAdapter(transformer)
        latents, timestep, text, kwargs = hunyuan_inputs(transformer)
        first = adapter.embed(latents, timestep, text, **kwargs)[1].modulated_input
        latents, timestep, text, kwargs = hunyuan_inputs(transformer, scale_second_half=3.0)
        second = adapter.embed(latents, timestep, text, **kwargs)[1].modulated_input
        results["hunyuan_change"] = (teacache().relative_l1(second, first), cache.relative_l1(second, first))

        try:
            WanDiTAdapter(build_wan(num_attention_heads=3)).embed(*wan_inputs(build_wan())[:3])
        except ValueError as exc:
            results["three_heads"] = str(exc)
    torch.save(results, Path(out_dir) / f"rank{rank}.pt")
    ps.destroy_parallel_state()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = tmp_path_factory.mktemp("sp")
    mp.spawn(_rank_main, args=(_free_port(), str(out)), nprocs=WORLD, join=True)
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def single_process(name: str) -> dict:
    from sglang.multimodal_gen.runtime.models.hunyuan import HunyuanDiTAdapter
    from sglang.multimodal_gen.runtime.models.wan import WanDiTAdapter

    build, inputs, adapter_class = {
        "wan": (build_wan, wan_inputs, WanDiTAdapter), "hunyuan": (build_hunyuan, hunyuan_inputs, HunyuanDiTAdapter),
        "wan_token_timesteps": (build_wan, wan_token_timestep_inputs, wan_token_timestep_adapter),
    }[name]
    transformer = build()
    with torch.no_grad():
        latents, timestep, text, kwargs = inputs(transformer)
        adapter = adapter_class(transformer)
        hidden, ctx = adapter.embed(latents, timestep, text, **kwargs)
        return dict(prediction=adapter.head(adapter.blocks(hidden, ctx), ctx), modulated_input=ctx.modulated_input)


# ----------------------------------------------------------------------------- the tests
@pytest.mark.parametrize("name", ["wan", "hunyuan", "wan_token_timesteps"])
def test_sp_forward_equals_single_process(ranks, name):
    expected = single_process(name)["prediction"]
    for rank in ranks:
        torch.testing.assert_close(rank[name]["prediction"], expected, atol=ATOL, rtol=RTOL)
    # The 45 image tokens split 23 + 22: embed (and so a cache) sees real tokens only; blocks pad
    # rank 1's shard to 23 for the exchange (the all-to-all shapes below).
    assert [rank[name]["hidden_shape"][1] for rank in ranks] == [23, 22]


def test_token_timesteps_are_embedded_per_shard(ranks):
    """Each rank embeds its own tokens' timesteps (Wan2.2 TI2V): the shards' per-token embeddings
    (TeaCache's indicator) put together are the single process's."""
    whole = single_process("wan_token_timesteps")["modulated_input"]
    shards = [rank["wan_token_timesteps"]["modulated_input"] for rank in ranks]
    assert [shard.shape[1] for shard in shards] == [23, 22]
    torch.testing.assert_close(torch.cat(shards, dim=1), whole, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("name", ["wan", "hunyuan"])
def test_heads_are_exchanged_all_to_all_not_the_sequence_gathered(ranks, name):
    blocks = 2 if name == "wan" else 4  # Wan: 2 blocks; HunyuanVideo: 2 double + 2 single
    heads = {"wan": 4, "hunyuan": 2}[name]
    for rank in ranks:
        seen = rank[name]
        calls = [c for c, _ in seen["block_collectives"]]
        # q, k, v to heads and the output back: four all-to-alls per attention, nothing else
        # but HunyuanVideo's text output gathered over heads (11 text tokens, never the 45 image ones).
        assert calls.count("all_to_all") == 4 * blocks
        for call, shape in seen["block_collectives"]:
            if call == "all_gather":
                assert name == "hunyuan" and shape[1] == TEXT_LEN
            else:
                assert call == "all_to_all" and shape[1] in (23, 46)  # a shard; 45 tokens padded to 46
        # Self-attention ran on the whole 45-token sequence with half the heads (Hunyuan: + text).
        joint = 45 + (TEXT_LEN if name == "hunyuan" else 0)
        self_attention = [q for q, k in seen["block_attention"] if k[1] != TEXT_LEN]
        assert len(self_attention) == blocks
        assert all(q[1:3] == (joint, heads // WORLD) for q in self_attention)
        # The head gathers the projected tokens once: 23 per rank, 64 = patch volume x channels.
        assert seen["head_collectives"] == [("all_gather", (2, 23, 64))]


def test_wan_cross_attention_runs_on_the_shard_without_exchange(ranks):
    cross = [(q, k) for q, k in ranks[0]["wan"]["block_attention"] if k[1] == TEXT_LEN]
    assert len(cross) == 2 and all(q[1:3] == (23, 4) for q, _ in cross)


def test_hunyuan_indicator_shards_cover_the_real_tokens(ranks):
    whole = single_process("hunyuan")["modulated_input"]
    shards = torch.cat([rank["hunyuan"]["modulated_input"] for rank in ranks], dim=1)
    torch.testing.assert_close(shards, whole, atol=ATOL, rtol=RTOL)  # 23 + 22 tokens, no padding


def test_ranks_disagree_without_the_reduction_and_agree_with_it(ranks):
    previous, current = strong_shard_indicators()
    whole_decision, whole_change = teacache_decisions(previous, current)
    assert whole_decision and 0.4 < whole_change < 0.6  # the mean of |change| over both halves
    # Each rank alone: rank 0 saw a 1% change and skips, rank 1 a 100% change and computes.
    (skip0, change0), (skip1, change1) = (rank["unreduced"] for rank in ranks)
    assert (skip0, skip1) == (False, True)
    assert change0 == pytest.approx(0.01, rel=1e-3) and change1 == pytest.approx(1.0, rel=1e-3)
    # With the sp group's reducer both take the whole sequence's decision on its value.
    for rank in ranks:
        decision, change = rank["reduced"]
        assert decision == whole_decision
        assert change == pytest.approx(whole_change, rel=1e-6)


def test_hunyuan_teacache_statistic_is_the_whole_sequences(ranks):
    from sglang.multimodal_gen.runtime.models.hunyuan import HunyuanDiTAdapter

    transformer = build_hunyuan()
    adapter = HunyuanDiTAdapter(transformer)
    with torch.no_grad():
        first = adapter.embed(*hunyuan_inputs(transformer)[:3], **hunyuan_inputs(transformer)[3])[1].modulated_input
        latents, timestep, text, kwargs = hunyuan_inputs(transformer, scale_second_half=3.0)
        second = adapter.embed(latents, timestep, text, **kwargs)[1].modulated_input
    whole = teacache().relative_l1(second, first)
    local = [rank["hunyuan_change"][0] for rank in ranks]
    reduced = [rank["hunyuan_change"][1] for rank in ranks]
    assert abs(local[0] - local[1]) > 0.05 * whole  # the shards alone disagree
    assert reduced[0] == reduced[1] == pytest.approx(whole, rel=1e-5)


def test_heads_not_divisible_are_refused_in_one_line(ranks):
    message = ranks[0]["three_heads"]
    assert "--ulysses-degree 2 does not divide the 3 attention heads" in message and "\n" not in message


def test_calibration_records_of_shards_are_the_whole_sequences(ranks):
    import dataclasses

    whole = dataclasses.asdict(calibration_records())
    assert [len(row) for row in whole["output_gram"]] == [1, 2, 3, 4, 5, 6]  # summed locally: no reduction
    for rank in ranks:
        records = dataclasses.asdict(rank["calibration"])
        for field, expected in whole.items():
            if field == "sigma":
                assert records[field] == expected
            elif field == "output_gram":
                for got_row, expected_row in zip(records[field], expected):
                    assert got_row == pytest.approx(expected_row, rel=1e-6)
            else:
                assert records[field] == pytest.approx(expected, rel=1e-5, abs=1e-7), field
    # Without the reduction a shard's records are its own: rank 1's magnitude ratios differ.
    alone = dataclasses.asdict(ranks[1]["calibration_unreduced"])
    assert alone["mag_ratio"][2:] != pytest.approx(whole["mag_ratio"][2:], rel=1e-2)
