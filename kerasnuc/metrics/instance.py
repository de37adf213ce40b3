"""Instance segmentation metrics: PQ, multi-class PQ, AJI, AJI+, object-level Dice and Hausdorff.

Every metric of an image pair derives from one sparse contingency table (:func:`pair_stats`):
the areas of all ground-truth and predicted instances and the intersection area of every
(ground truth, prediction) pair that shares at least one pixel. The table is built in a single
pass with :func:`numpy.bincount` over combined ids, so no metric loops over instance pairs in
Python.

Conventions shared by all functions here:

* Instance maps are integer ``(H, W)`` arrays, 0 = background; ids need not be consecutive.
* Instances are sorted by id; "ties go to the smallest id" wherever a definition takes an argmax.
* A metric that is 0/0 because both the ground truth and the prediction are empty is ``nan``
  (undefined; aggregations skip it). If only one side is empty the ratio metrics are 0.

One cohesive concept: every instance metric here derives from the one contingency table of
:func:`pair_stats`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
from scipy import ndimage

from kerasnuc.metrics.matching import max_weight_matching


def check_label_map(name: str, arr: np.ndarray) -> np.ndarray:
    """Return ``arr`` as a 2-D non-negative integer array, or raise a ``ValueError``.

    Args:
        name: argument name for the message.
        arr: ``(H, W)`` integer or bool map.

    Returns:
        The array as ``(H, W)`` with an integer dtype (bool becomes uint8).
    """
    arr = np.asarray(arr)
    if arr.ndim != 2:
        raise ValueError(f"`{name}` must be a 2-D (H, W) label map. Received: shape={arr.shape}")
    if arr.dtype == np.bool_:
        return arr.view(np.uint8)
    if not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"`{name}` must have an integer dtype. Received: dtype={arr.dtype}")
    if arr.size and arr.dtype.kind == "i" and int(arr.min()) < 0:
        raise ValueError(f"`{name}` must not contain negative ids. Received: min={int(arr.min())}")
    if arr.dtype == np.uint64 and arr.size and int(arr.max()) >= 2**63:
        raise ValueError(f"`{name}` ids must be < 2**63. Received: max={int(arr.max())}")
    return arr


def check_same_shape(name_a: str, a: np.ndarray, name_b: str, b: np.ndarray) -> None:
    """Raise a ``ValueError`` when two maps differ in shape."""
    if a.shape != b.shape:
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape. "
            f"Received: {name_a}.shape={a.shape}, {name_b}.shape={b.shape}"
        )


def compact_labels(labels: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Relabel a label map to 0..K (order of ids kept) and count the pixels of each label.

    Uses :func:`numpy.bincount` and a lookup table when the largest id is moderate (and returns
    the map itself when its ids already are 1..K), :func:`numpy.unique` otherwise (e.g. 32-bit
    hash-like ids).

    Args:
        labels: integer array of any shape, 0 = background, ids >= 0.

    Returns:
        ``(ids, areas, index)``: ``(K,)`` int64 sorted non-zero ids, ``(K,)`` int64 pixel counts,
        and an integer array of the shape of ``labels`` holding 0 for background and ``k + 1``
        for the pixels of ``ids[k]`` (possibly ``labels`` itself; do not write to it).
    """
    labels = np.asarray(labels)
    flat = labels.ravel()
    if flat.dtype == np.uint64:
        flat = flat.astype(np.int64)
    if flat.size == 0:
        empty = np.zeros(0, dtype=np.int64)
        return empty, empty, np.zeros(labels.shape, dtype=np.int64)
    top = int(flat.max())
    if top <= max(4 * flat.size, 1 << 16):
        counts = np.bincount(flat, minlength=top + 1)
        ids = np.flatnonzero(counts[1:]).astype(np.int64) + 1
        areas = counts[ids].astype(np.int64)
        if ids.size == top:
            index = flat
        else:
            lut = np.zeros(top + 1, dtype=np.int32 if ids.size < 2**31 else np.int64)
            lut[ids] = np.arange(1, ids.size + 1)
            index = np.take(lut, flat)
    else:
        uniq, inverse, counts = np.unique(flat, return_inverse=True, return_counts=True)
        inverse = inverse.astype(np.int64)
        if uniq[0] == 0:
            ids, areas, index = uniq[1:], counts[1:], inverse
        else:
            ids, areas, index = uniq, counts, inverse + 1
        ids = ids.astype(np.int64)
        areas = areas.astype(np.int64)
    return ids, areas, index.reshape(labels.shape)


