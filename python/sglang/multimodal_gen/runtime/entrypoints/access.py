"""Who may use ``sglang serve``, and what its responses may tell them.

Three parts, each wired in by ``http_server.create_app`` / ``run_server``:

* :class:`AccessControl`, an ASGI middleware run before routing (so a refused request's body is
  never read): on a loopback bind it answers only requests addressed to a loopback name (the
  Host header; a guard against DNS rebinding) and refuses requests that a web page of another
  origin sends (the Origin header; a guard against cross-site form posts); with an API key it
  requires ``Authorization: Bearer KEY`` on every route but ``/health``.
* :func:`exposure_warning`, the line printed at startup when the server is reachable from other
  machines.
* :class:`ResponseHygiene`: no machine paths, no CLI flags and no raw exception text in
  responses. Paths the server knows (the model folder, calibration files) are shown by their base
  names; a refusal worded with a ``sglang generate`` flag names the request field instead; a
  failed generation gets a short message with a stable code, and the detail goes to the log with
  the job id.
"""

from __future__ import annotations

import hmac
import ipaddress
import logging
import os
import socket
from pathlib import Path, PurePath
from typing import Any, Awaitable, Callable, Iterable, MutableMapping
from urllib.parse import urlsplit

from starlette.responses import JSONResponse

from sglang.multimodal_gen.errors import UserError
from sglang.multimodal_gen.runtime.entrypoints.openai_protocol import VideoError
from sglang.multimodal_gen.runtime.entrypoints.video_api import as_request_fields, as_request_param

logger = logging.getLogger(__name__)

#: Where ``sglang serve`` reads the API key when ``--api-key`` is not given (keeps it out of ``ps``).
API_KEY_ENV = "SGLANG_API_KEY"
#: Routes that need no API key (a load balancer's or a script's liveness probe).
OPEN_PATHS = frozenset({"/health"})
#: Names a loopback-bound server answers to, besides loopback IP literals.
LOOPBACK_NAMES = frozenset({"localhost"})
# How much of a refused Host or Origin header an error message repeats.
_ECHO_CHARS = 80

Scope = MutableMapping[str, Any]
ASGIApp = Callable[[Scope, Any, Any], Awaitable[None]]


# --------------------------------------------------------------------------- the API key
def check_api_key(key: str, source: str) -> str:
    """``key`` if it can travel in an ``Authorization`` header, else a ``UserError`` saying what to do.

    ``source`` names where it came from (``--api-key`` or the environment variable)."""
    if not key:
        raise UserError(f"{source} is empty; give a key (e.g. `openssl rand -hex 32`) or leave it unset")
    if not all("!" <= ch <= "~" for ch in key):
        raise UserError(f"{source} may hold only printable ASCII characters without spaces (it is sent in an "
                        "HTTP header); e.g. `openssl rand -hex 32`")
    return key


def resolve_api_key(flag: str | None, environ: MutableMapping[str, str] | None = None) -> str | None:
    """The key the server requires: ``--api-key`` wins over ``SGLANG_API_KEY``; an empty or unset
    variable means no key. ``None``: no authentication."""
    if flag is not None:
        return check_api_key(flag, "--api-key")
    value = (os.environ if environ is None else environ).get(API_KEY_ENV)
    return check_api_key(value, API_KEY_ENV) if value else None


def _bearer_token(headers: list[tuple[bytes, bytes]]) -> bytes | None:
    value = next((v for k, v in headers if k == b"authorization"), None)
    if value is None:
        return None
    scheme, _, token = value.strip().partition(b" ")
    return token.strip() if scheme.lower() == b"bearer" else None


