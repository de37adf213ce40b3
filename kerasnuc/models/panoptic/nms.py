"""Greedy non-maximum suppression with static output sizes, in ``keras.ops``.

The boxes are sorted by score (``top_k``), the ``K x K`` IoU matrix of the candidates is computed
once, and a ``fori_loop`` over the ``K`` candidates in score order drops every later candidate
whose IoU with a kept one is ``> iou_threshold`` (the rule of torchvision's ``nms``). Outputs have
a fixed size ``max_output`` (indices padded with ``-1``) so the function works inside a Keras
graph, with a dynamic number of input boxes, and in an exported SavedModel.

Cost: ``O(K^2)`` memory per image and ``K`` loop steps; limit ``K`` with ``pre_nms_top_k`` (e.g.
a few thousand RPN proposals).
"""

from __future__ import annotations

from keras import ops

from kerasnuc.models.panoptic.boxes import box_iou


def _check(max_output, iou_threshold, pre_nms_top_k):
    if not isinstance(max_output, int) or isinstance(max_output, bool) or max_output < 1:
        raise ValueError(
            f"`max_output` must be a positive int. Received: max_output={max_output!r}"
        )
    if not 0.0 <= float(iou_threshold) <= 1.0:
        raise ValueError(
            f"`iou_threshold` must be in [0, 1]. Received: iou_threshold={iou_threshold!r}"
        )
    if pre_nms_top_k is not None and (
        not isinstance(pre_nms_top_k, int) or isinstance(pre_nms_top_k, bool) or pre_nms_top_k < 1
    ):
        raise ValueError(
            "`pre_nms_top_k` must be None or a positive int. "
            f"Received: pre_nms_top_k={pre_nms_top_k!r}"
        )


def batched_nms(
    boxes,
    scores,
    max_output: int,
    iou_threshold: float = 0.5,
    score_threshold: float = float("-inf"),
    pre_nms_top_k: int | None = None,
):
    """Greedy NMS on each image of a batch independently.

    Args:
        boxes: ``(B, N, 4)`` boxes ``(y1, x1, y2, x2)``; ``N`` may be dynamic.
        scores: ``(B, N)`` scores; boxes with ``score <= score_threshold`` (and padding with score
            ``-inf``) are never selected.
        max_output: number of output slots per image.
        iou_threshold: a box is suppressed when its IoU with a higher-scored kept box is
            ``> iou_threshold``.
        score_threshold: minimum score (exclusive).
        pre_nms_top_k: only the ``pre_nms_top_k`` best-scored boxes are candidates (default: all
            ``N``, which must then be static).

    Returns:
        ``(indices, num_valid)``: ``(B, max_output)`` int32 indices into ``N`` of the kept boxes in
        decreasing score order, padded with ``-1``; ``(B,)`` int32 number of valid entries.
    """
    _check(max_output, iou_threshold, pre_nms_top_k)
    boxes = ops.convert_to_tensor(boxes, "float32")
    scores = ops.convert_to_tensor(scores, "float32")
    if len(boxes.shape) != 3 or len(scores.shape) != 2:
        raise ValueError(
            "`boxes` must be (B, N, 4) and `scores` (B, N). "
            f"Received: boxes.shape={boxes.shape}, scores.shape={scores.shape}"
        )
    k = pre_nms_top_k if pre_nms_top_k is not None else scores.shape[1]
    if k is None:
        raise ValueError("`pre_nms_top_k` is required when the number of boxes is not static.")
    if scores.shape[1] is None or scores.shape[1] < k:
        # Pad with k never-selected boxes so that top_k(k) is defined for any N.
        batch = ops.shape(scores)[0]
        scores = ops.concatenate([scores, ops.full((batch, k), float("-inf"))], axis=1)
        boxes = ops.concatenate([boxes, ops.zeros((batch, k, 4))], axis=1)
    top_scores, order = ops.top_k(scores, k, sorted=True)  # (B, K)
    order = ops.cast(order, "int32")
    cand = ops.take_along_axis(boxes, order[:, :, None], axis=1)  # (B, K, 4)
    iou = box_iou(cand, cand)  # (B, K, K)
    rank = ops.arange(k, dtype="int32")
    keep = top_scores > score_threshold

    def body(i, keep):
        row = ops.take(iou, i, axis=1)  # (B, K): IoU of candidate i with all
        keep_i = ops.take(keep, i, axis=1)[:, None]
        suppress = ops.logical_and(ops.logical_and(row > iou_threshold, rank[None, :] > i), keep_i)
        return ops.logical_and(keep, ops.logical_not(suppress))

    keep = ops.fori_loop(0, k, body, keep)
    # Kept candidates first, in score order: sort by key (rank if kept, k + rank if not).
    key = ops.where(keep, rank[None, :], rank[None, :] + k)
    n_out = min(max_output, k)
    _, pos = ops.top_k(-key, n_out, sorted=True)
    pos = ops.cast(pos, "int32")
    kept = ops.take_along_axis(keep, pos, axis=1)
    indices = ops.where(kept, ops.take_along_axis(order, pos, axis=1), -1)
    if n_out < max_output:
        pad = -ops.ones((ops.shape(indices)[0], max_output - n_out), "int32")
        indices = ops.concatenate([indices, pad], axis=1)
    num_valid = ops.minimum(ops.sum(ops.cast(keep, "int32"), axis=1), max_output)
    return ops.cast(indices, "int32"), ops.cast(num_valid, "int32")


def non_max_suppression(
    boxes,
    scores,
    max_output: int,
    iou_threshold: float = 0.5,
    score_threshold: float = float("-inf"),
    pre_nms_top_k: int | None = None,
):
    """Greedy NMS on one image; see :func:`batched_nms` for the arguments.

    Args:
        boxes: ``(N, 4)`` boxes.
        scores: ``(N,)`` scores.

    Returns:
        ``(indices (max_output,) int32 padded with -1, num_valid ()`` int32 ``)``.
    """
    boxes = ops.convert_to_tensor(boxes, "float32")
    scores = ops.convert_to_tensor(scores, "float32")
    if len(boxes.shape) != 2 or len(scores.shape) != 1:
        raise ValueError(
            "`boxes` must be (N, 4) and `scores` (N,). "
            f"Received: boxes.shape={boxes.shape}, scores.shape={scores.shape}"
        )
    indices, num_valid = batched_nms(
        boxes[None], scores[None], max_output, iou_threshold, score_threshold, pre_nms_top_k
    )
    return indices[0], num_valid[0]


__all__ = ["batched_nms", "non_max_suppression"]
