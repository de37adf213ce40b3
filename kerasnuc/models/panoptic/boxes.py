"""Box utilities: IoU, Faster R-CNN box encoding/decoding and clipping, in ``keras.ops``.

Boxes are ``(..., 4)`` float32 ``(y1, x1, y2, x2)`` in image pixels (see the package docstring).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from keras import ops

#: Largest ``dh``/``dw`` accepted by :func:`decode_boxes` (Detectron2: ``log(1000 / 16)``), so
#: that ``exp`` cannot overflow on a bad prediction.
DEFAULT_MAX_DELTA = math.log(1000.0 / 16.0)


def _check_weights(weights: Sequence[float]) -> tuple[float, float, float, float]:
    weights = tuple(float(w) for w in weights)
    if len(weights) != 4 or any(w <= 0 for w in weights):
        raise ValueError(
            f"`weights` must be 4 positive floats (wy, wx, wh, ww). Received: weights={weights}"
        )
    return weights


def box_area(boxes):
    """Area of ``(..., 4)`` boxes, ``0`` for empty or inverted boxes. Returns ``(...,)``."""
    boxes = ops.convert_to_tensor(boxes, "float32")
    h = ops.maximum(boxes[..., 2] - boxes[..., 0], 0.0)
    w = ops.maximum(boxes[..., 3] - boxes[..., 1], 0.0)
    return h * w


def box_iou(a, b):
    """Pairwise intersection over union.

    Args:
        a: ``(..., N, 4)`` boxes.
        b: ``(..., M, 4)`` boxes (same leading batch dimensions as ``a``, if any).

    Returns:
        ``(..., N, M)`` float32 IoU in ``[0, 1]``; ``0`` where the union is empty (e.g. two
        zero-size boxes).
    """
    a = ops.convert_to_tensor(a, "float32")
    b = ops.convert_to_tensor(b, "float32")
    a_e = ops.expand_dims(a, -2)  # (..., N, 1, 4)
    b_e = ops.expand_dims(b, -3)  # (..., 1, M, 4)
    ih = ops.maximum(
        ops.minimum(a_e[..., 2], b_e[..., 2]) - ops.maximum(a_e[..., 0], b_e[..., 0]), 0.0
    )
    iw = ops.maximum(
        ops.minimum(a_e[..., 3], b_e[..., 3]) - ops.maximum(a_e[..., 1], b_e[..., 1]), 0.0
    )
    inter = ih * iw
    union = ops.expand_dims(box_area(a), -1) + ops.expand_dims(box_area(b), -2) - inter
    return ops.where(union > 0.0, inter / ops.maximum(union, 1e-12), 0.0)


def _centre_size(boxes):
    h = boxes[..., 2] - boxes[..., 0]
    w = boxes[..., 3] - boxes[..., 1]
    return boxes[..., 0] + 0.5 * h, boxes[..., 1] + 0.5 * w, h, w


def encode_boxes(anchors, boxes, weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0)):
    """Regression targets of ``boxes`` relative to ``anchors`` (Faster R-CNN, Ren et al. 2015).

    ``dy = wy (cy - cya) / ha``, ``dx = wx (cx - cxa) / wa``, ``dh = wh log(h / ha)``,
    ``dw = ww log(w / wa)`` with centres ``c`` and sizes ``h, w``. Sizes are floored at ``1e-6``
    pixels so that degenerate (padding) boxes give finite values.

    Args:
        anchors: ``(..., 4)`` reference boxes.
        boxes: ``(..., 4)`` target boxes, broadcastable against ``anchors``.
        weights: ``(wy, wx, wh, ww)`` multipliers (``(10, 10, 5, 5)`` for the box head).

    Returns:
        ``(..., 4)`` float32 deltas ``(dy, dx, dh, dw)``.
    """
    wy, wx, wh, ww = _check_weights(weights)
    anchors = ops.convert_to_tensor(anchors, "float32")
    boxes = ops.convert_to_tensor(boxes, "float32")
    acy, acx, ah, aw = _centre_size(anchors)
    cy, cx, h, w = _centre_size(boxes)
    ah, aw = ops.maximum(ah, 1e-6), ops.maximum(aw, 1e-6)
    h, w = ops.maximum(h, 1e-6), ops.maximum(w, 1e-6)
    return ops.stack(
        [
            wy * (cy - acy) / ah,
            wx * (cx - acx) / aw,
            wh * ops.log(h / ah),
            ww * ops.log(w / aw),
        ],
        axis=-1,
    )


def decode_boxes(
    anchors,
    deltas,
    weights: Sequence[float] = (1.0, 1.0, 1.0, 1.0),
    max_delta: float = DEFAULT_MAX_DELTA,
):
    """Inverse of :func:`encode_boxes`: apply ``deltas`` to ``anchors``.

    Args:
        anchors: ``(..., 4)`` reference boxes.
        deltas: ``(..., 4)`` ``(dy, dx, dh, dw)``, broadcastable against ``anchors``.
        weights: the weights used for encoding.
        max_delta: ``dh / wh`` and ``dw / ww`` are clipped to ``<= max_delta`` before ``exp``.

    Returns:
        ``(..., 4)`` float32 boxes ``(y1, x1, y2, x2)`` (not clipped to the image).
    """
    wy, wx, wh, ww = _check_weights(weights)
    anchors = ops.convert_to_tensor(anchors, "float32")
    deltas = ops.cast(deltas, "float32")
    acy, acx, ah, aw = _centre_size(anchors)
    cy = deltas[..., 0] / wy * ah + acy
    cx = deltas[..., 1] / wx * aw + acx
    h = ops.exp(ops.minimum(deltas[..., 2] / wh, max_delta)) * ah
    w = ops.exp(ops.minimum(deltas[..., 3] / ww, max_delta)) * aw
    return ops.stack([cy - 0.5 * h, cx - 0.5 * w, cy + 0.5 * h, cx + 0.5 * w], axis=-1)


def clip_boxes(boxes, height, width):
    """Clip ``(..., 4)`` boxes to the image ``[0, height] x [0, width]``.

    Args:
        boxes: ``(..., 4)`` boxes.
        height: image height in pixels (Python number or scalar tensor, may be dynamic).
        width: image width in pixels.

    Returns:
        ``(..., 4)`` float32 clipped boxes.
    """
    boxes = ops.convert_to_tensor(boxes, "float32")
    height = ops.cast(height, "float32")
    width = ops.cast(width, "float32")
    y1 = ops.clip(boxes[..., 0], 0.0, height)
    x1 = ops.clip(boxes[..., 1], 0.0, width)
    y2 = ops.clip(boxes[..., 2], 0.0, height)
    x2 = ops.clip(boxes[..., 3], 0.0, width)
    return ops.stack([y1, x1, y2, x2], axis=-1)


__all__ = [
    "DEFAULT_MAX_DELTA",
    "box_area",
    "box_iou",
    "clip_boxes",
    "decode_boxes",
    "encode_boxes",
]
