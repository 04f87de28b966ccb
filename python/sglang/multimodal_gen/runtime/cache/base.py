"""The names strategies, tests and tools imported from here before the timestep-cache base was
split, re-exported so those imports keep working. Each lives in the module named for what it
holds: the contract a strategy implements in ``strategy.py``; the base's machinery in
``bookkeeping.py``; ``stats.py``, ``recording.py`` (calibration), ``reduction.py`` (statistics
over ranks), ``budget.py``, ``registry.py``, ``validation.py`` and ``branches.py``."""

from __future__ import annotations

from sglang.multimodal_gen.runtime.cache.branches import COND, UNCOND
from sglang.multimodal_gen.runtime.cache.budget import budget_passes
from sglang.multimodal_gen.runtime.cache.recording import CALIBRATION_WINDOW, CalibrationRecord
from sglang.multimodal_gen.runtime.cache.reduction import local_decision, local_statistic
from sglang.multimodal_gen.runtime.cache.registry import (
    _REGISTRY,
    NameRegistry,
    get_cache_class,
    register_cache,
    registered_caches,
)
from sglang.multimodal_gen.runtime.cache.stats import BranchStats, CacheStats, format_steps
from sglang.multimodal_gen.runtime.cache.strategy import StepFeatures, TimestepCache
from sglang.multimodal_gen.runtime.cache.validation import (
    CacheConfigError,
    is_number,
    is_whole,
    n_steps,
    threshold_above,
)

__all__ = [
    "CALIBRATION_WINDOW",
    "COND",
    "UNCOND",
    "_REGISTRY",
    "BranchStats",
    "CacheConfigError",
    "CacheStats",
    "CalibrationRecord",
    "NameRegistry",
    "StepFeatures",
    "TimestepCache",
    "budget_passes",
    "format_steps",
    "get_cache_class",
    "is_number",
    "is_whole",
    "local_decision",
    "local_statistic",
    "n_steps",
    "register_cache",
    "registered_caches",
    "threshold_above",
]
