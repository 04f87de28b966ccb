"""A Wan2.2 two-expert folder served and driven by the real ``openai`` client: ``guidance_scale_2``
reaches the low-noise expert and comes back on the video object; caching is refused naming ``cache``."""

from __future__ import annotations

import imageio.v3 as iio
import openai
import pytest

from .conftest import serve

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning")

PROMPT = "a red circle moving left on a blue background"


@pytest.fixture(scope="module")
def wan22_client(tiny_wan22_dir, tmp_path_factory):
    with serve(tmp_path_factory.mktemp("wan22-server") / "server.log", "--model-path", str(tiny_wan22_dir)) as url:
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


def test_caching_a_two_expert_model_is_a_400_naming_cache(wan22_client):
    with pytest.raises(openai.BadRequestError) as refused:
        wan22_client.videos.create(prompt=PROMPT, size="48x64", extra_body={"cache_speedup": 2, "num_frames": 5})
    error = refused.value.body
    assert error["param"] == "cache" and "two-expert" in error["message"] and "cache_speedup" in error["message"]
