"""Per-image evaluation of predictions and dataset-level aggregation.

:func:`evaluate_pair` scores one image from a single contingency table and returns a flat dict
of numbers. Besides the scores it holds the raw counts (matched pairs, pixel counts, per-class
TP/FP/FN and IoU sums) that :func:`aggregate` needs for the metrics that only exist over a
dataset: CoNIC mPQ+ (per-class counts pooled over images), R2 of per-class counts, the
concordance correlation of counts, and pooled ("micro") pixel, detection and class scores.
:class:`MetricAccumulator` wraps both for code that evaluates image by image (training
callbacks, threshold tuning, the ``kerasnuc evaluate`` command).

Keys of a per-image row (``c`` runs over the classes 1..C when classes are scored):

* counts, summed by :func:`aggregate`: ``n_gt``, ``n_pred``, ``tp``, ``fp``, ``fn``, ``iou_sum``,
  ``px_inter``, ``px_gt``, ``px_pred``, ``px_total``, ``det_tp``, ``det_fp``, ``det_fn``,
  ``tp_c{c}``, ``fp_c{c}``, ``fn_c{c}``, ``iou_sum_c{c}``, ``sem_tp_c{c}``, ``sem_gt_c{c}``,
  ``sem_pred_c{c}``, and for the type classification of detected nuclei ``type_pairs``,
  ``type_correct``, ``type_tp_c{c}``, ``type_fp_c{c}``, ``type_fn_c{c}``, ``det_fp_c{c}``,
  ``det_fn_c{c}`` (see :func:`type_counts`);
* scores, averaged over the images where they are defined (``nan`` skipped, ``inf`` kept):
  ``pq``, ``dq``, ``sq`` (binary PQ), ``aji``, ``aji_plus``, ``pixel_f1`` (= pixel Dice),
  ``pixel_acc``, ``obj_dice``, ``obj_hausdorff`` (pixels), ``det_precision``, ``det_recall``,
  ``det_f1``, and with classes ``mpq`` (PanNuke, per image), ``pq_c{c}``, ``miou``, ``mdice``,
  ``iou_c{c}``, ``dice_c{c}``.

Dataset-only keys added by :func:`aggregate`: ``n_images``, ``ccc`` (of ``n_gt`` vs ``n_pred``),
``pixel_f1_pooled``, ``det_precision_pooled``, ``det_recall_pooled``, ``det_f1_pooled`` and with
classes ``mpq_plus``, ``pq_plus_c{c}``, ``r2``, ``r2_c{c}``, ``miou_pooled``, ``mdice_pooled``,
``iou_pooled_c{c}``, ``dice_pooled_c{c}``, ``type_acc`` and ``type_f1_c{c}`` (HoVer-Net's
``F_d`` is ``det_f1_pooled``).

Type classification of detected nuclei (Graham et al. 2019, HoVer-Net, Sec. 5.2): ground-truth and
predicted nuclei are paired by centroid within ``max_dist`` (as for detection); ``type_acc`` is
the fraction of pairs whose types agree, and for each class ``c``

    F_c = 2 TP_c / (2 TP_c + 2 FP_c + 2 FN_c + FP_d,c + FN_d,c)

with, among the pairs, ``TP_c`` both of type ``c``, ``FP_c`` predicted ``c`` but truly another
type, ``FN_c`` truly ``c`` but predicted another type, and ``FP_d,c`` / ``FN_d,c`` the unpaired
predicted / true nuclei of type ``c``. The paper's formula also has true negatives, which its
published evaluation counts only among pairs that involve ``c`` (so there are none); the
figures reported for HoVer-Net use this form. All counts are pooled over the images.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from kerasnuc.instances import compact_ids, instance_centroids, majority_class
from kerasnuc.metrics.counts import concordance_cc, multiclass_r2
from kerasnuc.metrics.detection import DetectionResult, match_points
from kerasnuc.metrics.instance import (
    PQResult,
    check_label_map,
    check_same_shape,
    mpq_plus,
    multiclass_pq,
    object_hausdorff,
    pair_stats,
    pannuke_class_pq,
    pannuke_mpq,
)
from kerasnuc.metrics.semantic import (
    binary_scores_from_counts,
    confusion_matrix,
    iou_dice_from_confusion,
)

DEFAULT_MAX_DIST = 12.0
"""Detection radius in pixels: HoVer-Net's 12 px (about 3 um at 40x, 0.25 um/px)."""

