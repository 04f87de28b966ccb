"""The caching benchmark's smoke run (tiny model, uncached + MagCache and the diffusers peer, few
steps) so that benchmark/bench_cache.py cannot rot, its fidelity metrics on known inputs, and
benchmark/hunyuan_speed.py's ``--quick`` run."""

from __future__ import annotations

import json
import math
import sys

import numpy as np
import pytest
from conftest import REPO, TINY_REQUEST

sys.path.insert(0, str(REPO / "benchmark"))

import bench_cache  # noqa: E402
import hunyuan_speed  # noqa: E402
from bench_configs import PEER_BASELINE, BenchConfig, BenchSettings, Sweep  # noqa: E402
from metrics import mae, psnr, ssim  # noqa: E402

from sglang.multimodal_gen.configs.cache_params import CacheParams  # noqa: E402
from sglang.multimodal_gen.runtime.cache.base import COND, UNCOND  # noqa: E402
from sglang.multimodal_gen.runtime.cache.magcache import preset_ratio_table  # noqa: E402

STEPS = 8
SETTINGS = dict(threshold=0.3, max_skip_steps=3, retention_ratio=0.2)


def test_fidelity_metrics_on_known_inputs():
    rng = np.random.default_rng(0)
    video = rng.random((3, 24, 20, 3), dtype=np.float32)
    assert psnr(video, video) == math.inf and ssim(video, video) == pytest.approx(1.0) and mae(video, video) == 0.0
    shifted = np.clip(video + 0.1, 0, 1)
    assert psnr(video + 0.1, video) == pytest.approx(20.0, abs=1e-4)  # MSE 0.01 -> 20 dB
    assert mae(video + 0.1, video) == pytest.approx(0.1, abs=1e-6)
    noisy = np.clip(video + rng.normal(0, 0.2, video.shape), 0, 1)
    assert 0 < ssim(noisy, video) < ssim(shifted, video) < 1


def test_benchmark_smoke_run_writes_sane_results(tiny_wan_dir, tmp_path):
    ratios = preset_ratio_table()["wan21_t2v_1.3b"][COND]
    configs = [
        BenchConfig("uncached", "uncached", "uncached"),
        BenchConfig("magcache t=0.3", "ours magcache, diffusers' settings", threshold=0.3, cache=CacheParams(
            "magcache", options={"mag_ratios": {COND: ratios, UNCOND: ratios}}, **SETTINGS)),
        BenchConfig(PEER_BASELINE, "uncached", "uncached", impl="diffusers"),
        BenchConfig("diffusers hook t=0.3", "diffusers magcache hook", impl="diffusers", threshold=0.3,
                    hook={"mag_ratios": ratios, **SETTINGS}),
    ]
    request = {k: TINY_REQUEST[k] for k in ("height", "width", "num_frames")}
    settings = BenchSettings(
        sweep=Sweep(prompts=["a red circle moving left on a white background"], seeds=[3], repeats=1,
                    magcache_thresholds=[], teacache_thresholds=[], peer_thresholds=[]),
        model_path=str(tiny_wan_dir), request={**request, "num_inference_steps": STEPS}, device="cpu",
        block_heavy=False, configs=configs, output_dir=tmp_path, plot_path=tmp_path / "frontier.png",
        command="smoke",
    )
    report = bench_cache.run_benchmark(settings)

    saved = json.loads((tmp_path / "bench_cache_cpu.json").read_text())
    rows = {r["name"]: r for r in saved["sections"]["main"]}
    assert list(rows) == [c.name for c in configs]
    uncached, cached, hook = rows["uncached"], rows["magcache t=0.3"], rows["diffusers hook t=0.3"]
    assert uncached["psnr"] is None and uncached["ssim"] == pytest.approx(1.0) and uncached["mae"] == 0.0
    assert uncached["passes"] == {COND: STEPS, UNCOND: STEPS} and uncached["ideal_speedup"] == 1.0
    assert 0 < cached["skipped"] < 2 * STEPS
    assert cached["ideal_speedup"] == pytest.approx(2 * STEPS / (2 * STEPS - cached["skipped"]))
    assert sum(cached["passes"].values()) == 2 * STEPS - cached["skipped"]
    assert 10 < cached["psnr"] < math.inf and 0 < cached["ssim"] < 1 and cached["mae"] > 0
    for row in rows.values():
        assert row["denoise_ms"] > 0 and row["e2e_ms"] > row["denoise_ms"] and row["denoise_speedup"] > 0
        assert row["peak_mem_mib"] > 0
    assert cached["ms_per_step"]["blocks"] > 0 and 0 < cached["blocks_share"] < 1
    # Our uncached output is diffusers' own; the hook skips the same steps with the same result.
    assert rows[PEER_BASELINE]["mae"] < 1e-5
    assert hook["computed_steps"] == cached["computed_steps"]
    [pair] = report["checks"]["peer"]
    assert pair["same_plan"] and pair["fidelity_at_least_diffusers"]
    assert hook["psnr"] == pytest.approx(cached["psnr"], abs=0.01)

    markdown = (tmp_path / "bench_cache_cpu.md").read_text()
    assert "| magcache t=0.3 |" in markdown and "Command: `smoke`" in markdown and "| inf |" in markdown
    assert (tmp_path / "frontier.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_hunyuan_speed_quick_run_writes_sane_results(tmp_path, capsys):
    output = tmp_path / "hunyuan-speed.json"
    assert hunyuan_speed.main(["--quick", "--output", str(output)]) == 0

    saved = json.loads(output.read_text())
    steps = saved["steps"]
    rows = {r["name"]: r for r in saved["rows"]}
    assert list(rows) == [c.name for c in hunyuan_speed.QUICK_CONFIGS] == list(saved["configs"])
    uncached = rows["uncached"]
    assert uncached["passes"] == steps and uncached["ideal"] == 1.0 and uncached["measured"] == 1.0
    easycache = next(r for r in saved["rows"] if r["strategy"] == "easycache")
    assert easycache["skips"] == "whole model" and 0 < easycache["passes"] < steps
    assert easycache["ideal"] == pytest.approx(steps / easycache["passes"])
    for row in saved["rows"]:
        assert len(row["seconds"]) == saved["rounds"] and row["median_s"] > 0 and row["measured"] > 0
    assert saved["command"].startswith("python benchmark/hunyuan_speed.py --quick")
    assert len(saved["machine"]["load_average_end"]) == 3
    assert f"| {easycache['name']} | whole model | {easycache['passes']} |" in capsys.readouterr().out