@dataclass(frozen=True)
class PQResult:
    """Panoptic quality and its parts (Kirillov et al., "Panoptic Segmentation", CVPR 2019).

    ``DQ = TP / (TP + FP/2 + FN/2)``, ``SQ = sum of matched IoUs / TP``, ``PQ = DQ * SQ``.
    When ``TP + FP + FN == 0`` (nothing on either side) all three are ``nan``; when ``TP == 0``
    but something was missed or predicted, ``SQ = 0`` (as in the HoVer-Net / CoNIC code).

    Attributes:
        pq: panoptic quality.
        dq: detection quality (the F1 score of the matching).
        sq: segmentation quality (mean IoU of the matched pairs).
        tp: matched pairs.
        fp: unmatched predictions.
        fn: unmatched ground-truth instances.
        iou_sum: sum of the IoUs of the matched pairs.
    """

    pq: float
    dq: float
    sq: float
    tp: int
    fp: int
    fn: int
    iou_sum: float

    @classmethod
    def from_counts(cls, tp: int, fp: int, fn: int, iou_sum: float) -> PQResult:
        """Build the result from match counts (also used for sums over images)."""
        tp, fp, fn = int(tp), int(fp), int(fn)
        if tp + fp + fn == 0:
            return cls(math.nan, math.nan, math.nan, 0, 0, 0, 0.0)
        dq = tp / (tp + 0.5 * fp + 0.5 * fn)
        sq = float(iou_sum) / tp if tp else 0.0
        return cls(dq * sq, dq, sq, tp, fp, fn, float(iou_sum))

    @property
    def n_gt(self) -> int:
        """Number of ground-truth instances (``TP + FN``)."""
        return self.tp + self.fn

    @property
    def n_pred(self) -> int:
        """Number of predicted instances (``TP + FP``)."""
        return self.tp + self.fp

    def __add__(self, other: PQResult) -> PQResult:
        """Pool the counts of two results (the accumulation behind CoNIC's mPQ+)."""
        return PQResult.from_counts(
            self.tp + other.tp,
            self.fp + other.fp,
            self.fn + other.fn,
            self.iou_sum + other.iou_sum,
        )


def _first_per_group(group: np.ndarray, *keys: np.ndarray) -> np.ndarray:
    """Indices of the first element of each ``group`` after sorting by ``keys`` (last = primary).

    ``keys`` are passed to :func:`numpy.lexsort` before ``group``, so within a group the order is
    given by ``keys`` with ``keys[-1]`` as the primary key.
    """
    order = np.lexsort((*keys, group))
    g = group[order]
    first = np.r_[True, g[1:] != g[:-1]] if g.size else np.zeros(0, dtype=bool)
    return order[first]


