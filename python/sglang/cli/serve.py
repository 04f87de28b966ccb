"""``sglang serve``: load a model once and serve the OpenAI videos API (see docs/api.md).

Kept apart from ``main.py`` so that ``sglang generate`` does not import FastAPI and uvicorn.
"""

from __future__ import annotations

import argparse
import dataclasses
from typing import TYPE_CHECKING, Any, Callable

from sglang.cli.args import (
    add_memory_args,
    add_model_args,
    add_parallel_args,
    add_speed_args,
    memory_kwargs,
    parallel_kwargs,
    speed_kwargs,
)
from sglang.multimodal_gen.runtime.entrypoints.request_limits import RequestLimits

if TYPE_CHECKING:
    from sglang.multimodal_gen.runtime.entrypoints.video_service import ServerConfig


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    serve = subparsers.add_parser("serve", help="serve the OpenAI-style /v1/videos API")
    add_model_args(serve)
    add_parallel_args(serve)
    add_speed_args(serve)
    add_memory_args(serve)
    serve.add_argument("--host", default="127.0.0.1",
                       help="address to bind (default 127.0.0.1, loopback only; there, requests must name a loopback "
                            "Host and come from no web page of another Origin)")
    serve.add_argument("--port", type=_port, default=30000, help="port to bind (default 30000; 0 picks a free one)")
    serve.add_argument("--served-model-name", default=None,
                       help="model name in responses and /v1/models (default: the model folder's name)")
    serve.add_argument("--cache-calibration", default=None,
                       help="file written by `sglang calibrate`; cached requests use it instead of the shipped presets")
    serve.add_argument("--api-key", default=None,
                       help="require 'Authorization: Bearer KEY' on every route but /health (default: the "
                            "SGLANG_API_KEY environment variable, which keeps the key out of `ps`; unset: no key)")
    add_limit_args(serve)
    jobs = serve.add_argument_group("jobs and storage")
    jobs.add_argument("--data-dir", default=None,
                      help="folder of the job database and the videos, kept across restarts; one server at a time "
                           "(default: $XDG_CACHE_HOME/sglang/videos, i.e. ~/.cache/sglang/videos)")
    jobs.add_argument("--video-retention-hours", type=_hours, default=24.0,
                      help="finished videos expire this many hours after completion (expires_at); 0 keeps them "
                           "until deleted (default 24)")
    jobs.add_argument("--max-stored-videos", type=_whole_number(0, "no limit"), default=1000,
                      help="the most finished videos kept; the oldest beyond it are removed; 0: no limit "
                           "(default 1000)")
    jobs.add_argument("--max-queued-videos", type=_whole_number(1), default=64,
                      help="videos that may wait behind the running one; more is a 429 with Retry-After "
                           "(default 64)")
    serve.set_defaults(func=cmd_serve)
    return serve


def add_limit_args(parser: argparse.ArgumentParser) -> None:
    """One flag per bound of :class:`RequestLimits` (``max_steps`` -> ``--max-steps``), its help
    the field's; unset, a bound keeps its default (scaled from the model, or fixed)."""
    group = parser.add_argument_group(
        "request limits", "bounds on each POST /v1/videos: beyond them a 400 naming the field (413 for the body); "
                          "scaled defaults are computed from the loaded model's default request (docs/api.md#limits)")
    for f in dataclasses.fields(RequestLimits):
        if f.name in RequestLimits.bound_names():
            group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, type=_at_least_one(f.metadata["type"]),
                               default=None, metavar="N", help=f.metadata["help"])


def limits_from_args(args: argparse.Namespace) -> RequestLimits:
    """The operator's bounds; the flags not given keep their defaults."""
    given = {name: getattr(args, name, None) for name in RequestLimits.bound_names()}
    return RequestLimits(**{name: value for name, value in given.items() if value is not None})


def _at_least_one(kind: type) -> Callable[[str], Any]:
    """argparse type: a finite number >= 1 of ``kind`` (int or float), refused as a usage error."""

    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not 1 <= value < float("inf"):
            noun = "a whole number" if kind is int else "a number"
            raise argparse.ArgumentTypeError(f"invalid limit {text!r}; use {noun} >= 1")
        return value

    return parse


def _port(text: str) -> int:
    """argparse type: a TCP port, refused as a usage error (before anything loads) when out of range."""
    try:
        port = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid port {text!r}; use a number 0-65535") from None
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"port {port} is out of range; use 0-65535 (0 picks a free port)")
    return port


def _hours(text: str) -> float:
    """argparse type: hours >= 0 (a fraction is fine)."""
    try:
        hours = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid number of hours {text!r}; use e.g. 24 or 0.5 (0: keep)") from None
    if not hours >= 0 or hours == float("inf"):
        raise argparse.ArgumentTypeError(f"hours must be a finite number >= 0 (0 keeps videos), got {text}")
    return hours


def _whole_number(minimum: int, zero_means: str = "") -> Callable[[str], int]:
    """argparse type: a whole number >= ``minimum``; ``zero_means`` says what 0 does where it is allowed."""
    note = f" (0: {zero_means})" if zero_means else ""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid count {text!r}; use a whole number >= {minimum}{note}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"count must be >= {minimum}{note}, got {value}")
        return value

    return parse


def server_config(args: argparse.Namespace) -> "ServerConfig":
    """The operator's settings from the command line (and ``SGLANG_API_KEY``, which ``--api-key`` overrides)."""
    from sglang.multimodal_gen.runtime.entrypoints.access import resolve_api_key
    from sglang.multimodal_gen.runtime.entrypoints.video_service import ServerConfig
    from sglang.multimodal_gen.runtime.entrypoints.job_store import default_data_dir

    return ServerConfig(
        host=args.host,
        log_level=args.log_level,
        api_key=resolve_api_key(args.api_key),
        data_dir=str(args.data_dir or default_data_dir()),
        video_retention_hours=args.video_retention_hours or None,
        max_stored_videos=args.max_stored_videos or None,
        max_queued_videos=args.max_queued_videos,
        limits=limits_from_args(args),
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from sglang.multimodal_gen.runtime.cache.calibration import load_calibration
    from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator
    from sglang.multimodal_gen.runtime.entrypoints.http_server import check_listen_address, run_server
    from sglang.multimodal_gen.runtime.entrypoints.job_store import JobStore

    # What can be checked without the model first: a load can take minutes.
    config = server_config(args)
    check_listen_address(args.host, args.port)
    if args.cache_calibration is not None:
        load_calibration(args.cache_calibration)
    JobStore.check(config.data_dir)  # in use by another server, not writable, newer schema
    parallel = parallel_kwargs(args)
    generator = DiffGenerator.from_pretrained(
        args.model_path, device=args.device, dtype=args.dtype, cache_calibration=args.cache_calibration, **parallel,
        **speed_kwargs(args), **memory_kwargs(args),
    )
    name = args.served_model_name or generator.model_name
    try:
        generator.prepare_step_costs()  # what --cache-speedup plans with, before any request runs
        run_server(generator, name, args.port, config)
    finally:
        generator.close()
    return 0
