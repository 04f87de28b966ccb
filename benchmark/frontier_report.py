"""The frontier benchmark's report: per method and speedup, mean and worst PSNR and SSIM, and a plot."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path
from typing import Sequence

import numpy as np


def summarise(rows: Sequence[dict]) -> list[dict]:
    """One entry per (method, speedup): passes (the distinct counts over samples, and their mean), the
    measured denoising speedup (median uncached time / median time; ``None`` for diffusers' runs),
    mean and worst PSNR / SSIM."""
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["method"], row["speedup"])].append(row)
    summary = []
    for (method, speedup), group in groups.items():
        passes = sorted({r["passes"] for r in group})
        psnrs, ssims = [r["psnr"] for r in group], [r["ssim"] for r in group]
        timed = [r for r in group if r.get("seconds") is not None]
        measured = (float(np.median([r["uncached_seconds"] for r in timed]) / np.median([r["seconds"] for r in timed]))
                    if timed else None)
        summary.append(dict(
            method=method, speedup=speedup, passes=passes, passes_mean=float(np.mean([r["passes"] for r in group])),
            measured=measured,
            psnr_mean=float(np.mean(psnrs)), psnr_worst=float(np.min(psnrs)),
            ssim_mean=float(np.mean(ssims)), ssim_worst=float(np.min(ssims)),
        ))
    return summary


def _passes(entry: dict) -> str:
    """``25``, or for counts that vary over samples their mean and range: ``24.8 (23-26)``."""
    low, high = entry["passes"][0], entry["passes"][-1]
    return str(low) if low == high else f"{entry['passes_mean']:.1f} ({low}-{high})"


def markdown_table(summary: Sequence[dict], methods: Sequence[str]) -> str:
    """Rows: speedup x method; the best mean and the best worst PSNR of each speedup in bold."""
    lines = ["| speedup | method | passes/branch | measured | PSNR mean | PSNR worst | SSIM mean | SSIM worst |",
             "|---|---|---|---|---|---|---|---|"]
    for speedup in sorted({e["speedup"] for e in summary}):
        entries = [e for m in methods for e in summary if e["method"] == m and e["speedup"] == speedup]
        best_mean = max(e["psnr_mean"] for e in entries)
        best_worst = max(e["psnr_worst"] for e in entries)
        for e in entries:
            mean = f"{e['psnr_mean']:.1f}"
            worst = f"{e['psnr_worst']:.1f}"
            mean = f"**{mean}**" if e["psnr_mean"] == best_mean else mean
            worst = f"**{worst}**" if e["psnr_worst"] == best_worst else worst
            measured = "" if e["measured"] is None else f"{e['measured']:.2f}x"
            lines.append(f"| {speedup:g}x | {e['method']} | {_passes(e)} | {measured} | {mean} | {worst} | "
                         f"{e['ssim_mean']:.4f} | {e['ssim_worst']:.4f} |")
    return "\n".join(lines)


def plot_frontier(summary: Sequence[dict], methods: Sequence, title: str, path: str | Path) -> Path:
    """Mean (solid) and worst-case (faint) PSNR against passes per branch, one line per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.2), dpi=110)
    for method in methods:
        entries = sorted((e for e in summary if e["method"] == method.name), key=lambda e: e["speedup"])
        if not entries:
            continue
        passes = [e["passes_mean"] for e in entries]
        line, = ax.plot(passes, [e["psnr_mean"] for e in entries], method.style, label=method.name)
        ax.plot(passes, [e["psnr_worst"] for e in entries], method.style.lstrip("kcbgrmyw"), color=line.get_color(),
                alpha=0.3)
    ax.set_xlabel("transformer passes per branch")
    ax.set_ylabel("PSNR vs uncached (dB)")
    ax.set_title(f"{title}; faint: worst case", fontsize=9)
    ax.invert_xaxis()
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path
