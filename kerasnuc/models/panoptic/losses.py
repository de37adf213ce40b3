"""The seven loss terms of Eq. 4 of Liu et al. (IJCAI 2019), in ``keras.ops``.

``L_total = L_rpn-obj + L_rpn-reg + L_det-cls + L_det-reg + L_det-mask + L_semseg1 + L_semseg2``,
unweighted. Every function returns a float32 scalar, ``0`` (never NaN) when there is nothing to
average (no sampled anchor, no positive ROI, no labelled pixel). Predictions may be float16
(mixed precision); they are cast to float32.

Normalisation (Detectron2's, where the paper is silent):

* RPN objectness: binary CE averaged over the sampled anchors (label ``1`` or ``0``; ``-1``
  ignored).
* RPN box: smooth-L1 summed over the 4 deltas of the positive anchors, divided by the number of
  sampled anchors (so positives and negatives share one normaliser and the term does not explode
  when an image has few positives). ``beta = 1 / 9`` (py-faster-rcnn's ``sigma = 3``).
* Detection class: softmax CE averaged over the valid sampled ROIs (class target ``>= 0``).
* Detection box: smooth-L1 (``beta = 1``) summed over the 4 deltas of the positive ROIs, divided
  by the number of **positive** ROIs (Detectron2 and torchvision divide by all sampled ROIs, which
  makes the term grow with the share of positives as the RPN learns, and mixes that share into
  the number). Per positive, the term reads as the mean box error of a matched ROI. It still
  rises early in a run: the ground-truth boxes join the proposals, so at first most positives are
  ground-truth copies with zero targets, and later they are real proposals. To compare
  checkpoints on fixed ROIs use :meth:`~kerasnuc.models.panoptic.model.PanopticModel.probe_losses`
  (``benchmarks/panoptic_loss_probe.py``). Predictions may be class-agnostic ``(B, S, 4)`` or
  class-specific ``(B, S, K, 4)`` (the slice of the target class ``c`` is ``c - 1``); with the one
  class "nucleus" the two coincide, so the panoptic model uses the agnostic form.
* Detection mask: per-pixel binary CE on the mask channel of the target class, averaged over the
  pixels of the positive ROIs (Mask R-CNN).
* Semantic: softmax CE averaged over the labelled pixels (label ``>= 0``; ``-1`` ignored), used for
  the GCN branch (``L_semseg1``) and the fused instance map ``F_N`` (``L_semseg2``).
"""

from __future__ import annotations

from keras import ops


def _f32(x):
    return ops.cast(ops.convert_to_tensor(x), "float32")


def _safe_mean(total, count):
    """``total / count``, ``0`` when ``count == 0``."""
    count = ops.cast(count, "float32")
    return ops.where(count > 0.0, total / ops.maximum(count, 1.0), 0.0)


def _bce_with_logits(logits, targets):
    """Stable ``-z log(sigmoid(x)) - (1 - z) log(1 - sigmoid(x))``."""
    return ops.maximum(logits, 0.0) - logits * targets + ops.log1p(ops.exp(-ops.abs(logits)))


def smooth_l1(diff, beta: float = 1.0):
    """Elementwise smooth-L1: ``0.5 d^2 / beta`` for ``|d| < beta``, else ``|d| - 0.5 beta``.

    ``beta = 0`` gives the L1 loss.
    """
    diff = ops.abs(_f32(diff))
    if beta <= 0.0:
        return diff
    return ops.where(diff < beta, 0.5 * diff * diff / beta, diff - 0.5 * beta)


def rpn_objectness_loss(labels, logits):
    """``L_rpn-obj``: binary CE of the objectness over the sampled anchors.

    Args:
        labels: ``(B, A)`` int in ``{1, 0, -1}`` (``-1`` = not sampled / ignored).
        logits: ``(B, A)`` (or ``(B, A, 1)``) objectness logits.

    Returns:
        Scalar: mean BCE over anchors with ``labels >= 0``.
    """
    labels = ops.cast(labels, "int32")
    logits = ops.reshape(_f32(logits), ops.shape(labels))
    mask = ops.cast(labels >= 0, "float32")
    loss = _bce_with_logits(logits, ops.cast(labels == 1, "float32")) * mask
    return _safe_mean(ops.sum(loss), ops.sum(mask))


def rpn_box_loss(labels, pred_deltas, target_deltas, beta: float = 1.0 / 9.0):
    """``L_rpn-reg``: smooth-L1 of the positive anchors' deltas / number of sampled anchors.

    Args:
        labels: ``(B, A)`` int in ``{1, 0, -1}``.
        pred_deltas: ``(B, A, 4)`` predicted ``(dy, dx, dh, dw)``.
        target_deltas: ``(B, A, 4)`` targets (only positives matter).
        beta: smooth-L1 transition point.
    """
    labels = ops.cast(labels, "int32")
    pos = ops.cast(labels == 1, "float32")[..., None]
    loss = smooth_l1(_f32(pred_deltas) - _f32(target_deltas), beta) * pos
    return _safe_mean(ops.sum(loss), ops.sum(ops.cast(labels >= 0, "float32")))


