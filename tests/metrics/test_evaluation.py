"""Per-image rows and dataset aggregation on a two-image, three-class case worked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kerasnuc.metrics import MetricAccumulator, aggregate, evaluate_pair
from kerasnuc.metrics.evaluation import instance_types, type_counts


def box(arr, value, r0, r1, c0, c1):
    arr[r0:r1, c0:c1] = value


def image_one():
    # GT: A (class 1) and B (class 2), 4x4 each. Prediction: both exact, B labelled class 1.
    gi, gc, pi, pc = (np.zeros((8, 12), np.int32) for _ in range(4))
    box(gi, 1, 0, 4, 0, 4), box(gc, 1, 0, 4, 0, 4)
    box(gi, 2, 0, 4, 6, 10), box(gc, 2, 0, 4, 6, 10)
    box(pi, 11, 0, 4, 0, 4), box(pc, 1, 0, 4, 0, 4)
    box(pi, 12, 0, 4, 6, 10), box(pc, 1, 0, 4, 6, 10)
    return gi, pi, gc, pc


def image_two():
    # GT: C (class 2). Prediction: C shifted one column (IoU 12/20) and a spurious 3x3 class 3.
    gi, gc, pi, pc = (np.zeros((8, 12), np.int32) for _ in range(4))
    box(gi, 5, 0, 4, 0, 4), box(gc, 2, 0, 4, 0, 4)
    box(pi, 1, 0, 4, 1, 5), box(pc, 2, 0, 4, 1, 5)
    box(pi, 2, 5, 8, 8, 11), box(pc, 3, 5, 8, 8, 11)
    return gi, pi, gc, pc


def test_rows_by_hand():
    r1 = evaluate_pair(*image_one(), num_classes=3)
    assert (r1["pq"], r1["aji"], r1["obj_hausdorff"]) == (1.0, 1.0, 0.0)
    # Class 1: TP 1 (A), FP 1 (B as class 1) -> 2/3; class 2: FN 1 -> 0; class 3 skipped.
    assert r1["pq_c1"] == pytest.approx(2 / 3)
    assert r1["pq_c2"] == 0.0
    assert math.isnan(r1["pq_c3"])
    assert r1["mpq"] == pytest.approx(1 / 3)
    # Pixels: class 1 TP 16 of G 16 / P 32; class 2 TP 0 of G 16; class 3 absent.
    assert r1["iou_c1"] == pytest.approx(0.5) and r1["dice_c1"] == pytest.approx(2 / 3)
    assert r1["iou_c2"] == 0.0 and math.isnan(r1["iou_c3"])
    assert r1["miou"] == pytest.approx(0.25) and r1["mdice"] == pytest.approx(1 / 3)

    r2 = evaluate_pair(*image_two(), num_classes=3)
    assert (r2["tp"], r2["fp"], r2["fn"]) == (1, 1, 0)
    assert r2["pq"] == pytest.approx(0.6 / 1.5)
    assert r2["pq_c2"] == pytest.approx(0.6)
    assert math.isnan(r2["pq_c1"]) and math.isnan(r2["pq_c3"])  # class 3 only predicted
    assert r2["mpq"] == pytest.approx(0.6)
    assert (r2["det_tp"], r2["det_fp"], r2["det_fn"]) == (1, 1, 0)  # centroids 1 px apart
    assert r2["pixel_f1"] == pytest.approx(2 * 12 / (16 + 25))


def test_dataset_aggregate_by_hand():
    acc = MetricAccumulator(num_classes=3)
    acc.add(*image_one(), id="one")
    acc.add(*image_two(), id="two")
    s = acc.summary()
    assert s["n_images"] == 2 and len(acc) == 2
    assert (s["n_gt"], s["n_pred"], s["tp"], s["fp"], s["fn"]) == (3, 4, 3, 1, 0)
    assert s["pq"] == pytest.approx((1.0 + 0.4) / 2)
    assert s["mpq"] == pytest.approx((1 / 3 + 0.6) / 2)
    # mPQ+: class 1 TP 1 FP 1 -> 2/3; class 2 TP 1 FN 1 IoU 0.6 -> 0.4; class 3 FP 1 -> 0.
    assert s["pq_plus_c1"] == pytest.approx(2 / 3)
    assert s["pq_plus_c2"] == pytest.approx(0.4)
    assert s["pq_plus_c3"] == 0.0
    assert s["mpq_plus"] == pytest.approx((2 / 3 + 0.4) / 3)
    # Counts per class: true [1,1,0] / [0,1,0], predicted [2,0,0] / [0,1,1].
    # R2: class 1: SS_res 1, SS_tot 0.5 -> -1; classes 2, 3: constant truth, imperfect -> 0.
    assert s["r2_c1"] == pytest.approx(-1.0)
    assert (s["r2_c2"], s["r2_c3"]) == (0.0, 0.0)
    assert s["r2"] == pytest.approx(-1 / 3)
    # CCC of totals (2, 1) vs (2, 2): covariance 0 -> 0.
    assert s["ccc"] == pytest.approx(0.0)
    assert s["det_precision_pooled"] == pytest.approx(3 / 4)
    assert s["det_recall_pooled"] == 1.0
    assert s["pixel_f1_pooled"] == pytest.approx(2 * 44 / (48 + 57))
    assert s["iou_pooled_c2"] == pytest.approx(12 / 36)
    assert acc.rows[0]["id"] == "one"


def test_type_classification_by_hand():
    # Pairs by centroid: image one A (1 -> 1) and B (2 -> 1); image two C (2 -> 2) and an
    # unpaired prediction of class 3. Accuracy 2 of 3 pairs.
    s = aggregate(
        [evaluate_pair(*image_one(), num_classes=3), evaluate_pair(*image_two(), num_classes=3)]
    )
    assert (s["type_pairs"], s["type_correct"]) == (3, 2)
    assert s["type_acc"] == pytest.approx(2 / 3)
    # Class 1: TP 1 (A), FP 1 (B) -> 2 / (2 + 2); class 2: TP 1 (C), FN 1 (B) -> 2 / (2 + 2);
    # class 3: one unpaired prediction -> 0 / (0 + 1).
    assert (s["type_tp_c1"], s["type_fp_c1"], s["type_fn_c1"]) == (1, 1, 0)
    assert (s["type_tp_c2"], s["type_fp_c2"], s["type_fn_c2"]) == (1, 0, 1)
    assert (s["det_fp_c3"], s["det_fn_c3"]) == (1, 0)
    assert s["type_f1_c1"] == pytest.approx(0.5)
    assert s["type_f1_c2"] == pytest.approx(0.5)
    assert s["type_f1_c3"] == 0.0


def test_type_counts_and_f1_with_unpaired_nuclei():
    # True types 1, 2, 3, 2; predicted 1, 2, 2, 3; pairs (0, 0), (1, 1), (2, 2).
    # Unpaired: true nucleus 3 (type 2), prediction 3 (type 3).
    c = type_counts(
        np.array([1, 2, 3, 2]), np.array([1, 2, 2, 3]), np.array([0, 1, 2]), np.array([0, 1, 2]), 3
    )
    assert (c["type_pairs"], c["type_correct"]) == (3, 2)
    assert (c["type_tp_c2"], c["type_fp_c2"], c["type_fn_c2"]) == (1, 1, 0)
    assert (c["det_fp_c2"], c["det_fn_c2"]) == (0, 1)
    assert (c["type_tp_c3"], c["type_fp_c3"], c["type_fn_c3"]) == (0, 0, 1)
    assert (c["det_fp_c3"], c["det_fn_c3"]) == (1, 0)
    s = aggregate(
        [
            {
                "n_gt": 4,
                "n_pred": 4,
                "px_inter": 0,
                "px_gt": 0,
                "px_pred": 0,
                "px_total": 1,
                "det_tp": 3,
                "det_fp": 1,
                "det_fn": 1,
                **c,
            }
        ]
    )
    # F_2 = 2 * 1 / (2 * (1 + 1 + 0) + 0 + 1) = 2 / 5; F_3 = 0 / (2 + 1) = 0.
    assert s["type_f1_c2"] == pytest.approx(0.4)
    assert s["type_f1_c3"] == 0.0


def test_instance_types_majority_ties_and_missing():
    inst = np.array([[4, 4, 4, 9, 9, 7]])
    cls = np.array([[2, 3, 3, 1, 2, 0]])
    # id 4: class 3 on two pixels; id 7: no class pixel -> 0; id 9: tie 1 / 2 -> 1.
    assert instance_types(inst, cls, 3).tolist() == [3, 0, 1]
    assert instance_types(np.zeros((2, 2), np.int32), np.zeros((2, 2), np.int32), 3).size == 0


def test_undefined_images_are_skipped_in_means():
    z = np.zeros((6, 6), np.int32)
    one = z.copy()
    one[1:4, 1:4] = 3
    rows = [evaluate_pair(z, z), evaluate_pair(one, one)]
    assert math.isnan(rows[0]["pq"]) and math.isnan(rows[0]["obj_hausdorff"])
    s = aggregate(rows)
    assert s["n_images"] == 2
    assert (s["pq"], s["aji"], s["obj_dice"], s["obj_hausdorff"]) == (1.0, 1.0, 1.0, 0.0)
    assert s["n_gt"] == 1
    assert aggregate([]) == {"n_images": 0}


def test_argument_checks():
    a = np.zeros((4, 4), np.int32)
    with pytest.raises(ValueError, match="num_classes"):
        evaluate_pair(a, a, a, a)
    with pytest.raises(ValueError, match="required"):
        evaluate_pair(a, a, num_classes=2)
    with pytest.raises(ValueError, match="same shape"):
        evaluate_pair(a, np.zeros((4, 5), np.int32))
    row = evaluate_pair(a, a, hausdorff=False)
    assert "obj_hausdorff" not in row
