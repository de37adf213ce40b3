"""Detection metrics: one-to-one matching of points within a maximum distance.

A predicted point is a true positive when it is paired with a ground-truth point at most
``max_dist`` pixels away. Pairs are one-to-one and chosen with the Hungarian algorithm
(:func:`scipy.optimize.linear_sum_assignment`, per connected component of the graph of
candidate pairs) to maximise the number of pairs and, among maximal pairings, to minimise the
summed distance. Precision ``TP / (TP + FP)`` and recall ``TP / (TP + FN)`` are as defined by
Chamanzar & Nie (ISBI 2020); HoVer-Net (Graham et al. 2019) scores nuclei detection the same
way with centroids and a 12-pixel radius at 40x (but minimises the distance over all pairs
before applying the radius, which can lose pairs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy.spatial import cKDTree

from kerasnuc.metrics.matching import max_weight_matching


def _check_points(name: str, pts: np.ndarray) -> np.ndarray:
    pts = np.asarray(pts, dtype=np.float64)
    if pts.size == 0:
        return np.zeros((0, 2))
    if pts.ndim != 2 or pts.shape[1] != 2:
        raise ValueError(f"`{name}` must be an (N, 2) array of points. Received: shape={pts.shape}")
    if not np.all(np.isfinite(pts)):
        raise ValueError(f"`{name}` must hold finite coordinates.")
    return pts


def match_points(
    gt_points: np.ndarray, pred_points: np.ndarray, max_dist: float
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One-to-one pairing of two point sets within ``max_dist`` (inclusive).

    Maximises the number of pairs, then minimises their summed distance. Each connected
    component of the candidate graph is solved exactly with the Hungarian algorithm on weights
    ``W - d`` with ``W = (k + 1) * max_dist + 1`` (``k`` the size of the smaller set), which
    makes one more pair always worth more than any saving in distance.

    Args:
        gt_points: ``(N, 2)`` float ground-truth points (any consistent coordinate order).
        pred_points: ``(M, 2)`` float predicted points.
        max_dist: largest distance of a pair, in the points' unit (pixels), > 0.

    Returns:
        ``(gt_index, pred_index, distance)``: three ``(T,)`` arrays, sorted by ``gt_index``.
    """
    if not (isinstance(max_dist, int | float | np.floating) and max_dist > 0):
        raise ValueError(f"`max_dist` must be a positive number. Received: max_dist={max_dist}")
    gt_points = _check_points("gt_points", gt_points)
    pred_points = _check_points("pred_points", pred_points)
    if len(gt_points) == 0 or len(pred_points) == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    cand = cKDTree(gt_points).sparse_distance_matrix(
        cKDTree(pred_points), float(max_dist), output_type="ndarray"
    )
    rows = cand["i"].astype(np.int64)
    cols = cand["j"].astype(np.int64)
    dist = cand["v"].astype(np.float64)
    if rows.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(0)
    bonus = (min(len(gt_points), len(pred_points)) + 1) * float(max_dist) + 1.0
    mr, mc = max_weight_matching(rows, cols, bonus - dist, len(gt_points), len(pred_points))
    keys = rows * len(pred_points) + cols
    order = np.argsort(keys)
    pos = order[np.searchsorted(keys[order], mr * len(pred_points) + mc)]
    return mr, mc, dist[pos]


@dataclass(frozen=True)
class DetectionResult:
    """Counts and scores of a point matching.

    ``precision = TP / (TP + FP)`` (``nan`` without predictions), ``recall = TP / (TP + FN)``
    (``nan`` without ground truth), ``f1 = 2 TP / (2 TP + FP + FN)`` (``nan`` when both are
    empty).
    """

    tp: int
    fp: int
    fn: int
    precision: float
    recall: float
    f1: float

    @classmethod
    def from_counts(cls, tp: int, fp: int, fn: int) -> DetectionResult:
        tp, fp, fn = int(tp), int(fp), int(fn)
        precision = tp / (tp + fp) if tp + fp else math.nan
        recall = tp / (tp + fn) if tp + fn else math.nan
        f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
        return cls(tp, fp, fn, precision, recall, f1)


def detection_scores(
    gt_points: np.ndarray, pred_points: np.ndarray, max_dist: float
) -> DetectionResult:
    """Detection precision, recall and F1 of two point sets; see :func:`match_points`."""
    gi, _, _ = match_points(gt_points, pred_points, max_dist)
    tp = int(gi.size)
    n_gt = len(_check_points("gt_points", gt_points))
    n_pred = len(_check_points("pred_points", pred_points))
    return DetectionResult.from_counts(tp, n_pred - tp, n_gt - tp)
