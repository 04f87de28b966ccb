"""``sglang serve``: the OpenAI videos API over one loaded model.

Requests are validated on ``POST /v1/videos`` (bad input is a 400 right away), then queued. One
worker thread runs the queue a generation at a time, since the accelerator is the bottleneck and
the model holds one set of weights; the event loop only parses, validates and reports, so status
polls stay fast while a video is being made. Jobs and their mp4 bytes live in memory until
deleted or the server stops.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from sglang.multimodal_gen.configs.sampling_params import SamplingParams
from sglang.multimodal_gen.errors import InvalidRequestError, UserError
from sglang.multimodal_gen.runtime.entrypoints.access import (
    AccessControl,
    ResponseHygiene,
    exposure_warning,
    is_loopback_bind,
    public_name,
)
from sglang.multimodal_gen.runtime.entrypoints.openai_protocol import (
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    VideoDeletedResponse,
    VideoError,
    VideoListResponse,
    VideoObject,
)
from sglang.multimodal_gen.runtime.entrypoints.request_limits import (
    BodyLimitMiddleware,
    RequestLimits,
    RequestTooLarge,
)
from sglang.multimodal_gen.runtime.entrypoints.video_api import (
    build_sampling_params,
    form_to_fields,
    format_seconds,
    parse_create_request,
    parse_json_body,
)
from sglang.multimodal_gen.runtime.utils.video_io import encode_mp4

logger = logging.getLogger(__name__)

# What GET /v1/videos/{id} suggests to pollers (the openai client reads this header).
POLL_AFTER_MS = 200
DEFAULT_LIST_LIMIT = 20
MAX_LIST_LIMIT = 100


@dataclass
class ServerConfig:
    """What the operator of ``sglang serve`` sets besides the model (``sglang serve --help``).

    Attributes:
        host: Address the server is bound to (loopback unless the operator chose otherwise). On a
            loopback address, requests must be addressed to a loopback name (Host header) and must
            not come from a web page of another origin (Origin header); see ``access.py``.
        log_level: uvicorn's log level.
        api_key: When set, every route but ``/health`` requires ``Authorization: Bearer <api_key>``
            (``--api-key``, else the ``SGLANG_API_KEY`` environment variable). Left out of ``repr``.
        limits: Bounds on each request (``--max-steps``, ...); its unset bounds are scaled from the
            model's default request when the app is created (see :class:`RequestLimits`).
    """

    host: str = "127.0.0.1"
    log_level: str = "warning"
    api_key: str | None = field(default=None, repr=False)
    limits: RequestLimits = field(default_factory=RequestLimits)


class APIError(Exception):
    """An HTTP error with an OpenAI-shaped body."""

    def __init__(
        self, status_code: int, message: str, param: str | None = None, code: str | None = None,
        type: str = "invalid_request_error",
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.info = ErrorInfo(message=message, type=type, param=param, code=code)


class _Cancelled(Exception):
    """Raised from the progress callback to stop a generation whose video was deleted."""


@dataclass
class VideoJob:
    """One generation: its validated params, where it stands, and its result once done."""

    id: str
    params: SamplingParams
    created_at: int
    status: str = "queued"
    progress: int = 0
    completed_at: int | None = None
    error: VideoError | None = None
    content: bytes | None = None
    cache_stats: dict[str, Any] | None = None
    timings: dict[str, float] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)


class VideoService:
    """The job store and its single worker thread. All job fields change under ``_lock``."""

    def __init__(self, generator: Any, model_name: str) -> None:
        self.generator = generator
        self.model_name = model_name
        self._jobs: dict[str, VideoJob] = {}
        self._lock = threading.Lock()
        self._queue: queue.Queue[VideoJob | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._current: VideoJob | None = None
        self.hygiene = ResponseHygiene.for_generator(generator)

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="sglang-video-worker", daemon=True)
            self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Cancel the running generation at its next step, drop the queue, join the worker."""
        with self._lock:
            for job in self._jobs.values():
                if job.status in ("queued", "in_progress"):
                    job.cancelled.set()
        self._queue.put(None)
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    # ----------------------------------------------------------------------------- requests
    def submit(self, params: SamplingParams) -> VideoJob:
        job = VideoJob(id=f"video_{uuid.uuid4().hex}", params=params, created_at=int(time.time()))
        with self._lock:
            self._jobs[job.id] = job
        self._queue.put(job)
        logger.info("queued %s (%d in queue)", job.id, self._queue.qsize())
        return job

    def get(self, video_id: str) -> VideoJob:
        with self._lock:
            job = self._jobs.get(video_id)
        if job is None:
            raise APIError(404, f"no video with id {video_id!r}", param="video_id", code="not_found")
        return job

    def list(self, after: str | None, limit: int, order: str) -> tuple[list[VideoJob], bool]:
        """One page in creation order (``asc``) or newest first (``desc``), after the id ``after``."""
        with self._lock:
            jobs = list(self._jobs.values())
        if order == "desc":
            jobs.reverse()
        if after is not None:
            index = next((i for i, job in enumerate(jobs) if job.id == after), None)
            if index is None:
                raise APIError(400, f"after: no video with id {after!r} (deleted?)", param="after")
            jobs = jobs[index + 1:]
        return jobs[:limit], len(jobs) > limit

    def delete(self, video_id: str) -> VideoJob:
        """Forget a video; a queued one is never run, a running one stops at its next step."""
        with self._lock:
            job = self._jobs.pop(video_id, None)
        if job is None:
            raise APIError(404, f"no video with id {video_id!r}", param="video_id", code="not_found")
        job.cancelled.set()
        return job

    def content(self, video_id: str) -> bytes:
        job = self.get(video_id)
        with self._lock:
            status, progress, content, error = job.status, job.progress, job.content, job.error
        if status == "completed" and content is not None:
            return content
        if status == "failed":
            reason = error.message if error is not None else "unknown error"
            raise APIError(409, f"video {video_id} failed and has no content: {reason}", code="video_failed")
        raise APIError(
            409, f"video {video_id} is not ready yet (status {status}, progress {progress}%); "
            "poll GET /v1/videos/{id} until status is completed", code="video_not_ready",
        )

    def counts(self) -> dict[str, int]:
        with self._lock:
            statuses = [job.status for job in self._jobs.values()]
        return {s: statuses.count(s) for s in ("queued", "in_progress", "completed", "failed")}

    def to_object(self, job: VideoJob) -> VideoObject:
        with self._lock:
            p = job.params
            return VideoObject(
                id=job.id,
                model=self.model_name,
                status=job.status,
                progress=job.progress,
                created_at=job.created_at,
                completed_at=job.completed_at,
                prompt=p.prompt,
                size=f"{p.width}x{p.height}",
                seconds=format_seconds(p.num_frames, p.fps),
                error=job.error,
                negative_prompt=p.negative_prompt,
                seed=p.seed,
                num_inference_steps=p.num_inference_steps,
                guidance_scale=p.guidance_scale,
                num_frames=p.num_frames,
                fps=p.fps,
                cache=p.cache.strategy,
                cache_stats=job.cache_stats,
                inference_time_s=round(sum(job.timings.values()), 4) if job.timings else None,
                timings={k: round(v, 4) for k, v in job.timings.items()} if job.timings else None,
            )

    # ----------------------------------------------------------------------------- the worker
    def _work(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                return
            if job.cancelled.is_set():
                continue
            self._run(job)

    def _run(self, job: VideoJob) -> None:
        with self._lock:
            job.status = "in_progress"

        def progress(step: int, total: int) -> None:
            if job.cancelled.is_set():
                raise _Cancelled
            with self._lock:
                job.progress = min(99, int(100 * step / max(total, 1)))

        logger.info("generating %s", job.id)
        try:
            result = self.generator.generate(job.params, progress=progress)
            content = encode_mp4(result.frames, result.params.fps)
        except _Cancelled:
            logger.info("%s cancelled", job.id)
            return
        except Exception as exc:  # a failed generation must not take the server down; the detail goes to the log
            self._fail(job, self.hygiene.failure(job.id, exc))
            return
        with self._lock:
            job.content = content
            job.cache_stats = result.cache_stats.to_dict() if result.cache_stats is not None else None
            job.timings = dict(result.timings)
            job.progress = 100
            job.completed_at = int(time.time())
            job.status = "completed"
        logger.info("%s completed in %.2fs", job.id, sum(result.timings.values()))

    def _fail(self, job: VideoJob, error: VideoError) -> None:
        with self._lock:
            job.error = error
            job.completed_at = int(time.time())
            job.status = "failed"


# --------------------------------------------------------------------------- the app
def _error_response(status_code: int, info: ErrorInfo) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status_code)


