"""Argument checks shared by every package, with keras-core style messages.

Integers are Python or NumPy integers, never ``bool``; numbers add Python and NumPy floats. The
messages say what was expected and what was received, e.g.
``"`margin` must be an int >= 0. Received: margin=-1"``.
"""

from __future__ import annotations

from typing import Any

import numpy as np


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
