"""The ``sglang`` command: generate | serve | calibrate."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
from pathlib import Path
from typing import Any, Sequence

from sglang.cli.args import (
    add_memory_args,
    add_model_args,
    add_parallel_args,
    add_speed_args,
    memory_kwargs,
    parallel_kwargs,
    speed_kwargs,
    whole_number,
)
from sglang.multimodal_gen.errors import UserError

logger = logging.getLogger("sglang")

LOG_LEVELS = ("debug", "info", "warning", "error", "critical")
DISTRIBUTION = "sglang-diffusion-cache"  # pyproject's name


def _default_output_path(prompt: str, seed: int) -> str:
    slug = re.sub(r"[^a-zA-Z0-9]+", "_", prompt).strip("_")[:48] or "video"
    return f"outputs/{slug}_{seed}.mp4"


def add_sampling_args(parser: argparse.ArgumentParser, writes_video: bool = True) -> None:
    """The request's flags; ``writes_video`` False (calibrate) describes ``--fps`` as no mp4's."""
    parser.add_argument("--negative-prompt", default=None,
                        help="text for the unconditional CFG branch (default: the model's; empty for Wan2.1 and "
                             "HunyuanVideo)")
    parser.add_argument("--num-inference-steps", type=int, default=None, help="denoising steps (model default)")
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="CFG weight; <= 1 disables CFG (default: the model's, e.g. 5.0 for Wan2.1)")
    parser.add_argument("--guidance-scale-2", type=float, default=None,
                        help="Wan2.2 two-expert models: the low-noise expert's CFG weight (default: the model's "
                             "pair, 4.0 and 3.0 for T2V-A14B; with --guidance-scale alone, the same value)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise (default 0)")
    parser.add_argument("--height", type=int, default=None, help="height in pixels (model default)")
    parser.add_argument("--width", type=int, default=None, help="width in pixels (model default)")
    parser.add_argument("--num-frames", type=int, default=None, help="frames, 4k+1 for Wan (model default)")
    fps_help = ("frames per second of the mp4 (model default)" if writes_video else
                "frames per second of the requests (model default); calibrate writes no video")
    parser.add_argument("--fps", type=int, default=None, help=fps_help)


def add_cache_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("timestep cache")
    group.add_argument("--cache", default="none", action=_CacheAction,
                       help="timestep cache strategy (listed from the registry when help is shown)")
    group.add_argument("--cache-speedup", type=float, default=None,
                       help="exactly round(steps / X) transformer passes per branch; without --cache the planner "
                            "picks the steps from the model's calibration, with one it tunes its threshold")
    group.add_argument("--cache-preset", default=None, help="named level of the strategy's presets (e.g. default, fast)")
    group.add_argument("--cache-threshold", type=float, default=None, help="error budget; higher skips more steps")
    group.add_argument("--cache-max-skip-steps", type=int, default=None, help="most consecutive skipped steps (K)")
    group.add_argument("--cache-retention-ratio", type=float, default=None,
                       help="fraction of first steps never skipped, in [0, 1]")
    group.add_argument("--cache-estimator", default=None,
                       help="what a skipped step adds: reuse (default), scale, forecast1, forecast2, forecast1_sigma, "
                            "forecast2_sigma, blend (see docs/caching.md)")
    group.add_argument("--cache-params", default=None,
                       help="JSON object or .json file with further strategy options (see docs/caching.md)")
    group.add_argument("--cache-calibration", default=None,
                       help="file written by `sglang calibrate`, used instead of the shipped presets")


class _CacheAction(argparse.Action):
    """``--cache``, whose help lists the registered strategies: read from the registry only when
    the help is shown, since importing the strategies imports torch (seconds)."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        setattr(namespace, self.dest, values)

    @property
    def help(self) -> str:
        from sglang.multimodal_gen.runtime.cache.registry import registered_caches

        return f"timestep cache strategy: none (the default), {', '.join(registered_caches())}"

    @help.setter
    def help(self, value: str) -> None:
        pass  # the property above is the help


