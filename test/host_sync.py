"""A detector of host-device synchronisation that works on a CPU-only machine, without mocks.

On CUDA, ``torch.cuda.set_sync_debug_mode("warn")`` flags every synchronising call, but these
tests run on the CPU, where nothing ever waits. What can be seen on the CPU is the *call* that
would make the host wait for the device: a value read back into Python, a copy to the host, an
op whose output shape depends on the data (the host must learn the shape before it can go on),
or a blocking copy of Python data to the device. :class:`HostSyncDetector` records those calls
with two modes stacked while it is active:

- A ``TorchDispatchMode`` sees the aten ops, including those that composite ops and C++ code run
  internally (indexing with a tensor index reads it with ``_local_scalar_dense``):

  - ``aten._local_scalar_dense``: what ``.item()``, ``float(t)``, ``int(t)``, ``bool(t)`` (so any
    ``if t:`` or ``and`` on a tensor), ``t.__index__`` and ``f"{t:.2f}"`` dispatch to; under
    ``torch.inference_mode`` (every pipeline stage runs in it) the composite ops are not
    decomposed before the mode sees them, so the same reads arrive as ``aten.item`` (``.item()``,
    ``float(t)``, ``int(t)``) and ``aten.is_nonzero`` (``bool(t)``): all three are recorded;
  - data-dependent output shapes: ``nonzero`` (``torch.where(mask)``, ``argwhere``; in inference
    mode they arrive undecomposed as ``where``, ``nonzero_numpy``, ``argwhere``), ``masked_select``,
    ``unique``, ``bincount``, ``repeat_interleave`` without ``output_size``, ``index`` /
    ``index_put_`` with a boolean mask (``x[mask]``, ``x[mask] = v``: CUDA runs ``nonzero``);
  - tensor comparisons answered on the host: ``equal``, ``allclose``, ``is_nonzero``;
  - linear algebra that checks its result for errors on the host (the info tensor is read back):
    ``_linalg_check_errors``, or in inference mode the undecomposed ``linalg_solve``,
    ``linalg_inv``, ``linalg_cholesky``, ``linalg_lu_factor`` (their ``*_ex`` variants do not sync).

- A ``TorchFunctionMode`` sees the Python-level calls that dispatch nothing on a CPU tensor (the
  data is already on the host, so ``.cpu()`` returns the tensor itself and ``.tolist()`` reads
  its memory directly), but copy to the host, and wait for the device, on CUDA:
  ``.tolist()``, ``.cpu()``, ``.numpy()``, ``numpy.asarray(t)`` (``__array__``), ``.to("cpu")``
  with the device given as the string ``"cpu"``; and ``torch.tensor`` / ``torch.as_tensor``
  with an explicit ``device``: a blocking host-to-device copy, which on CUDA synchronises the
  stream (PyTorch's non-``non_blocking`` copy waits for it to finish).

What it cannot see on the CPU: ``torch.cuda.synchronize()``, ``Event.synchronize()`` and
``Stream.synchronize()`` (not torch ops; they never run on a CPU tensor anyway); ``.to(device)``
where ``device`` is a ``torch.device("cpu")`` object, since on a CPU-only run it cannot be told
from the device-agnostic ``.to(latents.device)``; a blocking copy to the device of a tensor that
lives on the host, a no-op here (diffusers' UniPC keeps its sigmas on the host and does
``self.sigmas[i].to(device)`` a few times per step: on CUDA each is a copy that waits for the
stream); and anything done outside torch (a NumPy computation on data read earlier). On CUDA,
``torch.cuda.set_sync_debug_mode`` covers those. The other way round, every tensor is taken for a
device tensor: reading one that lives on the host on CUDA too (``torch.tensor(x).item()``, which
rounds a Python float) is recorded although it would not sync. Each record names the op, the step
it ran in and the first caller outside torch, so a failing test says where to look.

Attach it with :meth:`HostSyncDetector.progress` as the request's progress callback: the
denoising stage calls it with 0 right before the first step and with ``total`` right after the
last one, so exactly the loop is watched (text encoding, latent preparation, the loop's setup,
the timer's final read and decoding are not). Use it as a context manager around the request,
so the modes are popped even if the loop raises.
"""

from __future__ import annotations

import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

#: aten ops that make the host wait for the device whatever their arguments.
SYNCING_OPS = {
    aten._local_scalar_dense.default: "reads a value to the host (.item(), float(), bool(), int())",
    aten.item.default: "reads a value to the host (.item(), float(), int())",
    aten.nonzero.default: "nonzero: output shape depends on the data",
    aten.nonzero_numpy.default: "nonzero: output shape depends on the data",
    aten.argwhere.default: "argwhere: output shape depends on the data",
    aten.where.default: "torch.where(condition) is nonzero: output shape depends on the data",
    aten.masked_select.default: "masked_select: output shape depends on the data",
    aten._unique.default: "unique: output shape depends on the data",
    aten._unique2.default: "unique: output shape depends on the data",
    aten.unique_dim.default: "unique: output shape depends on the data",
    aten.unique_consecutive.default: "unique_consecutive: output shape depends on the data",
    aten.bincount.default: "bincount: output shape depends on the data",
    aten.equal.default: "torch.equal answers on the host",
    aten.allclose.default: "torch.allclose answers on the host",
    aten.is_nonzero.default: "is_nonzero answers on the host",
    aten._linalg_check_errors.default: "linalg error check reads the info tensor to the host",
    # Composites that run that check (in inference mode they arrive undecomposed); *_ex variants do not.
    aten.linalg_solve.default: "torch.linalg.solve checks for errors on the host (solve_ex does not)",
    aten.linalg_inv.default: "torch.linalg.inv checks for errors on the host (inv_ex does not)",
    aten.linalg_cholesky.default: "torch.linalg.cholesky checks for errors on the host (cholesky_ex does not)",
    aten.linalg_lu_factor.default: "torch.linalg.lu_factor checks for errors on the host (lu_factor_ex does not)",
}