def roi_class_loss(class_targets, logits):
    """``L_det-cls``: softmax CE over the sampled ROIs.

    Args:
        class_targets: ``(B, S)`` int, ``0`` = background, ``1 .. C`` classes, ``-1`` = padding.
        logits: ``(B, S, C + 1)`` class logits.

    Returns:
        Scalar: mean CE over ROIs with ``class_targets >= 0``.
    """
    class_targets = ops.cast(class_targets, "int32")
    logits = _f32(logits)
    valid = class_targets >= 0
    logp = ops.log_softmax(logits, axis=-1)
    picked = ops.take_along_axis(logp, ops.maximum(class_targets, 0)[..., None], axis=-1)[..., 0]
    mask = ops.cast(valid, "float32")
    return _safe_mean(-ops.sum(picked * mask), ops.sum(mask))


def roi_box_loss(class_targets, pred_deltas, target_deltas, beta: float = 1.0):
    """``L_det-reg``: smooth-L1 of the positive ROIs' deltas / number of positive ROIs.

    Args:
        class_targets: ``(B, S)`` int (``> 0`` = positive, ``0`` background, ``-1`` padding).
        pred_deltas: ``(B, S, 4)`` class-agnostic, or ``(B, S, K, 4)`` class-specific deltas (slice
            ``c - 1`` for class ``c``).
        target_deltas: ``(B, S, 4)`` targets (e.g. ``sample_proposals(...)["box_targets"]``).
        beta: smooth-L1 transition point.
    """
    class_targets = ops.cast(class_targets, "int32")
    pred = _f32(pred_deltas)
    if len(pred.shape) == 4:
        idx = ops.maximum(class_targets - 1, 0)[:, :, None, None]
        pred = ops.take_along_axis(pred, idx, axis=2)[:, :, 0]
    pos = ops.cast(class_targets > 0, "float32")[..., None]
    loss = smooth_l1(pred - _f32(target_deltas), beta) * pos
    return _safe_mean(ops.sum(loss), ops.sum(pos))


def mask_loss(class_targets, mask_logits, mask_targets):
    """``L_det-mask``: per-pixel BCE on the target class's mask, over the positive ROIs.

    Args:
        class_targets: ``(B, S)`` int (``> 0`` = positive).
        mask_logits: ``(B, S, M, M, K)`` channels-last logits; channel ``c`` is the mask of class
            ``c`` (channel 0, background, is never trained; ``K = 2`` for the panoptic model's
            ``2 x 28 x 28`` generator), or ``K = 1`` for a class-agnostic mask.
        mask_targets: ``(B, S, M, M)`` float in ``{0, 1}``
            (:func:`~kerasnuc.models.panoptic.sampling.mask_targets`).

    Returns:
        Scalar: mean BCE over the ``M x M`` pixels of the positive ROIs.
    """
    class_targets = ops.cast(class_targets, "int32")
    logits = _f32(mask_logits)
    if logits.shape[-1] == 1:
        logits = logits[..., 0]
    else:
        idx = ops.maximum(class_targets, 0)[:, :, None, None, None]
        logits = ops.take_along_axis(logits, idx, axis=-1)[..., 0]
    pos = ops.cast(class_targets > 0, "float32")[:, :, None, None]
    loss = _bce_with_logits(logits, _f32(mask_targets)) * pos
    count = ops.sum(pos) * ops.cast(ops.shape(logits)[2] * ops.shape(logits)[3], "float32")
    return _safe_mean(ops.sum(loss), count)


def semantic_loss(labels, logits):
    """``L_semseg1`` / ``L_semseg2``: softmax CE per pixel.

    Args:
        labels: ``(B, H, W)`` (or ``(B, H, W, 1)``) int class per pixel, ``-1`` = ignored (the
            panoptic model uses ``0`` background, ``1`` nucleus).
        logits: ``(B, H, W, K)`` logits.

    Returns:
        Scalar: mean CE over the labelled pixels.
    """
    logits = _f32(logits)
    labels = ops.cast(labels, "int32")
    if len(labels.shape) == len(logits.shape):
        labels = labels[..., 0]
    logp = ops.log_softmax(logits, axis=-1)
    picked = ops.take_along_axis(logp, ops.maximum(labels, 0)[..., None], axis=-1)[..., 0]
    mask = ops.cast(labels >= 0, "float32")
    return _safe_mean(-ops.sum(picked * mask), ops.sum(mask))


__all__ = [
    "mask_loss",
    "roi_box_loss",
    "roi_class_loss",
    "rpn_box_loss",
    "rpn_objectness_loss",
    "semantic_loss",
    "smooth_l1",
]