SUM_KEYS = frozenset(
    {
        "n_gt",
        "n_pred",
        "tp",
        "fp",
        "fn",
        "iou_sum",
        "px_inter",
        "px_gt",
        "px_pred",
        "px_total",
        "det_tp",
        "det_fp",
        "det_fn",
        "sem_tp",
        "sem_gt",
        "sem_pred",
        "type_pairs",
        "type_correct",
        "type_tp",
        "type_fp",
        "type_fn",
    }
)
"""Base names (without the ``_c{c}`` class suffix) of the count keys that aggregate by sum."""

_CLASS_SUFFIX = re.compile(r"^(.*)_c(\d+)$")


def _nanmean(values: Sequence[float]) -> float:
    finite_or_inf = [float(v) for v in values if not math.isnan(float(v))]
    return float(np.mean(finite_or_inf)) if finite_or_inf else math.nan


def evaluate_pair(
    gt_inst: np.ndarray,
    pred_inst: np.ndarray,
    gt_cls: np.ndarray | None = None,
    pred_cls: np.ndarray | None = None,
    num_classes: int = 0,
    *,
    match_iou: float = 0.5,
    max_dist: float = DEFAULT_MAX_DIST,
    hausdorff: bool = True,
) -> dict[str, Any]:
    """All per-image metrics of one prediction (see the module docstring for the keys).

    Args:
        gt_inst: ``(H, W)`` integer ground-truth instance map, 0 = background.
        pred_inst: ``(H, W)`` integer predicted instance map; ids need not be consecutive.
        gt_cls: ``(H, W)`` integer ground-truth class map (classes 1..C), or None.
        pred_cls: ``(H, W)`` integer predicted class map, or None.
        num_classes: C; 0 scores instances only (class maps must then be None).
        match_iou: IoU threshold of a PQ match (a pair matches when IoU > ``match_iou``).
        max_dist: detection radius in pixels between matched centroids.
        hausdorff: compute the object-level Hausdorff distance (the only metric that loops over
            objects; about as costly as all the others together).

    Returns:
        A flat dict of Python ints and floats.
    """
    gt_inst = check_label_map("gt_inst", gt_inst)
    pred_inst = check_label_map("pred_inst", pred_inst)
    check_same_shape("gt_inst", gt_inst, "pred_inst", pred_inst)
    if num_classes and (gt_cls is None or pred_cls is None):
        raise ValueError(
            "`gt_cls` and `pred_cls` are required when num_classes > 0. "
            f"Received: num_classes={num_classes}"
        )
    if not num_classes and (gt_cls is not None or pred_cls is not None):
        raise ValueError(
            "`num_classes` must be > 0 when class maps are given. "
            f"Received: num_classes={num_classes}"
        )

    stats = pair_stats(gt_inst, pred_inst)
    pq = stats.pq(match_iou)
    inter, px_gt, px_pred = stats.foreground_counts()
    pixel = binary_scores_from_counts(inter, px_gt, px_pred, stats.n_pixels)
    gt_ids, gt_pts = instance_centroids(gt_inst)
    pred_ids, pred_pts = instance_centroids(pred_inst)
    det_gt, det_pred, _ = match_points(gt_pts, pred_pts, max_dist)
    det = DetectionResult.from_counts(
        det_gt.size, len(pred_ids) - det_gt.size, len(gt_ids) - det_gt.size
    )

    row: dict[str, Any] = {
        "n_gt": stats.n_gt,
        "n_pred": stats.n_pred,
        "pq": pq.pq,
        "dq": pq.dq,
        "sq": pq.sq,
        "aji": stats.aji(),
        "aji_plus": stats.aji_plus(),
        "pixel_f1": pixel["f1"],
        "pixel_acc": pixel["accuracy"],
        "obj_dice": stats.object_dice(),
    }
    if hausdorff:
        row["obj_hausdorff"] = object_hausdorff(gt_inst, pred_inst, stats)
    row.update(
        {
            "det_precision": det.precision,
            "det_recall": det.recall,
            "det_f1": det.f1,
            "tp": pq.tp,
            "fp": pq.fp,
            "fn": pq.fn,
            "iou_sum": pq.iou_sum,
            "px_inter": inter,
            "px_gt": px_gt,
            "px_pred": px_pred,
            "px_total": stats.n_pixels,
            "det_tp": det.tp,
            "det_fp": det.fp,
            "det_fn": det.fn,
        }
    )
    if num_classes:
        row.update(_class_metrics(gt_inst, pred_inst, gt_cls, pred_cls, num_classes, match_iou))
        gt_type = instance_types(gt_inst, check_label_map("gt_cls", gt_cls), num_classes)
        pred_type = instance_types(pred_inst, check_label_map("pred_cls", pred_cls), num_classes)
        row.update(type_counts(gt_type, pred_type, det_gt, det_pred, num_classes))
    return row