# --------------------------------------------------------------------------- where it is bound
def is_loopback_bind(host: str) -> bool:
    """Whether binding ``host`` keeps the server on this machine: a loopback IP, ``localhost``, or a
    name that resolves to a loopback address (what ``bind_socket`` would bind)."""
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        pass
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        address = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, UnicodeError):
        return False
    return ipaddress.ip_address(address.split("%")[0]).is_loopback


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The startup warning for a server bound where other machines can reach it; ``None`` on loopback."""
    if is_loopback_bind(host):
        return None
    try:
        everywhere = ipaddress.ip_address(host.strip("[]")).is_unspecified
    except ValueError:
        everywhere = False
    where = f"{host} (all interfaces)" if everywhere else f"{host}, which is not a loopback address"
    if api_key is None:
        return (f"sglang serve is bound to {where} without an API key: anyone who can reach this port can create, "
                f"read and delete videos. Set --api-key (or {API_KEY_ENV}), or bind to 127.0.0.1. The Host and "
                "Origin checks apply on loopback only.")
    return (f"sglang serve is bound to {where}: requests need the API key, but the Host and Origin checks apply on "
            "loopback only and the key travels in clear text without TLS; put a TLS proxy in front.")


# --------------------------------------------------------------------------- the middleware
def _host_name(value: str) -> str | None:
    """The name in a Host header (``name``, ``name:port``, ``[v6]``, ``[v6]:port``); None if malformed."""
    if value.startswith("["):
        name, bracket, rest = value[1:].partition("]")
        if not bracket:
            return None
    else:
        name, colon, port = value.partition(":")
        rest = colon + port
    if rest and not (rest.startswith(":") and rest[1:].isascii() and rest[1:].isdigit()):
        return None
    return name


class AccessControl:
    """ASGI middleware: Host and Origin checks (when ``local_only``), then the API key (when set).

    Refusals are OpenAI-shaped JSON: 400/421 ``invalid_host``, 403 ``origin_not_allowed``,
    401 ``invalid_api_key`` with ``WWW-Authenticate: Bearer``. Checked in that order, before
    routing, on every path (the key: on every path but :data:`OPEN_PATHS`).
    """

    def __init__(self, app: ASGIApp, api_key: str | None = None, local_only: bool = True,
                 host_names: Iterable[str] = ()) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key is not None else None
        self.local_only = local_only
        self.host_names = LOOPBACK_NAMES | {name.lower() for name in host_names}

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        refusal = self.refusal(scope["headers"], scope["path"])
        if refusal is None:
            await self.app(scope, receive, send)
        else:
            await refusal(scope, receive, send)

    def is_local_name(self, name: str) -> bool:
        name = name.lower()
        if name in self.host_names:
            return True
        try:
            return ipaddress.ip_address(name).is_loopback
        except ValueError:
            return False

    def refusal(self, headers: list[tuple[bytes, bytes]], path: str) -> JSONResponse | None:
        """The response refusing a request with these headers, or None to let it through."""
        if self.local_only:
            hosts = [v.decode("latin-1").strip() for k, v in headers if k == b"host"]
            if len(hosts) > 1:
                return _refuse(400, "invalid_host", "the request has more than one Host header")
            if hosts:
                name = _host_name(hosts[0])
                if name is None:
                    return _refuse(400, "invalid_host", f"malformed Host header {_echo(hosts[0])}")
                if not self.is_local_name(name):
                    return _refuse(
                        421, "invalid_host",
                        f"Host {_echo(hosts[0])} is not a loopback name: this server is bound to loopback and answers "
                        "only requests addressed to localhost, 127.0.0.1 or [::1] (a guard against DNS rebinding); "
                        "to serve other names, bind another --host and set --api-key",
                    )
            origins = [v.decode("latin-1").strip() for k, v in headers if k == b"origin"]
            bad = next((origin for origin in origins if not self._local_origin(origin)), None)
            if bad is not None:
                return _refuse(
                    403, "origin_not_allowed",
                    f"Origin {_echo(bad)} is not allowed: this server is bound to loopback and refuses requests sent "
                    "by web pages of other origins (a guard against cross-site requests); call it from a program "
                    "(no Origin header) or from a page served on localhost",
                )
        if self.api_key is not None and path not in OPEN_PATHS:
            token = _bearer_token(headers)
            if token is None:
                return _refuse(
                    401, "invalid_api_key",
                    "missing API key: send the header 'Authorization: Bearer <key>' with the key the server was "
                    f"started with (--api-key or {API_KEY_ENV}); /health needs none",
                    headers={"WWW-Authenticate": "Bearer"},
                )
            if not hmac.compare_digest(token, self.api_key):
                return _refuse(401, "invalid_api_key", "incorrect API key provided",
                               headers={"WWW-Authenticate": "Bearer"})
        return None

    def _local_origin(self, origin: str) -> bool:
        """``http(s)://`` a loopback name, any port. ``null`` (sandboxed frames, file pages) is not."""
        try:
            parts = urlsplit(origin)
            parts.port  # noqa: B018 -- raises ValueError on a malformed port
        except ValueError:
            return False
        return parts.scheme in ("http", "https") and parts.hostname is not None and self.is_local_name(parts.hostname)


