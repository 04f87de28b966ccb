"""The flags ``sglang generate`` and ``sglang serve`` share (model, processes, speed, memory; of
these ``sglang calibrate`` takes the model's and memory's), and the ``DiffGenerator.from_pretrained``
arguments they become. The commands import them from here, so neither command's module imports
the other's."""

from __future__ import annotations

import argparse
from typing import Any, Callable


def add_model_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model-path", default=None,
                        help="diffusers-layout model folder, hub id, or a built-in model's name: wan2.1-t2v-tiny "
                             "(the default), wan2.1-t2v-tiny-hard, wan2.2-t2v-tiny (two experts), wan2.1-i2v-tiny "
                             "(image to video) or hunyuanvideo-t2v-tiny")
    parser.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", default=None, help="float32, bfloat16 or float16 (default: bf16 on CUDA, fp32 on CPU)")


def whole_number(minimum: int, zero_means: str = "") -> Callable[[str], int]:
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


_count = whole_number(1)


def add_parallel_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("multiple processes (docs/multi_gpu.md)")
    group.add_argument("--num-gpus", type=_count, default=1,
                       help="processes per request, one per GPU (on the CPU: gloo processes); default 1")
    group.add_argument("--enable-cfg-parallel", action="store_true",
                       help="run the cond and uncond CFG branches on different processes (Wan)")
    group.add_argument("--ulysses-degree", type=_count, default=None,
                       help="Ulysses sequence-parallel degree (default: what --num-gpus leaves after CFG parallel)")
    group.add_argument("--sp-degree", type=_count, default=None,
                       help="sequence-parallel degree = ulysses degree x ring degree (ring > 1 is not supported)")


def add_speed_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("speed")
    group.add_argument("--enable-torch-compile", action="store_true",
                       help="torch.compile the DiT's transformer blocks (embedding, head and cache stay eager); "
                            "faster steps, but the first request of each new shape (size, frames, batch) pays "
                            "the compile")
    group.add_argument("--batched-cfg", action=argparse.BooleanOptionalAction, default=None,
                       help="run the cond and uncond CFG branches as one batch of 2 (default: on); --no-batched-cfg "
                            "runs two passes as diffusers does; does not apply with --enable-cfg-parallel, which "
                            "runs them on different processes")


def speed_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``DiffGenerator.from_pretrained``'s speed flags."""
    return dict(enable_torch_compile=args.enable_torch_compile, batched_cfg=args.batched_cfg)


def add_memory_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("memory")
    group.add_argument("--offload-idle-expert", action="store_true",
                       help="Wan2.2 two-expert models: keep the expert that is not running on the CPU, so the "
                            "device holds one expert's weights instead of two; costs one copy of an expert each "
                            "way per request (refused for a model with one transformer; nothing to do on a CPU)")


def memory_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``DiffGenerator.from_pretrained``'s memory flags."""
    return dict(offload_idle_expert=args.offload_idle_expert)


def parallel_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """``DiffGenerator.from_pretrained``'s process flags, checked (without the model) first."""
    from sglang.multimodal_gen.runtime.distributed.worker_group import ParallelConfig

    flags = dict(num_gpus=args.num_gpus, enable_cfg_parallel=args.enable_cfg_parallel,
                 ulysses_degree=args.ulysses_degree, sp_degree=args.sp_degree)
    config = ParallelConfig.from_flags(**flags)
    if config.cfg_degree * config.sp_degree != config.num_gpus:
        config.check(_AnyFamily())
    return flags


class _AnyFamily:
    """A model with two CFG branches: the flags' arithmetic is checked before the model is known."""

    name = "this model"
    cfg_branches = 2
