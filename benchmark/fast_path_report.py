"""The fast-path benchmark's markdown: per model, the variants, each change's gain, where time goes."""

from __future__ import annotations

from typing import Any

_PARTS = ("embed", "blocks", "head", "scheduler", "cache", "loop")
_STAGES = ("input_validation", "text_encoding", "latent_preparation", "denoising", "decoding")


def render_markdown(report: dict[str, Any]) -> str:
    machine = report["machine"]
    lines = [
        f"Machine: {machine['cpu']}, {machine['device']}"
        + (f" ({machine['gpu']})" if "gpu" in machine else "")
        + f", torch {machine['torch']}, diffusers {machine['diffusers']}, {machine['torch_threads']} torch thread(s);"
        f" load average {machine['load_average_start'][0]:.2f} at the start, {machine['load_average_end'][0]:.2f} at"
        f" the end; {report['repeats']} timed rounds; wall {report['wall_s'] / 60:.1f} min.",
        f"Command: `{report['command']}`",
        "",
    ]
    for model in report["models"]:
        lines += _model_section(model)
    return "\n".join(lines)


def _model_section(model: dict[str, Any]) -> list[str]:
    frames, height, width = model["request"]
    lines = [
        f"### {model['model']}: {model['model_path'] if model['model'] == 'block-heavy' else ''}".rstrip(": "),
        "",
        f"{frames} frames of {width}x{height}, {model['num_inference_steps']} steps, {model['dtype']}, CFG on "
        f"(two branches). Our default loop on this device: `{model['default_loop']}`.",
        "",
        "| variant | passes cond/uncond | denoise ms | e2e ms | max frame diff | against |",
        "|---|---|---|---|---|---|",
    ]
    for row in model["rows"]:
        passes = "/".join(str(v) for v in row["passes"].values())
        same = row.get("same_plan_as", {})
        plan = "".join(f" (plan = {peer}: {'yes' if ok else 'NO'})" for peer, ok in same.items())
        lines.append(f"| {row['name']} | {passes}{plan} | {row['denoise_ms']:.1f} | {row['e2e_ms']:.1f} | "
                     f"{row['max_frame_diff']:.2g} | {row['reference']} |")
    lines += ["", "| change | slower | faster | denoise gain | e2e gain |", "|---|---|---|---|---|"]
    for gain in model["gains"]:
        lines.append(f"| {gain['label']} | {gain['slower']} | {gain['faster']} | {gain['denoise']:.3f}x | "
                     f"{gain['e2e']:.3f}x |")
    if model.get("compile_warmup_s"):
        warm = ", ".join(f"{name} {s:.1f} s" for name, s in model["compile_warmup_s"].items())
        lines += ["", f"First request of the compiled variants (pays the compile): {warm}."]
    lines += ["", f"Where the time goes in `{model['default_loop']}` (ms per step; stages in ms per request):", "",
              "| run | " + " | ".join(_PARTS) + " | denoise/step | " + " | ".join(_STAGES) + " |",
              "|---|" + "---|" * (len(_PARTS) + 1 + len(_STAGES))]
    for name, entry in model["profile"].items():
        parts, stage_ms = entry["parts_ms_per_step"], entry.get("stages_ms", {})
        stages = [f"{stage_ms[s]:.1f}" if s in stage_ms else "" for s in _STAGES]
        lines.append(f"| {name} | " + " | ".join(f"{parts.get(p, 0.0):.3f}" for p in _PARTS)
                     + f" | {entry['denoise_ms_per_step']:.3f} | " + " | ".join(stages) + " |")
    lines.append("")
    return lines
