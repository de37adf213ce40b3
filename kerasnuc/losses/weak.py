"""Losses of the `weak` method: point-supervised multi-task U-Net.

Chamanzar & Nie, "Weakly Supervised Multi-Task Learning for Cell Detection and Segmentation"
(ISBI 2020), Eq. 1-3. The model has one output, named ``seg``: ``(B, H, W, 2)`` float softmax
**probabilities** (not logits), channel ``BACKGROUND = 0``, channel ``NUCLEUS = 1``. The three
targets are derived from point labels (``kerasnuc.data`` point encodings):

* :class:`VoronoiLoss` (Eq. 2): cross-entropy on Voronoi labels ``(B, H, W)`` with values
  0 (partition lines, background), 1 (points, nucleus) and ``IGNORE = 255`` (all other pixels).
* :class:`ClusterLoss` (Eq. 1): cross-entropy on local-clustering labels, same value set.
* :class:`RepelLoss` (Eq. 3): mean squared error between the nucleus probability and the filtered
  repel code ``(B, H, W)`` float in ``[0, 1]``.

Our choices where the paper is silent:

* The cross-entropy is the categorical one over the two softmax channels,
  ``-log seg[..., t]``, which equals the paper's binary form ``-(t log o + (1 - t) log(1 - o))``
  with ``o = seg[..., NUCLEUS]`` when the channels sum to 1. Probabilities are clipped to
  ``[keras.config.epsilon(), 1 - keras.config.epsilon()]`` as Keras' own cross-entropies do.
* Pixels equal to ``IGNORE`` are left out of both cross-entropies, and the mean is taken over the
  non-ignored pixels of the **whole batch** (as PyTorch's ``NLLLoss(ignore_index=...)`` used by
  Qu et al. 2019, whose encodings the paper follows). A batch with no labelled pixel gives a loss
  of exactly 0 and zero gradients, never NaN. Eq. 1 normalises by all pixels; the clustering
  labels of the paper have no ignored pixel, in which case both agree.
* The losses are ``keras.losses.Loss`` objects whose ``call`` returns per-pixel values
  ``(B, H, W)``, reduced by Keras (default ``"sum_over_batch_size"``; ``sample_weight`` of shape
  ``(B, H, W)`` multiplies them). For the two cross-entropies the per-pixel values are scaled by
  ``(number of pixels) / (number of non-ignored pixels)`` and are 0 at ignored pixels, so the
  default reduction gives the mean over non-ignored pixels, as Keras does for masked losses.
"""

from __future__ import annotations

import keras
from keras import ops

IGNORE = 255
"""Label value of pixels excluded from the Voronoi and clustering losses."""
BACKGROUND = 0
"""Channel of ``seg`` holding the background probability (and label value of background)."""
NUCLEUS = 1
"""Channel of ``seg`` holding the nucleus probability (and label value of nucleus pixels)."""


def _pixel_targets(y_true, y_pred, name: str):
    """Drops a trailing channel axis of size 1 from ``y_true`` and checks the shapes."""
    if len(y_pred.shape) != 4 or y_pred.shape[-1] != 2:
        raise ValueError(
            f"{name}: `y_pred` must be (B, H, W, 2) probabilities. Received: shape={y_pred.shape}"
        )
    if len(y_true.shape) == 4 and y_true.shape[-1] == 1:
        y_true = ops.squeeze(y_true, axis=-1)
    if len(y_true.shape) != 3:
        raise ValueError(
            f"{name}: `y_true` must be (B, H, W) or (B, H, W, 1). Received: shape={y_true.shape}"
        )
    return y_true


def masked_crossentropy(y_true, y_pred):
    """Per-pixel cross-entropy of 0/1/IGNORE labels against 2-channel probabilities.

    Args:
        y_true: ``(B, H, W)`` labels, values ``BACKGROUND``, ``NUCLEUS`` or ``IGNORE`` (any
            numeric dtype; any other value counts as background, it is not checked in-graph).
        y_pred: ``(B, H, W, 2)`` float softmax probabilities.

    Returns:
        ``(ce, valid)``: ``(B, H, W)`` float cross-entropy, 0 where ignored; ``(B, H, W)`` bool,
        True where the label is not ``IGNORE``.
    """
    valid = ops.not_equal(y_true, ops.cast(IGNORE, y_true.dtype))
    nucleus = ops.logical_and(valid, ops.equal(y_true, ops.cast(NUCLEUS, y_true.dtype)))
    eps = keras.config.epsilon()
    probs = ops.clip(y_pred, eps, 1.0 - eps)
    prob_of_label = ops.where(nucleus, probs[..., NUCLEUS], probs[..., BACKGROUND])
    ce = ops.where(valid, ops.negative(ops.log(prob_of_label)), 0.0)
    return ce, valid