@dataclass(frozen=True, eq=False)
class InstanceStats:
    """Sparse contingency table of one (ground truth, prediction) instance-map pair.

    Built by :func:`pair_stats`. Instances are indexed 0..N-1 (ground truth) and 0..M-1
    (prediction) in increasing order of their ids; every metric method derives from these arrays
    without touching the images again.

    Attributes:
        gt_ids: ``(N,)`` int64 ground-truth ids, increasing.
        pred_ids: ``(M,)`` int64 predicted ids, increasing.
        gt_areas: ``(N,)`` int64 pixel count of each ground-truth instance.
        pred_areas: ``(M,)`` int64 pixel count of each predicted instance.
        pair_gt: ``(K,)`` int64 ground-truth index of each overlapping pair.
        pair_pred: ``(K,)`` int64 prediction index of each overlapping pair.
        pair_inter: ``(K,)`` int64 intersection area of each pair (> 0). Pairs are sorted by
            ``(pair_gt, pair_pred)``.
        n_pixels: number of pixels of the image.
    """

    gt_ids: np.ndarray
    pred_ids: np.ndarray
    gt_areas: np.ndarray
    pred_areas: np.ndarray
    pair_gt: np.ndarray
    pair_pred: np.ndarray
    pair_inter: np.ndarray
    n_pixels: int

    @property
    def n_gt(self) -> int:
        return int(self.gt_ids.size)

    @property
    def n_pred(self) -> int:
        return int(self.pred_ids.size)

    @cached_property
    def pair_union(self) -> np.ndarray:
        """``(K,)`` int64 union area of each overlapping pair."""
        return self.gt_areas[self.pair_gt] + self.pred_areas[self.pair_pred] - self.pair_inter

    @cached_property
    def pair_iou(self) -> np.ndarray:
        """``(K,)`` float64 IoU of each overlapping pair."""
        return self.pair_inter / self.pair_union

    @property
    def both_empty(self) -> bool:
        return self.n_gt == 0 and self.n_pred == 0

    def foreground_counts(self) -> tuple[int, int, int]:
        """``(|G ∩ P|, |G|, |P|)`` of the binary foregrounds (instance id > 0)."""
        return int(self.pair_inter.sum()), int(self.gt_areas.sum()), int(self.pred_areas.sum())

    def match(self, match_iou: float = 0.5) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """One-to-one matches with IoU > ``match_iou``.

        For ``match_iou >= 0.5`` the pairs with IoU > ``match_iou`` are unique by construction
        (an instance cannot overlap two others by more than half of each union; Kirillov et al.
        2019, Theorem 1). Below 0.5 the pairs are chosen by maximising the total IoU with the
        Hungarian algorithm among the pairs above the threshold (as in the HoVer-Net code, which
        however solves over all pairs and thresholds afterwards).

        Args:
            match_iou: IoU threshold in ``[0, 1)``; a pair matches when IoU > ``match_iou``.

        Returns:
            ``(gt_index, pred_index, iou)``, each ``(T,)``, sorted by ground-truth index.
        """
        if not 0.0 <= match_iou < 1.0:
            raise ValueError(f"`match_iou` must be in [0, 1). Received: match_iou={match_iou}")
        iou = self.pair_iou
        sel = np.flatnonzero(iou > match_iou)
        if match_iou < 0.5 and sel.size:
            mg, mp = max_weight_matching(
                self.pair_gt[sel], self.pair_pred[sel], iou[sel], self.n_gt, self.n_pred
            )
            sel = self._pair_index(mg, mp)
        return self.pair_gt[sel], self.pair_pred[sel], iou[sel]

    def _pair_index(self, gt_index: np.ndarray, pred_index: np.ndarray) -> np.ndarray:
        """Positions in the pair arrays of the given (ground truth, prediction) index pairs."""
        width = max(self.n_pred, 1)
        keys = self.pair_gt * width + self.pair_pred
        return np.searchsorted(keys, gt_index * width + pred_index)

    def pq(self, match_iou: float = 0.5) -> PQResult:
        """Panoptic quality (binary / class-agnostic when the maps carry no classes).

        Source: Kirillov et al., "Panoptic Segmentation", CVPR 2019, with the unique matching at
        IoU > 0.5 used for nuclei by Graham et al. (HoVer-Net, MedIA 2019).
        """
        _, _, iou = self.match(match_iou)
        tp = int(iou.size)
        return PQResult.from_counts(tp, self.n_pred - tp, self.n_gt - tp, float(iou.sum()))

    def aji(self) -> float:
        """Aggregated Jaccard Index (Kumar et al., IEEE TMI 2017).

        Each ground-truth nucleus ``G_i`` is paired with the prediction ``S_j`` of largest IoU
        (ties: smallest id); a prediction may be chosen by several nuclei and is then counted in
        each of their unions. ``AJI = sum |G_i ∩ S_j| / (sum |G_i ∪ S_j| + sum |S_unused|)``.
        A nucleus that overlaps no prediction adds its area to the denominator (the treatment of
        the HoVer-Net ``get_fast_aji`` code), and predictions chosen by no nucleus add theirs.
        """
        if self.both_empty:
            return math.nan
        best = _first_per_group(self.pair_gt, self.pair_pred, -self.pair_iou)
        return self._aggregated_jaccard(best)

    def aji_plus(self) -> float:
        """AJI+ (Graham et al., HoVer-Net, MedIA 2019): AJI with a one-to-one pairing.

        The pairing maximises the summed IoU over all pairs with overlap
        (:func:`scipy.optimize.linear_sum_assignment`, solved per connected component of the
        overlap graph), so no prediction is counted twice; unpaired nuclei and predictions add
        their areas to the denominator.
        """
        if self.both_empty:
            return math.nan
        mg, mp = max_weight_matching(
            self.pair_gt, self.pair_pred, self.pair_iou, self.n_gt, self.n_pred
        )
        return self._aggregated_jaccard(self._pair_index(mg, mp))

    def _aggregated_jaccard(self, chosen: np.ndarray) -> float:
        inter = int(self.pair_inter[chosen].sum())
        union = int(self.pair_union[chosen].sum())
        paired_gt = np.unique(self.pair_gt[chosen])
        paired_pred = np.unique(self.pair_pred[chosen])
        union += int(self.gt_areas.sum() - self.gt_areas[paired_gt].sum())
        union += int(self.pred_areas.sum() - self.pred_areas[paired_pred].sum())
        return inter / union

    def best_overlap(self) -> tuple[np.ndarray, np.ndarray]:
        """Partner of largest intersection area on the other side, ``-1`` where none overlaps.

        Returns:
            ``(gt_partner, pred_partner)``: ``(N,)`` prediction index for each ground-truth
            instance and ``(M,)`` ground-truth index for each prediction (ties: smallest id, as
            MATLAB's ``mode`` in the GlaS evaluation code).
        """
        gt_partner = np.full(self.n_gt, -1, dtype=np.int64)
        pred_partner = np.full(self.n_pred, -1, dtype=np.int64)
        g = _first_per_group(self.pair_gt, self.pair_pred, -self.pair_inter)
        gt_partner[self.pair_gt[g]] = self.pair_pred[g]
        p = _first_per_group(self.pair_pred, self.pair_gt, -self.pair_inter)
        pred_partner[self.pair_pred[p]] = self.pair_gt[p]
        return gt_partner, pred_partner

    def object_dice(self) -> float:
        """Object-level Dice (Sirinukunwattana et al., GlaS, MedIA 2017; used by Liu et al. 2019).

        ``D_obj = 1/2 [sum_i g_i D(G_i, S*(G_i)) + sum_j s_j D(G*(S_j), S_j)]`` with
        ``g_i = |G_i| / sum |G|``, ``s_j = |S_j| / sum |S|`` and ``S*(G_i)`` the prediction of
        largest overlap with ``G_i`` (Dice 0 when nothing overlaps), and symmetrically.
        """
        if self.both_empty:
            return math.nan
        gt_partner, pred_partner = self.best_overlap()
        dice_g = self._partner_dice(np.arange(self.n_gt), gt_partner)
        dice_p = self._partner_dice(pred_partner, np.arange(self.n_pred))
        term_g = float((self.gt_areas * dice_g).sum() / self.gt_areas.sum()) if self.n_gt else 0.0
        term_p = (
            float((self.pred_areas * dice_p).sum() / self.pred_areas.sum()) if self.n_pred else 0.0
        )
        return 0.5 * (term_g + term_p)

    def _partner_dice(self, gt_index: np.ndarray, pred_index: np.ndarray) -> np.ndarray:
        """Dice of index pairs; 0 where either index is -1 (no partner)."""
        out = np.zeros(np.shape(gt_index), dtype=np.float64)
        valid = np.flatnonzero((gt_index >= 0) & (pred_index >= 0))
        if valid.size:
            g, p = gt_index[valid], pred_index[valid]
            inter = self.pair_inter[self._pair_index(g, p)]
            out[valid] = 2.0 * inter / (self.gt_areas[g] + self.pred_areas[p])
        return out


