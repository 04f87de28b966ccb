"""What the caching benchmark reports: acceptance checks, markdown tables, JSON and the frontier plot."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

from bench_configs import DIFFUSERS_MAGCACHE, FRONTIER_STYLES, OURS_MAGCACHE, OURS_MAGCACHE_SHARED, BenchSettings


# --------------------------------------------------------------------------- checks
def checks(report: dict[str, Any]) -> dict[str, Any]:
    """The issue's acceptance numbers: achieved / ideal for our MagCache, and ours vs diffusers at equal skips."""
    out: dict[str, Any] = {}
    for section, rows in report["sections"].items():
        mag = [r for r in rows if r["impl"] == "ours" and r["strategy"].startswith(OURS_MAGCACHE) and r["skipped"]]
        if mag:
            out[f"{section}_magcache_min_achieved_over_ideal"] = min(r["achieved_over_ideal"] for r in mag)
            out[f"{section}_magcache_min_achieved_over_bound"] = min(r["achieved_over_bound"] for r in mag)
    out["peer"] = peer_pairs(report["sections"]["main"])
    return out


def peer_pairs(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Ours with diffusers' settings vs the diffusers hook, threshold by threshold."""
    ours = {r["threshold"]: r for r in rows if r["strategy"] == OURS_MAGCACHE_SHARED}
    theirs = {r["threshold"]: r for r in rows if r["strategy"] == DIFFUSERS_MAGCACHE and r["kind"] == "sweep"}
    pairs = []
    for t in sorted(set(ours) & set(theirs)):
        a, b = ours[t], theirs[t]
        pair = {"threshold": t, "skipped_ours": a["skipped"], "skipped_diffusers": b["skipped"],
                "same_plan": a["computed_steps"] == b["computed_steps"],
                "speedup_ours": a["denoise_speedup"], "speedup_diffusers": b["denoise_speedup"]}
        if "psnr" in a:
            for metric in ("psnr", "ssim", "mae"):
                pair[f"{metric}_ours"], pair[f"{metric}_diffusers"] = a[metric], b[metric]
            # Same plan, same arithmetic: equal up to float rounding (0.01 dB).
            pair["fidelity_at_least_diffusers"] = a["psnr"] >= b["psnr"] - 0.01
        pairs.append(pair)
    return pairs


# --------------------------------------------------------------------------- outputs
def _fmt(value: Any, digits: int = 2) -> str:
    """A table cell: fixed digits for floats, empty for a missing value."""
    if value is None:
        return ""
    if isinstance(value, float):
        if math.isinf(value):
            return "inf"
        return f"{value:.{digits}f}"
    return str(value)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_fmt(v) if not isinstance(v, str) else v for v in row) + " |" for row in rows]
    return "\n".join(lines)


def main_table(rows: list[dict[str, Any]], fidelity_columns: bool = True) -> str:
    """Every configuration: passes, ideal / achieved / bound speedups, times, memory, fidelity."""
    headers = ["config", "settings", "passes cond/uncond", "ideal", "achieved", "achieved/ideal", "bound",
               "e2e speedup", "denoise ms", "e2e ms", "overhead ms/step", "cache KiB", "peak MiB"]
    if fidelity_columns:
        headers += ["PSNR dB", "SSIM", "MAE"]
    body = []
    for r in rows:
        passes = "/".join(str(n) for n in r["passes"].values()) + ("" if r["branches_share_plan"] else " †")
        line = [r["name"], r["settings"], passes, r["ideal_speedup"],
                r["denoise_speedup"], r["achieved_over_ideal"], r.get("bound_speedup"), r["e2e_speedup"],
                r["denoise_ms"], r["e2e_ms"], r.get("overhead_ms_per_step"),
                _fmt(r["cache_bytes"] / 1024, 1) if "cache_bytes" in r else "", r["peak_mem_mib"]]
        if fidelity_columns:
            line += [r.get("psnr"), _fmt(r.get("ssim"), 4), _fmt(r.get("mae"), 4)]
        body.append(line)
    return _table(headers, body)


def breakdown_table(rows: list[dict[str, Any]]) -> str:
    """Where a step's time goes, for uncached and the never-skipping controls (ours only)."""
    parts = ("embed", "blocks", "head", "scheduler", "cache", "loop")
    body = [[r["name"], *(r["ms_per_step"][p] for p in parts), _fmt(100 * r.get("blocks_share", 0.0), 1)]
            for r in rows if "ms_per_step" in r and r["kind"] in ("uncached", "never-skip")]
    return _table(["config", *(f"{p} ms/step" for p in parts), "blocks % of uncached"], body)


def peer_table(pairs: list[dict[str, Any]]) -> str:
    """``peer_pairs`` as a table: ours / diffusers side by side per threshold."""
    body = [[p["threshold"], f"{p['skipped_ours']} / {p['skipped_diffusers']}", "yes" if p["same_plan"] else "no",
             f"{_fmt(p['speedup_ours'])} / {_fmt(p['speedup_diffusers'])}",
             f"{_fmt(p.get('psnr_ours'), 3)} / {_fmt(p.get('psnr_diffusers'), 3)}",
             f"{_fmt(p.get('ssim_ours'), 4)} / {_fmt(p.get('ssim_diffusers'), 4)}",
             f"{_fmt(p.get('mae_ours'), 5)} / {_fmt(p.get('mae_diffusers'), 5)}"] for p in pairs]
    return _table(["threshold", "skipped ours / diffusers", "same plan", "denoise speedup", "PSNR dB", "SSIM", "MAE"],
                  body)


