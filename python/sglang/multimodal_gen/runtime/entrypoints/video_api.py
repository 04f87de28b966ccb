"""Turn a ``POST /v1/videos`` body into validated ``SamplingParams``, with errors naming the field.

The official ``openai`` client always sends multipart/form-data: every value is a string,
``extra_body`` keys become top-level fields, nested dicts become ``name[key]`` fields, lists
``name[key][]`` (repeated) and booleans ``"true"``/``"false"``. A JSON body carries typed values.
Both are reduced to one flat mapping by :func:`form_to_fields` (forms) and then checked by
:func:`parse_create_request`, so a field means the same thing whichever way it arrives.

Duration: ``seconds`` is turned into a frame count with the request's ``fps`` (or the model's),
rounded to the nearest count the model can take (Wan: 4k+1); the Video object then reports the
real duration ``num_frames / fps``. ``seconds`` and ``num_frames`` together are refused.

Hostile input is refused here too, before anything is parsed deeply or built: JSON and form
nesting deeper than the server's limit, numbers that do not fit in 64 bits (or a float), and,
through :class:`RequestLimits`, values beyond the server's bounds (request_limits.py). An
``input_reference`` image is decoded here, under its own bounds (input_reference.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from PIL import Image

from sglang.multimodal_gen.configs.models import IMAGE_REQUIRED, NO_IMAGE
from sglang.multimodal_gen.configs.cache_params import CacheParams
from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.errors import InvalidRequestError
from sglang.multimodal_gen.runtime.cache.validation import CacheConfigError
from sglang.multimodal_gen.runtime.entrypoints.input_reference import (
    ReferenceImage,
    decode_image,
    reference_bytes,
)
from sglang.multimodal_gen.runtime.entrypoints.request_limits import (
    DEFAULT_MAX_IMAGE_BYTES,
    DEFAULT_MAX_IMAGE_PIXELS,
    DEFAULT_MAX_JSON_DEPTH,
    RequestLimits,
    check_form_depth,
    check_json_depth,
)
from sglang.multimodal_gen.runtime.stages.input_validation import check_speedup_strategy

_SIZE = re.compile(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$")
_INTEGER = re.compile(r"^[+-]?\d+$")
_FORM_KEY = re.compile(r"^([^\[\]]+)((?:\[[^\[\]]*\])*)$")
# Integers a field may hold before its range is checked: anything wider is no number the model uses.
_MAX_INT = 2**64 - 1
_MAX_DIGITS = 4300  # Python's int <-> str conversion limit (sys.get_int_max_str_digits)


@dataclass
class VideoCreateRequest:
    """The fields of ``POST /v1/videos``, type-checked; ``None`` means "not given".

    OpenAI's fields are ``prompt``, ``model``, ``size`` ("WIDTHxHEIGHT"), ``seconds`` and
    ``input_reference`` (decoded and checked: ``sglang generate --image``); the rest are this
    server's extensions with the meaning of the ``sglang generate`` flags of the same name.
    """

    prompt: str
    model: str | None = None
    size: tuple[int, int] | None = None
    seconds: float | None = None
    negative_prompt: str | None = None
    num_inference_steps: int | None = None
    guidance_scale: float | None = None
    guidance_scale_2: float | None = None
    seed: int | None = None
    num_frames: int | None = None
    fps: int | None = None
    cache: str | None = None
    cache_preset: str | None = None
    cache_threshold: float | None = None
    cache_max_skip_steps: int | None = None
    cache_retention_ratio: float | None = None
    cache_estimator: str | None = None
    cache_speedup: float | None = None
    cache_params: dict[str, Any] = field(default_factory=dict)
    input_reference: ReferenceImage | None = None


#: The request's fields, each also a ``sglang generate`` flag (``cache_speedup`` is ``--cache-speedup``).
REQUEST_FIELDS = frozenset(f.name for f in dataclasses.fields(VideoCreateRequest))
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9]*(?:-[a-z0-9]+)*)(?![\w-])")
# ``sglang generate`` flags and runtime params whose request field has another name.
_FIELD_ALIASES = {"image": "input_reference"}


def as_request_param(param: str | None) -> str | None:
    """The request field a runtime refusal's ``param`` is (``image`` -> ``input_reference``)."""
    return _FIELD_ALIASES.get(param, param) if param is not None else None


