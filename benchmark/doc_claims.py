"""Measures two figures quoted in docs/: the PSNR an mp4 round trip costs (docs/generate.md) and
how close a calibration from fewer prompts comes to the 8-prompt one (docs/calibration.md).

Run: python benchmark/doc_claims.py  (about 1 minute on 2 CPU cores)
"""
import sys, tempfile, numpy as np
sys.path.insert(0, str(__import__('pathlib').Path(__file__).resolve().parents[1] / 'python'))
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator
from sglang.multimodal_gen.runtime.entrypoints.calibrate import calibrate, read_prompts_file
from sglang.multimodal_gen.runtime.utils.video_io import save_video, read_video
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.tools.tiny_models import build_tiny_wan
from metrics import psnr  # benchmark/metrics.py, next to this script
d = tempfile.mkdtemp()
for name, path in (("built-in (trained)", None), ("random tiny", build_tiny_wan(d + "/rand"))):
    g = DiffGenerator.from_pretrained(path and str(path))
    r = g.generate(SamplingParams(prompt="a red circle moving left on a blue background", seed=3, height=64, width=64, num_frames=17, num_inference_steps=50, fps=8))
    save_video(r.frames, d + "/v.mp4", r.params.fps)
    print(name, "mp4 round-trip PSNR", round(psnr(read_video(d + "/v.mp4") / 255.0, r.frames), 2))
g = DiffGenerator.from_pretrained()
prompts = read_prompts_file("python/sglang/multimodal_gen/builtin/wan2.1-t2v-tiny/calibration_prompts.txt")
full = calibrate(g, prompts, SamplingParams(num_inference_steps=50), d + "/8.json")
for n in (1, 2, 4):
    part = calibrate(g, prompts[:n], SamplingParams(num_inference_steps=50), d + f"/{n}.json")
    diff = max(np.max(np.abs(np.subtract(part.branches[b].mag_ratio, full.branches[b].mag_ratio))) for b in ("cond", "uncond"))
    print(f"{n} prompts vs 8: max |ratio diff| {diff:.4f}")