class _VersionAction(argparse.Action):
    """``sglang --version``: the package's version and the versions of the libraries it runs on."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs: Any) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace, values: Any,
                 option_string: str | None = None) -> None:
        from importlib.metadata import PackageNotFoundError, version

        def of(name: str) -> str:
            try:
                return version(name)
            except PackageNotFoundError:
                return "not installed"

        libraries = ", ".join(f"{name} {of(name)}" for name in ("torch", "diffusers", "transformers"))
        print(f"sglang {of(DISTRIBUTION)} ({libraries})")
        parser.exit()


def sampling_params_from_args(args: argparse.Namespace):
    """The sampling flags of `add_sampling_args` as SamplingParams (no prompt, no cache)."""
    from sglang.multimodal_gen.configs.sampling_params import SamplingParams

    return SamplingParams(
        negative_prompt=args.negative_prompt,
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        guidance_scale_2=args.guidance_scale_2,
        seed=args.seed,
        height=args.height,
        width=args.width,
        num_frames=args.num_frames,
        fps=args.fps,
        image=getattr(args, "image", None),
    )


def cache_params_from_args(args: argparse.Namespace):
    from sglang.multimodal_gen.configs.cache_params import CacheParams, parse_cache_params_arg

    return CacheParams(
        strategy=args.cache,
        threshold=args.cache_threshold,
        max_skip_steps=args.cache_max_skip_steps,
        retention_ratio=args.cache_retention_ratio,
        preset=args.cache_preset,
        estimator=args.cache_estimator,
        speedup=args.cache_speedup,
        options=parse_cache_params_arg(args.cache_params) if args.cache_params else {},
        calibration_file=args.cache_calibration,
    )


def check_before_load(args: argparse.Namespace, requests: Sequence[Any]) -> None:
    """Everything that needs no model, so a mistake costs no model load (minutes, for a real one):
    the requests' values (``SamplingParams``; an ``--image`` that is no image file included), the
    device and dtype names, a calibration file's format."""
    from sglang.multimodal_gen.runtime.cache.calibration import load_calibration
    from sglang.multimodal_gen.runtime.entrypoints.generator import resolve_device, resolve_dtype
    from sglang.multimodal_gen.runtime.stages.input_validation import check_model_free, check_speedup_strategy

    for params in requests:
        check_model_free(params)
        if params.cache is not None:
            check_speedup_strategy(params.cache)
    resolve_dtype(args.dtype, resolve_device(args.device))
    calibration_file = getattr(args, "cache_calibration", None)
    if calibration_file is not None:
        load_calibration(calibration_file)


def cmd_generate(args: argparse.Namespace) -> int:
    from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator
    from sglang.multimodal_gen.runtime.stages.input_validation import check_prompt
    from sglang.multimodal_gen.runtime.utils.video_io import check_output_path

    check_prompt(args.prompt)  # before the default output path is made from it
    params = dataclasses.replace(
        sampling_params_from_args(args),
        prompt=args.prompt,
        output_path=args.output_path or _default_output_path(args.prompt, args.seed),
        cache=cache_params_from_args(args),
    )
    check_before_load(args, [params])
    check_output_path(params.output_path)
    check_image_for_folder(args.model_path, params.image)
    parallel = parallel_kwargs(args)
    with DiffGenerator.from_pretrained(args.model_path, device=args.device, dtype=args.dtype, **parallel,
                                       **speed_kwargs(args), **memory_kwargs(args)) as generator:
        result = generator.generate(params, show_progress_bar=True)
    for stage, seconds in result.timings.items():
        print(f"  {stage:<20s} {seconds:8.3f} s")
    print(f"  {'total':<20s} {sum(result.timings.values()):8.3f} s")
    stats = result.cache_stats
    if stats is not None:
        print(stats.summary())
        timing = stats.timing_line()
        if timing is not None:
            print(f"  {timing}")
        print(f"  {stats.skipped_line()}")
        if stats.estimator != "reuse":
            print(f"  {stats.estimator_line()}")
    print(f"saved {result.output_path}")
    return 0