def as_request_fields(message: str) -> str:
    """``message`` with each ``sglang generate`` flag that is a request field written as that
    field (``use --cache-speedup`` -> ``use cache_speedup``): the runtime words its refusals once,
    for the CLI, and a client of this API sets fields. Flags of the operator (``--max-steps``,
    ``--cache-calibration``) stay as they are: they are the server's to set, not the client's."""
    def field_name(match: re.Match[str]) -> str:
        name = as_request_param(match.group(1).replace("-", "_"))
        return name if name in REQUEST_FIELDS else match.group(0)

    return _FLAG.sub(field_name, message)


# --------------------------------------------------------------------------- bodies
def parse_json_body(raw: bytes, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> dict[str, Any]:
    """A JSON body as a mapping; nesting deeper than ``max_depth`` is refused before parsing.

    The body is decoded as UTF-8 first, and only as UTF-8: ``json.loads`` of bytes would also take
    UTF-16 and UTF-32, whose bytes hide the brackets and quotes from the depth check.
    """
    if not raw.strip():
        raise InvalidRequestError("the request body is empty; send a JSON object with at least 'prompt'")
    text = decode_utf8(raw, "the request body")
    check_json_depth(text, max_depth)
    try:
        body = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidRequestError(f"the request body is not valid JSON ({exc})") from None
    except ValueError:  # Python refuses integers of more than 4300 digits
        raise InvalidRequestError(f"the request body holds a number of more than {_MAX_DIGITS} digits") from None
    if not isinstance(body, dict):
        raise InvalidRequestError(f"the request body must be a JSON object, got {type(body).__name__}")
    return body


def decode_utf8(raw: bytes, what: str, param: str | None = None) -> str:
    """``raw`` as UTF-8 text, else one 400 saying where it is not (the docs promise UTF-8 only)."""
    if raw[:2] in (b"\xff\xfe", b"\xfe\xff") or (len(raw) > 1 and b"\x00" in raw[:4]):
        raise InvalidRequestError(f"{what} looks like UTF-16 or UTF-32; send UTF-8", param=param)
    if raw.startswith(b"\xef\xbb\xbf"):
        raise InvalidRequestError(f"{what} starts with a byte order mark; send UTF-8 without one", param=param)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InvalidRequestError(
            f"{what} is not valid UTF-8 (byte 0x{raw[exc.start]:02x} at position {exc.start}); send UTF-8",
            param=param,
        ) from None


def form_to_fields(items: Iterable[tuple[str, Any]], max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> dict[str, Any]:
    """Rebuild the mapping the client flattened: ``a[b][c]=v`` -> ``{"a": {"b": {"c": v}}}``.

    Top-level values stay strings (the field parsers convert them); values inside nested fields
    are decoded as JSON scalars ("true", "0.5", "null"), since nothing else says their type.
    One uploaded file is taken, as ``input_reference`` (its bytes); a file under any other name is
    refused. Reads the upload: call it off the event loop.
    """
    fields: dict[str, Any] = {}
    for key, value in items:
        match = _FORM_KEY.match(key)
        if match is None:
            raise InvalidRequestError(f"malformed form field name {brief(key)}", param=brief(key, quoted=False))
        root, rest = match.group(1), match.group(2)
        if not isinstance(value, str):
            if key != "input_reference":
                raise InvalidRequestError(f"field {brief(key)} is a file upload; this server takes a file only "
                                          "as input_reference", param=root)
            if root in fields:
                raise InvalidRequestError(f"parameter {root!r} was given more than once", param=root)
            value.file.seek(0)
            fields[root] = value.file.read()
            continue
        parts = re.findall(r"\[([^\[\]]*)\]", rest)
        check_form_depth(key, parts, max_depth, root)
        if not parts:
            if root in fields:
                raise InvalidRequestError(f"parameter {root!r} was given more than once", param=root)
            fields[root] = value
            continue
        _insert_nested(fields, root, parts, _form_scalar(value))
    return fields


def _insert_nested(fields: dict[str, Any], root: str, parts: list[str], value: Any) -> None:
    node = fields.setdefault(root, {})
    path = [root]
    for index, part in enumerate(parts):
        last = index == len(parts) - 1
        if not isinstance(node, dict):
            raise InvalidRequestError(
                f"form field {'.'.join(path)} is given both as a value and as nested fields", param=root
            )
        if part == "":
            raise InvalidRequestError(
                f"form field {root!r}: lists are only taken as 'name[key][]'; "
                f"for other structures send {root} as a JSON string",
                param=root,
            )
        path.append(part)
        if last:
            if part in node and not isinstance(node[part], list):
                raise InvalidRequestError(f"form field {'.'.join(path)} was given more than once", param=root)
            node[part] = value
        elif index + 1 < len(parts) and parts[index + 1] == "" and index + 2 == len(parts):
            existing = node.setdefault(part, [])
            if not isinstance(existing, list):
                raise InvalidRequestError(
                    f"form field {'.'.join(path)} is given both as a value and as a list", param=root
                )
            existing.append(value)
            return
        else:
            node = node.setdefault(part, {})


def _form_scalar(text: str) -> Any:
    """A nested form value as the JSON scalar it spells, else the string itself."""
    stripped = text.strip()
    if stripped == "":
        return None
    try:
        value = json.loads(stripped)
    except ValueError:  # not JSON, or a number of more than 4300 digits: the string itself
        return text
    return value if not isinstance(value, (dict, list)) else text


# --------------------------------------------------------------------------- field parsing
def parse_create_request(
    fields: Mapping[str, Any], max_json_depth: int = DEFAULT_MAX_JSON_DEPTH,
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
) -> VideoCreateRequest:
    """Check names and types of every field; ranges the model and the server's limits decide are
    checked later. ``max_json_depth`` bounds ``cache_params`` sent as a JSON string; an
    ``input_reference`` is decoded here, within ``max_image_bytes`` and ``max_image_pixels``
    (CPU-bound for a large image: call it off the event loop)."""
    if not isinstance(fields, Mapping):
        raise InvalidRequestError("the request body must be a JSON object or a form", param=None)
    known = {f.name for f in dataclasses.fields(VideoCreateRequest)}
    for name in fields:
        if name not in known:
            raise InvalidRequestError(
                f"unknown parameter {name!r}; this server takes: {', '.join(sorted(known))}", param=name
            )
    if "prompt" not in fields or fields["prompt"] is None:
        raise InvalidRequestError("missing required parameter 'prompt'", param="prompt")
    size = _optional_str(fields, "size")
    return VideoCreateRequest(
        prompt=_required_str(fields, "prompt"),
        model=_optional_str(fields, "model"),
        size=parse_size(size) if size is not None else None,
        seconds=_as_positive_float(fields.get("seconds"), "seconds"),
        negative_prompt=_plain_str(fields, "negative_prompt"),
        num_inference_steps=_as_int(fields.get("num_inference_steps"), "num_inference_steps"),
        guidance_scale=_as_float(fields.get("guidance_scale"), "guidance_scale"),
        guidance_scale_2=_as_float(fields.get("guidance_scale_2"), "guidance_scale_2"),
        seed=_as_int(fields.get("seed"), "seed"),
        num_frames=_as_int(fields.get("num_frames"), "num_frames"),
        fps=_as_int(fields.get("fps"), "fps"),
        cache=_optional_str(fields, "cache"),
        cache_preset=_optional_str(fields, "cache_preset"),
        cache_threshold=_as_float(fields.get("cache_threshold"), "cache_threshold"),
        cache_max_skip_steps=_as_int(fields.get("cache_max_skip_steps"), "cache_max_skip_steps"),
        cache_retention_ratio=_as_float(fields.get("cache_retention_ratio"), "cache_retention_ratio"),
        cache_estimator=_optional_str(fields, "cache_estimator"),
        cache_speedup=_as_float(fields.get("cache_speedup"), "cache_speedup"),
        cache_params=_as_object(fields.get("cache_params"), "cache_params", max_json_depth),
        input_reference=_as_image(fields.get("input_reference"), max_image_bytes, max_image_pixels),
    )


def _as_image(value: Any, max_bytes: int, max_pixels: int) -> ReferenceImage | None:
    data = reference_bytes(value)
    return None if data is None else decode_image(data, max_bytes, max_pixels)


def parse_size(value: str) -> tuple[int, int]:
    """``"832x480"`` -> ``(832, 480)``: width first, as OpenAI's ``size`` is written."""
    match = _SIZE.match(value)
    if match is None:
        raise InvalidRequestError(f"size must be 'WIDTHxHEIGHT' such as '832x480', got {brief(value)}", param="size")
    if max(len(match.group(1)), len(match.group(2))) > 9:
        raise InvalidRequestError(f"size {brief(value)} is far larger than any video this server makes", param="size")
    width, height = int(match.group(1)), int(match.group(2))
    if width <= 0 or height <= 0:
        raise InvalidRequestError(f"size must be positive, got {value!r}", param="size")
    return width, height


def _is_blank(value: Any) -> bool:
    return value is None or (isinstance(value, str) and not value.strip())


def _required_str(fields: Mapping[str, Any], name: str) -> str:
    value = fields.get(name)
    if not isinstance(value, str):
        raise InvalidRequestError(f"{name} must be a string, got {brief(value)}", param=name)
    return value


def _plain_str(fields: Mapping[str, Any], name: str) -> str | None:
    value = fields.get(name)
    if value is None:
        return None
    return _required_str(fields, name)


def _optional_str(fields: Mapping[str, Any], name: str) -> str | None:
    """A selector (model, size, cache, ...): blank means not given, as the client sends ``None``."""
    value = fields.get(name)
    if _is_blank(value):
        return None
    return _required_str(fields, name).strip()


def _as_int(value: Any, name: str) -> int | None:
    if _is_blank(value):
        return None
    if isinstance(value, bool):
        raise InvalidRequestError(f"{name} must be an integer, got {json.dumps(value)}", param=name)
    number: int | None = None
    if isinstance(value, int):
        number = value
    elif isinstance(value, float) and value.is_integer():
        number = int(value)
    elif isinstance(value, str) and _INTEGER.match(value.strip()):
        digits = value.strip().lstrip("+-")
        number = int(value.strip()) if len(digits) <= 20 else _MAX_INT + 1  # int() refuses > 4300 digits
    if number is None:
        raise InvalidRequestError(f"{name} must be an integer, got {brief(value)}", param=name)
    if abs(number) > _MAX_INT:
        raise InvalidRequestError(f"{name} {brief(value, quoted=False)} does not fit in 64 bits", param=name)
    return number


def _as_float(value: Any, name: str) -> float | None:
    if _is_blank(value):
        return None
    number: float | None = None
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):
            number = float(value.strip())
    except (ValueError, OverflowError):  # not a number, or an integer beyond a float (10^400)
        number = None
    if number is None or not math.isfinite(number):
        raise InvalidRequestError(f"{name} must be a finite number, got {brief(value)}", param=name)
    return number


def _as_positive_float(value: Any, name: str) -> float | None:
    number = _as_float(value, name)
    if number is not None and number <= 0:
        raise InvalidRequestError(f"{name} must be > 0, got {value!r}", param=name)
    return number


def _as_object(value: Any, name: str, max_depth: int = DEFAULT_MAX_JSON_DEPTH) -> dict[str, Any]:
    """A JSON object, given as one (JSON body, nested form fields) or as a JSON string, whose
    numbers all fit: integers in 64 bits, floats finite."""
    if _is_blank(value):
        return {}
    if isinstance(value, str):
        check_json_depth(value, max_depth, param=name)
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise InvalidRequestError(
                f"{name} is not valid JSON ({exc.msg} at column {exc.colno}); "
                "write e.g. '{\"sqrt_ratios\": true}' with double quotes",
                param=name,
            ) from None
        except ValueError:  # Python refuses integers of more than 4300 digits
            raise InvalidRequestError(f"{name} holds a number of more than {_MAX_DIGITS} digits", param=name) from None
    if not isinstance(value, dict):
        raise InvalidRequestError(f"{name} must be a JSON object of knob -> value, got {brief(value)}", param=name)
    _check_numbers(value, name)
    return value


def _check_numbers(value: Any, name: str) -> None:
    """Every number inside ``value`` fits: an integer in 64 bits, a float finite (JSON's 1e400 and
    NaN parse to inf and nan). Iterative: the depth was bounded, but this needs no recursion."""
    stack: list[tuple[str, Any]] = [(name, value)]
    while stack:
        path, item = stack.pop()
        if isinstance(item, dict):
            stack.extend((f"{path}.{key}", child) for key, child in item.items())
        elif isinstance(item, list):
            stack.extend((f"{path}[{index}]", child) for index, child in enumerate(item))
        elif isinstance(item, bool):
            continue
        elif isinstance(item, int) and abs(item) > _MAX_INT:
            raise InvalidRequestError(
                f"{brief(path, quoted=False)} = {brief(item, quoted=False)} does not fit in 64 bits", param=name
            )
        elif isinstance(item, float) and not math.isfinite(item):
            raise InvalidRequestError(f"{brief(path, quoted=False)} must be a finite number, got {item}", param=name)


def brief(value: Any, limit: int = 60, quoted: bool = True) -> str:
    """``value`` for an error message, cut to ``limit`` characters: a client's 1 MB string or
    400-digit number does not come back whole in the response and the log."""
    try:
        text = repr(value) if quoted else str(value)
    except ValueError:  # str() of an int of more than 4300 digits
        return f"a number of about {int(value.bit_length() * 0.30103)} digits" if isinstance(value, int) else "?"
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text)} characters)"


