"""``--enable-torch-compile``: regional compilation of the DiT's transformer blocks.

Graph counts come from dynamo's counters (``unique_graphs``: graphs handed to a backend;
``frames``: frames dynamo compiled, one more for every recompile). The counting tests compile
with ``backend="eager"``: dynamo traces, guards and counts exactly as with inductor, but a graph
costs well under a second instead of ~20 s of C++ compilation on this machine's CPU. The real
default (inductor) runs in the numerical tests and the CLI test; the Ulysses test routes its graphs
to the eager backend through torch's own override (``debug_backend_override``), as each
rank's inductor build of its shard's graph would add ~30 s and inductor's numerics are checked above.
"""

from __future__ import annotations

import dataclasses
import logging

import imageio.v3 as iio
import pytest
import torch
from conftest import TINY_REQUEST, skipping_strategies
from torch._dynamo.utils import counters

from sglang.cli.main import build_parser, main, speed_kwargs
from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.runtime.entrypoints.generator import (
    BUILTIN_MODEL_PATH,
    DiffGenerator,
    denoising_stage,
    resolve_batched_cfg,
)

PROMPT = "a red circle moving left on a blue background"
STEPS = 10  # skipping_strategies skip steps at 10
STRATEGIES = skipping_strategies(str(BUILTIN_MODEL_PATH / "calibration.json"))
CACHED = {
    **{name: cache for name, cache in STRATEGIES.items() if name != "none"},
    "easycache+forecast1": dataclasses.replace(STRATEGIES["easycache"], estimator="forecast1"),
}


def _params(cache: CacheParams | None = None, **overrides) -> SamplingParams:
    fields = {"prompt": PROMPT, "seed": 3, **TINY_REQUEST, "num_inference_steps": STEPS, **overrides}
    return SamplingParams(cache=cache or CacheParams(), **fields)


def _compiled(generator: DiffGenerator, params: SamplingParams):
    """Run one request; its result and the (graphs, frames) dynamo compiled during it."""
    graphs, frames = counters["stats"]["unique_graphs"], counters["frames"]["total"]
    result = generator.generate(params)
    return result, (counters["stats"]["unique_graphs"] - graphs, counters["frames"]["total"] - frames)


@pytest.fixture(autouse=True)
def fresh_dynamo():
    """Every test starts with no compiled code and zero counts, so it counts its own graphs."""
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def eager_wan(tiny_wan_dir) -> DiffGenerator:
    """The tiny Wan (4 identical blocks) with its blocks compiled on dynamo's eager backend; its own
    copy, since compiling changes the modules in place."""
    generator = DiffGenerator.from_pretrained(str(tiny_wan_dir), device="cpu")
    denoising_stage(generator.pipeline).adapter.compile_blocks(backend="eager")
    return generator


@pytest.fixture(params=[False, True], ids=["two-pass", "batched"])
def batched(request, eager_wan):
    """Both CFG loops: two passes of batch 1, or one of batch 2 (a graph of its own shape)."""
    stage = denoising_stage(eager_wan.pipeline)
    default, stage.batched_cfg = stage.batched_cfg, request.param
    yield request.param
    stage.batched_cfg = default


def test_identical_blocks_share_one_graph_and_a_second_request_compiles_none(eager_wan, batched):
    with torch._dynamo.config.patch(error_on_recompile=True):
        _, first = _compiled(eager_wan, _params())
        _, second = _compiled(eager_wan, _params(seed=4))
    assert first == (1, 1)  # 4 blocks x 10 steps x 2 branches: one graph, traced once
    assert second == (0, 0)


@pytest.mark.parametrize("name", list(CACHED))
def test_a_cached_request_compiles_no_more_than_an_uncached_one(eager_wan, batched, name):
    with torch._dynamo.config.patch(error_on_recompile=True):
        result, first = _compiled(eager_wan, _params(CACHED[name]))
        _, second = _compiled(eager_wan, _params(CACHED[name], seed=4))
    assert result.cache_stats.total_skipped > 0, f"{name} skipped nothing: the test would prove nothing"
    assert first == (1, 1)  # the uncached request's one graph; decisions and residuals stay eager
    assert second == (0, 0)


