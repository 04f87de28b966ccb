"""``sglang serve``: load a model once and serve the OpenAI videos API (see docs/api.md).

Kept apart from ``main.py`` so that ``sglang generate`` does not import FastAPI and uvicorn.
"""

from __future__ import annotations

import argparse
from typing import Any

from sglang.cli.main import add_model_args


def add_serve_parser(subparsers: Any) -> argparse.ArgumentParser:
    serve = subparsers.add_parser("serve", help="serve the OpenAI-style /v1/videos API")
    add_model_args(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, loopback only)")
    serve.add_argument("--port", type=int, default=30000, help="port to bind (default 30000; 0 picks a free one)")
    serve.add_argument("--served-model-name", default=None,
                       help="model name in responses and /v1/models (default: the model folder's name)")
    serve.add_argument("--cache-calibration", default=None,
                       help="file written by `sglang calibrate`; cached requests use it instead of the shipped presets")
    serve.set_defaults(func=cmd_serve)
    return serve


def cmd_serve(args: argparse.Namespace) -> int:
    from sglang.multimodal_gen.runtime.entrypoints.generator import DiffGenerator
    from sglang.multimodal_gen.runtime.entrypoints.http_server import run_server

    generator = DiffGenerator.from_pretrained(
        args.model_path, device=args.device, dtype=args.dtype, cache_calibration=args.cache_calibration
    )
    name = args.served_model_name or generator.model_name
    run_server(generator, name, args.host, args.port, log_level=args.log_level)
    return 0
