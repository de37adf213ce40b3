"""Instance, semantic, detection and count metrics (numpy / scipy only, no TensorFlow).

* :mod:`~kerasnuc.metrics.instance`: one contingency table per image pair (:func:`pair_stats`)
  from which PQ / DQ / SQ, AJI, AJI+ and object-level Dice derive; object-level Hausdorff;
  per-class PQ, PanNuke mPQ and CoNIC mPQ+.
* :mod:`~kerasnuc.metrics.semantic`: pixel F1 / Dice / accuracy, per-class IoU and Dice.
* :mod:`~kerasnuc.metrics.detection`: distance-based one-to-one point matching, precision,
  recall, F1.
* :mod:`~kerasnuc.metrics.counts`: per-class counts, R2 (CoNIC task 2), Lin's CCC.
* :mod:`~kerasnuc.metrics.evaluation`: :func:`evaluate_pair`, :func:`aggregate` and
  :class:`MetricAccumulator` for per-image scoring and dataset-level summaries.
"""

from kerasnuc.metrics.counts import class_counts, concordance_cc, multiclass_r2, r2_score
from kerasnuc.metrics.detection import (
    DetectionResult,
    detection_scores,
    match_points,
)
from kerasnuc.metrics.evaluation import (
    DEFAULT_MAX_DIST,
    MetricAccumulator,
    aggregate,
    evaluate_pair,
)
from kerasnuc.metrics.instance import (
    InstanceStats,
    PQResult,
    aji,
    aji_plus,
    hausdorff_distance,
    mpq_plus,
    multiclass_pq,
    object_dice,
    object_hausdorff,
    pair_stats,
    pannuke_class_pq,
    pannuke_mpq,
    panoptic_quality,
)
from kerasnuc.metrics.matching import max_weight_matching
from kerasnuc.metrics.semantic import (
    binary_scores_from_counts,
    class_iou_dice,
    confusion_matrix,
    dice_coefficient,
    iou_dice_from_confusion,
    pixel_scores,
)

__all__ = [
    "DEFAULT_MAX_DIST",
    "DetectionResult",
    "InstanceStats",
    "MetricAccumulator",
    "PQResult",
    "aggregate",
    "aji",
    "aji_plus",
    "binary_scores_from_counts",
    "class_counts",
    "class_iou_dice",
    "concordance_cc",
    "confusion_matrix",
    "detection_scores",
    "dice_coefficient",
    "evaluate_pair",
    "hausdorff_distance",
    "iou_dice_from_confusion",
    "match_points",
    "max_weight_matching",
    "mpq_plus",
    "multiclass_pq",
    "multiclass_r2",
    "object_dice",
    "object_hausdorff",
    "pair_stats",
    "panoptic_quality",
    "pannuke_class_pq",
    "pannuke_mpq",
    "pixel_scores",
    "r2_score",
]