#: repeat_interleave with tensor repeats: its output size depends on them unless ``output_size`` is given.
_REPEAT_INTERLEAVE = (aten.repeat_interleave.Tensor, aten.repeat_interleave.self_Tensor)

#: Tensor methods that copy to the host (they dispatch nothing on a CPU tensor).
HOST_COPY_METHODS = {
    torch.Tensor.tolist: ".tolist() copies to the host",
    torch.Tensor.cpu: ".cpu() copies to the host",
    torch.Tensor.numpy: ".numpy() copies to the host",
    torch.Tensor.__array__: "numpy.asarray(tensor) copies to the host",
}

_TORCH_DIR = str(Path(torch.__file__).resolve().parent)
_THIS_FILE = str(Path(__file__).resolve())


@dataclass(frozen=True)
class SyncEvent:
    """One call that would synchronise host and device: what, in which step, called from where."""

    op: str
    reason: str
    step: int | None
    caller: str

    def __str__(self) -> str:
        return f"step {self.step}: {self.op} ({self.reason}) at {self.caller}"


def _caller() -> str:
    """The innermost frame outside torch and this module: the code that asked for the sync."""
    for frame in reversed(traceback.extract_stack()):
        filename = str(Path(frame.filename).resolve())
        if filename != _THIS_FILE and not filename.startswith(_TORCH_DIR):
            return f"{frame.filename}:{frame.lineno} in {frame.name}"
    return "<torch internals>"


def _is_bool_index(indices: Any) -> bool:
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in indices or ())


def _device_is_cpu_string(args: tuple, kwargs: dict) -> bool:
    device = kwargs.get("device")
    if device is None:
        device = next((a for a in args[1:] if isinstance(a, str)), None)
    return isinstance(device, str) and device.split(":")[0] == "cpu"


class _DispatchWatch(TorchDispatchMode):
    def __init__(self, record: Callable[[str, str], None]) -> None:
        super().__init__()
        self._record = record

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in SYNCING_OPS:
            self._record(str(func), SYNCING_OPS[func])
        elif func in _REPEAT_INTERLEAVE and kwargs.get("output_size") is None:
            self._record(str(func), "repeat_interleave without output_size: output shape depends on the data")
        elif func in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default) and _is_bool_index(args[1]):
            self._record(str(func), "boolean-mask indexing runs nonzero")
        return func(*args, **kwargs)


class _FunctionWatch(TorchFunctionMode):
    def __init__(self, record: Callable[[str, str], None]) -> None:
        super().__init__()
        self._record = record

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in HOST_COPY_METHODS:
            self._record(func.__name__, HOST_COPY_METHODS[func])
        elif func is torch.Tensor.to and _device_is_cpu_string(args, kwargs):
            self._record("to", '.to("cpu") copies to the host')
        elif func in (torch.tensor, torch.as_tensor) and kwargs.get("device") is not None:
            self._record(func.__name__, "a blocking copy of host data to the device")
        return func(*args, **kwargs)


class HostSyncDetector:
    """Records the calls that would synchronise host and device while it is active (see the module).

    Active between :meth:`progress` ``(0, total)`` and ``(total, total)`` (the denoising loop), or
    inside ``with detector.watching():`` for any other code.
    """

    def __init__(self) -> None:
        self.events: list[SyncEvent] = []
        self.steps_watched = 0
        self._step: int | None = None
        self._modes: list[Any] = []

    def _record(self, op: str, reason: str) -> None:
        self.events.append(SyncEvent(op, reason, self._step, _caller()))

    def start(self) -> None:
        """Push the two modes (the dispatch mode innermost)."""
        if self._modes:
            raise RuntimeError("HostSyncDetector is already watching")
        self._modes = [_FunctionWatch(self._record), _DispatchWatch(self._record)]
        for mode in self._modes:
            mode.__enter__()

    def stop(self) -> None:
        """Pop the modes if they are pushed (in reverse order); a no-op otherwise."""
        while self._modes:
            self._modes.pop().__exit__(None, None, None)

    def progress(self, done: int, total: int) -> None:
        """The request's progress callback: watch from before the first step to after the last."""
        if done == 0:
            self.start()
        self._step = done
        self.steps_watched = done
        if done == total:
            self.stop()

    def watching(self) -> "HostSyncDetector":
        """For ``with``: watch the body, whatever it is (``progress`` does not have to be called)."""
        self._step = None
        self.start()
        return self

    def __enter__(self) -> "HostSyncDetector":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def report(self) -> str:
        """Every recorded event, one a line (for assertion messages)."""
        return "\n".join(str(event) for event in self.events) or "no host-device sync"
