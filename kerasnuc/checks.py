"""Argument checks shared by every package, with keras-core style messages.

Integers are Python or NumPy integers, never ``bool``; numbers add Python and NumPy floats. The
messages say what was expected and what was received, e.g.
``"`margin` must be an int >= 0. Received: margin=-1"``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

MPP_RANGE = (0.02, 50.0)
"""Plausible pixel sizes in um/px (0.25 at 40x, 0.5 at 20x; 50 is a 0.2x overview): given
values outside it are refused, values read from files outside it are ignored (e.g. the 72 dpi
default of many writers)."""


def is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, int | np.integer) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    """A Python or NumPy integer or float, not a bool."""
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(value, bool)


def check_int(name: str, value: Any, minimum: int) -> int:
    """``value`` as a Python int if it is an integer >= ``minimum`` (ValueError otherwise)."""
    if not is_int(value) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}. Received: {name}={value!r}")
    return int(value)


def check_positive_int(name: str, value: Any) -> int:
    """``value`` as a Python int if it is an integer >= 1 (ValueError otherwise)."""
    if not is_int(value) or value < 1:
        raise ValueError(f"`{name}` must be a positive int. Received: {name}={value!r}")
    return int(value)


def is_plausible_mpp(value: Any) -> bool:
    """Whether ``value`` is a number within :data:`MPP_RANGE` (um/px)."""
    if not is_number(value) or not math.isfinite(float(value)):
        return False
    return MPP_RANGE[0] <= float(value) <= MPP_RANGE[1]


def check_mpp(value: Any, name: str = "mpp") -> float | None:
    """``value`` as a float if it is None or a pixel size within :data:`MPP_RANGE` (ValueError
    otherwise, saying the range)."""
    if value is None:
        return None
    if not is_plausible_mpp(value):
        low, high = MPP_RANGE
        raise ValueError(
            f"`{name}` must be a pixel size in {low:g}..{high:g} um/px (0.25 at 40x, 0.5 at "
            f"20x) or None. Received: {name}={value!r}"
        )
    return float(value)