def instance_types(instances: np.ndarray, classes: np.ndarray, num_classes: int) -> np.ndarray:
    """Type of every nucleus: the class 1..C on most of its pixels (0 when it has none).

    Args:
        instances: ``(H, W)`` integer instance map, 0 = background.
        classes: ``(H, W)`` integer class map; values outside 1..C are ignored.
        num_classes: C.

    Returns:
        ``(N,)`` int64 types in the order of increasing instance id (the order of
        :func:`kerasnuc.instances.instance_centroids`); ties go to the lower class.
    """
    labels, ids = compact_ids(instances)
    return majority_class(labels, np.where(classes <= num_classes, classes, 0), ids.size)[1:]


def type_counts(
    gt_type: np.ndarray,
    pred_type: np.ndarray,
    gt_index: np.ndarray,
    pred_index: np.ndarray,
    num_classes: int,
) -> dict[str, int]:
    """Counts of the type classification of paired nuclei (see the module docstring).

    Args:
        gt_type: ``(N,)`` type of each true nucleus.
        pred_type: ``(M,)`` type of each predicted nucleus.
        gt_index: ``(T,)`` true nucleus of each pair.
        pred_index: ``(T,)`` predicted nucleus of each pair.
        num_classes: C.

    Returns:
        ``type_pairs``, ``type_correct`` and per class ``type_tp_c``, ``type_fp_c``,
        ``type_fn_c``, ``det_fp_c`` (unpaired predictions of type c), ``det_fn_c`` (unpaired
        true nuclei of type c).
    """
    true, pred = gt_type[gt_index], pred_type[pred_index]
    unpaired_gt = np.ones(gt_type.size, dtype=bool)
    unpaired_gt[gt_index] = False
    unpaired_pred = np.ones(pred_type.size, dtype=bool)
    unpaired_pred[pred_index] = False
    out = {"type_pairs": int(true.size), "type_correct": int((true == pred).sum())}
    for c in range(1, num_classes + 1):
        out[f"type_tp_c{c}"] = int(((true == c) & (pred == c)).sum())
        out[f"type_fp_c{c}"] = int(((true != c) & (pred == c)).sum())
        out[f"type_fn_c{c}"] = int(((true == c) & (pred != c)).sum())
        out[f"det_fp_c{c}"] = int((pred_type[unpaired_pred] == c).sum())
        out[f"det_fn_c{c}"] = int((gt_type[unpaired_gt] == c).sum())
    return out