_DIRECT_TABLE_CELLS = 1 << 20
"""Largest table of raw ids, ``(max gt id + 1) * (max pred id + 1)`` cells, built as is."""


def pair_stats(gt: np.ndarray, pred: np.ndarray) -> InstanceStats:
    """Contingency table of a ground-truth and a predicted instance map, in one pass.

    One :func:`numpy.bincount` over the combined label ``gt * (max_pred + 1) + pred`` gives the
    dense table of pixel counts, whose margins are the instance areas and whose non-zero inner
    cells are the intersections. A map whose ids span too wide a range for that table is first
    relabelled to 1..K (:func:`compact_labels`); if even the relabelled table would be larger
    than four cells per pixel, the intersections come from :func:`numpy.unique` over the
    overlapping pixels instead.

    Args:
        gt: ``(H, W)`` integer ground-truth instance map, 0 = background.
        pred: ``(H, W)`` integer predicted instance map, 0 = background.

    Returns:
        The :class:`InstanceStats` of the pair.
    """
    gt = check_label_map("gt", gt)
    pred = check_label_map("pred", pred)
    check_same_shape("gt", gt, "pred", pred)
    n = gt.size
    if n == 0:
        e = np.zeros(0, dtype=np.int64)
        return InstanceStats(e, e, e, e, e, e, e, 0)
    # Each side: flat labels, largest label, and the original ids when relabelled (else None).
    sides = []
    for arr in (gt, pred):
        flat = arr.ravel()
        if flat.dtype == np.uint64:
            flat = flat.astype(np.int64)
        sides.append([flat, int(flat.max()), None])
    while (sides[0][1] + 1) * (sides[1][1] + 1) > _DIRECT_TABLE_CELLS:
        raw = [side for side in sides if side[2] is None]
        if not raw:
            break
        side = max(raw, key=lambda sd: sd[1])
        ids, _, index = compact_labels(side[0])
        side[:] = [index.ravel(), int(ids.size), ids]
    (g, g_top, g_ids), (p, p_top, p_ids) = sides
    width = p_top + 1
    cells = (g_top + 1) * width
    if cells <= max(_DIRECT_TABLE_CELLS, 4 * n):
        kt = np.int32 if cells < 2**31 else np.int64
        keys = g.astype(kt, copy=False) * kt(width) + p.astype(kt, copy=False)
        table = np.bincount(keys, minlength=cells).reshape(g_top + 1, width)
        g_counts = table.sum(axis=1)
        p_counts = table.sum(axis=0)
        rows, cols = np.nonzero(table[1:, 1:])
        inter = table[rows + 1, cols + 1]
    else:
        g_counts = np.bincount(g, minlength=g_top + 1)
        p_counts = np.bincount(p, minlength=width)
        both = (g > 0) & (p > 0)
        keys, inter = np.unique(g[both].astype(np.int64) * width + p[both], return_counts=True)
        rows = keys // width - 1
        cols = keys % width - 1
    # Labels 1..top present in each map (raw ids may have gaps) and their positions.
    g_present = np.flatnonzero(g_counts[1:])
    p_present = np.flatnonzero(p_counts[1:])
    return InstanceStats(
        gt_ids=(g_present + 1 if g_ids is None else g_ids[g_present]).astype(np.int64),
        pred_ids=(p_present + 1 if p_ids is None else p_ids[p_present]).astype(np.int64),
        gt_areas=g_counts[1:][g_present].astype(np.int64),
        pred_areas=p_counts[1:][p_present].astype(np.int64),
        pair_gt=np.searchsorted(g_present, rows).astype(np.int64),
        pair_pred=np.searchsorted(p_present, cols).astype(np.int64),
        pair_inter=inter.astype(np.int64),
        n_pixels=int(n),
    )


