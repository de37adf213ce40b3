"""Pixel-level (semantic) metrics: binary Dice / F1 and accuracy, per-class IoU and Dice.

Binary scores treat every pixel with a non-zero label as foreground, so they accept instance
maps, class maps or boolean masks. Per-class scores come from a confusion matrix built with one
:func:`numpy.bincount`, which also accumulates over a dataset by summation.

A ratio that is 0/0 (the class, or the foreground, absent from both maps) is ``nan``.
"""

from __future__ import annotations

import math

import numpy as np

from kerasnuc.metrics.instance import check_label_map, check_same_shape


def _ratio(num: float, den: float) -> float:
    return num / den if den else math.nan


def binary_scores_from_counts(inter: int, n_gt: int, n_pred: int, n_pixels: int) -> dict:
    """Binary pixel scores from foreground pixel counts.

    Args:
        inter: pixels foreground in both maps (true positives).
        n_gt: ground-truth foreground pixels.
        n_pred: predicted foreground pixels.
        n_pixels: all pixels.

    Returns:
        dict with ``f1`` (= Dice = ``2|G ∩ P| / (|G| + |P|)``), ``precision``, ``recall``,
        ``iou`` (Jaccard) and ``accuracy`` (fraction of pixels where both maps agree).
    """
    union = n_gt + n_pred - inter
    return {
        "f1": _ratio(2 * inter, n_gt + n_pred),
        "precision": _ratio(inter, n_pred),
        "recall": _ratio(inter, n_gt),
        "iou": _ratio(inter, union),
        "accuracy": _ratio(n_pixels - (union - inter), n_pixels),
    }


def pixel_scores(gt: np.ndarray, pred: np.ndarray) -> dict:
    """Binary pixel-level scores of two label maps (foreground = label > 0).

    The pixel F1 of Liu et al. (IJCAI 2019) and Chamanzar & Nie (ISBI 2020), identical to the
    binary Dice coefficient; accuracy is their pixel accuracy (ACC).

    Args:
        gt: ``(H, W)`` integer or bool ground truth.
        pred: ``(H, W)`` integer or bool prediction.

    Returns:
        See :func:`binary_scores_from_counts`.
    """
    gt = check_label_map("gt", gt)
    pred = check_label_map("pred", pred)
    check_same_shape("gt", gt, "pred", pred)
    g, p = gt > 0, pred > 0
    inter = int(np.count_nonzero(g & p))
    return binary_scores_from_counts(
        inter, int(np.count_nonzero(g)), int(np.count_nonzero(p)), int(g.size)
    )


def dice_coefficient(gt: np.ndarray, pred: np.ndarray) -> float:
    """Binary Dice ``2|G ∩ P| / (|G| + |P|)`` of two masks (label > 0); ``nan`` if both empty."""
    return pixel_scores(gt, pred)["f1"]


def confusion_matrix(gt_cls: np.ndarray, pred_cls: np.ndarray, num_classes: int) -> np.ndarray:
    """Pixel confusion matrix of two class maps, background included.

    Args:
        gt_cls: ``(H, W)`` integer ground-truth class map with values in ``0..num_classes``.
        pred_cls: ``(H, W)`` integer predicted class map, same shape and range.
        num_classes: number of foreground classes C (>= 1).

    Returns:
        ``(C + 1, C + 1)`` int64 matrix; entry ``[i, j]`` counts pixels of ground-truth class
        ``i`` predicted as class ``j``. Sum the matrices of several images to pool them.
    """
    if not isinstance(num_classes, int | np.integer) or num_classes < 1:
        raise ValueError(
            f"`num_classes` must be a positive int. Received: num_classes={num_classes}"
        )
    gt_cls = check_label_map("gt_cls", gt_cls)
    pred_cls = check_label_map("pred_cls", pred_cls)
    check_same_shape("gt_cls", gt_cls, "pred_cls", pred_cls)
    n = num_classes + 1
    for name, arr in (("gt_cls", gt_cls), ("pred_cls", pred_cls)):
        if arr.size and int(arr.max()) > num_classes:
            raise ValueError(
                f"`{name}` values must be in 0..num_classes={num_classes}. "
                f"Received: max={int(arr.max())}"
            )
    keys = gt_cls.ravel().astype(np.int64) * n + pred_cls.ravel()
    return np.bincount(keys, minlength=n * n).reshape(n, n).astype(np.int64)


def iou_dice_from_confusion(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-class IoU (Jaccard) and Dice from a confusion matrix.

    ``IoU_c = TP_c / (TP_c + FP_c + FN_c)``, ``Dice_c = 2 TP_c / (2 TP_c + FP_c + FN_c)``: the
    per-class scores reported by U-Net# (Stagys et al.) on PanNuke.

    Args:
        cm: ``(C + 1, C + 1)`` confusion matrix (rows: ground truth, columns: prediction).

    Returns:
        ``(iou, dice)``: two ``(C + 1,)`` float64 arrays indexed by class (0 = background);
        ``nan`` for a class absent from both maps.
    """
    cm = np.asarray(cm, dtype=np.float64)
    if cm.ndim != 2 or cm.shape[0] != cm.shape[1]:
        raise ValueError(f"`cm` must be a square matrix. Received: shape={cm.shape}")
    tp = np.diag(cm)
    gt = cm.sum(axis=1)
    pred = cm.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        iou = np.where(gt + pred > 0, tp / (gt + pred - tp), np.nan)
        dice = np.where(gt + pred > 0, 2 * tp / (gt + pred), np.nan)
    return iou, dice


def class_iou_dice(
    gt_cls: np.ndarray, pred_cls: np.ndarray, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Per-class IoU and Dice of two class maps; see :func:`iou_dice_from_confusion`."""
    return iou_dice_from_confusion(confusion_matrix(gt_cls, pred_cls, num_classes))