def _class_metrics(
    gt_inst: np.ndarray,
    pred_inst: np.ndarray,
    gt_cls: np.ndarray,
    pred_cls: np.ndarray,
    num_classes: int,
    match_iou: float,
) -> dict[str, Any]:
    results = multiclass_pq(gt_inst, pred_inst, gt_cls, pred_cls, num_classes, match_iou)
    cm = confusion_matrix(gt_cls, pred_cls, num_classes)
    iou, dice = iou_dice_from_confusion(cm)
    out: dict[str, Any] = {
        "mpq": pannuke_mpq(results),
        "miou": _nanmean(iou[1:]),
        "mdice": _nanmean(dice[1:]),
    }
    for c, r in enumerate(results, start=1):
        out[f"pq_c{c}"] = pannuke_class_pq(r)
    for c in range(1, num_classes + 1):
        out[f"iou_c{c}"] = float(iou[c])
        out[f"dice_c{c}"] = float(dice[c])
    for c, r in enumerate(results, start=1):
        out[f"tp_c{c}"] = r.tp
        out[f"fp_c{c}"] = r.fp
        out[f"fn_c{c}"] = r.fn
        out[f"iou_sum_c{c}"] = r.iou_sum
    for c in range(1, num_classes + 1):
        out[f"sem_tp_c{c}"] = int(cm[c, c])
        out[f"sem_gt_c{c}"] = int(cm[c, :].sum())
        out[f"sem_pred_c{c}"] = int(cm[:, c].sum())
    return out


def _base_key(key: str) -> tuple[str, int | None]:
    m = _CLASS_SUFFIX.match(key)
    return (m.group(1), int(m.group(2))) if m else (key, None)


