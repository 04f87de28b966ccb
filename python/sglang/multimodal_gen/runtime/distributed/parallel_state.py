"""Process groups of one multi-process request, and the only collectives the runtime calls.

Contract (stable; the denoising stage, the model adapters and the sequence-parallel module
import these and nothing from ``torch.distributed`` directly):

Layout. ``world = cfg_degree x sp_degree`` ranks. Rank ``r`` has ``cfg_rank = r // sp_degree``
and ``sp_rank = r % sp_degree``: the sp group of a rank is the contiguous block of
``sp_degree`` ranks that share its CFG branch; the cfg group of a rank is the ``cfg_degree``
ranks with the same ``sp_rank``. With CFG parallel (``cfg_degree == 2``) cfg rank 0 runs the
``cond`` branch and cfg rank 1 the ``uncond`` branch.

Accessors (all valid without ``torch.distributed`` initialised, and then trivial):

- ``get_world_group()``, ``get_sp_group()``, ``get_cfg_group()`` -> :class:`GroupCoordinator`
  (``.group`` is the torch ``ProcessGroup`` or ``None`` single-process, ``.ranks``,
  ``.rank_in_group``, ``.world_size``, and the collectives below, each a no-op / identity
  when ``world_size == 1``).
- ``world_rank()``, ``world_size()``, ``sp_rank()``, ``sp_world_size()``, ``cfg_rank()``,
  ``cfg_world_size()`` -> int (0 / 1 single-process).
- ``is_initialized()`` -> whether ``init_parallel_state`` ran in this process.
- ``init_parallel_state(rank, world_size, init_method, *, sp_degree=1, cfg_degree=1,
  backend=None, timeout_s=...)`` and ``destroy_parallel_state()`` (called by the worker
  group, not by adapters).
- ``parallel_state_active(active)``: a context manager. In a worker the groups are active for
  the life of the process; in the driver (rank 0, the user's process) they are active only
  while its multi-process generator runs a request, so a single-process generator in the same
  process still sees the trivial values.

GroupCoordinator collectives (tensor in, tensor out; the input is not modified):
``all_reduce(t, op="sum")``, ``all_gather(t, dim=0)`` (concatenated in rank order along
``dim``), ``all_to_all(t, scatter_dim, gather_dim)`` (chunks ``t`` along ``scatter_dim`` into
``world_size`` parts, sends part ``j`` to rank ``j``, concatenates what arrives along
``gather_dim``; Ulysses uses this), ``broadcast(t, src=0)`` (``src`` is a rank *in the group*),
``broadcast_object(obj, src=0)``, ``broadcast_flag(value, src=0)`` (one bool),
``all_gather_object(obj)``, ``barrier()``. Every collective runs under the group's
timeout (set at ``init_process_group``), so a dead peer raises instead of waiting forever.

Backend: ``nccl`` when CUDA is available, else ``gloo`` (override with ``backend=``). gloo has
no all_to_all: the coordinator builds it from all_gather there (same result, more traffic).
"""

from __future__ import annotations

import contextlib
import datetime
from dataclasses import dataclass, field
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist

DEFAULT_TIMEOUT_S = 120.0
#: The control group's timeout: idle workers wait there for the next request (the driver's exit
#: closes the connection, which ends the wait at once).
IDLE_TIMEOUT_S = 7 * 24 * 3600.0