def panoptic_quality(gt: np.ndarray, pred: np.ndarray, match_iou: float = 0.5) -> PQResult:
    """Binary (class-agnostic) panoptic quality of two instance maps; see :meth:`InstanceStats.pq`.

    Args:
        gt: ``(H, W)`` integer ground-truth instance map.
        pred: ``(H, W)`` integer predicted instance map.
        match_iou: a pair matches when its IoU exceeds this (0.5 in all nuclei benchmarks).
    """
    return pair_stats(gt, pred).pq(match_iou)


def aji(gt: np.ndarray, pred: np.ndarray) -> float:
    """Aggregated Jaccard Index of two instance maps; see :meth:`InstanceStats.aji`."""
    return pair_stats(gt, pred).aji()


def aji_plus(gt: np.ndarray, pred: np.ndarray) -> float:
    """AJI+ of two instance maps; see :meth:`InstanceStats.aji_plus`."""
    return pair_stats(gt, pred).aji_plus()


def object_dice(gt: np.ndarray, pred: np.ndarray) -> float:
    """Object-level Dice of two instance maps; see :meth:`InstanceStats.object_dice`."""
    return pair_stats(gt, pred).object_dice()


def hausdorff_distance(a: np.ndarray, b: np.ndarray) -> float:
    """Hausdorff distance between the pixel sets of two boolean masks (Euclidean, in pixels).

    ``H(A, B) = max(max_a min_b |a - b|, max_b min_a |a - b|)`` over all pixels of the regions
    (not only their contours), as in the GlaS evaluation code. Uses exact Euclidean distance
    transforms.

    Args:
        a: ``(H, W)`` bool mask.
        b: ``(H, W)`` bool mask of the same shape.

    Returns:
        The distance; ``0.0`` when both are empty and ``inf`` when exactly one is.
    """
    a = np.asarray(a, dtype=bool)
    b = np.asarray(b, dtype=bool)
    check_same_shape("a", a, "b", b)
    has_a, has_b = bool(a.any()), bool(b.any())
    if not has_a and not has_b:
        return 0.0
    if not has_a or not has_b:
        return math.inf
    rows = np.flatnonzero((a | b).any(axis=1))
    cols = np.flatnonzero((a | b).any(axis=0))
    window = (slice(rows[0], rows[-1] + 1), slice(cols[0], cols[-1] + 1))
    return _hausdorff_window(a[window], b[window])