def test_hunyuan_compiles_once_per_block_class_and_input_layout(tiny_hunyuan_dir):
    """diffusers' single-stream block returns its image tokens as a view of the joint [image, text]
    sequence, so the first single-stream block gets contiguous tokens and the next ones a strided
    view: dynamo compiles that class once per layout, on the first request (the second entry is
    generic in the stride), and nothing after it, cached or not."""
    generator = DiffGenerator.from_pretrained(str(tiny_hunyuan_dir), device="cpu")
    denoising_stage(generator.pipeline).adapter.compile_blocks(backend="eager")
    _, uncached = _compiled(generator, _params())
    with torch._dynamo.config.patch(error_on_recompile=True):
        cached, again = _compiled(generator, _params(STRATEGIES["easycache"], seed=4))
    assert uncached == (3, 3)  # double-stream blocks; single-stream: contiguous and strided input
    assert cached.cache_stats.total_skipped > 0 and again == (0, 0)


def _inductor_run(model: str, dtype: str, params: SamplingParams, caplog):
    """``enable_torch_compile=True`` (inductor, the default): the run, after checking the log line
    and that one graph served the 4 blocks of every step and branch."""
    with caplog.at_level(logging.INFO, logger="sglang.multimodal_gen.runtime.models.base"):
        generator = DiffGenerator.from_pretrained(model, device="cpu", dtype=dtype, enable_torch_compile=True)
    assert "torch.compile: 4 transformer blocks (WanTransformerBlock)" in caplog.text
    result, graphs = _compiled(generator, params)
    assert graphs == (1, 1)
    return result


def test_inductor_matches_eager_in_float32(tiny_wan_dir, wan_generator, caplog):
    """Inductor fuses a block's element-wise work (norms, modulation, activations, softmax) into
    its own kernels and may reorder their reductions; the matmuls go to the same BLAS. So fp32
    differs from eager by float32 rounding: measured max 3.3e-6 on latents of magnitude up to 4
    after 3 steps; 1e-4 leaves room for another CPU's vector width, while a wrong graph, a skipped
    block or a stale weight moves the latents by ~1."""
    params = _params(num_inference_steps=3)
    compiled = _inductor_run(str(tiny_wan_dir), "float32", params, caplog)
    torch.testing.assert_close(compiled.latents, wan_generator.generate(params).latents, atol=1e-4, rtol=0)


def test_inductor_in_bfloat16_is_as_close_to_float32_as_eager(tiny_wan_dir, wan_generator, caplog):
    """Eager bf16 rounds every intermediate to bf16; a fused kernel computes in fp32 and rounds
    once, so compiled and eager bf16 differ by about bf16's own error, not by float32 ulps
    (measured after 3 steps: compiled is 6.2e-2 from eager bf16, which is 5.0e-2 from fp32). The
    check that means something: compiled bf16 is no further from the fp32 result than eager bf16
    is, within a factor 2 (measured 4.0e-2 against 5.0e-2; a broken graph would be ~1 away)."""
    params = _params(num_inference_steps=3)
    reference = wan_generator.generate(params).latents
    eager = DiffGenerator.from_pretrained(str(tiny_wan_dir), device="cpu", dtype="bfloat16").generate(params)
    compiled = _inductor_run(str(tiny_wan_dir), "bfloat16", params, caplog)
    eager_error = (eager.latents - reference).abs().max().item()
    compiled_error = (compiled.latents - reference).abs().max().item()
    assert compiled_error <= 2 * eager_error, (compiled_error, eager_error)


EAGER_EVERYWHERE = ">=0:eager"  # torch's TORCH_COMPILE_OVERRIDE_BACKENDS syntax: every graph on eager


def route_graphs_to_eager() -> None:
    """A worker's ``worker_init``: its graphs go to dynamo's eager backend, as rank 0's below."""
    torch._dynamo.config.debug_backend_override = EAGER_EVERYWHERE