# --------------------------------------------------------------------------- to SamplingParams
def build_cache_params(request: VideoCreateRequest) -> CacheParams:
    """Merge ``cache_params`` with the explicit ``cache*`` fields (which win), naming the bad one.

    The knobs are added one at a time, so the first that ``CacheParams`` refuses is the
    parameter the error names.
    """
    data: dict[str, Any] = dict(request.cache_params)
    if "calibration_file" in data:
        raise InvalidRequestError(
            "calibration_file cannot be set over HTTP (it would be a path on the server); name the file in the "
            "model folder's sglang_config.json as cache_calibration_file, or pass the calibration's ratios in "
            "cache_params",
            param="cache_params",
        )
    strategy = request.cache if request.cache is not None else data.pop("strategy", "none")
    data.pop("strategy", None)
    if request.cache_estimator is not None:
        data.pop("estimator", None)  # the explicit field wins; merged first so blend_alpha finds it
    steps: list[tuple[str, dict[str, Any]]] = [
        ("cache", {"strategy": strategy}),
        ("cache_estimator", {"estimator": request.cache_estimator}),
        ("cache_params", data),
        ("cache_preset", {"preset": request.cache_preset}),
        ("cache_threshold", {"threshold": request.cache_threshold}),
        ("cache_max_skip_steps", {"max_skip_steps": request.cache_max_skip_steps}),
        ("cache_retention_ratio", {"retention_ratio": request.cache_retention_ratio}),
        ("cache_speedup", {"speedup": request.cache_speedup}),
    ]
    merged: dict[str, Any] = {}
    params = CacheParams()
    for param, extra in steps:
        extra = {k: v for k, v in extra.items() if v is not None}
        if not extra and param != "cache":
            continue
        merged.update(extra)
        try:
            params = CacheParams.from_dict(merged)
        except CacheConfigError as exc:
            message = _cut_quoted(str(exc), extra.values())
            raise InvalidRequestError(message, param=getattr(exc, "param", None) or param) from None
    try:
        check_speedup_strategy(params)
    except CacheConfigError as exc:
        raise InvalidRequestError(str(exc), param="cache_speedup") from None
    return params


