"""Views of an image: the eight flips and quarter turns, and maps averaged over them.

A fully convolutional network is not exactly equivariant to flips and rotations, so the maps of
a flipped tile, flipped back, differ a little from the tile's own; their mean is a cheap
ensemble (test-time augmentation without stain changes or dropout). The functions here are
numpy only: the onnxruntime engine uses them without TensorFlow.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np

#: Number of dihedral transforms (4 rotations x optional left-right flip).
NUM_TRANSFORMS = 8
#: Outputs whose last axis is a ``(dy, dx)`` vector in (row, column) pixel axes.
VECTOR_OUTPUTS: tuple[str, ...] = ("vectors",)


def _transform_parts(transform: int) -> tuple[int, bool]:
    if not isinstance(transform, int | np.integer) or not 0 <= transform < NUM_TRANSFORMS:
        raise ValueError(f"`transform` must be an int in [0, 8). Received: transform={transform!r}")
    return int(transform) % 4, int(transform) >= 4


def apply_transform(image: np.ndarray, transform: int) -> np.ndarray:
    """Apply dihedral transform ``transform`` to an image or a batch.

    Transform ``t`` flips left-right when ``t >= 4`` and then rotates by ``t % 4`` quarter turns
    counter-clockwise (``np.rot90``): 0 identity, 1..3 rotations, 4 left-right flip, 6
    up-down flip, 5 the transpose, 7 the anti-transpose.

    Args:
        image: ``(H, W, C)`` or ``(B, H, W, C)`` array.
        transform: index ``0..7``.

    Returns:
        The transformed array (``(W, H, ...)`` spatial size for odd rotations).
    """
    rotations, flip = _transform_parts(transform)
    out = np.asarray(image)
    if flip:
        out = out[..., :, ::-1, :]
    return np.rot90(out, rotations, axes=(-3, -2))


def invert_transform(
    maps: Mapping[str, np.ndarray],
    transform: int,
    vector_outputs: Sequence[str] = VECTOR_OUTPUTS,
) -> dict[str, np.ndarray]:
    """Map outputs predicted on ``apply_transform(image, transform)`` back to the image's frame.

    Spatially this is the inverse flip / rotation of :func:`apply_transform`. A vector field
    transforms with the pixel grid: if the transform sends pixel ``p = (row, col)`` to
    ``A p + b``, an equivariant model predicts ``v'(A p + b) = A v(p)``, so after undoing the
    spatial move the vectors are multiplied by ``A^-1``. With ``np.rot90`` sending
    ``(row, col)`` to ``(-col, row)`` (plus a shift), ``A^-1`` of one quarter turn maps
    ``(dy, dx)`` to ``(dx, -dy)``; the left-right flip negates ``dx``.

    Args:
        maps: ``{name: (H', W', K)}`` or ``(B, H', W', K)`` arrays predicted on the transformed
            image.
        transform: the index ``0..7`` that was applied.
        vector_outputs: names of the outputs holding ``(dy, dx)`` vectors in their last axis
            (``K = 2``); missing names are ignored.

    Returns:
        ``{name: array}`` in the original frame (``(H, W, K)``), float32 for vector outputs.
    """
    rotations, flip = _transform_parts(transform)
    out: dict[str, np.ndarray] = {}
    for name, value in maps.items():
        value = np.rot90(np.asarray(value), -rotations, axes=(-3, -2))
        if flip:
            value = value[..., :, ::-1, :]
        if name in vector_outputs:
            if value.shape[-1] != 2:
                raise ValueError(
                    f"vector output {name!r} must have 2 channels (dy, dx). "
                    f"Received: shape={value.shape}"
                )
            dy, dx = value[..., 0], value[..., 1]
            for _ in range(rotations):
                dy, dx = dx, -dy
            if flip:
                dx = -dx
            value = np.stack([dy, dx], axis=-1).astype(np.float32)
        out[name] = np.ascontiguousarray(value)
    return out


#: The order in which views are added: 2 views = the image and its mirror image; 4 adds the
#: up-down flip and the half turn (the first four keep the image's shape); 8 adds the transpose,
#: the quarter turns and the anti-transpose.
VIEW_ORDER: tuple[int, ...] = (0, 4, 6, 2, 1, 5, 3, 7)


def average_views(
    forward: Callable[[np.ndarray], Mapping[str, np.ndarray]],
    images: np.ndarray,
    views: int,
    vector_outputs: Sequence[str] = VECTOR_OUTPUTS,
) -> dict[str, np.ndarray]:
    """Mean maps of ``images`` over their first ``views`` views (:data:`VIEW_ORDER`).

    Args:
        forward: ``(B, H, W, 3) -> {name: (B, H, W, K)}`` for any ``H, W`` (e.g. the padded
            forward pass of :func:`kerasnuc.models.maps.predict_maps_batch`).
        images: ``(B, H, W, 3)`` batch given to ``forward`` as it is, transformed.
        views: 1..8; 1 is one plain call.
        vector_outputs: outputs holding ``(dy, dx)`` vectors (rotated with the views).

    Returns:
        ``{name: (B, H, W, K) float32}``: for each output the mean over the views of
        ``invert_transform(forward(apply_transform(images, t)), t)``.
    """
    if isinstance(views, bool) or not isinstance(views, int | np.integer):
        raise ValueError(f"`views` must be an int in [1, 8]. Received: views={views!r}")
    if not 1 <= views <= NUM_TRANSFORMS:
        raise ValueError(f"`views` must be an int in [1, 8]. Received: views={views!r}")
    if views == 1:
        return {k: np.asarray(v, np.float32) for k, v in forward(images).items()}
    total: dict[str, np.ndarray] = {}
    for t in VIEW_ORDER[:views]:
        out = forward(np.ascontiguousarray(apply_transform(images, t)))
        for k, v in invert_transform(out, t, vector_outputs).items():
            if k in total:
                total[k] += v
            else:
                total[k] = np.array(v, dtype=np.float32)
    return {k: v / np.float32(views) for k, v in total.items()}
