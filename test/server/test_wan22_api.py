"""A Wan2.2 two-expert folder served and driven by the real ``openai`` client: ``guidance_scale_2``
reaches the low-noise expert and comes back on the video object; ``cache_stats`` reports per expert;
a budget without a calibration of the experts is a 400 naming ``cache_calibration``."""

from __future__ import annotations

import json
import shutil

import imageio.v3 as iio
import openai
import pytest

from .conftest import serve

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROMPT = "a red circle moving left on a blue background"


@pytest.fixture(scope="module")
def wan22_client(tiny_wan22_dir, tmp_path_factory):
    # The folder at a small default size: the server times a few uncached steps at it on start
    # (what --cache-speedup plans with), and Wan2.2's own default is 1280x720, 81 frames.
    folder = tmp_path_factory.mktemp("wan22-small") / "tiny-wan22"
    shutil.copytree(tiny_wan22_dir, folder)
    small = {"sampling_defaults": {"height": 64, "width": 48, "num_frames": 5, "num_inference_steps": 6}}
    (folder / "sglang_config.json").write_text(json.dumps(small))
    with serve(tmp_path_factory.mktemp("wan22-server") / "server.log", "--model-path", str(folder)) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="sk-local", max_retries=0, timeout=30.0)


def test_openai_client_flow_with_guidance_scale_2(wan22_client):
    request = {"num_inference_steps": 4, "num_frames": 5, "seed": 2, "guidance_scale": 4.0}
    created = wan22_client.videos.create(prompt=PROMPT, size="48x64", extra_body={**request, "guidance_scale_2": 2.0})
    finished = wan22_client.videos.poll(created.id, poll_interval_ms=50)
    assert finished.status == "completed", finished.error
    assert finished.guidance_scale == 4.0 and finished.guidance_scale_2 == 2.0
    frames = iio.imread(wan22_client.videos.download_content(created.id).read(), index=None, extension=".mp4")
    assert frames.shape == (5, 64, 48, 3)
    # Without guidance_scale_2 the low-noise expert takes guidance_scale, as in diffusers.
    default = wan22_client.videos.poll(wan22_client.videos.create(prompt=PROMPT, size="48x64",
                                                                  extra_body=request).id, poll_interval_ms=50)
    assert default.status == "completed" and default.guidance_scale_2 == 4.0


def test_cache_stats_report_per_expert(wan22_client):
    request = {"num_inference_steps": 6, "num_frames": 5, "seed": 2, "cache": "easycache", "cache_threshold": 0.5}
    created = wan22_client.videos.create(prompt=PROMPT, size="48x64", extra_body=request)
    finished = wan22_client.videos.poll(created.id, poll_interval_ms=50)
    assert finished.status == "completed", finished.error
    experts = finished.model_extra["cache_stats"]["experts"]
    assert list(experts) == ["high_noise", "low_noise"]
    assert experts["high_noise"]["num_inference_steps"] + experts["low_noise"]["num_inference_steps"] == 6
    first_low = 6 - experts["low_noise"]["num_inference_steps"]
    for branch in experts["low_noise"]["branches"].values():
        assert first_low in branch["computed_steps"]  # the switch is never skipped


def test_a_budget_without_an_experts_calibration_is_a_400_naming_it(wan22_client):
    with pytest.raises(openai.BadRequestError) as refused:
        wan22_client.videos.create(prompt=PROMPT, size="48x64", extra_body={"cache_speedup": 2, "num_frames": 5})
    error = refused.value.body
    assert error["param"] == "cache_calibration" and "sglang calibrate" in error["message"]
    assert "cache easycache" in error["message"]  # the server words flags as its fields
