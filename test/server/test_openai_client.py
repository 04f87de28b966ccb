"""The real server driven by the real ``openai`` client (multipart forms) and by plain JSON."""

from __future__ import annotations

import json
import time

import imageio.v3 as iio
import numpy as np
import openai
import pytest

from sglang.cli.main import main

from .conftest import SMALL, wait_finished

# The client marks the videos resource deprecated (the hosted Sora API); the routes are the same.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROMPT = "a red circle moving left on a blue background"
MAGCACHE = {"cache": "magcache", "cache_threshold": 0.5, "cache_max_skip_steps": 3, "cache_retention_ratio": 0.1,
            "cache_params": {"sqrt_ratios": True}}
# cache_stats keys holding measured times, which differ between two runs of the same request.
MEASURED = {"denoising_seconds", "blocks_pass_seconds", "uncached_estimate_seconds", "measured_speedup"}


def _decode(content: bytes) -> np.ndarray:
    return iio.imread(content, index=None, extension=".mp4")


@pytest.fixture(scope="module")
def magcache_video(openai_client):
    """One MagCache request made through the client: (created object, finished object, mp4 bytes)."""
    created = openai_client.videos.create(
        prompt=PROMPT, size="48x32", seconds="1",
        extra_body={**MAGCACHE, "num_inference_steps": 8, "seed": 3},
    )
    finished = openai_client.videos.poll(created.id, poll_interval_ms=50)
    content = openai_client.videos.download_content(created.id).read()
    return created, finished, content


def test_create_poll_download_with_magcache(magcache_video):
    created, video, content = magcache_video
    assert created.object == "video" and created.id.startswith("video_")
    assert created.status in ("queued", "in_progress", "completed")
    assert created.model == "wan2.1-t2v-tiny" and created.prompt == PROMPT
    # 1 s at the model's 8 fps is 8 frames, rounded to the 4k+1 the VAE takes: 9 frames, 1.125 s.
    assert created.size == "48x32" and created.num_frames == 9 and created.seconds == "1.125"
    assert video.status == "completed" and video.progress == 100 and video.error is None
    assert video.completed_at >= video.created_at
    assert video.cache == "magcache" and video.seed == 3 and video.num_inference_steps == 8
    stats = video.cache_stats
    assert stats["strategy"] == "magcache" and set(stats["branches"]) == {"cond", "uncond"}
    for branch in stats["branches"].values():
        assert branch["skipped"] > 0 and branch["computed"] + branch["skipped"] == 8
    assert video.inference_time_s > 0 and "denoising" in video.timings
    frames = _decode(content)
    assert frames.shape == (9, 32, 48, 3) and frames.dtype == np.uint8


def test_cache_stats_carry_measured_time_and_uncached_estimate(magcache_video):
    stats = magcache_video[1].cache_stats
    computed = sum(b["computed"] for b in stats["branches"].values())
    skipped = sum(b["skipped"] for b in stats["branches"].values())
    assert stats["timed_passes"] == computed and skipped > 0
    assert stats["blocks_pass_seconds"] > 0 and stats["denoising_seconds"] > 0
    assert stats["uncached_estimate_seconds"] == pytest.approx(
        stats["denoising_seconds"] + skipped * stats["blocks_pass_seconds"], abs=1e-5
    )
    assert stats["uncached_estimate_seconds"] > stats["denoising_seconds"]
    assert stats["measured_speedup"] == pytest.approx(
        stats["uncached_estimate_seconds"] / stats["denoising_seconds"], abs=1e-3
    )
    assert stats["pass_reduction"] == pytest.approx((computed + skipped) / computed, abs=1e-4)
    assert stats["denoising_seconds"] <= magcache_video[1].timings["denoising"] + 1e-4