class _IgnoringCrossentropy(keras.losses.Loss):
    """Cross-entropy over non-``IGNORE`` pixels (shared by the Voronoi and clustering losses)."""

    def call(self, y_true, y_pred):
        y_true = _pixel_targets(y_true, y_pred, self.__class__.__name__)
        ce, valid = masked_crossentropy(y_true, y_pred)
        valid = ops.cast(valid, ce.dtype)
        scale = ops.divide_no_nan(ops.cast(ops.size(valid), ce.dtype), ops.sum(valid))
        return ops.multiply(ce, scale)


@keras.saving.register_keras_serializable(package="kerasnuc")
class VoronoiLoss(_IgnoringCrossentropy):
    """Cross-entropy on Voronoi labels, ignored pixels excluded from the mean (Eq. 2).

    Args:
        name: loss name. Defaults to ``"voronoi_loss"``.
        reduction: Keras reduction; the default ``"sum_over_batch_size"`` gives the mean over the
            non-ignored pixels of the batch (0 when there is none).
        dtype: computation dtype. Defaults to ``keras.config.floatx()``.

    Call arguments:
        y_true: ``(B, H, W)`` or ``(B, H, W, 1)`` labels: ``0`` partition lines (background),
            ``1`` points (nucleus), ``IGNORE = 255`` everything else.
        y_pred: ``(B, H, W, 2)`` float softmax probabilities (``seg``).
        sample_weight: optional ``(B, H, W)`` weights.

    Returns:
        Scalar float loss (with the default reduction).
    """

    def __init__(self, name="voronoi_loss", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)


@keras.saving.register_keras_serializable(package="kerasnuc")
class ClusterLoss(_IgnoringCrossentropy):
    """Cross-entropy on local pixel-clustering labels (Eq. 1), ``IGNORE`` pixels excluded.

    Args:
        name: loss name. Defaults to ``"cluster_loss"``.
        reduction: Keras reduction; the default gives the mean over the non-ignored pixels.
        dtype: computation dtype. Defaults to ``keras.config.floatx()``.

    Call arguments:
        y_true: ``(B, H, W)`` or ``(B, H, W, 1)`` labels: ``0`` background, ``1`` nucleus,
            ``IGNORE = 255`` excluded.
        y_pred: ``(B, H, W, 2)`` float softmax probabilities (``seg``).
        sample_weight: optional ``(B, H, W)`` weights.

    Returns:
        Scalar float loss (with the default reduction).
    """

    def __init__(self, name="cluster_loss", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)


@keras.saving.register_keras_serializable(package="kerasnuc")
class RepelLoss(keras.losses.Loss):
    """Mean squared error between the nucleus probability and the filtered repel code (Eq. 3).

    Args:
        name: loss name. Defaults to ``"repel_loss"``.
        reduction: Keras reduction; the default gives the mean over all pixels of the batch.
        dtype: computation dtype. Defaults to ``keras.config.floatx()``.

    Call arguments:
        y_true: ``(B, H, W)`` or ``(B, H, W, 1)`` float repel code in ``[0, 1]`` (the repel code
            of Liang et al. 2019 multiplied by the clustering nucleus mask).
        y_pred: ``(B, H, W, 2)`` float softmax probabilities (``seg``); only channel
            ``NUCLEUS`` is used.
        sample_weight: optional ``(B, H, W)`` weights.

    Returns:
        Scalar float loss (with the default reduction).
    """

    def __init__(self, name="repel_loss", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        y_true = _pixel_targets(y_true, y_pred, self.__class__.__name__)
        return ops.square(ops.subtract(y_pred[..., NUCLEUS], y_true))
