"""How much one ``POST /v1/videos`` may ask for, checked when the request arrives (docs/api.md#limits).

Without bounds a single request can hold the one worker for days (``num_inference_steps`` 10^7),
exhaust memory (``size`` 4096x4096 on a small model, a 100 MB prompt), or stall the event loop
(a cache plan for 5*10^7 steps, JSON nested 100 000 levels deep). :class:`RequestLimits` holds the
bounds; the size, frame, step, duration and work bounds scale with the loaded model's own default
request, so a Wan 720p model gets room the built-in tiny model does not, and the rest are fixed.
Every bound is a ``sglang serve`` flag of the same name (``--max-steps``, ...).

A request over a bound is a 400 whose ``param`` names the field (``size`` for width and height,
``seconds`` when the frame count came from it); a body over ``max_body_bytes`` is a 413, raised by
:class:`BodyLimitMiddleware` while the body streams in, so it is never held whole. A multipart
create may carry one file besides, the ``input_reference`` image, of up to ``max_image_bytes``.
"""

from __future__ import annotations

import dataclasses
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable

from sglang.multimodal_gen.errors import InvalidRequestError, UserError

if TYPE_CHECKING:
    from sglang.multimodal_gen.configs.sampling_params import SamplingParams

# Seeds are stored and reported as signed 64-bit integers (SQLite, JSON readers in other languages).
MAX_SEED = 2**63 - 1
MIB = 1 << 20
# How many times the model's default request the scaled bounds allow, and their floors.
SCALE = 4
MIN_SIDE = 1024
MIN_STEPS = 200
MIN_SECONDS = 10.0
DEFAULT_MAX_JSON_DEPTH = 32
DEFAULT_MAX_IMAGE_BYTES = 20 * MIB
DEFAULT_MAX_IMAGE_PIXELS = 4096 * 4096
# What a multipart body's file part adds besides its bytes: its headers and boundaries.
UPLOAD_OVERHEAD_BYTES = 64 * 1024


def _limit(default: Any, help: str, type: type = int) -> Any:
    """A field of :class:`RequestLimits`: ``help`` says what it bounds and its default (also the
    ``sglang serve --help`` text of its flag); ``None`` means "scaled from the model"."""
    return field(default=default, metadata={"help": help, "type": type})