def _cut_quoted(message: str, values: Iterable[Any]) -> str:
    """``message`` with each long string of ``values`` it quotes cut as :func:`brief` cuts it: an
    unknown 10 000-character ``cache`` name does not come back whole."""
    for value in values:
        if isinstance(value, str) and len(repr(value)) > 60:
            message = message.replace(repr(value), brief(value))
    return message


def frames_for_seconds(seconds: float, fps: int, temporal_stride: int) -> int:
    """The frame count nearest to ``seconds * fps`` that the model takes (``stride * k + 1``)."""
    k = max(0, math.floor((seconds * fps - 1) / temporal_stride + 0.5))
    return k * temporal_stride + 1


def format_seconds(num_frames: int, fps: int) -> str:
    """The clip's real duration as OpenAI writes ``seconds``: a string, e.g. ``"1.125"``."""
    return f"{num_frames / fps:.3f}".rstrip("0").rstrip(".")


def build_sampling_params(
    request: VideoCreateRequest, generator: Any, limits: RequestLimits | None = None
) -> SamplingParams:
    """Validated params with the model's defaults filled in; raises ``InvalidRequestError``.

    Runs the pipeline's input validation (which also builds the request's cache), so everything
    a generation would refuse is refused here, before the request is queued. ``limits`` (resolved
    for the model) are checked on the request as sent, before that validation, so no oversized
    cache plan is built, and again on the validated request. It can take a while (tokenizing,
    cache plans): the server calls it off the event loop.
    """
    if request.seconds is not None and request.num_frames is not None:
        raise InvalidRequestError("give either seconds or num_frames, not both", param="seconds")
    check_image_for_model(request.input_reference is not None, generator)
    width, height = request.size if request.size is not None else (None, None)
    params = SamplingParams(
        prompt=request.prompt,
        negative_prompt=request.negative_prompt,
        num_inference_steps=request.num_inference_steps,
        guidance_scale=request.guidance_scale,
        guidance_scale_2=request.guidance_scale_2,
        seed=request.seed if request.seed is not None else 0,
        height=height,
        width=width,
        num_frames=request.num_frames,
        fps=request.fps,
        cache=build_cache_params(request),
        image=request.input_reference.image if request.input_reference is not None else None,
    )
    if limits is not None:
        limits.check(params, request.seconds)
    validated = _validate(generator, params, request)
    if request.seconds is not None:
        num_frames = frames_for_seconds(request.seconds, validated.fps, generator.geometry.temporal_stride)
        if limits is not None:
            limits.check(dataclasses.replace(validated, num_frames=num_frames), request.seconds)
        validated = _validate(generator, dataclasses.replace(params, num_frames=num_frames), request)
    if limits is not None:
        limits.check(validated, request.seconds)
    return validated