async def _read_fields(request: Request, limits: RequestLimits) -> dict[str, Any]:
    """The body as one mapping, whether the client sent a form (as ``openai`` does) or JSON.

    The body arrives through ``BodyLimitMiddleware`` (413 past ``max_body_bytes``); JSON is
    parsed off the event loop, its nesting checked first.
    """
    content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if content_type == "application/json":
        return await run_in_threadpool(parse_json_body, await request.body(), limits.max_json_depth)
    if content_type in ("multipart/form-data", "application/x-www-form-urlencoded"):
        # One file at most: an input_reference upload is then refused by name, not by count.
        async with request.form(max_files=1, max_part_size=limits.max_body_bytes) as form:
            return form_to_fields(form.multi_items(), limits.max_json_depth)
    raise APIError(
        415 if content_type else 400,
        f"unsupported content type {content_type or '(none)'!r}; send multipart/form-data, "
        "application/x-www-form-urlencoded or application/json",
        code="unsupported_content_type",
    )


def _list_query(request: Request) -> tuple[str | None, int, str]:
    query = request.query_params
    unknown = sorted(set(query) - {"after", "limit", "order"})
    if unknown:
        raise InvalidRequestError(f"unknown query parameter {unknown[0]!r}; use after, limit, order", param=unknown[0])
    after = query.get("after") or None
    limit_text = query.get("limit")
    limit = DEFAULT_LIST_LIMIT
    if limit_text is not None:
        try:
            limit = int(limit_text)
        except ValueError:
            raise InvalidRequestError(f"limit must be an integer, got {limit_text!r}", param="limit") from None
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequestError(f"limit must be in [1, {MAX_LIST_LIMIT}], got {limit}", param="limit")
    order = query.get("order") or "desc"
    if order not in ("asc", "desc"):
        raise InvalidRequestError(f"order must be 'asc' or 'desc', got {order!r}", param="order")
    return after, limit, order


