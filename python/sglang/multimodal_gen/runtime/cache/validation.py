"""What strategies' configs share: the error that tells the user what to change, the checks of
numeric knobs, and the wording of the messages that suggest a knob."""

from __future__ import annotations

import math
import numbers
from typing import Any

from sglang.multimodal_gen.errors import InvalidRequestError


class CacheConfigError(InvalidRequestError):
    """A user-supplied cache setting is invalid; the message says what to change."""


def is_number(value: Any) -> bool:
    """A real number that is not a bool (JSON's ``true`` is not a threshold)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_whole(value: Any, minimum: int = 0) -> bool:
    """A whole number (``3`` or ``3.0``) of at least ``minimum``: what config counts take."""
    return is_number(value) and float(value).is_integer() and value >= minimum


def threshold_above(value: float) -> float:
    """The smallest two-significant-digit threshold strictly above ``value``: what to suggest to
    a user whose threshold never let a step skip (skipping needs ``accumulated < threshold``)."""
    if value < 0:
        return 0.0
    if value == 0:
        return 0.01
    quantum = 10.0 ** (math.floor(math.log10(value)) - 1)
    suggestion = round(math.floor(value / quantum + 1) * quantum, 12)
    return suggestion if suggestion > value else round(suggestion + quantum, 12)


def n_steps(count: int) -> str:
    """'1 step', '4 steps': step counts in user-facing messages."""
    return f"{count} step" if count == 1 else f"{count} steps"
