"""``sglang serve``: the OpenAI videos API over one loaded model.

Requests are checked against the limits and validated on ``POST /v1/videos`` (bad input is a 400
right away, the validation itself off the event loop), then handed to the
:class:`~sglang.multimodal_gen.runtime.entrypoints.video_service.VideoService`, whose worker runs
them one at a time and keeps them under ``--data-dir``. The event loop only parses, validates and
reports, so status polls stay fast while a video is being made. Access control (API key, loopback
Host and Origin checks) and the body limit are middleware around every route. On SIGTERM the
server refuses new videos (503), fails the queued ones and stops the running one at its next step
(``server_stopped``), then exits.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import sys
import time
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
    exposure_warning,
    is_loopback_bind,
    public_name,
)
from sglang.multimodal_gen.runtime.entrypoints.form_bodies import (
    StrictMultiPartParser,
    check_charset,
    parse_urlencoded,
)
from sglang.multimodal_gen.runtime.entrypoints.input_reference import ReferenceImage
from sglang.multimodal_gen.runtime.entrypoints.job_store import JobStoreError
from sglang.multimodal_gen.runtime.entrypoints.openai_protocol import (
    APIError,
    ErrorInfo,
    ErrorResponse,
    ModelCard,
    ModelList,
    VideoDeletedResponse,
    VideoListResponse,
    VideoObject,
)
from sglang.multimodal_gen.runtime.entrypoints.request_limits import (
    BodyLimitMiddleware,
    RequestLimits,
    RequestTooLarge,
)
from sglang.multimodal_gen.runtime.entrypoints.video_api import (
    as_request_param,
    brief,
    build_sampling_params,
    default_request,
    form_to_fields,
    parse_create_request,
    parse_json_body,
)
from sglang.multimodal_gen.runtime.entrypoints.video_service import ServerConfig, VideoService

logger = logging.getLogger(__name__)

# What GET /v1/videos/{id} suggests to pollers (the openai client reads this header).
POLL_AFTER_MS = 200
DEFAULT_LIST_LIMIT = 20
# Retry-After of a 503 while the job store cannot be reached.
STORE_RETRY_AFTER_S = 5
MAX_LIST_LIMIT = 100
# --------------------------------------------------------------------------- the app
def _error_response(status_code: int, info: ErrorInfo, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(error=info).model_dump(), status_code=status_code, headers=headers)


async def _read_fields(request: Request, limits: RequestLimits) -> dict[str, Any]:
    """The body as one mapping, whether the client sent a form (as ``openai`` does) or JSON.

    The body arrives through ``BodyLimitMiddleware`` (413 past ``max_body_bytes``); JSON is
    parsed off the event loop, its nesting checked first.
    """
    header = request.headers.get("content-type", "")
    content_type = header.split(";")[0].strip().lower()
    if content_type == "application/json":
        check_charset(header, "the JSON body")
        return await run_in_threadpool(parse_json_body, await request.body(), limits.max_json_depth)
    if content_type == "application/x-www-form-urlencoded":
        check_charset(header, "the form body")
        return form_to_fields(parse_urlencoded(await request.body()), limits.max_json_depth)
    if content_type == "multipart/form-data":
        # One file at most, the input_reference image; the fields keep the body's bound.
        parser = StrictMultiPartParser(request.headers, request.stream(), max_field_bytes=limits.max_body_bytes,
                                       max_file_bytes=limits.max_image_bytes)
        form = await parser.parse()
        try:
            return await run_in_threadpool(form_to_fields, form.multi_items(), limits.max_json_depth)
        finally:
            await form.close()
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
        raise InvalidRequestError(f"unknown query parameter {brief(unknown[0])}; use after, limit, order", param=brief(unknown[0], quoted=False))
    after = query.get("after") or None
    limit_text = query.get("limit")
    limit = DEFAULT_LIST_LIMIT
    if limit_text is not None:
        try:
            limit = int(limit_text)
        except ValueError:
            raise InvalidRequestError(f"limit must be an integer, got {brief(limit_text)}", param="limit") from None
        if not 1 <= limit <= MAX_LIST_LIMIT:
            raise InvalidRequestError(f"limit must be in [1, {MAX_LIST_LIMIT}], got {limit}", param="limit")
    order = query.get("order") or "desc"
    if order not in ("asc", "desc"):
        raise InvalidRequestError(f"order must be 'asc' or 'desc', got {brief(order)}", param="order")
    return after, limit, order


def create_app(generator: Any, model_name: str, config: ServerConfig | None = None) -> FastAPI:
    """The FastAPI app serving ``generator`` (a ``DiffGenerator``) under the name ``model_name``,
    as ``config`` (defaults: :class:`ServerConfig`) says.

    The job store opens and the worker thread starts with the app's lifespan; when it ends the
    queued and running jobs are failed (``server_stopped``) and the store is closed.
    ``app.state.service`` is the :class:`VideoService`.
    """
    config = config or ServerConfig()
    limits = config.limits.resolved(default_request(generator))
    logger.info("request limits: %s", limits.describe())
    service = VideoService(generator, model_name, config)
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
    app.add_middleware(BodyLimitMiddleware, max_bytes=limits.max_body_bytes, upload_bytes=limits.max_image_bytes)

    @app.exception_handler(RequestTooLarge)
    async def _too_large(request: Request, exc: RequestTooLarge) -> JSONResponse:
        return _error_response(413, ErrorInfo(message=str(exc), code="request_too_large"))

    @app.exception_handler(UserError)
    async def _invalid_request(request: Request, exc: UserError) -> JSONResponse:
        param = as_request_param(getattr(exc, "param", None))
        message = service.hygiene.text(str(exc))  # a server calibration file's error would name its path
        return _error_response(400, ErrorInfo(message=message, param=param, code="invalid_value"))

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc.status_code, exc.info, exc.headers)

    @app.exception_handler(JobStoreError)
    async def _store_error(request: Request, exc: JobStoreError) -> JSONResponse:
        """A full disk under the job store is a 507 ``storage_failed`` (the code a job gets when its
        mp4 cannot be written); a database that cannot be reached a 503. One log line, no traceback."""
        logger.error("the job store failed on %s %s: %s", request.method, request.url.path, exc)
        if exc.full:
            return _error_response(507, ErrorInfo(message=f"the server cannot store videos now ({exc}); retry later",
                                                  type="server_error", code="storage_failed"))
        return _error_response(503, ErrorInfo(message="the server cannot reach its job store now; retry later",
                                              type="server_error", code="job_store_unavailable"),
                               headers={"Retry-After": str(STORE_RETRY_AFTER_S)})

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        where = f"{request.method} {brief(request.url.path, quoted=False)}"
        return _error_response(exc.status_code, ErrorInfo(message=f"{where}: {exc.detail}", code=code))

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
    async def health() -> Response:
        """200 while serving; 503 (``status`` ``stopping``) once shutdown began."""
        body = {"status": "stopping" if service.stopping else "ok", "model": model_name,
                "videos": service.counts(), "worker": service.worker_state()}
        return JSONResponse(body, status_code=503 if service.stopping else 200)

    @app.get("/v1/models")
    async def models() -> ModelList:
        root = public_name(str(getattr(generator, "model_path", ""))) or None
        return ModelList(data=[ModelCard(id=model_name, created=started, root=root)])

    def prepare(fields: dict[str, Any]) -> tuple[SamplingParams, ReferenceImage | None]:
        """The validated request and its decoded image: the model's validation can be slow (cache
        plans), as can decoding an image, so this runs off the event loop and other clients,
        /health included, are answered meanwhile."""
        create = parse_create_request(fields, limits.max_json_depth, limits.max_image_bytes, limits.max_image_pixels)
        if create.model is not None and create.model not in accepted_models:
            raise InvalidRequestError(
                f"model {brief(create.model)} is not served here; this server serves {model_name!r}", param="model"
            )
        return build_sampling_params(create, generator, limits), create.input_reference

    @app.post("/v1/videos")
    async def create_video(request: Request) -> VideoObject:
        service.check_accepting()  # a full queue or a shutdown is refused before any parsing
        params, image = await run_in_threadpool(prepare, await _read_fields(request, limits))
        job = await run_in_threadpool(service.submit, params, image)  # writes the image, fsyncs the database
        return service.to_object(job)

    @app.get("/v1/videos")
    async def list_videos(request: Request) -> VideoListResponse:
        after, limit, order = _list_query(request)
        jobs, has_more = service.list(after, limit, order)
        data = [video for video in map(service.to_listed_object, jobs) if video is not None]
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
            raise InvalidRequestError(f"variant {brief(variant)} is not available; only 'video' (the mp4) is",
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

    From the signal on, creates are refused (503); uvicorn then closes the listening socket, lets
    open requests finish (up to 5 s) and ends the app's lifespan, which fails the queued and running
    videos (``server_stopped``) and closes the store.

    The socket is bound here, before uvicorn starts, so a taken port is one clear error line and
    the "serving" line is only printed once the server can be reached (``--port 0`` shows the port).
    """
    import uvicorn

    config = config or ServerConfig()
    sock = bind_socket(config.host, port)
    bound_port = sock.getsockname()[1]
    app = create_app(generator, model_name, config)
    service: VideoService = app.state.service
    warning = exposure_warning(config.host, config.api_key)
    if warning is not None:
        print(f"warning: {warning}", file=sys.stderr, flush=True)
    server_config = uvicorn.Config(app, host=config.host, port=bound_port, log_level=config.log_level.lower(),
                                   timeout_graceful_shutdown=5)

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            service.begin_shutdown()
            super().handle_exit(sig, frame)

    print(f"serving {model_name} at http://{config.host}:{bound_port}/v1 (Ctrl+C to stop)", flush=True)
    with sock:
        Server(server_config).run(sockets=[sock])
