"""Running third-party step code (diffusers' schedulers) without host-device syncs it does not need."""

from __future__ import annotations

import torch
from torch.overrides import TorchFunctionMode


class SolveWithoutErrorCheck(TorchFunctionMode):
    """Inside it, ``torch.linalg.solve(A, B)`` is ``torch.linalg.solve_ex(A, B).result``.

    The same LU solve, bit for bit, minus the error check, which reads the info tensor back to the
    host: on CUDA a sync per call (PyTorch documents ``linalg.solve`` as synchronising and points to
    ``solve_ex``). diffusers' UniPC scheduler, the one Wan2.1 checkpoints ship, solves a tiny system
    for its corrector on every step from the third on (and for its predictor above order 2). The
    matrix is a Vandermonde matrix of step-size ratios, not singular while the sigmas are distinct,
    so the check has nothing to catch. The denoising stage enters this around ``scheduler.step`` only.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.linalg.solve and "out" not in kwargs:
            return torch.linalg.solve_ex(*args, **kwargs).result
        return func(*args, **kwargs)