def test_server_output_equals_sglang_generate(magcache_video, tmp_path):
    _, _, content = magcache_video
    out = tmp_path / "cli.mp4"
    code = main(["generate", "--prompt", PROMPT, "--seed", "3", "--width", "48", "--height", "32", "--num-frames",
                 "9", "--num-inference-steps", "8", "--device", "cpu", "--cache", "magcache",
                 "--cache-threshold", "0.5", "--cache-max-skip-steps", "3", "--cache-retention-ratio", "0.1",
                 "--cache-params", json.dumps(MAGCACHE["cache_params"]), "--output-path", str(out)])
    assert code == 0
    np.testing.assert_array_equal(_decode(content), _decode(out.read_bytes()))
    assert content == out.read_bytes()


def test_cache_estimator_through_the_client_equals_sglang_generate(openai_client, magcache_video, tmp_path):
    """``cache_estimator`` picks what skipped steps add: same skips as the reuse request, another
    video, the CLI's --cache-estimator's bytes, and the estimator and its memory in cache_stats."""
    created = openai_client.videos.create(
        prompt=PROMPT, size="48x32", seconds="1",
        extra_body={**MAGCACHE, "num_inference_steps": 8, "seed": 3, "cache_estimator": "forecast1_sigma"},
    )
    video = openai_client.videos.poll(created.id, poll_interval_ms=50)
    content = openai_client.videos.download_content(created.id).read()
    stats, reused = video.cache_stats, magcache_video[1].cache_stats
    assert reused["estimator"] == "reuse" and stats["estimator"] == "forecast1_sigma"
    assert stats["estimator_history_bytes"] == 2 * reused["estimator_history_bytes"] > 0
    assert stats["branches"] == reused["branches"]
    assert content != magcache_video[2]
    out = tmp_path / "cli.mp4"
    assert main(["generate", "--prompt", PROMPT, "--seed", "3", "--width", "48", "--height", "32", "--num-frames",
                 "9", "--num-inference-steps", "8", "--device", "cpu", "--cache", "magcache",
                 "--cache-threshold", "0.5", "--cache-max-skip-steps", "3", "--cache-retention-ratio", "0.1",
                 "--cache-params", json.dumps(MAGCACHE["cache_params"]), "--cache-estimator", "forecast1_sigma",
                 "--output-path", str(out)]) == 0
    assert content == out.read_bytes()


def test_list_pages_with_cursor(openai_client):
    ids = [openai_client.videos.create(prompt=f"a green square {i}", size="48x32",
                                       extra_body={"num_inference_steps": 2, "num_frames": 5, "seed": i}).id
           for i in range(3)]
    first = openai_client.videos.list(limit=2, order="desc")
    assert [v.id for v in first.data] == ids[::-1][:2]
    assert first.has_more is True and first.last_id == ids[1]
    second = openai_client.videos.list(limit=2, order="desc", after=first.last_id)
    assert second.data[0].id == ids[0]
    everything_asc = [v.id for v in openai_client.videos.list(limit=2, order="asc")]  # auto-pagination
    assert everything_asc[-3:] == ids and len(set(everything_asc)) == len(everything_asc)
    everything_desc = [v.id for v in openai_client.videos.list(limit=100)]
    assert everything_desc == everything_asc[::-1]
    last_page = openai_client.videos.list(limit=100, order="asc", after=ids[-1])
    assert last_page.data == [] and last_page.has_more is False


def test_delete(openai_client):
    video = openai_client.videos.create(prompt="a yellow triangle", size="48x32",
                                        extra_body={"num_inference_steps": 2, "num_frames": 5})
    deleted = openai_client.videos.delete(video.id)
    assert deleted.id == video.id and deleted.deleted is True and deleted.object == "video.deleted"
    # If the worker had already started it, it shows as failed / cancelled until the worker lets go.
    deadline = time.monotonic() + 10
    with pytest.raises(openai.NotFoundError) as missing:
        while time.monotonic() < deadline:
            assert openai_client.videos.retrieve(video.id).error.code == "cancelled"
            time.sleep(0.02)
    assert missing.value.param == "video_id" and video.id in missing.value.message
    with pytest.raises(openai.NotFoundError):
        openai_client.videos.download_content(video.id)
    with pytest.raises(openai.NotFoundError):
        openai_client.videos.delete(video.id)
    assert video.id not in [v.id for v in openai_client.videos.list(limit=100)]


