"""``sglang serve``: load a model once and serve the OpenAI videos API (see docs/api.md).

Kept apart from ``main.py`` so that ``sglang generate`` does not import FastAPI and uvicorn.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from typing import TYPE_CHECKING, Any, Callable

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
from sglang.multimodal_gen.runtime.entrypoints.request_limits import RequestLimits

logger = logging.getLogger(__name__)

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
    jobs.add_argument("--video-retention-hours", type=_duration("hours", "24 or 0.5", "keep videos"), default=24.0,
                      help="finished videos expire this many hours after completion (expires_at); 0 keeps them "
                           "until deleted (default 24)")
    jobs.add_argument("--max-stored-videos", type=whole_number(0, "no limit"), default=1000,
                      help="the most finished videos kept; the oldest beyond it are removed; 0: no limit "
                           "(default 1000)")
    jobs.add_argument("--max-queued-videos", type=whole_number(1), default=64,
                      help="videos that may wait behind the running one; more is a 429 with Retry-After "
                           "(default 64)")
    replicas = serve.add_argument_group(
        "several replicas", "servers sharing one queue through PostgreSQL (docs/api.md#several-replicas); the queue "
                            "and retention flags above must then be the same on every replica")
    replicas.add_argument("--job-store", default=None, metavar="URL",
                          help="the jobs' database: sqlite:///relative/path or sqlite:////absolute/path (one server), "
                               "or postgresql://user:password@host:port/database (replicas share its queue) (default: "
                               "the SGLANG_JOB_STORE_URL environment variable, which keeps a password out of `ps`; "
                               "unset: sqlite, jobs.sqlite3 under --data-dir)")
    replicas.add_argument("--video-store", default=None, metavar="DIR",
                          help="folder of the mp4s and input images, shared by the replicas (e.g. a network file "
                               "system) (default: --data-dir)")
    replicas.add_argument("--replica-id", default=None, metavar="ID",
                          help="this server's id in the job store: what it claimed is recovered by it alone at its "
                               "next start (default: HOSTNAME:PORT)")
    replicas.add_argument("--job-lease-seconds", type=_duration("seconds", "30 or 2.5"), default=30.0, metavar="S",
                          help="a running job stays this replica's this long without a renewal (renewed every "
                               "third of it, at most 5 s apart); the job of a replica silent for longer is failed "
                               "replica_lost (default 30)")
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


def _duration(unit: str, example: str, zero_means: str = "") -> Callable[[str], float]:
    """argparse type: a finite number of ``unit`` > 0, or >= 0 where ``zero_means`` says what 0 does."""
    note = f" (0: {zero_means})" if zero_means else ""
    bound = ">= 0" if zero_means else "> 0"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"invalid number of {unit} {text!r}; use e.g. {example}{note}") from None
        if not (value >= 0 if zero_means else value > 0) or value == float("inf"):
            raise argparse.ArgumentTypeError(f"{unit} must be a finite number {bound}{note}, got {text}")
        return value

    return parse


def server_config(args: argparse.Namespace) -> "ServerConfig":
    """The operator's settings from the command line (and ``SGLANG_API_KEY`` and
    ``SGLANG_JOB_STORE_URL``, which ``--api-key`` and ``--job-store`` override)."""
    from sglang.multimodal_gen.runtime.entrypoints.access import resolve_api_key
    from sglang.multimodal_gen.runtime.entrypoints.job_store import default_data_dir
    from sglang.multimodal_gen.runtime.entrypoints.store_url import ENV_VAR, default_replica_id
    from sglang.multimodal_gen.runtime.entrypoints.video_service import ServerConfig

    return ServerConfig(
        host=args.host,
        log_level=args.log_level,
        api_key=resolve_api_key(args.api_key),
        data_dir=str(args.data_dir or default_data_dir()),
        video_retention_hours=args.video_retention_hours or None,
        max_stored_videos=args.max_stored_videos or None,
        max_queued_videos=args.max_queued_videos,
        limits=limits_from_args(args),
        job_store=args.job_store or os.environ.get(ENV_VAR) or None,
        video_store=args.video_store,
        replica_id=args.replica_id or default_replica_id(args.port),
        job_lease_seconds=args.job_lease_seconds,
    )


def cmd_serve(args: argparse.Namespace) -> int:
    from sglang.multimodal_gen.runtime.cache.calibration import load_calibration
    from sglang.multimodal_gen.runtime.entrypoints.store_url import redact_url
    from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator
    from sglang.multimodal_gen.runtime.entrypoints.http_server import check_listen_address, run_server

    # What can be checked without the model first: a load can take minutes.
    config = server_config(args)
    check_listen_address(args.host, args.port)
    if args.cache_calibration is not None:
        load_calibration(args.cache_calibration)
    # In use by another server, not writable, a newer schema, unreachable, other queue settings.
    config.open_store(config.data_dir).close()
    store = redact_url(config.job_store) if config.job_store else f"SQLite under {config.data_dir}"
    logger.info("job store: %s; videos in %s; replica %s", store, config.video_store or config.data_dir,
                config.replica_id)
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