def _echo(value: str) -> str:
    return repr(value if len(value) <= _ECHO_CHARS else value[:_ECHO_CHARS] + "...")


def _refuse(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"message": message, "type": "invalid_request_error", "param": None, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


# --------------------------------------------------------------------------- what responses say
def public_name(path: str) -> str:
    """A model reference fit for responses: a local folder's base name, a hub id as given."""
    if PurePath(path).is_absolute() or Path(path).exists():
        return PurePath(path).name or path
    return path


def is_out_of_memory(exc: BaseException) -> bool:
    """An allocator failure anywhere in ``exc``'s chain: ``torch.OutOfMemoryError``, ``MemoryError``,
    or a message saying out of memory (CUDA, MPS, the CPU allocator)."""
    import torch

    oom_types: tuple[type[BaseException], ...] = (MemoryError, torch.cuda.OutOfMemoryError)
    if hasattr(torch, "OutOfMemoryError"):
        oom_types += (torch.OutOfMemoryError,)
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        text = str(current).lower()
        if isinstance(current, oom_types) or "out of memory" in text or "can't allocate memory" in text:
            return True
        current = current.__cause__ or current.__context__
    return False


class ResponseHygiene:
    """Keeps the server's own paths, CLI flags and raw exception text out of what clients read.

    Args:
        paths: Files and folders of this server (model folder, calibration files); in a message,
            each is replaced by its base name (longest first, so a file inside the model folder
            reads ``folder/file``).
    """

    def __init__(self, paths: Iterable[str | os.PathLike[str] | None] = ()) -> None:
        variants: dict[str, str] = {}
        for path in paths:
            if path is None or not str(path):
                continue
            name = PurePath(path).name or str(path)
            for variant in {str(path), os.path.abspath(path), str(Path(path).resolve())}:
                if os.path.isabs(variant) and variant != "/":  # a relative path says nothing of the machine
                    variants[variant] = name
        self._replacements = sorted(variants.items(), key=lambda item: len(item[0]), reverse=True)

    @classmethod
    def for_generator(cls, generator: Any) -> "ResponseHygiene":
        """The paths a ``DiffGenerator`` holds: its model folder (as given and resolved) and calibrations."""
        info = getattr(getattr(generator, "pipeline", None), "model_info", None)
        return cls([
            getattr(generator, "model_path", None),
            getattr(generator, "cache_calibration", None),
            getattr(info, "path", None),
            getattr(info, "calibration_file", None),
        ])

    def text(self, message: str) -> str:
        """``message`` with every known path replaced by its base name and every request flag by
        its field (:func:`video_api.as_request_fields`): what a client reads of a refusal."""
        for path, name in self._replacements:
            message = message.replace(path, name)
        return as_request_fields(message)

    def failure(self, job_id: str, exc: BaseException) -> VideoError:
        """What a failed job reports: a refused request says why (paths removed); anything else is
        logged in full with the job id and reported as a stable code and a generic message."""
        if isinstance(exc, UserError):
            logger.info("%s refused: %s", job_id, exc)
            return VideoError(code="invalid_request", message=self.text(str(exc)),
                              param=as_request_param(getattr(exc, "param", None)), type="invalid_request_error")
        if is_out_of_memory(exc):
            logger.error("generation of %s ran out of memory", job_id, exc_info=exc)
            return VideoError(code="out_of_memory", type="server_error",
                              message="the generation ran out of memory; try a smaller size, fewer frames or fewer "
                                      "steps, or retry when the server is less busy (the server log has the detail "
                                      f"under {job_id})")
        logger.error("generation of %s failed", job_id, exc_info=exc)
        return VideoError(code="generation_failed", type="server_error",
                          message=f"the generation failed on the server (the server log has the detail under {job_id})")