def test_client_sees_openai_errors(openai_client):
    with pytest.raises(openai.BadRequestError) as bad:
        openai_client.videos.create(prompt=PROMPT, extra_body={"cache": "magcache", "cache_threshold": -1})
    assert bad.value.status_code == 400 and bad.value.param == "cache_threshold"
    assert bad.value.type == "invalid_request_error" and "threshold must be a number >= 0" in bad.value.message


def test_json_body_over_httpx(http):
    body = {"prompt": PROMPT, "seed": 3, "num_inference_steps": 8, "size": "48x32", "num_frames": 9,
            "cache": "magcache", "cache_threshold": 0.5, "cache_max_skip_steps": 3, "cache_retention_ratio": 0.1,
            "cache_params": {"sqrt_ratios": True}}
    response = http.post("/v1/videos", json=body)
    assert response.status_code == 200, response.text
    video = wait_finished(http, response.json()["id"])
    assert video["status"] == "completed"
    assert all(b["skipped"] > 0 for b in video["cache_stats"]["branches"].values())
    content = http.get(f"/v1/videos/{video['id']}/content")
    assert content.status_code == 200 and content.headers["content-type"] == "video/mp4"
    assert _decode(content.content).shape == (9, 32, 48, 3)


def test_urlencoded_form_with_json_string_cache_params(http, magcache_video):
    """The same request as a urlencoded form with cache_params as a JSON string: same video."""
    form = {"prompt": PROMPT, "seed": "3", "num_inference_steps": "8", "size": "48x32", "seconds": "1",
            "cache": "magcache", "cache_threshold": "0.5", "cache_max_skip_steps": "3",
            "cache_retention_ratio": "0.1", "cache_params": '{"sqrt_ratios": true}'}
    response = http.post("/v1/videos", data=form)
    assert response.status_code == 200, response.text
    video = wait_finished(http, response.json()["id"])
    decisions = {k: v for k, v in video["cache_stats"].items() if k not in MEASURED}
    assert decisions == {k: v for k, v in magcache_video[1].cache_stats.items() if k not in MEASURED}
    assert http.get(f"/v1/videos/{video['id']}/content").content == magcache_video[2]


def test_queued_requests_complete_with_their_seeds(http, openai_client):
    from sglang.multimodal_gen.configs.cache_params import CacheParams
    from sglang.multimodal_gen.configs.sampling_params import SamplingParams
    from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator
    from sglang.multimodal_gen.runtime.utils.video_io import encode_mp4

    requests = [
        dict(seed=0),
        dict(seed=1, cache="magcache"),
        dict(seed=2, cache="teacache"),
        dict(seed=3, guidance_scale=1.0),
        dict(seed=4, negative_prompt="blurry"),
    ]
    ids = [openai_client.videos.create(prompt=PROMPT, size=SMALL["size"],
                                       extra_body={**r, "num_frames": 5, "num_inference_steps": 6}).id
           for r in requests]
    start = time.perf_counter()
    health = http.get("/health")
    assert health.status_code == 200 and time.perf_counter() - start < 2.0
    videos = [wait_finished(http, video_id) for video_id in ids]
    assert [v["status"] for v in videos] == ["completed"] * len(requests)
    assert [v["seed"] for v in videos] == [r["seed"] for r in requests]

    generator = DiffGenerator.from_pretrained(device="cpu")
    contents = []
    for r, video in zip(requests, videos):
        r = dict(r)
        cache = CacheParams(strategy=r.pop("cache", "none"))
        direct = generator.generate(SamplingParams(prompt=PROMPT, height=32, width=48, num_frames=5,
                                                   num_inference_steps=6, cache=cache, **r))
        content = http.get(f"/v1/videos/{video['id']}/content").content
        assert content == encode_mp4(direct.frames, direct.params.fps), f"seed {r['seed']} differs"
        contents.append(content)
    assert len(set(contents)) == len(contents)