def test_ulysses_workers_compile_and_match_one_process(tmp_path):
    """Ulysses' all-to-alls inside the blocks trace on gloo (functional collectives, no graph
    break); every block of a rank sees its shard in one contiguous layout, so the rank compiles one
    graph on the first request and none afterwards (a strided first shard would cost a second)."""
    from sglang.multimodal_gen.tools.tiny_models import build_tiny_wan

    with torch._dynamo.config.patch(debug_backend_override=EAGER_EVERYWHERE):  # rank 0 is this process
        model = str(build_tiny_wan(tmp_path / "tiny-wan-4heads", seed=0,
                                   transformer_config={"num_attention_heads": 4, "attention_head_dim": 16}))
        params = _params(STRATEGIES["easycache"], num_inference_steps=STEPS)
        single = DiffGenerator.from_pretrained(model, device="cpu").generate(params)
        with DiffGenerator.from_pretrained(model, device="cpu", num_gpus=2, ulysses_degree=2, dist_timeout_s=300,
                                           enable_torch_compile=True, worker_init=route_graphs_to_eager) as group:
            assert (group.workers.load["enable_torch_compile"], group.workers.load["batched_cfg"]) == (True, True)
            parallel, first = _compiled(group, params)
            _, second = _compiled(group, params)
        assert first == (1, 1) and second == (0, 0)
        # As test_ulysses_pipeline.py: fp32 ulps per step between the shards' and one process's sums.
        torch.testing.assert_close(parallel.latents, single.latents, atol=1e-4, rtol=0)
        assert parallel.cache_stats.total_skipped == single.cache_stats.total_skipped


def test_generate_with_torch_compile_and_a_cache_writes_the_mp4(tiny_wan_dir, tmp_path, capsys, caplog):
    """`sglang generate --enable-torch-compile` (4 identical blocks): the flag compiles them, one
    graph, and the cached run writes its video. The folder and geometry of the inductor tests
    above, so inductor's cache serves the graph they compiled (a C++ build of a new one takes
    seconds on this CPU)."""
    out = tmp_path / "clip.mp4"
    geometry = ["--height", str(TINY_REQUEST["height"]), "--width", str(TINY_REQUEST["width"]),
                "--num-frames", str(TINY_REQUEST["num_frames"])]
    with caplog.at_level(logging.INFO, logger="sglang.multimodal_gen.runtime.models.base"):
        code = main(["generate", "--model-path", str(tiny_wan_dir), "--enable-torch-compile", "--cache", "easycache",
                     "--prompt", PROMPT, *geometry, "--num-inference-steps", "4", "--output-path", str(out)])
    assert code == 0 and f"saved {out}" in capsys.readouterr().out
    assert "torch.compile: 4 transformer blocks" in caplog.text
    assert (counters["stats"]["unique_graphs"], counters["frames"]["total"]) == (1, 1)
    assert iio.imread(out, index=None).shape == (TINY_REQUEST["num_frames"], TINY_REQUEST["height"],
                                                 TINY_REQUEST["width"], 3)


@pytest.mark.parametrize("command", ["generate", "serve"])
def test_speed_flags_reach_from_pretrained(command):
    prompt = ["--prompt", "p"] if command == "generate" else []
    parse = build_parser().parse_args
    assert speed_kwargs(parse([command, *prompt])) == {"enable_torch_compile": False, "batched_cfg": None}
    assert speed_kwargs(parse([command, *prompt, "--enable-torch-compile", "--batched-cfg"])) == {
        "enable_torch_compile": True, "batched_cfg": True}
    assert speed_kwargs(parse([command, *prompt, "--no-batched-cfg"]))["batched_cfg"] is False


def test_batched_cfg_resolves_and_reaches_the_denoising_stage(tiny_wan_dir):
    assert (resolve_batched_cfg(None), resolve_batched_cfg(True), resolve_batched_cfg(False)) == (True, True, False)
    assert resolve_batched_cfg(True, enable_cfg_parallel=True) is False  # one branch per rank
    for asked, expected in ((None, True), (False, False)):
        generator = DiffGenerator.from_pretrained(str(tiny_wan_dir), device="cpu", batched_cfg=asked)
        stage = denoising_stage(generator.pipeline)
        assert stage.batched_cfg is expected
        assert stage.sync_free_scheduler is False  # CUDA only: on the CPU nothing waits for a device