def check_image_for_folder(model_path: str | None, image: Any) -> None:
    """An image-to-video model without ``--image``, or a text-to-video one with it, is refused from
    the folder's model_index.json, before its weights load."""
    from sglang.multimodal_gen.runtime.stages.input_validation import check_image_for_model

    check_image_for_model(image, folder_image_input(model_path))


def folder_image_input(model_path: str | None) -> str:
    """Whether the folder's model takes a first frame (``ModelInfo.image_input``), read from its
    model_index.json alone."""
    from sglang.multimodal_gen.configs.models import read_model_info
    from sglang.multimodal_gen.runtime.entrypoints.generator import BUILTIN_MODEL_PATH
    from sglang.multimodal_gen.runtime.models.loader import resolve_model_path

    return read_model_info(resolve_model_path(str(model_path or BUILTIN_MODEL_PATH))).image_input


def parse_step_list(value: str | None) -> list[int]:
    """``--planner-steps 20,30`` -> ``[20, 30]``, or one line saying what is wrong."""
    try:
        steps = [int(part) for part in (value or "").split(",") if part.strip()]
    except ValueError:
        steps = [0]
    if any(step < 2 for step in steps):
        raise UserError(f"--planner-steps must be comma-separated whole numbers >= 2 (e.g. 20,30), got {value!r}")
    return steps


