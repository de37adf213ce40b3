"""Pixel and per-class scores against hand-computed confusion counts."""

from __future__ import annotations

import math

import numpy as np
import pytest

from kerasnuc.metrics import (
    class_iou_dice,
    confusion_matrix,
    dice_coefficient,
    iou_dice_from_confusion,
    pixel_scores,
)


def test_pixel_scores_by_hand():
    gt = np.zeros((4, 5), np.int32)
    pred = np.zeros((4, 5), np.int32)
    gt[0, :4] = 3  # 4 px
    gt[1, :2] = 8  # 2 px -> |G| = 6
    pred[0, 1:5] = 1  # 4 px, 3 of them on G
    pred[2, 0] = 2  # 1 px off G -> |P| = 5, |G & P| = 3
    s = pixel_scores(gt, pred)
    assert s["f1"] == pytest.approx(2 * 3 / 11)
    assert s["precision"] == pytest.approx(3 / 5)
    assert s["recall"] == pytest.approx(3 / 6)
    assert s["iou"] == pytest.approx(3 / 8)
    # Disagreeing pixels: G only 3, P only 2 -> 15 of 20 agree.
    assert s["accuracy"] == pytest.approx(15 / 20)
    assert dice_coefficient(gt > 0, pred > 0) == pytest.approx(6 / 11)


def test_pixel_scores_empty():
    z = np.zeros((3, 3), np.int32)
    s = pixel_scores(z, z)
    assert math.isnan(s["f1"]) and math.isnan(s["iou"])
    assert s["accuracy"] == 1.0
    one = z.copy()
    one[1, 1] = 1
    assert pixel_scores(one, z)["f1"] == 0.0


def test_confusion_and_class_scores():
    gt = np.array([[0, 1, 1, 2], [0, 2, 2, 2]])
    pred = np.array([[0, 1, 2, 2], [1, 2, 2, 0]])
    cm = confusion_matrix(gt, pred, num_classes=3)
    expect = np.zeros((4, 4), int)
    expect[0, 0] = 1
    expect[0, 1] = 1
    expect[1, 1] = 1
    expect[1, 2] = 1
    expect[2, 2] = 3
    expect[2, 0] = 1
    np.testing.assert_array_equal(cm, expect)
    iou, dice = iou_dice_from_confusion(cm)
    # class 1: TP 1, |G| 2, |P| 2 -> IoU 1/3, Dice 1/2; class 2: TP 3, |G| 4, |P| 4 -> 3/5, 3/4.
    assert iou[1] == pytest.approx(1 / 3) and dice[1] == pytest.approx(1 / 2)
    assert iou[2] == pytest.approx(3 / 5) and dice[2] == pytest.approx(3 / 4)
    assert iou[0] == pytest.approx(1 / 3)
    assert math.isnan(iou[3]) and math.isnan(dice[3])
    iou2, _ = class_iou_dice(gt, pred, 3)
    np.testing.assert_allclose(iou2, iou)


def test_confusion_rejects_out_of_range():
    with pytest.raises(ValueError, match="num_classes=2"):
        confusion_matrix(np.full((2, 2), 3), np.zeros((2, 2), int), 2)
    with pytest.raises(ValueError, match="positive int"):
        confusion_matrix(np.zeros((2, 2), int), np.zeros((2, 2), int), 0)
