"""Ground-truth boxes of the panoptic pipeline (kerasnuc.data.targets.panoptic_box_targets)."""

from __future__ import annotations

import numpy as np

from kerasnuc.data.targets import UNKNOWN_CLASS, panoptic_box_targets


def _scene():
    inst = np.zeros((10, 12), np.int32)
    inst[1:4, 2:5] = 7  # 9 px, rows 1..3, cols 2..4
    inst[5:9, 0:2] = 3  # 8 px
    inst[6, 6] = 9  # 1 px
    cls = np.zeros_like(inst)
    cls[inst == 7] = 2
    cls[1, 2] = 1  # minority class inside nucleus 7
    cls[inst == 3] = UNKNOWN_CLASS
    cls[inst == 9] = 1
    return inst, cls


def test_boxes_classes_and_relabelling():
    inst, cls = _scene()
    relabelled, boxes, classes = panoptic_box_targets(inst, cls, 4)
    # ids in increasing original order: 3 -> 1, 7 -> 2, 9 -> 3
    np.testing.assert_array_equal(relabelled == 1, inst == 3)
    np.testing.assert_array_equal(relabelled == 2, inst == 7)
    np.testing.assert_array_equal(relabelled == 3, inst == 9)
    np.testing.assert_array_equal(boxes, [[5, 0, 9, 2], [1, 2, 4, 5], [6, 6, 7, 7], [0, 0, 0, 0]])
    np.testing.assert_array_equal(classes, [1, 2, 1, 0])  # unknown -> 1, majority 2, empty 0


def test_keeps_largest_when_too_many():
    inst, cls = _scene()
    relabelled, boxes, classes = panoptic_box_targets(inst, cls, 2)
    assert set(np.unique(relabelled)) == {0, 1, 2}
    assert not np.any(relabelled[inst == 9])  # the 1-pixel nucleus is dropped
    np.testing.assert_array_equal(boxes, [[5, 0, 9, 2], [1, 2, 4, 5]])
    np.testing.assert_array_equal(classes, [1, 2])


def test_empty_crop():
    relabelled, boxes, classes = panoptic_box_targets(
        np.zeros((5, 5), np.int32), np.zeros((5, 5), np.int32), 3
    )
    assert not relabelled.any() and not boxes.any() and not classes.any()


def test_panoptic_targets_stacks_crops_by_hand():
    from kerasnuc.data.targets import panoptic_targets

    inst = np.zeros((2, 4, 4), np.int32)
    inst[0, 0:2, 1:3] = 7  # one nucleus, rows 0-1, cols 1-2
    inst[1, 3, 0] = 2
    inst[1, 1:3, 2:4] = 5
    t = panoptic_targets(inst, 3)
    assert set(t) == {"instances", "semantic", "boxes", "classes"}
    np.testing.assert_array_equal(t["semantic"], (inst > 0).astype(np.int32))
    np.testing.assert_array_equal(t["boxes"][0], [[0, 1, 2, 3], [0, 0, 0, 0], [0, 0, 0, 0]])
    np.testing.assert_array_equal(t["classes"], [[1, 0, 0], [1, 1, 0]])
    # crop 1: id 2 -> 1 (box rows 3-3, col 0), id 5 -> 2 (rows 1-2, cols 2-3)
    np.testing.assert_array_equal(t["boxes"][1][:2], [[3, 0, 4, 1], [1, 2, 3, 4]])
    assert t["instances"][1][3, 0] == 1 and t["instances"][1][2, 3] == 2
    assert t["instances"][0][1, 2] == 1 and t["instances"].dtype == np.int32