def _hausdorff_window(a: np.ndarray, b: np.ndarray) -> float:
    """Hausdorff distance of two non-empty masks that both lie inside the given window."""
    to_b = ndimage.distance_transform_edt(~b)
    to_a = ndimage.distance_transform_edt(~a)
    return float(max(to_b[a].max(), to_a[b].max()))


class _ObjectGeometry:
    """Compact label map with bounding boxes, for per-object Hausdorff distances."""

    def __init__(self, labels: np.ndarray):
        _, self.areas, index = compact_labels(labels)
        self.index = index
        boxes = ndimage.find_objects(index.astype(np.int32)) if self.areas.size else []
        self.boxes = np.array(
            [(s[0].start, s[0].stop, s[1].start, s[1].stop) for s in boxes], dtype=np.int64
        ).reshape(-1, 4)

    def __len__(self) -> int:
        return int(self.areas.size)


def _box_gap(box: np.ndarray, boxes: np.ndarray) -> np.ndarray:
    """Smallest Euclidean distance between pixels of one box and each of ``boxes``.

    Boxes are ``(row_start, row_stop, col_start, col_stop)`` with exclusive stops. A lower bound
    of the Hausdorff distance between any two objects inside the boxes.
    """
    dr = np.maximum(0, np.maximum(boxes[:, 0] - (box[1] - 1), box[0] - (boxes[:, 1] - 1)))
    dc = np.maximum(0, np.maximum(boxes[:, 2] - (box[3] - 1), box[2] - (boxes[:, 3] - 1)))
    return np.sqrt(dr.astype(np.float64) ** 2 + dc.astype(np.float64) ** 2)