@dataclass
class GroupCoordinator:
    """One process group as the runtime sees it: its ranks, this process's place, collectives."""

    name: str
    ranks: list[int] = field(default_factory=lambda: [0])
    rank_in_group: int = 0
    group: Any = None  # torch ProcessGroup, or None for a group of one

    @property
    def world_size(self) -> int:
        return len(self.ranks)

    @property
    def is_first(self) -> bool:
        return self.rank_in_group == 0

    def _global(self, group_rank: int) -> int:
        return self.ranks[group_rank]

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        out = tensor.clone()
        dist.all_reduce(out, op=ops[op], group=self.group)
        return out

    def all_gather(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor, group=self.group)
        return torch.cat(parts, dim=dim)

    def all_gather_list(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor (same shape), in group-rank order."""
        if self.world_size == 1:
            return [tensor]
        tensor = tensor.contiguous()
        parts = [torch.empty_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor, group=self.group)
        return parts

    def all_to_all(self, tensor: torch.Tensor, scatter_dim: int, gather_dim: int) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        n = self.world_size
        if tensor.shape[scatter_dim] % n:
            raise ValueError(
                f"all_to_all: dimension {scatter_dim} of size {tensor.shape[scatter_dim]} does not "
                f"split into {n} equal parts; pad it first"
            )
        inputs = [c.contiguous() for c in tensor.chunk(n, dim=scatter_dim)]
        if dist.get_backend(self.group) == "gloo":
            # gloo has no all_to_all: gather every rank's parts, keep the ones addressed to us.
            stacked = torch.stack(inputs)  # [n, ...]
            gathered = [torch.empty_like(stacked) for _ in range(n)]
            dist.all_gather(gathered, stacked, group=self.group)
            received = [gathered[src][self.rank_in_group] for src in range(n)]
        else:
            received = [torch.empty_like(c) for c in inputs]
            dist.all_to_all(received, inputs, group=self.group)
        return torch.cat(received, dim=gather_dim)

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor:
        if self.world_size == 1:
            return tensor
        out = tensor.clone().contiguous()
        dist.broadcast(out, src=self._global(src), group=self.group)
        return out

    def broadcast_object(self, obj: Any = None, src: int = 0) -> Any:
        if self.world_size == 1:
            return obj
        box = [obj if self.rank_in_group == src else None]
        dist.broadcast_object_list(box, src=self._global(src), group=self.group)
        return box[0]

    def broadcast_flag(self, value: bool | None, src: int = 0, device: Any = "cpu") -> bool:
        """One bool from group rank ``src`` (``value`` is ignored elsewhere)."""
        if self.world_size == 1:
            return bool(value)
        if self.group is not None and dist.get_backend(self.group) == "nccl":
            device = torch.device("cuda", torch.cuda.current_device())
        flag = torch.tensor([1 if (self.rank_in_group == src and value) else 0], dtype=torch.int32, device=device)
        dist.broadcast(flag, src=self._global(src), group=self.group)
        return bool(flag.item())

    def all_gather_object(self, obj: Any) -> list[Any]:
        if self.world_size == 1:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj, group=self.group)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier(group=self.group)


def _single_groups() -> dict[str, GroupCoordinator]:
    return {name: GroupCoordinator(name) for name in ("world", "sp", "cfg", "control")}


_SINGLE = _single_groups()
_distributed: dict[str, GroupCoordinator] | None = None  # this process's groups, once initialised
_groups: dict[str, GroupCoordinator] = _SINGLE  # what the accessors answer now


def default_backend() -> str:
    return "nccl" if torch.cuda.is_available() else "gloo"


def group_layout(world_size: int, sp_degree: int, cfg_degree: int) -> tuple[list[list[int]], list[list[int]]]:
    """(sp groups, cfg groups) as lists of global ranks, for ``world = cfg x sp``."""
    if sp_degree * cfg_degree != world_size:
        raise ValueError(
            f"{world_size} processes do not split into cfg degree {cfg_degree} x sp degree {sp_degree}"
        )
    sp_groups = [list(range(c * sp_degree, (c + 1) * sp_degree)) for c in range(cfg_degree)]
    cfg_groups = [[c * sp_degree + s for c in range(cfg_degree)] for s in range(sp_degree)]
    return sp_groups, cfg_groups


def init_parallel_state(
    rank: int,
    world_size: int,
    init_method: str,
    *,
    sp_degree: int = 1,
    cfg_degree: int = 1,
    backend: str | None = None,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    activate: bool = True,
) -> None:
    """Join the world (``init_method`` e.g. ``tcp://127.0.0.1:PORT`` or ``file:///path``) and
    build the sp, cfg and control groups. Every rank calls this with the same arguments but
    ``rank``. ``activate=False`` (the driver) leaves the accessors trivial until
    :func:`parallel_state_active` turns them on."""
    global _distributed, _groups
    if _distributed is not None or dist.is_initialized():
        raise RuntimeError("torch.distributed is already initialised in this process; one worker group per process")
    sp_groups, cfg_groups = group_layout(world_size, sp_degree, cfg_degree)
    backend = backend or default_backend()
    timeout = datetime.timedelta(seconds=timeout_s)
    if backend == "nccl":
        torch.cuda.set_device(rank % torch.cuda.device_count())
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size, timeout=timeout)
    everyone = list(range(world_size))
    groups = {"world": GroupCoordinator("world", everyone, rank, dist.group.WORLD)}
    # new_group must be called by every rank for every group, in the same order.
    for name, layout in (("sp", sp_groups), ("cfg", cfg_groups)):
        for ranks in layout:
            pg = dist.new_group(ranks, timeout=timeout, backend=backend) if len(ranks) > 1 else None
            if rank in ranks:
                groups[name] = GroupCoordinator(name, ranks, ranks.index(rank), pg)
    # Requests travel on a gloo group with a long timeout: idle workers wait there.
    control = dist.new_group(everyone, timeout=datetime.timedelta(seconds=IDLE_TIMEOUT_S), backend="gloo")
    groups["control"] = GroupCoordinator("control", everyone, rank, control)
    _distributed = groups
    if activate:
        _groups = groups


def destroy_parallel_state() -> None:
    global _distributed, _groups
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    _distributed = None
    _groups = _SINGLE


@contextlib.contextmanager
def parallel_state_active(active: bool = True) -> Iterator[None]:
    """Answer the accessors from this process's groups (``active``) or as a single process."""
    global _groups
    previous = _groups
    if active and _distributed is None:
        raise RuntimeError("parallel_state_active: init_parallel_state has not run in this process")
    _groups = _distributed if active else _SINGLE
    try:
        yield
    finally:
        _groups = previous


def is_initialized() -> bool:
    """Whether this process belongs to a worker group (the accessors may still be inactive)."""
    return _distributed is not None


def get_control_group() -> GroupCoordinator:
    """The gloo group requests and results travel on (the worker group's, not the adapters')."""
    return _groups["control"]


def get_world_group() -> GroupCoordinator:
    return _groups["world"]


def get_sp_group() -> GroupCoordinator:
    return _groups["sp"]


def get_cfg_group() -> GroupCoordinator:
    return _groups["cfg"]


def world_rank() -> int:
    return _groups["world"].rank_in_group


def world_size() -> int:
    return _groups["world"].world_size


def sp_rank() -> int:
    return _groups["sp"].rank_in_group


def sp_world_size() -> int:
    return _groups["sp"].world_size


def cfg_rank() -> int:
    return _groups["cfg"].rank_in_group


def cfg_world_size() -> int:
    return _groups["cfg"].world_size


__all__: Sequence[str] = (
    "GroupCoordinator",
    "init_parallel_state",
    "destroy_parallel_state",
    "is_initialized",
    "parallel_state_active",
    "get_control_group",
    "get_world_group",
    "get_sp_group",
    "get_cfg_group",
    "world_rank",
    "world_size",
    "sp_rank",
    "sp_world_size",
    "cfg_rank",
    "cfg_world_size",
    "default_backend",
    "group_layout",
)
