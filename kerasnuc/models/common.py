"""Argument checks shared by the model builders."""

from __future__ import annotations

from typing import Any

from kerasnuc.checks import is_int


def check_input_shape(input_shape: Any) -> tuple:
    """``input_shape`` as a tuple ``(height, width, 3)``, height/width None or multiples of 32.

    Raises:
        ValueError: another length or channel count, or a size that is not a positive multiple of
            32 (the output stride of the encoders).
    """
    shape = tuple(input_shape)
    if len(shape) != 3 or shape[2] != 3:
        raise ValueError(
            f"`input_shape` must be (height, width, 3). Received: input_shape={input_shape!r}"
        )
    for size in shape[:2]:
        if size is not None and (not is_int(size) or size < 32 or size % 32):
            raise ValueError(
                "`input_shape` height and width must be None or positive multiples of 32 (the "
                f"encoder's output stride). Received: input_shape={input_shape!r}"
            )
    return shape
