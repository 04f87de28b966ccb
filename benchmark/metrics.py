"""Fidelity and memory measurements for the caching benchmark.

Fidelity compares decoded float frames ``(frames, height, width, 3)`` in ``[0, 1]`` of a cached run
with the uncached run of the same seed: PSNR and mean absolute error over the whole video, and
SSIM (Wang et al., 2004) per frame and channel with the usual 11x11 Gaussian window (sigma 1.5,
K1 0.01, K2 0.03), averaged over the valid (unpadded) positions, which is what scikit-image
computes with ``gaussian_weights=True``.
"""

from __future__ import annotations

import math
import os
import resource
import threading
import time

import numpy as np
import torch
import torch.nn.functional as F

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03


def psnr(test: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> float:
    """Peak signal-to-noise ratio in dB over the whole video; ``inf`` for identical videos."""
    mse = float(np.mean((np.asarray(test, np.float64) - np.asarray(reference, np.float64)) ** 2))
    return math.inf if mse == 0.0 else 10.0 * math.log10(data_range**2 / mse)


def mae(test: np.ndarray, reference: np.ndarray) -> float:
    """Mean absolute error over every pixel and channel."""
    return float(np.mean(np.abs(np.asarray(test, np.float64) - np.asarray(reference, np.float64))))


def _gaussian(size: int, sigma: float) -> torch.Tensor:
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def ssim(test: np.ndarray, reference: np.ndarray, data_range: float = 1.0) -> float:
    """Mean SSIM over frames and channels of two ``(frames, height, width, channels)`` videos."""
    x = torch.from_numpy(np.asarray(test, np.float64)).permute(0, 3, 1, 2)
    y = torch.from_numpy(np.asarray(reference, np.float64)).permute(0, 3, 1, 2)
    channels, height, width = x.shape[1:]
    size = min(SSIM_WINDOW, height, width)
    g = _gaussian(size, SSIM_SIGMA)
    rows = g.view(1, 1, 1, size).expand(channels, 1, 1, size)
    cols = g.view(1, 1, size, 1).expand(channels, 1, size, 1)

    def blur(t: torch.Tensor) -> torch.Tensor:
        return F.conv2d(F.conv2d(t, rows, groups=channels), cols, groups=channels)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (SSIM_K1 * data_range) ** 2, (SSIM_K2 * data_range) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return float(ssim_map.mean())


def fidelity(test: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    return {"psnr": psnr(test, reference), "ssim": ssim(test, reference), "mae": mae(test, reference)}


def current_rss() -> int:
    """Resident set size of this process in bytes (Linux ``/proc``; else the lifetime peak)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class PeakMemory:
    """Peak memory while the block runs: the CUDA allocator's peak, or the process RSS on CPU.

    On CPU torch allocates outside Python, so ``tracemalloc`` sees nothing; instead a thread samples
    the RSS every ``interval`` seconds. That thread competes for the GIL, so use it outside timed runs.
    """

    def __init__(self, device: torch.device, interval: float = 0.002) -> None:
        self.device = device
        self.interval = interval
        self.start_bytes = 0
        self.peak_bytes = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> "PeakMemory":
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start_bytes = torch.cuda.memory_allocated(self.device)
        else:
            self.start_bytes = self.peak_bytes = current_rss()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak_bytes = max(self.peak_bytes, current_rss())
            time.sleep(self.interval)

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device)
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self.peak_bytes, current_rss())