def aggregate(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Dataset-level metrics of per-image rows from :func:`evaluate_pair`.

    Count keys (:data:`SUM_KEYS`) are summed; every other numeric key is the mean over the
    images where it is defined (``nan`` skipped; an ``inf`` Hausdorff distance makes the mean
    ``inf``). Non-numeric keys (e.g. ``id``) are ignored. Then the dataset-only metrics are
    added (see the module docstring): CoNIC mPQ+ from the pooled per-class counts, R2 of the
    per-class counts (``n_gt_c = tp_c + fn_c``, ``n_pred_c = tp_c + fp_c``), the CCC of the
    per-image nucleus counts, and pooled pixel F1, detection and per-class IoU / Dice.

    Args:
        rows: per-image dicts (all scored with the same settings).

    Returns:
        One flat dict; ``{"n_images": 0}`` for no rows.
    """
    out: dict[str, Any] = {"n_images": len(rows)}
    if not rows:
        return out
    keys: list[str] = []
    for r in rows:
        keys.extend(k for k in r if k not in keys)
    for key in keys:
        values = [r[key] for r in rows if key in r]
        if not all(isinstance(v, int | float | np.integer | np.floating) for v in values):
            continue
        if _base_key(key)[0] in SUM_KEYS:
            total = sum(values)
            out[key] = int(total) if all(isinstance(v, int | np.integer) for v in values) else total
        else:
            out[key] = _nanmean(values)

    out["ccc"] = concordance_cc([r["n_gt"] for r in rows], [r["n_pred"] for r in rows])
    out["pixel_f1_pooled"] = binary_scores_from_counts(
        out["px_inter"], out["px_gt"], out["px_pred"], out["px_total"]
    )["f1"]
    det = DetectionResult.from_counts(out["det_tp"], out["det_fp"], out["det_fn"])
    out["det_precision_pooled"] = det.precision
    out["det_recall_pooled"] = det.recall
    out["det_f1_pooled"] = det.f1

    classes = sorted({c for k in keys for b, c in [_base_key(k)] if b == "tp" and c is not None})
    if classes:
        totals = [
            PQResult.from_counts(
                out[f"tp_c{c}"], out[f"fp_c{c}"], out[f"fn_c{c}"], out[f"iou_sum_c{c}"]
            )
            for c in classes
        ]
        mpq, per_class = mpq_plus(totals)
        out["mpq_plus"] = mpq
        for c, v in zip(classes, per_class, strict=True):
            out[f"pq_plus_c{c}"] = v
        true_counts = np.array([[r[f"tp_c{c}"] + r[f"fn_c{c}"] for c in classes] for r in rows])
        pred_counts = np.array([[r[f"tp_c{c}"] + r[f"fp_c{c}"] for c in classes] for r in rows])
        r2, r2_per_class = multiclass_r2(true_counts, pred_counts)
        out["r2"] = r2
        for c, v in zip(classes, r2_per_class, strict=True):
            out[f"r2_c{c}"] = float(v)
        ious, dices = [], []
        for c in classes:
            tp, g, p = out[f"sem_tp_c{c}"], out[f"sem_gt_c{c}"], out[f"sem_pred_c{c}"]
            iou = tp / (g + p - tp) if g + p else math.nan
            dice = 2 * tp / (g + p) if g + p else math.nan
            out[f"iou_pooled_c{c}"] = iou
            out[f"dice_pooled_c{c}"] = dice
            ious.append(iou)
            dices.append(dice)
        out["miou_pooled"] = _nanmean(ious)
        out["mdice_pooled"] = _nanmean(dices)
    if "type_pairs" in out:
        pairs = out["type_pairs"]
        out["type_acc"] = out["type_correct"] / pairs if pairs else math.nan
        for c in sorted({c for k in keys for b, c in [_base_key(k)] if b == "type_tp"}):
            tp = out[f"type_tp_c{c}"]
            den = 2 * (tp + out[f"type_fp_c{c}"] + out[f"type_fn_c{c}"])
            den += out[f"det_fp_c{c}"] + out[f"det_fn_c{c}"]
            out[f"type_f1_c{c}"] = 2 * tp / den if den else math.nan
    return out


class MetricAccumulator:
    """Evaluate image pairs one at a time and aggregate them over the dataset.

    Example::

        acc = MetricAccumulator(num_classes=4)
        for sample, (inst, cls) in zip(samples, predictions):
            acc.add(sample.instances, inst, sample.classes, cls, id=sample.id)
        summary = acc.summary()   # mean PQ, AJI, ..., mPQ+, R2, CCC

    Args:
        num_classes: C (0 = score instances only).
        match_iou: IoU threshold of a PQ match.
        max_dist: detection radius in pixels.
        hausdorff: also compute the object-level Hausdorff distance.
    """

    def __init__(
        self,
        num_classes: int = 0,
        match_iou: float = 0.5,
        max_dist: float = DEFAULT_MAX_DIST,
        hausdorff: bool = True,
    ):
        if not isinstance(num_classes, int | np.integer) or num_classes < 0:
            raise ValueError(
                f"`num_classes` must be an int >= 0. Received: num_classes={num_classes}"
            )
        self.num_classes = int(num_classes)
        self.match_iou = match_iou
        self.max_dist = max_dist
        self.hausdorff = hausdorff
        self.rows: list[dict[str, Any]] = []

    def add(
        self,
        gt_inst: np.ndarray,
        pred_inst: np.ndarray,
        gt_cls: np.ndarray | None = None,
        pred_cls: np.ndarray | None = None,
        id: str | None = None,
    ) -> dict[str, Any]:
        """Score one image pair, keep its row and return it (with ``id`` first when given)."""
        scores = evaluate_pair(
            gt_inst,
            pred_inst,
            gt_cls if self.num_classes else None,
            pred_cls if self.num_classes else None,
            self.num_classes,
            match_iou=self.match_iou,
            max_dist=self.max_dist,
            hausdorff=self.hausdorff,
        )
        row = {"id": id, **scores} if id is not None else scores
        self.rows.append(row)
        return row

    def summary(self) -> dict[str, Any]:
        """Dataset-level metrics of the rows so far; see :func:`aggregate`."""
        return aggregate(self.rows)

    def __len__(self) -> int:
        return len(self.rows)