def cmd_calibrate(args: argparse.Namespace) -> int:
    from sglang.multimodal_gen.configs.models import NO_IMAGE
    from sglang.multimodal_gen.runtime.entrypoints.calibrate import (
        calibrate,
        check_calibration_output,
        read_prompt_lines,
        split_prompt_lines,
    )
    from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator
    from sglang.multimodal_gen.runtime.stages.input_validation import check_image_for_model

    flag_prompts = list(args.prompt or [])
    file_lines = read_prompt_lines(args.prompts_file) if args.prompts_file else []
    if not flag_prompts and not file_lines:
        raise UserError("give at least one --prompt or a --prompts-file")
    if args.image is not None and not flag_prompts:
        raise UserError("--image is the first frame of each --prompt; a prompts file names its own images "
                        "(IMAGE_PATH<TAB>caption on each line)")
    planner_steps = parse_step_list(args.planner_steps)
    template = sampling_params_from_args(args)
    # Seeds as calibrate() draws them: the --prompt ones first, then the file's.
    check_before_load(args, [dataclasses.replace(template, prompt=prompt, seed=template.seed + index)
                             for index, prompt in enumerate(flag_prompts)])
    check_calibration_output(args.output)
    image_input = folder_image_input(args.model_path)
    file_prompts, file_images = (split_prompt_lines(args.prompts_file, file_lines, image_input) if file_lines
                                 else ([], []))
    if flag_prompts:
        check_image_for_model(args.image, image_input)
    prompts = flag_prompts + file_prompts
    images = [args.image] * len(flag_prompts) + file_images if image_input != NO_IMAGE else None
    first_seed = template.seed + len(flag_prompts)  # the file's images were checked with their lines
    check_before_load(args, [dataclasses.replace(template, prompt=prompt, image=None, seed=first_seed + index)
                             for index, prompt in enumerate(file_prompts)])
    generator = DiffGenerator.from_pretrained(args.model_path, device=args.device, dtype=args.dtype,
                                              **memory_kwargs(args))
    result = calibrate(generator, prompts, template, args.output, show_progress=True, planner_steps=planner_steps,
                       images=images, **({} if args.growth_prompts is None else {"growth_prompts": args.growth_prompts}))
    parts = result.experts.items() if result.experts else [("", result)]
    for expert, part in parts:
        label = f"{expert.replace('_', '-')} expert, " if expert else ""
        for name, branch in part.branches.items():
            ratios = branch.mag_ratio
            print(f"  {label}{name:<7s} magnitude ratio: min {min(ratios):.4f}, last {ratios[-1]:.4f}")
    steps = sorted({result.num_inference_steps, *planner_steps})
    per_expert = " per expert" if result.experts else ""
    print(f"  planner tables at {', '.join(map(str, steps))} steps{per_expert} (model outputs, {len(prompts)} prompts)")
    growth = result.error_growth.get("growth")
    if growth:
        print(f"  error growth: an error made at the first step is {growth[0]:.1f}x as large at the end, one made "
              f"halfway {growth[len(growth) // 2]:.1f}x (the planner weighs its skips by it)")
    print(f"saved {args.output} and {Path(args.output).with_suffix('.png')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sglang", description="sglang diffusion runtime with timestep caching")
    parser.add_argument("--version", action=_VersionAction, help="print the versions of sglang, torch, diffusers "
                                                                   "and transformers, and exit")
    add_log_level_arg(parser, default="warning")
    sub = parser.add_subparsers(dest="command", required=True)

    generate = sub.add_parser("generate", help="generate one video from a prompt")
    add_log_level_arg(generate)
    add_model_args(generate)
    generate.add_argument("--prompt", required=True, help="what the video shows")
    add_sampling_args(generate)
    generate.add_argument("--image", default=None, metavar="PATH",
                          help="image-to-video models (Wan2.1 I2V, Wan2.2 I2V-A14B; optional for TI2V-5B): the first "
                               "frame, an image file PIL reads; it is stretched to --height x --width")
    generate.add_argument("--output-path", default=None,
                          help="where to save: .mp4 (default outputs/<prompt>_<seed>.mp4) or .npy (float frames)")
    add_cache_args(generate)
    add_parallel_args(generate)
    add_speed_args(generate)
    add_memory_args(generate)
    generate.set_defaults(func=cmd_generate)

    calibrate = sub.add_parser("calibrate", help="measure a model's cache statistics and save them for --cache-calibration")
    add_log_level_arg(calibrate)
    add_model_args(calibrate)
    calibrate.add_argument("--prompt", action="append", help="a calibration prompt (repeatable)")
    calibrate.add_argument("--prompts-file", default=None,
                           help="file with one prompt per line; for an image-to-video model each line is "
                                "IMAGE_PATH<TAB>caption (a relative path from the file's folder)")
    calibrate.add_argument("--image", default=None, metavar="PATH",
                           help="image-to-video models: the first frame of every --prompt (the prompts file "
                                "names its own images)")
    add_sampling_args(calibrate, writes_video=False)
    calibrate.add_argument("--output", required=True, help="calibration .json to write (a .png plot goes beside it)")
    calibrate.add_argument("--planner-steps", default=None,
                           help="comma-separated further step counts to record the budget planner's data at "
                                "(e.g. 20,30), for --cache-speedup requests at those step counts")
    calibrate.add_argument("--growth-prompts", type=whole_number(0, "no growth measured"), default=None, metavar="N",
                           help="measure how an error grows through the run on the first N prompts (one more "
                                "run each, denoising only): what the budget planner weighs each skip by; 0 "
                                "leaves it out (default 4)")
    add_memory_args(calibrate)
    calibrate.set_defaults(func=cmd_calibrate)

    from sglang.cli.serve import add_serve_parser

    add_log_level_arg(add_serve_parser(sub))
    return parser


def add_log_level_arg(parser: argparse.ArgumentParser, default: str = argparse.SUPPRESS) -> None:
    """``--log-level`` before the command and after it (``sglang generate --log-level info``); a
    command's copy sets it only when given, so it never resets the one given before."""
    parser.add_argument("--log-level", default=default, type=str.lower, choices=LOG_LEVELS,
                        help="debug, info, warning, error or critical (default warning)")


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
