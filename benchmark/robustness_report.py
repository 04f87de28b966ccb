"""The robustness benchmark's report: per cell and speedup, mean and worst PSNR of each method, and
whether the planner meets the bar (issue: at 2x it beats plain steps on mean and worst; at 3x it
does not lose on the mean; never more than 1 dB below ``planner, reuse`` on the mean)."""

from __future__ import annotations

from collections import defaultdict
from typing import Sequence

import numpy as np

REUSE_MARGIN_DB = 1.0


def summarise(rows: Sequence[dict]) -> list[dict]:
    """One entry per (cell, speedup): each method's mean and worst PSNR and the verdicts."""
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["cell"], row["speedup"])].append(row)
    summary = []
    for (cell, speedup), group in groups.items():
        entry: dict = {"cell": cell, "speedup": speedup, "samples": len(group)}
        for method in group[0]["psnr"]:
            values = [r["psnr"][method] for r in group]
            entry[method] = {"mean": float(np.mean(values)), "worst": float(np.min(values))}
        planner, plain, reuse = entry["planner"], entry["plain steps"], entry["planner, reuse"]
        if speedup <= 2.0:
            beats_plain = planner["mean"] > plain["mean"] and planner["worst"] > plain["worst"]
        else:
            beats_plain = planner["mean"] >= plain["mean"]
        entry["beats_plain"] = bool(beats_plain)
        entry["near_reuse"] = bool(planner["mean"] >= reuse["mean"] - REUSE_MARGIN_DB)
        summary.append(entry)
    return summary


def markdown_table(summary: Sequence[dict], methods: Sequence[str]) -> str:
    header = "| cell | speedup | " + " | ".join(f"{m} mean / worst" for m in methods) + " | meets the bar |"
    lines = [header, "|" + "---|" * (len(methods) + 3)]
    for e in sorted(summary, key=lambda e: (e["speedup"], e["cell"])):
        cells = " | ".join(f"{e[m]['mean']:.1f} / {e[m]['worst']:.1f}" for m in methods)
        verdict = "yes" if e["beats_plain"] and e["near_reuse"] else (
            "no: " + ", ".join(why for ok, why in ((e["beats_plain"], "plain steps"), (e["near_reuse"], "reuse")) if not ok))
        lines.append(f"| {e['cell']} | {e['speedup']:g}x | {cells} | {verdict} |")
    return "\n".join(lines)
