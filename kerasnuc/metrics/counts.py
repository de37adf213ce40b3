"""Count metrics: per-class nucleus counts, R2 (CoNIC task 2) and the concordance correlation.

These exist only over a set of images: each image contributes one count (per class).
"""

from __future__ import annotations

import math

import numpy as np

from kerasnuc.metrics.instance import check_label_map, check_same_shape


def class_counts(instances: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Number of nuclei of each class in one image.

    An instance is counted in class ``c`` when at least one of its pixels has class ``c`` (the
    per-class instance maps ``where(classes == c, instances, 0)`` of the CoNIC / PanNuke code);
    with one class per nucleus, as the dataset layout guarantees, each nucleus counts once.

    Args:
        instances: ``(H, W)`` integer instance map, 0 = background.
        classes: ``(H, W)`` integer class map, classes 1..C.
        num_classes: number of classes C (>= 1).

    Returns:
        ``(C,)`` int64 counts, index ``c - 1`` for class ``c``.
    """
    if not isinstance(num_classes, int | np.integer) or num_classes < 1:
        raise ValueError(
            f"`num_classes` must be a positive int. Received: num_classes={num_classes}"
        )
    instances = check_label_map("instances", instances)
    classes = check_label_map("classes", classes)
    check_same_shape("instances", instances, "classes", classes)
    fg = (instances > 0) & (classes > 0) & (classes <= num_classes)
    pairs = np.unique(
        np.stack([classes[fg].astype(np.int64), instances[fg].astype(np.int64)]), axis=1
    )
    return np.bincount(pairs[0], minlength=num_classes + 1)[1:].astype(np.int64)


def _check_pair(y_true: np.ndarray, y_pred: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    y_true = np.asarray(y_true, dtype=np.float64)
    y_pred = np.asarray(y_pred, dtype=np.float64)
    if y_true.ndim != 1 or y_true.shape != y_pred.shape:
        raise ValueError(
            "`y_true` and `y_pred` must be 1-D arrays of the same length. "
            f"Received: shapes {y_true.shape} and {y_pred.shape}"
        )
    return y_true, y_pred


def r2_score(y_true: np.ndarray, y_pred: np.ndarray) -> float:
    """Coefficient of determination ``R2 = 1 - sum (y - y_hat)^2 / sum (y - mean y)^2``.

    The CoNIC challenge (Graham et al. 2022, task 2) scores the counts of each class with
    ``sklearn.metrics.r2_score`` and averages over classes; this follows sklearn: with constant
    ``y_true`` the value is 1.0 for a perfect prediction and 0.0 otherwise, and ``nan`` with
    fewer than two samples.

    Args:
        y_true: ``(n,)`` true values (e.g. per-image counts of one class).
        y_pred: ``(n,)`` predicted values.
    """
    y_true, y_pred = _check_pair(y_true, y_pred)
    if y_true.size < 2:
        return math.nan
    ss_res = float(((y_true - y_pred) ** 2).sum())
    ss_tot = float(((y_true - y_true.mean()) ** 2).sum())
    if ss_tot == 0.0:
        return 1.0 if ss_res == 0.0 else 0.0
    return 1.0 - ss_res / ss_tot


def multiclass_r2(true_counts: np.ndarray, pred_counts: np.ndarray) -> tuple[float, np.ndarray]:
    """CoNIC task-2 R2: :func:`r2_score` per class (column), averaged over classes.

    Args:
        true_counts: ``(n_images, C)`` true counts.
        pred_counts: ``(n_images, C)`` predicted counts.

    Returns:
        ``(mean R2, (C,) per-class R2)``.
    """
    true_counts = np.asarray(true_counts, dtype=np.float64)
    pred_counts = np.asarray(pred_counts, dtype=np.float64)
    if true_counts.ndim != 2 or true_counts.shape != pred_counts.shape:
        raise ValueError(
            "`true_counts` and `pred_counts` must be (n_images, C) arrays of the same shape. "
            f"Received: {true_counts.shape} and {pred_counts.shape}"
        )
    per_class = np.array(
        [r2_score(true_counts[:, c], pred_counts[:, c]) for c in range(true_counts.shape[1])]
    )
    return (float(per_class.mean()) if per_class.size else math.nan), per_class


def concordance_cc(x: np.ndarray, y: np.ndarray) -> float:
    """Lin's concordance correlation coefficient (Lin, Biometrics 1989).

    ``CCC = 2 s_xy / (s_x^2 + s_y^2 + (mean x - mean y)^2)`` with population (1/n) moments, as
    in Lin's definition; used for per-image cell counts by Chamanzar & Nie (ISBI 2020). When the
    denominator is 0 every ``x_i`` equals every ``y_i`` (perfect agreement) and the value is 1.0;
    ``nan`` for empty input.

    Args:
        x: ``(n,)`` values (e.g. true counts per image).
        y: ``(n,)`` values (e.g. predicted counts per image).
    """
    x, y = _check_pair(x, y)
    if x.size == 0:
        return math.nan
    mx, my = x.mean(), y.mean()
    sxy = float(((x - mx) * (y - my)).mean())
    den = float(((x - mx) ** 2).mean() + ((y - my) ** 2).mean() + (mx - my) ** 2)
    return 1.0 if den == 0.0 else 2.0 * sxy / den