def render_markdown(report: dict[str, Any]) -> str:
    """The results page: command, machine, request and method, then the tables and the checks."""
    m = report["machine"]
    main = report["sections"]["main"]
    never = {r["name"]: r for r in main if r["kind"] == "never-skip"}
    lines = [
        f"# Caching benchmark: {report['model']}",
        "",
        f"Command: `{report['command']}`  ",
        f"Machine: {m['cpu']}, {m['cpu_count']} cores, torch {m['torch']} with {m['torch_threads']} thread(s), "
        f"diffusers {m['diffusers']}, device {m['device']}; load average {_fmt(m['load_average_start'][0])} at start, "
        f"{_fmt(m['load_average_end'][0])} at end.  ",
        f"Request: {report['size'][0]} frames {report['size'][1]}x{report['size'][2]}, {report['num_inference_steps']} "
        f"steps, guidance {report['guidance_scale']}; {len(report['prompts'])} prompt(s) x seeds {report['seeds']}; "
        f"{report['repeats']} timed round(s) after one warm-up round; wall time {report['wall_s']:.0f} s.  ",
        f"Calibration: {report['calibration']}. Transformer weights sha256 {report['weights_sha256']}.",
        "",
        "Speedups are of the denoising stage against the uncached run of the same implementation (medians of "
        "ratios within a round); *ideal* = N / (N - skipped) transformer passes; *bound* = the speedup if only the "
        "blocks' share of the uncached step shrank and caching cost nothing; *overhead* = extra time per step in "
        "the loop outside the model and scheduler (decisions, residual store/add) vs uncached; *cache KiB* = the "
        "residuals the strategy holds; *peak* = process RSS sampled every 2 ms during the run on CPU (all loaded "
        "models included), torch.cuda.max_memory_allocated on CUDA. Fidelity: decoded frames against our uncached "
        "output of the same seed.",
        "",
        "## All configurations",
        "",
        main_table(main),
        "",
        "† cond and uncond run different steps.",
        "",
        "## Where the denoising time goes",
        "",
        breakdown_table(main),
        "",
    ]
    if never:
        extra = ", ".join(f"{n} {_fmt(r['never_skip_overhead_ms_per_step'], 3)} ms" for n, r in never.items())
        lines += [f"Never-skipping configurations minus uncached, per step: {extra}.", ""]
    if report["checks"]["peer"]:
        lines += ["## Ours vs diffusers' MagCache hook (same ratios, threshold, K, retention)", "",
                  peer_table(report["checks"]["peer"]), ""]
    if "block_heavy" in report["sections"]:
        rows = report["sections"]["block_heavy"]
        lines += ["## Block-dominated model (speed only; random weights)", "",
                  f"{rows[0]['model']}; first prompt and seed.", "",
                  main_table(rows, fidelity_columns=False), "", breakdown_table(rows), ""]
    lines += ["## Checks", "", "```", json.dumps({k: v for k, v in report["checks"].items() if k != "peer"},
                                                  indent=1), "```", ""]
    return "\n".join(lines)


def plot_frontier(report: dict[str, Any], path: Path) -> Path:
    """PSNR against achieved speedup: one line per strategy's threshold sweep, stars for presets."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    # PSNR is inf (None once saved as JSON) for configurations identical to uncached.
    rows = [r for r in report["sections"]["main"] if r.get("psnr") is not None and math.isfinite(r["psnr"])]
    for strategy, style in FRONTIER_STYLES.items():
        line = sorted((r for r in rows if r["strategy"] == strategy and r["kind"] == "sweep"),
                      key=lambda r: r["threshold"])
        if line:
            (handle,) = ax.plot([r["denoise_speedup"] for r in line], [r["psnr"] for r in line], style, label=strategy)
            for r in rows:
                if r["strategy"] == strategy and r["kind"] == "preset":
                    ax.plot(r["denoise_speedup"], r["psnr"], "*", markersize=12, color=handle.get_color())
                    ax.annotate(r["name"], (r["denoise_speedup"], r["psnr"]), fontsize=7,
                                textcoords="offset points", xytext=(4, 4))
    ax.set_xlabel("denoising speedup vs uncached (achieved)")
    ax.set_ylabel("PSNR vs uncached (dB)")
    ax.set_title(f"{report['model']}: {report['num_inference_steps']} steps, {report['machine']['device']} "
                 "(stars: presets)", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def _jsonable(value: Any) -> Any:
    """Strict JSON: infinite PSNR (identical output) becomes null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    return value


def write_outputs(report: dict[str, Any], settings: BenchSettings) -> None:
    """``bench_cache_<device><tag>.json`` and ``.md`` in the output folder, and the frontier plot."""
    settings.output_dir.mkdir(parents=True, exist_ok=True)
    stem = settings.output_dir / f"bench_cache_{report['machine']['device'].split(':')[0]}{settings.tag}"
    report["outputs"] = {"json": str(stem.with_suffix(".json")), "markdown": str(stem.with_suffix(".md")),
                         "plot": str(settings.plot_path)}
    stem.with_suffix(".json").write_text(json.dumps(_jsonable(report), indent=1, allow_nan=False) + "\n")
    stem.with_suffix(".md").write_text(render_markdown(report))
    plot_frontier(report, settings.plot_path)