@dataclass(frozen=True)
class RequestLimits:
    """Upper bounds on one video request; ``None`` fields are scaled by :meth:`resolved` from the
    model's default request (its size WxH, F frames, S steps, at R fps). Each field's ``help``
    metadata is its documentation and its ``sglang serve --help`` text.

    Examples of the scaled defaults (built-in tiny model 64x64, 17 frames, 50 steps, 8 fps /
    Wan2.1 832x480, 81, 50, 16 / HunyuanVideo 1280x720, 129, 50, 24): width and height 1024 /
    3328 / 5120; frames 68 / 324 / 516; steps 200 for all three; seconds 10 / 20.25 / 21.5; work
    13 926 400 / 6 469 632 000 / 23 777 280 000 pixel-frame-steps.
    """

    max_width: int | None = _limit(
        None, "widest video in pixels (size WIDTHx...). Default: 4x the long side of the model's default size, "
              "at least 1024")
    max_height: int | None = _limit(
        None, "tallest video in pixels (size ...xHEIGHT). Default: 4x the long side of the model's default size, "
              "at least 1024")
    max_frames: int | None = _limit(
        None, "most frames (num_frames, or seconds x fps). Default: 4x the model's default frame count")
    max_steps: int | None = _limit(
        None, "most denoising steps (num_inference_steps); also bounds the cache plan built for them. "
              "Default: 4x the model's default steps, at least 200")
    max_seconds: float | None = _limit(
        None, "longest duration asked through seconds. Default: 4x the model's default clip "
              "(frames / fps), at least 10", float)
    max_work: int | None = _limit(
        None, "budget of width x height x frames x steps for one request, what its time and memory grow "
              "with. Default: 4x the model's default request")
    max_fps: int = _limit(120, "highest fps (the lowest is 1). Default: 120")
    max_guidance_scale: float = _limit(
        100.0, "largest guidance_scale and guidance_scale_2 (they must also be finite and >= 0). Default: 100",
        float)
    max_prompt_chars: int = _limit(
        20_000, "longest prompt and negative_prompt, in characters (the text encoder reads only the "
                "first few hundred tokens). Default: 20000")
    max_body_bytes: int = _limit(
        MIB, "largest request body in bytes, JSON or form, also when sent chunked; larger is a 413. "
             "Default: 1048576 (1 MiB)")
    max_json_depth: int = _limit(
        DEFAULT_MAX_JSON_DEPTH, "deepest nesting of objects and lists in a JSON body (itself level 1), in "
                                "cache_params sent as a JSON string and in form field names such as "
                                "cache_params[a][b] (3 levels). Default: 32")
    max_image_bytes: int = _limit(
        DEFAULT_MAX_IMAGE_BYTES, "largest input_reference image in bytes: a multipart file, taken on top of the "
                                 "body bound, or the image a data URL decodes to (the data URL itself is part of "
                                 "the body, within its bound). Default: 20971520 (20 MiB)")
    max_image_pixels: int = _limit(
        DEFAULT_MAX_IMAGE_PIXELS, "most pixels in an input_reference image, counted as width x height (so "
                                  "4096x4096 or 8192x2048, not each side), read from its header before it is "
                                  "decoded. Default: 16777216 (4096x4096)")
    default_request: tuple[int, int, int, int] | None = field(default=None, compare=False)
    """(width, height, frames, steps) of the model default the scaled bounds came from, set by
    :meth:`resolved`; an over-budget request names the field furthest above it."""

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            if "type" not in f.metadata or value is None:
                continue
            kind = f.metadata["type"]
            if not (_is_int(value) if kind is int else _is_number(value)) or not 1 <= value < float("inf"):
                noun = "a whole number" if kind is int else "a finite number"
                raise UserError(f"{f.name} (--{f.name.replace('_', '-')}) must be {noun} >= 1, got {value!r}")

    # ----------------------------------------------------------------------------- scaling
    def resolved(self, defaults: SamplingParams) -> "RequestLimits":
        """These limits with every ``None`` bound scaled from ``defaults``, the model's default
        request (``video_api.default_request(generator)``, all fields filled in)."""
        width, height, frames, steps, fps = (
            defaults.width, defaults.height, defaults.num_frames, defaults.num_inference_steps, defaults.fps
        )
        scaled = {
            "max_width": max(MIN_SIDE, SCALE * max(width, height)),
            "max_height": max(MIN_SIDE, SCALE * max(width, height)),
            "max_frames": SCALE * frames,
            "max_steps": max(MIN_STEPS, SCALE * steps),
            "max_seconds": max(MIN_SECONDS, SCALE * frames / fps),
            "max_work": SCALE * width * height * frames * steps,
        }
        chosen = {name: value for name, value in scaled.items() if getattr(self, name) is None}
        return dataclasses.replace(self, **chosen, default_request=(width, height, frames, steps))

    def describe(self) -> str:
        """One line for the log: every bound in force."""
        return ", ".join(f"{name}={getattr(self, name)}" for name in self.bound_names())

    @classmethod
    def bound_names(cls) -> list[str]:
        """The fields that are bounds (each a ``sglang serve`` flag)."""
        return [f.name for f in dataclasses.fields(cls) if "help" in f.metadata]

    # ----------------------------------------------------------------------------- checks
    def check(self, params: SamplingParams, seconds: float | None = None) -> None:
        """Refuse ``params`` where it goes beyond these (resolved) limits, naming the API field.

        Unset fields are skipped, so this runs twice: on the request as sent, before the model's
        input validation (which builds the cache plan: a step count must be refused before that),
        and on the validated request, with the model's defaults and the frames from ``seconds``.
        Lower bounds and types are the model's input validation's.
        """
        unresolved = [name for name in self.bound_names() if getattr(self, name) is None]
        if unresolved:
            raise ValueError(f"limits {unresolved} are not set; check with RequestLimits.resolved(model defaults)")
        frames_param = "seconds" if seconds is not None else "num_frames"
        for name in ("prompt", "negative_prompt"):
            text = getattr(params, name)
            if isinstance(text, str) and len(text) > self.max_prompt_chars:
                raise InvalidRequestError(
                    f"{name} has {len(text)} characters; this server takes at most {self.max_prompt_chars} "
                    "(--max-prompt-chars)", param=name,
                )
        if seconds is not None and seconds > self.max_seconds:
            raise InvalidRequestError(
                f"seconds {seconds:g} is longer than this server's limit of {self.max_seconds:g} (--max-seconds)",
                param="seconds",
            )
        for name, bound, why, param in (
            ("width", self.max_width, "--max-width", "size"),
            ("height", self.max_height, "--max-height", "size"),
            ("num_frames", self.max_frames, "--max-frames", frames_param),
            ("num_inference_steps", self.max_steps, "--max-steps", "num_inference_steps"),
            ("fps", self.max_fps, "--max-fps", "fps"),
            ("seed", MAX_SEED, "2^63 - 1", "seed"),
        ):
            value = getattr(params, name)
            if _is_int(value) and value > bound:
                prefix = ""
                if param == "size":
                    prefix = f"size {params.width}x{params.height}: "
                elif param == "seconds":
                    prefix = f"seconds {seconds:g} at {params.fps} fps is {value} frames: "
                raise InvalidRequestError(f"{prefix}{name} must be at most {bound} ({why}), got {value}", param=param)
        for name in ("guidance_scale", "guidance_scale_2"):
            guidance = getattr(params, name)
            if _is_number(guidance) and abs(guidance) > self.max_guidance_scale:
                raise InvalidRequestError(
                    f"{name} must be at most {self.max_guidance_scale:g} (--max-guidance-scale), got {guidance:g}",
                    param=name,
                )
        self._check_work(params, frames_param)

    def _check_work(self, params: SamplingParams, frames_param: str) -> None:
        dims = (params.width, params.height, params.num_frames, params.num_inference_steps)
        if not all(_is_int(d) for d in dims):
            return
        width, height, frames, steps = dims
        work = width * height * frames * steps
        if work <= self.max_work:
            return
        param = None
        if self.default_request is not None:
            dw, dh, df, ds = self.default_request
            ratios = {"size": width * height / (dw * dh), frames_param: frames / df, "num_inference_steps": steps / ds}
            param = max(ratios, key=ratios.__getitem__)
        raise InvalidRequestError(
            f"this request is {width}x{height} x {frames} frames x {steps} steps = {work:,} pixel-frame-steps, "
            f"more than this server's budget of {self.max_work:,} (--max-work); lower size, "
            f"num_frames/seconds or num_inference_steps",
            param=param,
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


# --------------------------------------------------------------------------- JSON nesting
_JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"')
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")
_EMPTY_PAIR = re.compile(rb"\[\]|\{\}")
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"\s*:?|[\[\]{}]')


def check_json_depth(text: str | bytes, max_depth: int, param: str | None = None) -> None:
    """Refuse JSON text nested deeper than ``max_depth`` objects and lists, before it is parsed
    (Python's parser recurses: 100 000 levels raise ``RecursionError``, even unclosed ones).

    ``param`` names the field the text is (``cache_params`` sent as a string); for a whole body
    the error names the top-level key under which the nesting goes too deep. Fast on the common
    case: the brackets outside strings are kept and the innermost pairs dropped ``max_depth``
    times, at C speed; only what is left after that (too deep, or unbalanced) is scanned token by
    token. Unbalanced brackets within the depth pass: the parser reports them, with the position.
    """
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text
    brackets = _JSON_STRING.sub(b"", raw).translate(None, _NOT_BRACKETS)
    for _ in range(max_depth):
        reduced = _EMPTY_PAIR.sub(b"", brackets)
        if not reduced:
            return
        if len(reduced) == len(brackets):
            break  # no pair left to drop: unbalanced
        brackets = reduced
    too_deep, key = _scan_depth(raw, max_depth)
    if too_deep:
        where = param if param is not None else key
        raise InvalidRequestError(
            f"{where or 'the request body'} is nested deeper than {max_depth} levels of objects and lists; "
            "send flatter JSON", param=where,
        )


def check_form_depth(key: str, parts: list[str], max_depth: int, root: str) -> None:
    """A form field name ``root[a][b]...`` nests like JSON: the body, then one level per bracket."""
    if 1 + len(parts) > max_depth:
        raise InvalidRequestError(
            f"form field {key[:60]!r}{'...' if len(key) > 60 else ''} is nested {len(parts)} levels deep; "
            f"this server takes at most {max_depth - 1}", param=root,
        )


def _scan_depth(raw: bytes, max_depth: int) -> tuple[bool, str | None]:
    """Whether ``raw`` opens more than ``max_depth`` levels, and the top-level key it does so
    under (None at the top level, or in a top-level list)."""
    depth, key = 0, None
    for match in _TOKEN.finditer(raw):
        token = match.group()
        if token[:1] == b'"':
            if depth == 1 and token.endswith(b":"):
                key = token
            continue
        depth += 1 if token in (b"[", b"{") else -1
        if depth > max_depth:
            break
    else:
        return False, None
    if key is None:
        return True, None
    try:
        name = json.loads(key.rstrip(b": \t\r\n"))
    except ValueError:
        return True, None
    return True, name if isinstance(name, str) else None


# --------------------------------------------------------------------------- body size
class RequestTooLarge(UserError):
    """A request body over ``max_body_bytes``: the server answers 413."""

    param = None


class BodyLimitMiddleware:
    """ASGI middleware: a body larger than ``max_bytes`` raises :class:`RequestTooLarge` from
    ``receive`` as soon as the count passes the limit (or at once, when ``content-length`` says
    so), so a 100 MB upload, chunked or not, is never held; the app's handler answers 413.

    Counting in ``receive`` covers every way the body is read: ``request.body()``,
    ``request.stream()`` and the form parsers, multipart parts included. A multipart ``POST`` to
    ``upload_path`` may be ``upload_bytes`` (and a file part's headers) larger: it may carry the
    ``input_reference`` file, whose own bound and that of its fields the multipart parser keeps
    (form_bodies.StrictMultiPartParser).
    """

    def __init__(self, app: Callable[..., Awaitable[None]], max_bytes: int, upload_bytes: int = 0,
                 upload_path: str = "/v1/videos") -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.upload_bytes = upload_bytes
        self.upload_path = upload_path

    async def __call__(self, scope: dict[str, Any], receive: Callable[[], Awaitable[dict]], send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = _first_header(scope, b"content-length")
        max_bytes, received, upload = self.max_bytes, 0, ""
        if self.upload_bytes and scope.get("method") == "POST" and scope.get("path") == self.upload_path \
                and _first_header(scope, b"content-type").lower().startswith(b"multipart/form-data"):
            max_bytes += self.upload_bytes + UPLOAD_OVERHEAD_BYTES
            upload = f", and one input_reference file of at most {self.upload_bytes} bytes (--max-image-bytes)"
        declared_too_large = declared.isdigit() and (len(declared) > 18 or int(declared) > max_bytes)

        def too_large(size: str) -> RequestTooLarge:
            if upload:
                return RequestTooLarge(f"the request body is {size}; this server takes at most {self.max_bytes} "
                                       f"bytes of fields (--max-body-bytes){upload}")
            return RequestTooLarge(
                f"the request body is {size}; this server takes at most {max_bytes} bytes (--max-body-bytes)"
            )

        async def limited_receive() -> dict:
            nonlocal received
            if declared_too_large:
                raise too_large(f"{declared.decode()} bytes (content-length)")
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > max_bytes:
                    raise too_large(f"more than {max_bytes} bytes")
            return message

        await self.app(scope, limited_receive, send)


def _first_header(scope: dict[str, Any], name: bytes) -> bytes:
    return next((value for key, value in scope.get("headers", []) if key == name), b"")