def create_app(generator: Any, model_name: str, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``generator`` (a ``DiffGenerator``) under the name ``model_name``,
    as ``config`` (defaults: :class:`ServerConfig`) says.

    The worker thread starts with the app's lifespan and stops (cancelling the running job) when
    it ends; ``app.state.service`` is the :class:`VideoService`.
    """
    config = config or ServerConfig()
    limits = config.limits.resolved(generator.validate(SamplingParams(prompt="x")))
    logger.info("request limits: %s", limits.describe())
    service = VideoService(generator, model_name)
    accepted_models = {model_name, str(getattr(generator, "model_path", model_name))}
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        service.start()
        try:
            yield
        finally:
            service.stop()

    app = FastAPI(title="sglang diffusion", lifespan=lifespan)
    app.state.service = service
    app.add_middleware(AccessControl, api_key=config.api_key, local_only=is_loopback_bind(config.host),
                       host_names=[config.host])
    app.state.limits = limits
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes)

    @app.exception_handler(RequestTooLarge)
    async def _too_large(request: Request, exc: RequestTooLarge) -> JSONResponse:
        return _error_response(413, ErrorInfo(message=str(exc), code="request_too_large"))

    @app.exception_handler(UserError)
    async def _invalid_request(request: Request, exc: UserError) -> JSONResponse:
        param = getattr(exc, "param", None)
        message = service.hygiene.text(str(exc))  # a server calibration file's error would name its path
        return _error_response(400, ErrorInfo(message=message, param=param, code="invalid_value"))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc.status_code, exc.info)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return _error_response(exc.status_code, ErrorInfo(message=f"{request.method} {request.url.path}: {exc.detail}",
                                                          code=code))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = str(first.get("loc", ["", None])[-1]) if first else None
        return _error_response(400, ErrorInfo(message=str(first.get("msg", exc)), param=param, code="invalid_value"))

    @app.exception_handler(Exception)
    async def _server_error(request: Request, exc: Exception) -> JSONResponse:
        logger.exception("unhandled error on %s %s", request.method, request.url.path)
        return _error_response(500, ErrorInfo(message=f"internal server error: {type(exc).__name__}",
                                              type="server_error"))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": model_name, "videos": service.counts()}

    @app.get("/v1/models")
    async def models() -> ModelList:
        root = public_name(str(getattr(generator, "model_path", ""))) or None
        return ModelList(data=[ModelCard(id=model_name, created=started, root=root)])

    def prepare(fields: dict[str, Any]) -> SamplingParams:
        """The validated request: the model's validation can be slow (cache plans), so this runs
        off the event loop and other clients, /health included, are answered meanwhile."""
        create = parse_create_request(fields, limits.max_json_depth)
        if create.model is not None and create.model not in accepted_models:
            raise InvalidRequestError(
                f"model {create.model!r} is not served here; this server serves {model_name!r}", param="model"
            )
        return build_sampling_params(create, generator, limits)

    @app.post("/v1/videos")
    async def create_video(request: Request) -> VideoObject:
        params = await run_in_threadpool(prepare, await _read_fields(request, limits))
        job = service.submit(params)
        return service.to_object(job)

    @app.get("/v1/videos")
    async def list_videos(request: Request) -> VideoListResponse:
        after, limit, order = _list_query(request)
        jobs, has_more = service.list(after, limit, order)
        data = [service.to_object(job) for job in jobs]
        return VideoListResponse(
            data=data,
            first_id=data[0].id if data else None,
            last_id=data[-1].id if data else None,
            has_more=has_more,
        )

    @app.get("/v1/videos/{video_id}")
    async def retrieve_video(video_id: str) -> Response:
        video = service.to_object(service.get(video_id))
        headers = {"openai-poll-after-ms": str(POLL_AFTER_MS)} if video.status in ("queued", "in_progress") else None
        return JSONResponse(video.model_dump(), headers=headers)

    @app.delete("/v1/videos/{video_id}")
    async def delete_video(video_id: str) -> VideoDeletedResponse:
        job = service.delete(video_id)
        return VideoDeletedResponse(id=job.id)

    @app.get("/v1/videos/{video_id}/content")
    async def video_content(video_id: str, request: Request) -> Response:
        variant = request.query_params.get("variant") or "video"
        if variant != "video":
            raise InvalidRequestError(f"variant {variant!r} is not available; only 'video' (the mp4) is",
                                      param="variant")
        content = service.content(video_id)
        return Response(content, media_type="video/mp4",
                        headers={"content-disposition": f'attachment; filename="{video_id}.mp4"'})

    return app


def bind_socket(host: str, port: int) -> socket.socket:
    """A listening socket on ``host:port``; a bad host or a taken port is one ``UserError`` line."""
    if not 0 <= port <= 65535:
        raise UserError(f"--port {port} is out of range; use 0-65535 (0 picks a free port)")
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
    except socket.gaierror as exc:
        raise UserError(f"cannot resolve --host {host!r}: {exc.strerror}") from None
    try:
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise UserError(f"cannot listen on {host}:{port}: {reason}; pick another --port") from None


def check_listen_address(host: str, port: int) -> None:
    """Bind and release ``host:port`` at once, so a taken port is reported before the model loads
    (minutes, for a real one) rather than after; ``run_server`` binds again for real."""
    bind_socket(host, port).close()


def run_server(generator: Any, model_name: str, port: int, config: ServerConfig | None = None) -> None:
    """Serve until interrupted (Ctrl+C / SIGTERM stop uvicorn, which stops the worker).

    The socket is bound here, before uvicorn starts, so a taken port is one clear error line and
    the "serving" line is only printed once the server can be reached (``--port 0`` shows the port).
    """
    import uvicorn

    config = config or ServerConfig()
    sock = bind_socket(config.host, port)
    bound_port = sock.getsockname()[1]
    app = create_app(generator, model_name, config)
    warning = exposure_warning(config.host, config.api_key)
    if warning is not None:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    server_config = uvicorn.Config(app, host=config.host, port=bound_port, log_level=config.log_level.lower(),
                                   timeout_graceful_shutdown=5)
    print(f"serving {model_name} at http://{config.host}:{bound_port}/v1 (Ctrl+C to stop)", flush=True)
    with sock:
        uvicorn.Server(server_config).run(sockets=[sock])