def object_hausdorff(gt: np.ndarray, pred: np.ndarray, stats: InstanceStats | None = None) -> float:
    """Object-level Hausdorff distance (Sirinukunwattana et al., GlaS, MedIA 2017).

    ``H_obj = 1/2 [sum_i g_i H(G_i, S*(G_i)) + sum_j s_j H(G*(S_j), S_j)]`` with the area
    weights of :meth:`InstanceStats.object_dice`. ``S*(G_i)`` is the prediction of largest
    overlap with ``G_i``; when none overlaps, the prediction of smallest Hausdorff distance to
    ``G_i`` (ties: smallest id), as in the official GlaS MATLAB code (``ObjectHausdorff.m``).
    ``H`` is the Hausdorff distance between pixel sets (:func:`hausdorff_distance`), in pixels.

    The nearest non-overlapping object is found exactly: candidates are visited in increasing
    order of their bounding-box gap (a lower bound of the Hausdorff distance) until that bound
    exceeds the best distance found.

    Args:
        gt: ``(H, W)`` integer ground-truth instance map.
        pred: ``(H, W)`` integer predicted instance map.
        stats: the :func:`pair_stats` of the pair, if already computed.

    Returns:
        The distance in pixels; ``nan`` when both maps are empty and ``inf`` when exactly one is
        (the GlaS code's value for a missing partner).
    """
    gt = check_label_map("gt", gt)
    pred = check_label_map("pred", pred)
    check_same_shape("gt", gt, "pred", pred)
    if stats is None:
        stats = pair_stats(gt, pred)
    if stats.both_empty:
        return math.nan
    if stats.n_gt == 0 or stats.n_pred == 0:
        return math.inf
    g_geo = _ObjectGeometry(gt)
    p_geo = _ObjectGeometry(pred)
    cache: dict[tuple[int, int], float] = {}

    def distance(i: int, j: int) -> float:
        key = (i, j)
        if key not in cache:
            gb, pb = g_geo.boxes[i], p_geo.boxes[j]
            window = (
                slice(min(gb[0], pb[0]), max(gb[1], pb[1])),
                slice(min(gb[2], pb[2]), max(gb[3], pb[3])),
            )
            a = g_geo.index[window] == i + 1
            b = p_geo.index[window] == j + 1
            cache[key] = _hausdorff_window(a, b)
        return cache[key]

    def nearest(own_box: np.ndarray, other: _ObjectGeometry, dist_to) -> float:
        gaps = _box_gap(own_box, other.boxes)
        best_d, best_k = math.inf, -1
        for k in np.lexsort((np.arange(len(other)), gaps)):
            if gaps[k] > best_d:
                break
            d = dist_to(int(k))
            if d < best_d or (d == best_d and k < best_k):
                best_d, best_k = d, int(k)
        return best_d

    gt_partner, pred_partner = stats.best_overlap()
    h_gt = np.empty(stats.n_gt)
    for i in range(stats.n_gt):
        j = int(gt_partner[i])
        if j >= 0:
            h_gt[i] = distance(i, j)
        else:
            h_gt[i] = nearest(g_geo.boxes[i], p_geo, lambda k, i=i: distance(i, k))
    h_pred = np.empty(stats.n_pred)
    for j in range(stats.n_pred):
        i = int(pred_partner[j])
        if i >= 0:
            h_pred[j] = distance(i, j)
        else:
            h_pred[j] = nearest(p_geo.boxes[j], g_geo, lambda k, j=j: distance(k, j))
    term_g = float((stats.gt_areas * h_gt).sum() / stats.gt_areas.sum())
    term_p = float((stats.pred_areas * h_pred).sum() / stats.pred_areas.sum())
    return 0.5 * (term_g + term_p)


