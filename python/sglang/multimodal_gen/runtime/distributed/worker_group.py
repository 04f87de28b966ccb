"""The worker processes of a multi-process generator, started and rebuilt by rank 0.

``DiffGenerator.from_pretrained(..., num_gpus=N)`` keeps its own pipeline as rank 0 and starts
``N - 1`` worker processes (``torch.multiprocessing``; on the CPU forked from a fork server that has
imported the model libraries once, so a rebuilt group does not pay the imports again; spawned on
CUDA) that join torch.distributed (NCCL on CUDA, gloo on the CPU) over a free loopback TCP port
and load the same model with the loader the generator hands over (this layer knows nothing of the
entrypoints). A request goes from rank 0 to every worker with ``broadcast_object_list`` on the
control group; every rank runs the pipeline (the denoising stage splits the work through
``parallel_state``); each rank's report comes back with ``all_gather_object``; rank 0 returns the
result.

Failure: a worker that raises puts one line (its rank and error) on an error queue and exits,
which ends rank 0's pending collective at once (the peer's connection closes); every
collective of a request also has the group's timeout. Rank 0 then stops the workers, tears the
group down, starts a new one (processes respawned, model reloaded) and raises
:class:`WorkerGroupError` naming the rank and its error. Idle workers wait for the next request
on the control group, whose connection the driver's exit closes.

Interruption: Ctrl-C reaches every process of the terminal's process group, the workers too.
Workers ignore SIGINT (blocked from before they start, so not even their interpreter's start-up
sees it); the driver alone decides. A ``KeyboardInterrupt`` (or ``SystemExit``) in the driver
stops the workers and is re-raised: the process is leaving, so nothing is respawned.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import queue
import signal
import socket
import time
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.multiprocessing as mp

from sglang.multimodal_gen.errors import InvalidRequestError
from sglang.multimodal_gen.runtime.distributed import parallel_state as ps
from sglang.multimodal_gen.runtime.distributed.sequence_parallel import check_heads

logger = logging.getLogger(__name__)


class WorkerGroupError(RuntimeError):
    """A rank failed during a request; the worker group was rebuilt and serves the next one."""


@dataclasses.dataclass(frozen=True)
class ParallelConfig:
    """How one request is spread over processes (sglang's flags).

    Attributes:
        num_gpus: Processes per request (ranks; on the CPU, gloo processes). 1: no workers.
        enable_cfg_parallel: Run the cond and uncond branches on different ranks (Wan).
        ulysses_degree: Sequence-parallel degree (Ulysses: all-to-all over attention heads).
        ring_degree: Ring attention degree; only 1 is supported.
        timeout_s: Every collective of a request (and the start-up) fails after this long.
    """

    num_gpus: int = 1
    enable_cfg_parallel: bool = False
    ulysses_degree: int = 1
    ring_degree: int = 1
    timeout_s: float = ps.DEFAULT_TIMEOUT_S

    @classmethod
    def from_flags(
        cls,
        num_gpus: int | None = 1,
        enable_cfg_parallel: bool = False,
        ulysses_degree: int | None = None,
        sp_degree: int | None = None,
        timeout_s: float = ps.DEFAULT_TIMEOUT_S,
    ) -> "ParallelConfig":
        """sglang's flags: ``sp_degree = ulysses_degree x ring_degree``; one of the two may be
        left out (the other decides). Inconsistent values are refused in one line."""
        num_gpus = 1 if num_gpus is None else num_gpus
        for name, value in (("num_gpus", num_gpus), ("ulysses_degree", ulysses_degree), ("sp_degree", sp_degree)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InvalidRequestError(f"{name} must be a whole number >= 1, got {value!r}", param=name)
        if ulysses_degree is None and sp_degree is None:
            cfg = 2 if enable_cfg_parallel else 1
            ulysses_degree = max(1, num_gpus // cfg)  # sglang: the processes CFG leaves go to SP
        elif ulysses_degree is None:
            ulysses_degree = sp_degree
        ring = 1
        if sp_degree is not None:
            if sp_degree % ulysses_degree:
                raise InvalidRequestError(
                    f"sp_degree {sp_degree} is ulysses_degree x ring_degree, not a multiple of ulysses_degree "
                    f"{ulysses_degree}", param="sp_degree")
            ring = sp_degree // ulysses_degree
        if ring > 1:
            raise InvalidRequestError(
                f"ring attention is not supported: sp_degree {sp_degree} / ulysses_degree {ulysses_degree} = ring "
                f"degree {ring}; set --ulysses-degree {sp_degree}", param="sp_degree")
        return cls(num_gpus, bool(enable_cfg_parallel), ulysses_degree, ring, timeout_s)

    @property
    def cfg_degree(self) -> int:
        return 2 if self.enable_cfg_parallel else 1

    @property
    def sp_degree(self) -> int:
        return self.ulysses_degree * self.ring_degree

    def check(self, model_family: Any, num_attention_heads: int | None = None) -> None:
        """Refuse, before any model loads or process starts, what this model and these processes
        cannot do (``num_attention_heads``: the transformer's, which the Ulysses degree must divide)."""
        if self.enable_cfg_parallel and model_family.cfg_branches != 2:
            raise InvalidRequestError(
                f"--enable-cfg-parallel needs a model with two CFG branches; {model_family.name} runs "
                f"{model_family.cfg_branches} (guidance-distilled): use --ulysses-degree instead", param="enable_cfg_parallel")
        if self.cfg_degree * self.sp_degree != self.num_gpus:
            cfg = "2 (cfg parallel) x " if self.enable_cfg_parallel else ""
            raise InvalidRequestError(
                f"--num-gpus {self.num_gpus} must equal {cfg}sp degree {self.sp_degree} = "
                f"{self.cfg_degree * self.sp_degree}; change --num-gpus, --ulysses-degree or --enable-cfg-parallel",
                param="num_gpus")
        if num_attention_heads is not None and self.ulysses_degree > 1:
            check_heads(num_attention_heads, self.ulysses_degree, f"this {model_family.title} transformer")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _backend(device: str | None) -> str:
    if device is None:
        return ps.default_backend()
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def _rank_device(device: str | None, rank: int) -> str | None:
    if _backend(device) == "nccl":
        return f"cuda:{rank % torch.cuda.device_count()}"
    return device


def rank_report(result: Any) -> dict[str, Any]:
    """What each rank says about a request: its rank, the branches it ran, the steps its cache
    computed and skipped per branch (after the stage merged the other ranks' branches)."""
    report: dict[str, Any] = {"rank": ps.world_rank(), "cfg_rank": ps.cfg_rank(), "sp_rank": ps.sp_rank()}
    stats = getattr(result, "cache_stats", None)
    if stats is not None:
        report["steps"] = {
            name: (list(b.computed_steps), list(b.skipped_steps)) for name, b in stats.branches.items()
        }
    return report


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread while processes start: a child keeps the signal mask across
    fork and exec, so a Ctrl-C during its start-up stays pending until :func:`_ignore_sigint`
    discards it. This process loses none: another of its threads takes it, or it arrives when
    the block ends."""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)


def _ignore_sigint() -> None:
    """A worker's SIGINT: ignored (the driver stops the workers), and unblocked so that one sent
    during start-up is dropped instead of left pending."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


def _worker_main(
    rank: int,
    config: ParallelConfig,
    init_method: str,
    load: dict[str, Any],
    load_worker: Callable[[dict[str, Any]], Any],
    worker_init: Callable[[], None] | None,
    errors: Any,
) -> None:
    """A worker's life: join the group, load the model, serve requests until told to stop."""
    _ignore_sigint()
    try:
        ps.init_parallel_state(
            rank, config.num_gpus, init_method, sp_degree=config.sp_degree, cfg_degree=config.cfg_degree,
            backend=_backend(load.get("device")), timeout_s=config.timeout_s,
        )
        if worker_init is not None:
            worker_init()
        pipeline = load_worker({**load, "device": _rank_device(load.get("device"), rank)})
        control = ps.get_control_group()
        control.barrier()  # loaded
        while True:
            message = control.broadcast_object(None, src=0)
            if message[0] == "stop":
                break
            _, params, calibrate, probe = message
            result = pipeline.run(params, calibrate=calibrate, probe=probe, stop_after="denoising")  # rank 0 decodes
            control.all_gather_object(rank_report(result))
    except BaseException as exc:  # report, then leave: the closed connection ends rank 0's wait
        try:
            errors.put((rank, f"{type(exc).__name__}: {exc}"))
            errors.close()
            errors.join_thread()
        finally:
            os._exit(1)
    ps.destroy_parallel_state()


class WorkerGroup:
    """Ranks 1..N-1 of a multi-process generator; the calling process is rank 0.

    Args:
        config: The process layout.
        load: The keyword arguments every rank loads its model with (``device`` among them).
        load_rank0: Loads rank 0's pipeline in this process (called once the group is up).
        load_worker: A picklable function that loads a worker's pipeline from ``load`` (with the
            worker's device): what the group runs requests on, built by the layer that knows
            how (the generator).
        worker_init: A picklable function each worker runs before loading (tests register
            strategies with it).
        preload: Modules the workers' fork server imports once (torch, the model libraries): a
            worker forks from it with them imported, so starting or replacing a group costs the
            model's load, not seconds of imports. Fixed when the process's first group starts;
            CPU (gloo) groups only: CUDA workers are spawned.
    """

    def __init__(
        self,
        config: ParallelConfig,
        load: dict[str, Any],
        load_rank0: Callable[[], Any],
        load_worker: Callable[[dict[str, Any]], Any],
        worker_init: Callable[[], None] | None = None,
        preload: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.load = load
        self.load_worker = load_worker
        self.worker_init = worker_init
        if _backend(load.get("device")) == "gloo":
            self._ctx = mp.get_context("forkserver")
            self._ctx.set_forkserver_preload([__name__, *preload])
        else:
            # CUDA does not survive a fork after the driver was touched, which a library imported
            # in the fork server may do; a CUDA rank costs seconds of model load anyway.
            self._ctx = mp.get_context("spawn")
        self._procs: list[Any] = []
        self._errors: Any = None
        self.restarts = 0
        self.pipeline = self._start(load_rank0)

    # ----------------------------------------------------------------------------- life cycle
    def _start(self, load_rank0: Callable[[], Any] | None) -> Any:
        self._errors = self._ctx.Queue()
        init_method = f"tcp://127.0.0.1:{free_port()}"
        self._procs = [
            self._ctx.Process(
                target=_worker_main,
                args=(rank, self.config, init_method, self.load, self.load_worker, self.worker_init, self._errors),
                daemon=True, name=f"sglang-rank{rank}",
            )
            for rank in range(1, self.config.num_gpus)
        ]
        with _sigint_blocked():
            for proc in self._procs:
                proc.start()
        try:
            ps.init_parallel_state(
                0, self.config.num_gpus, init_method, sp_degree=self.config.sp_degree,
                cfg_degree=self.config.cfg_degree, backend=_backend(self.load.get("device")),
                timeout_s=self.config.timeout_s, activate=False,
            )
            pipeline = load_rank0() if load_rank0 is not None else None
            with ps.parallel_state_active():
                ps.get_control_group().barrier()
        except BaseException as exc:
            failure = self._worker_failure() if isinstance(exc, Exception) else None  # Ctrl-C: leave now
            self._stop_workers()
            if failure is not None:
                raise WorkerGroupError(f"the worker group did not start: {failure}") from exc
            raise
        logger.info("worker group up: %d ranks (cfg %d x sp %d)", self.config.num_gpus, self.config.cfg_degree,
                    self.config.sp_degree)
        return pipeline

    def _worker_failure(self, wait_s: float = 5.0) -> str | None:
        """The first failed worker's ``rank N: error`` line, waiting up to ``wait_s`` for it; at once
        when a worker has died (what it reported, if anything, was flushed before it exited)."""
        deadline = time.monotonic() + wait_s
        while True:
            dead = [p for p in self._procs if p.exitcode not in (None, 0)]
            try:
                rank, error = self._errors.get(timeout=0.1)
                return f"rank {rank}: {error}"
            except queue.Empty:
                pass
            if dead or time.monotonic() > deadline:
                return f"rank {self._procs.index(dead[0]) + 1} exited with code {dead[0].exitcode}" if dead else None

    def _stop_workers(self) -> None:
        for proc in self._procs:
            if proc.is_alive():
                proc.terminate()
        for proc in self._procs:
            proc.join(timeout=10)
            if proc.is_alive():
                proc.kill()
                proc.join(timeout=5)
        self._procs = []
        if self._errors is not None:  # release its semaphores now, not at interpreter exit
            self._errors.close()
            self._errors.join_thread()
            self._errors = None
        ps.destroy_parallel_state()

    def restart(self) -> None:
        """Stop every worker, tear the group down and start a new one (models reloaded)."""
        self._stop_workers()
        self.restarts += 1
        self._start(None)

    def close(self) -> None:
        if not self._procs:
            return
        try:
            with ps.parallel_state_active():
                ps.get_control_group().broadcast_object(("stop",), src=0)
            for proc in self._procs:
                proc.join(timeout=10)
        except Exception:  # a group that is already broken: the terminate below ends it
            pass
        self._stop_workers()

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    # ----------------------------------------------------------------------------- requests
    def run(self, pipeline: Any, params: Any, calibrate: bool = False, probe: Any = None, **run_kwargs: Any) -> Any:
        """Run one request on every rank; rank 0's result, with every rank's report. ``probe`` (a
        calibration's latent probe) goes to every rank, so each perturbs its latents alike."""
        if not self.alive:
            self.restart()
        try:
            with ps.parallel_state_active():
                control = ps.get_control_group()
                control.broadcast_object(("generate", params, calibrate, probe), src=0)
                result = pipeline.run(params, calibrate=calibrate, probe=probe, **run_kwargs)
                result.rank_reports = control.all_gather_object(rank_report(result))
            return result
        except BaseException as exc:
            if not isinstance(exc, Exception):  # Ctrl-C or exit: the process is leaving, respawn nothing
                self._stop_workers()
                raise
            # A collective that failed (a RuntimeError, as gloo's and NCCL's are) may be a worker's
            # doing: give its report time to arrive. Rank 0's own exception (a cancellation from the
            # progress callback, a refused input) leaves the workers waiting, with nothing to report.
            failure = self._worker_failure(wait_s=2.0 if isinstance(exc, RuntimeError) else 0.0)
            logger.warning("request failed (%s); restarting the worker group", failure or exc)
            self.restart()
            if failure is not None:
                raise WorkerGroupError(
                    f"{failure} (during the request; the worker group was restarted)") from exc
            raise