def image_input(generator: Any) -> str:
    """Whether the served model's requests give a first frame (``ModelInfo.image_input``)."""
    info = getattr(getattr(generator, "pipeline", None), "model_info", None)
    return getattr(info, "image_input", NO_IMAGE)


def default_request(generator: Any) -> SamplingParams:
    """The request that sets nothing, validated: the model's defaults, which the scaled limits
    start from. An image-to-video model is given a blank first frame, as its validation wants one."""
    image = Image.new("RGB", (16, 16)) if image_input(generator) == IMAGE_REQUIRED else None
    return generator.validate(SamplingParams(prompt="x", image=image))


def check_image_for_model(has_image: bool, generator: Any) -> None:
    """An image sent to a text-to-video model, or none to an image-to-video one: a 400 naming
    ``input_reference``, checked here so the server refuses it whatever the pipeline checks."""
    if has_image and image_input(generator) == NO_IMAGE:
        raise InvalidRequestError("this model makes video from text only and takes no input_reference; send the "
                                  "request without it", param="input_reference")
    if not has_image and image_input(generator) == IMAGE_REQUIRED:
        raise InvalidRequestError("this model makes video from an image: send the first frame as input_reference "
                                  "(a PNG, JPEG or WebP file, or {\"image_url\": \"data:image/png;base64,...\"})",
                                  param="input_reference")


def _validate(generator: Any, params: SamplingParams, request: VideoCreateRequest) -> SamplingParams:
    try:
        return generator.validate(params)
    except CacheConfigError as exc:
        raise InvalidRequestError(str(exc), param=getattr(exc, "param", None) or "cache") from None
    except InvalidRequestError as exc:
        if exc.param in ("height", "width") and request.size is not None:
            width, height = request.size
            raise InvalidRequestError(f"size {width}x{height}: {exc}", param="size") from None
        if exc.param == "num_frames" and request.seconds is not None:
            raise InvalidRequestError(f"seconds {request.seconds:g}: {exc}", param="seconds") from None
        raise