def multiclass_pq(
    gt_inst: np.ndarray,
    pred_inst: np.ndarray,
    gt_cls: np.ndarray,
    pred_cls: np.ndarray,
    num_classes: int,
    match_iou: float = 0.5,
) -> list[PQResult]:
    """Per-class panoptic quality of one image.

    For each class ``c`` the instance maps are restricted to the pixels of class ``c``
    (``where(cls == c, inst, 0)``), as the PanNuke and CoNIC evaluation code does with its
    per-class channels, and matched as in :meth:`InstanceStats.pq`.

    Args:
        gt_inst: ``(H, W)`` integer ground-truth instance map.
        pred_inst: ``(H, W)`` integer predicted instance map.
        gt_cls: ``(H, W)`` integer ground-truth class map, classes 1..C (0 = background).
        pred_cls: ``(H, W)`` integer predicted class map.
        num_classes: number of classes C (> 0).
        match_iou: IoU threshold of a match.

    Returns:
        ``C`` results, index ``c - 1`` for class ``c``; their ``tp + fn`` / ``tp + fp`` are the
        per-class instance counts of ground truth / prediction.
    """
    if not isinstance(num_classes, int | np.integer) or num_classes < 1:
        raise ValueError(
            f"`num_classes` must be a positive int. Received: num_classes={num_classes}"
        )
    gt_inst = check_label_map("gt_inst", gt_inst)
    pred_inst = check_label_map("pred_inst", pred_inst)
    gt_cls = check_label_map("gt_cls", gt_cls)
    pred_cls = check_label_map("pred_cls", pred_cls)
    for name, arr in (("pred_inst", pred_inst), ("gt_cls", gt_cls), ("pred_cls", pred_cls)):
        check_same_shape("gt_inst", gt_inst, name, arr)
    results = []
    for c in range(1, num_classes + 1):
        g = np.where(gt_cls == c, gt_inst, 0)
        p = np.where(pred_cls == c, pred_inst, 0)
        results.append(pair_stats(g, p).pq(match_iou))
    return results


def pannuke_mpq(class_results: Sequence[PQResult]) -> float:
    """Multi-class PQ of one image as in the PanNuke evaluation (Gamper et al., 2020).

    The mean of the per-class PQ over the classes present in the ground truth of the image; a
    class absent from the ground truth is skipped even when it was predicted (the official
    PanNuke script sets it to ``nan`` and averages with ``nanmean``). The dataset mPQ is the
    mean of this value over images. ``nan`` when the ground truth holds no nucleus.

    Args:
        class_results: per-class results of :func:`multiclass_pq`.
    """
    values = [r.pq for r in class_results if r.n_gt > 0]
    return float(np.mean(values)) if values else math.nan


def pannuke_class_pq(result: PQResult) -> float:
    """Per-image PQ of one class under the PanNuke convention (``nan`` if absent from the GT)."""
    return result.pq if result.n_gt > 0 else math.nan


def mpq_plus(class_totals: Sequence[PQResult]) -> tuple[float, list[float]]:
    """CoNIC multi-class PQ+ (Graham et al., CoNIC challenge 2022).

    For each class the TP, FP, FN and IoU sums are accumulated over all images first (pass the
    per-class sums, e.g. ``sum(results, start)`` with :meth:`PQResult.__add__`), the class PQ is
    computed from the totals, and mPQ+ is the mean over classes. A class with no instance in
    the ground truth nor in the prediction of any image has an undefined PQ (``nan``) and is
    left out of the mean (the CoNIC code's epsilon would make it 0).

    Args:
        class_totals: accumulated per-class results, index ``c - 1`` for class ``c``.

    Returns:
        ``(mPQ+, per-class PQ+ list)``.
    """
    per_class = [r.pq for r in class_totals]
    defined = [v for v in per_class if not math.isnan(v)]
    return (float(np.mean(defined)) if defined else math.nan), per_class
