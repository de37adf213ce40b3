"""The seven loss terms on hand-made targets, with hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf
from keras import ops

from kerasnuc.models.panoptic.losses import (
    mask_loss,
    roi_box_loss,
    roi_class_loss,
    rpn_box_loss,
    rpn_objectness_loss,
    semantic_loss,
    smooth_l1,
)


def _f(x):
    return float(ops.convert_to_numpy(x))


def _bce(x, z):
    p = 1 / (1 + math.exp(-x))
    return -(z * math.log(p) + (1 - z) * math.log(1 - p))


def test_smooth_l1_values():
    got = ops.convert_to_numpy(smooth_l1(np.array([0.5, -2.0, 0.05]), beta=1.0))
    np.testing.assert_allclose(got, [0.125, 1.5, 0.00125], rtol=1e-6)
    got = ops.convert_to_numpy(smooth_l1(np.array([0.2, -0.05, 0.1]), beta=1 / 9))
    np.testing.assert_allclose(got, [0.2 - 0.5 / 9, 0.5 * 0.0025 * 9, 0.5 * 0.01 * 9], rtol=1e-5)
    np.testing.assert_allclose(ops.convert_to_numpy(smooth_l1(np.array([-0.3]), 0.0)), [0.3])


def test_rpn_objectness():
    labels = np.array([[1, 0, -1, 0], [-1, -1, 1, -1]], "int32")
    logits = np.array([[2.0, -1.0, 50.0, 0.5], [9.0, 9.0, -0.3, 9.0]], "float32")
    expected = (_bce(2.0, 1) + _bce(-1.0, 0) + _bce(0.5, 0) + _bce(-0.3, 1)) / 4
    assert math.isclose(_f(rpn_objectness_loss(labels, logits)), expected, rel_tol=1e-5)
    assert _f(rpn_objectness_loss(labels, logits[..., None])) == _f(
        rpn_objectness_loss(labels, logits)
    )
    # Extreme logits stay finite; all ignored -> 0, not NaN.
    assert math.isclose(_f(rpn_objectness_loss([[1, 0]], [[-100.0, 100.0]])), 100.0, rel_tol=1e-5)
    assert _f(rpn_objectness_loss(-np.ones((2, 4), "int32"), logits)) == 0.0


def test_rpn_box():
    labels = np.array([[1, 0, -1, 1]], "int32")
    pred = np.zeros((1, 4, 4), "float32")
    target = np.zeros((1, 4, 4), "float32")
    target[0, 0] = [0.05, -0.5, 0.0, 0.0]  # 0.5 * 0.0025 * 9 + (0.5 - 0.5 / 9)
    target[0, 1] = [9, 9, 9, 9]  # negative: ignored
    target[0, 2] = [9, 9, 9, 9]  # ignored
    target[0, 3] = [0.0, 0.0, 1.0, 0.0]  # 1 - 0.5 / 9
    expected = (0.5 * 0.0025 * 9 + 0.5 - 0.5 / 9 + 1 - 0.5 / 9) / 3  # 3 sampled anchors
    assert math.isclose(_f(rpn_box_loss(labels, pred, target)), expected, rel_tol=1e-5)
    assert _f(rpn_box_loss(-np.ones((1, 4), "int32"), pred, target)) == 0.0


def test_roi_class():
    targets = np.array([[1, 0, -1]], "int32")
    logits = np.array([[[0.0, 2.0], [1.0, -1.0], [5.0, 5.0]]], "float32")
    lse1 = math.log(math.exp(0) + math.exp(2))
    lse2 = math.log(math.exp(1) + math.exp(-1))
    expected = ((lse1 - 2.0) + (lse2 - 1.0)) / 2
    assert math.isclose(_f(roi_class_loss(targets, logits)), expected, rel_tol=1e-5)
    assert _f(roi_class_loss(-np.ones((1, 3), "int32"), logits)) == 0.0


def test_roi_box_agnostic_and_specific():
    targets = np.array([[2, 0, 1, -1]], "int32")
    tgt = np.zeros((1, 4, 4), "float32")
    tgt[0, 0] = [0.5, 0, 0, 0]
    tgt[0, 2] = [0, 0, 0, 3.0]
    agn = np.zeros((1, 4, 4), "float32")
    agn[0, 1] = [7, 7, 7, 7]  # background: ignored
    expected = (0.125 + 2.5) / 2  # 2 positive ROIs (the background ROI does not count)
    assert math.isclose(_f(roi_box_loss(targets, agn, tgt)), expected, rel_tol=1e-6)
    spec = np.full((1, 4, 2, 4), 100.0, "float32")  # wrong-class slices are huge
    spec[0, 0, 1] = 0.0  # class 2 -> slice 1
    spec[0, 2, 0] = 0.0  # class 1 -> slice 0
    assert math.isclose(_f(roi_box_loss(targets, spec, tgt)), expected, rel_tol=1e-6)
    assert _f(roi_box_loss(np.array([[0, -1, 0, 0]]), agn, tgt)) == 0.0


def test_mask_loss():
    targets = np.array([[1, 0]], "int32")
    m = 2
    logits = np.zeros((1, 2, m, m, 2), "float32")
    logits[0, 0, :, :, 0] = 50.0  # background channel: never used
    logits[0, 0, :, :, 1] = [[2.0, -1.0], [0.0, 3.0]]
    logits[0, 1] = 9.0  # negative ROI: ignored
    mt = np.array([[[[1, 0], [1, 0]], [[1, 1], [1, 1]]]], "float32")
    expected = (_bce(2, 1) + _bce(-1, 0) + _bce(0, 1) + _bce(3, 0)) / 4
    assert math.isclose(_f(mask_loss(targets, logits, mt)), expected, rel_tol=1e-5)
    # Class-agnostic single channel.
    assert math.isclose(_f(mask_loss(targets, logits[..., 1:], mt)), expected, rel_tol=1e-5)
    assert _f(mask_loss(np.array([[0, -1]]), logits, mt)) == 0.0


def test_semantic_loss():
    labels = np.array([[[0, 1], [-1, 1]]], "int32")
    logits = np.array([[[[1.0, 0.0], [0.0, 0.0]], [[3.0, 3.0], [-1.0, 2.0]]]], "float32")
    lse = math.log(math.exp(1) + 1)
    expected = ((lse - 1) + math.log(2) + (math.log(math.exp(-1) + math.exp(2)) - 2)) / 3
    assert math.isclose(_f(semantic_loss(labels, logits)), expected, rel_tol=1e-5)
    assert math.isclose(_f(semantic_loss(labels[..., None], logits)), expected, rel_tol=1e-5)
    assert _f(semantic_loss(-np.ones((1, 2, 2), "int32"), logits)) == 0.0


def test_float16_and_graph():
    @tf.function
    def f(labels, logits):
        return rpn_objectness_loss(labels, logits)

    labels = np.array([[1, 0]], "int32")
    got = float(f(labels, tf.constant([[2.0, -1.0]], tf.float16)))
    assert math.isclose(got, (_bce(2.0, 1) + _bce(-1.0, 0)) / 2, rel_tol=1e-4)
