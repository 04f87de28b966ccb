"""``sglang calibrate``: uncached runs in calibration mode, averaged over prompts, saved with a plot."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Sequence

from tqdm.auto import tqdm

from sglang.multimodal_gen.configs.models import IMAGE_REQUIRED, NO_IMAGE
from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.errors import InvalidRequestError
from sglang.multimodal_gen.runtime.cache.calibration import CalibrationResult, plot_magnitude_ratios
from sglang.multimodal_gen.runtime.cache.error_growth import ErrorGrowth, LatentProbe, growth_from_traces
from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator
from sglang.multimodal_gen.runtime.stages.input_validation import check_image_for_model, check_prompt
from sglang.multimodal_gen.runtime.utils.image_io import check_image
from sglang.multimodal_gen.runtime.utils.video_io import check_writable_file

_SPACES = " \r\n\f\v"
#: Prompts whose error growth ``sglang calibrate`` measures, one more run each (denoising only):
#: half of the 8 prompts the docs advise, so a calibration costs at most 1.5 times its uncached
#: runs; measuring 8 on the hard-world model planned no better (docs/benchmarks.md, "Where an
#: error grows").
DEFAULT_GROWTH_PROMPTS = 4


def read_prompt_lines(path: str | Path) -> list[tuple[int, str]]:
    """The prompts file's lines that hold a prompt, with their 1-based line numbers (blank lines and
    lines starting with '#' are skipped): read before the model is looked at, parsed once its kind
    is known (:func:`split_prompt_lines`)."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise InvalidRequestError(f"prompts file {path} does not exist", param="prompts_file") from None
    except OSError as exc:
        raise InvalidRequestError(f"cannot read prompts file {path}: {exc.strerror or exc}",
                                  param="prompts_file") from None
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(f"prompts file {path} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                                  param="prompts_file") from None
    # Tabs are kept at the ends: "IMAGE_PATH<TAB>" is an image-to-video line without its caption.
    numbered = [(number, line.strip(_SPACES)) for number, line in enumerate(lines, start=1)
                if line.strip() and not line.lstrip().startswith("#")]
    if not numbered:
        raise InvalidRequestError(f"prompts file {path} holds no prompts", param="prompts_file")
    return numbered


def split_prompt_lines(path: str | Path, lines: Sequence[tuple[int, str]],
                       image_input: str) -> tuple[list[str], list[Path | None] | None]:
    """The prompts and, for a model that takes a first frame (``ModelInfo.image_input``), their
    images: an image-to-video model reads ``IMAGE_PATH<TAB>caption`` on each line (a relative path
    from the file's folder), a text-to-video model a caption without a tab, and Wan2.2 TI2V-5B
    either (a line without a tab is text to video: its image is ``None``). Each image's header is
    read here, so a missing or unreadable one is named with its line before any generation."""
    path = Path(path)
    prompts, images = [], []
    for number, line in lines:
        where = f"prompts file {path} line {number}"
        image_text, tab, caption = line.partition("\t")
        if image_input == NO_IMAGE and tab:
            raise InvalidRequestError(
                f"{where} holds a tab (IMAGE_PATH<TAB>caption, the image-to-video format), but this model "
                "makes videos from text alone; give one caption per line", param="prompts_file")
        if not tab:
            if image_input == IMAGE_REQUIRED:
                raise InvalidRequestError(
                    f"{where} has no tab: an image-to-video model needs IMAGE_PATH<TAB>caption on each line",
                    param="prompts_file")
            prompts.append(line)
            images.append(None)
            continue
        image_text, caption = image_text.strip(), caption.strip()
        if not image_text or not caption:
            missing = "image path before" if not image_text else "caption after"
            raise InvalidRequestError(f"{where} has no {missing} the tab (IMAGE_PATH<TAB>caption)",
                                      param="prompts_file")
        image = Path(image_text).expanduser()
        image = image if image.is_absolute() else path.parent / image
        try:
            check_image(image)
        except InvalidRequestError as exc:
            raise InvalidRequestError(f"{where}: {exc}", param="prompts_file") from None
        prompts.append(caption)
        images.append(image)
    return prompts, (None if image_input == NO_IMAGE else images)


def read_prompts_file(path: str | Path) -> list[str]:
    """A text-to-video model's prompts file: one prompt per line (see :func:`read_prompt_lines`)."""
    return split_prompt_lines(path, read_prompt_lines(path), NO_IMAGE)[0]


def check_calibration_output(output: str | Path) -> Path:
    """A .json path that can be written, with room for the .png beside it: checked before any run,
    since a calibration takes many generations."""
    output = Path(output)
    if output.suffix.lower() != ".json":
        raise InvalidRequestError(f"calibration output {output} must be a .json file", param="output")
    check_writable_file(output, "output", "calibration output")
    check_writable_file(output.with_suffix(".png"), "output", "calibration plot")
    return output


def check_planner_steps(values: Sequence[int]) -> list[int]:
    """Step counts for ``--planner-steps``: whole numbers of at least 2, each once."""
    checked = []
    for value in values:
        if isinstance(value, bool) or not isinstance(value, int) or value < 2:
            raise InvalidRequestError(f"planner step counts must be whole numbers >= 2, got {value!r}",
                                      param="planner_steps")
        if value not in checked:
            checked.append(value)
    return checked


def error_growth(generator: DiffGenerator, requests: Sequence[SamplingParams], references: Sequence[LatentProbe],
                 show_progress: bool = False) -> ErrorGrowth:
    """How an error in the latents grows by the end of the run, root mean square over ``requests``:
    each run again, denoising only, perturbed after its first step, against the trace ``reference``
    its calibration run left (``cache/error_growth.py``)."""
    curves = []
    for params, reference in tqdm(list(zip(requests, references)), desc="error growth", unit="prompt",
                                  disable=not show_progress):
        perturbed = LatentProbe(perturb=True, seed=reference.seed)
        generator.trace_latents(params, perturbed)
        curves.append(growth_from_traces(reference.trace, perturbed.trace))
    return ErrorGrowth.from_runs(references[0].run_sigmas(), curves)


def calibrate(
    generator: DiffGenerator,
    prompts: Sequence[str],
    template: SamplingParams,
    output: str | Path,
    show_progress: bool = False,
    planner_steps: Sequence[int] = (),
    images: Sequence[Any] | None = None,
    growth_prompts: int = DEFAULT_GROWTH_PROMPTS,
) -> CalibrationResult:
    """Run each prompt uncached (seed ``template.seed + index``), save the averaged result and its plot.

    On a model with several experts (Wan2.2) each expert is calibrated over its own steps
    (``CalibrationResult.experts``): its ratios, TeaCache fit and planner tables.

    ``planner_steps``: further step counts to record the budget planner's data at (the same
    prompts and seeds, uncached), for requests at those step counts. Nothing else runs but 5
    uncached steps that time what a skipped step still costs and the growth runs below: the
    planner fits its forecasts from the recorded outputs.

    ``images``: an image-to-video model's first frames (PIL images or paths), one per prompt;
    without them every run takes ``template.image``. The step costs are timed on the first.

    ``growth_prompts``: the first this many prompts' calibration runs are traced and run once
    more, denoising only, perturbed after their first step: how an error grows by the end of the
    run (``cache/error_growth.py``), what the planner weighs each skip by. 0 leaves it out (every
    step weighs the same).
    """
    output = check_calibration_output(output)
    for prompt in prompts:
        check_prompt(prompt)
    if images is None:
        images = [template.image] * len(prompts)
    elif len(images) != len(prompts):
        raise InvalidRequestError(f"calibrate got {len(images)} images for {len(prompts)} prompts; give one "
                                  "image per prompt", param="images")
    for image in images:  # before the first run, not after some of them
        check_image_for_model(image, generator.pipeline.model_info.image_input)
        check_image(image)
    planner_steps = check_planner_steps(planner_steps)
    if isinstance(growth_prompts, bool) or not isinstance(growth_prompts, int) or growth_prompts < 0:
        raise InvalidRequestError(f"growth prompts must be a whole number >= 0, got {growth_prompts!r}",
                                  param="growth_prompts")
    growth_prompts = min(growth_prompts, len(prompts))

    def request(index: int, steps: int | None = None) -> SamplingParams:
        return dataclasses.replace(
            template, prompt=prompts[index], image=images[index], seed=template.seed + index, cache=CacheParams(),
            output_path=None, **({} if steps is None else {"num_inference_steps": steps}),
        )

    references: list[LatentProbe] = []  # the traced calibration runs the growth is measured against

    def run_all(steps: int | None, label: str):
        runs, resolved = [], None
        for index in tqdm(range(len(prompts)), desc=label, unit="prompt", disable=not show_progress):
            probe = LatentProbe(seed=index) if steps is None and index < growth_prompts else None
            result = generator.generate(request(index, steps), show_progress_bar=show_progress, calibrate=True,
                                        probe=probe)
            runs.append(dict(result.cache.calibration_records()))
            resolved = result.params
            if probe is not None:
                references.append(probe)
        return runs, resolved

    runs, resolved = run_all(None, "calibrating")
    pipeline = generator.pipeline
    per_expert = pipeline.expert_schedule is not None
    build = CalibrationResult.from_expert_records if per_expert else CalibrationResult.from_records
    calibration = build(
        runs,
        model=generator.model_name,
        model_family=pipeline.model_info.family.name,
        num_inference_steps=resolved.num_inference_steps,
        dtype=str(pipeline.dtype).removeprefix("torch."),
        device=pipeline.device.type,
        seed=template.seed,
        guidance_scale=float(resolved.guidance_scale),
        size=[resolved.num_frames, resolved.height, resolved.width],
    )
    if references:
        growth = error_growth(generator, [request(index) for index in range(len(references))], references,
                              show_progress)
        for part in [calibration, *calibration.experts.values()]:
            part.error_growth = growth.to_dict()
    calibration.skipped_step_cost = generator.measure_step_costs(
        dataclasses.replace(template, prompt=prompts[0], image=images[0])).to_dict()
    for steps in planner_steps:
        if steps != calibration.num_inference_steps:
            extra_runs, _ = run_all(steps, f"planner tables, {steps} steps")
            if per_expert:
                calibration.add_expert_planner_tables(extra_runs)
            else:
                calibration.add_planner_table(extra_runs, steps)
    calibration.save(output)
    plot_magnitude_ratios(calibration, output.with_suffix(".png"))
    return calibration
