"""Response objects of the OpenAI videos API, as the official ``openai`` client parses them.

Field names follow ``openai.types.Video`` / ``VideoDeleteResponse`` / the cursor page of
``client.videos.list``; fields after the ``# extensions`` marker are ours (the client keeps
unknown fields, reachable as attributes or through ``model_extra``).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field

VideoStatus = Literal["queued", "in_progress", "completed", "failed"]


class ErrorInfo(BaseModel):
    """The ``error`` member of an OpenAI error body; ``param`` names the offending request field."""

    message: str
    type: str = "invalid_request_error"
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    """``{"error": {...}}``, what every 4xx/5xx of this server returns."""

    error: ErrorInfo


class VideoError(BaseModel):
    """Why a video failed (``openai.types.VideoCreateError``)."""

    code: str
    message: str
    param: str | None = None
    type: str | None = None


class InputReferenceInfo(BaseModel):
    """The image a video started from (its ``input_reference``), as decoded: size after the EXIF
    orientation, and the SHA-256 of the bytes sent, so a client can tell which image it was."""

    width: int
    height: int
    sha256: str


class VideoObject(BaseModel):
    """One generation job (``openai.types.Video``).

    ``seconds`` is the real duration of the clip (``num_frames / fps``), which may differ from the
    requested one because the frame count is rounded to what the model can take.
    """

    id: str
    object: Literal["video"] = "video"
    model: str
    status: VideoStatus
    progress: int = Field(ge=0, le=100)
    created_at: int
    completed_at: int | None = None
    expires_at: int | None = None
    prompt: str | None = None
    remixed_from_video_id: str | None = None
    size: str
    seconds: str
    error: VideoError | None = None
    # extensions
    negative_prompt: str | None = None
    seed: int
    num_inference_steps: int
    guidance_scale: float
    guidance_scale_2: float | None = None
    num_frames: int
    fps: int
    cache: str = "none"
    cache_stats: dict[str, Any] | None = None
    inference_time_s: float | None = None
    timings: dict[str, float] | None = None
    input_reference: InputReferenceInfo | None = None


class VideoListResponse(BaseModel):
    """A cursor page: pass ``last_id`` as ``after`` to get the next one while ``has_more``."""

    object: Literal["list"] = "list"
    data: list[VideoObject]
    first_id: str | None = None
    last_id: str | None = None
    has_more: bool = False


class VideoDeletedResponse(BaseModel):
    """``openai.types.VideoDeleteResponse``."""

    id: str
    object: Literal["video.deleted"] = "video.deleted"
    deleted: bool = True


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "sglang"
    root: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class APIError(Exception):
    """An HTTP error with an OpenAI-shaped body."""

    def __init__(
        self, status_code: int, message: str, param: str | None = None, code: str | None = None,
        type: str = "invalid_request_error", headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)
        self.headers = headers
