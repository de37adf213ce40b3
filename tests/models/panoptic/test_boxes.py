"""Box IoU / encoding / decoding / clipping against hand-computed values."""

from __future__ import annotations

import math

import numpy as np
import pytest
from keras import ops

from kerasnuc.models.panoptic.boxes import box_iou, clip_boxes, decode_boxes, encode_boxes


def test_box_iou_hand_values():
    a = np.array([[0, 0, 10, 10], [0, 0, 2, 4]], "float32")
    b = np.array(
        [
            [0, 0, 10, 10],  # identical
            [5, 5, 15, 15],  # overlap 25 / (100 + 100 - 25)
            [20, 20, 30, 30],  # disjoint
            [0, 0, 10, 5],  # inside: 50 / 100
            [3, 3, 3, 3],  # empty box
        ],
        "float32",
    )
    iou = ops.convert_to_numpy(box_iou(a, b))
    expected = np.array(
        [
            [1.0, 25 / 175, 0.0, 0.5, 0.0],
            [8 / 100, 0.0, 0.0, 8 / 50, 0.0],
        ]
    )
    np.testing.assert_allclose(iou, expected, rtol=1e-6)
    # Two empty boxes: union 0 -> IoU 0, not NaN.
    z = np.zeros((1, 4), "float32")
    assert ops.convert_to_numpy(box_iou(z, z))[0, 0] == 0.0


def test_box_iou_batched():
    rng = np.random.default_rng(1)
    a = rng.uniform(0, 50, (2, 3, 2))
    a = np.concatenate([a, a + rng.uniform(1, 20, (2, 3, 2))], -1).astype("float32")
    b = a[:, ::-1]
    iou = ops.convert_to_numpy(box_iou(a, b))
    assert iou.shape == (2, 3, 3)
    for i in range(2):
        np.testing.assert_allclose(iou[i], ops.convert_to_numpy(box_iou(a[i], b[i])))
    np.testing.assert_allclose(np.diagonal(iou[:, :, ::-1], axis1=1, axis2=2), 1.0, rtol=1e-6)


def test_encode_hand_values():
    anchor = np.array([[0, 0, 10, 20]], "float32")  # centre (5, 10), size (10, 20)
    box = np.array([[2, 4, 22, 14]], "float32")  # centre (12, 9), size (20, 10)
    d = ops.convert_to_numpy(encode_boxes(anchor, box))
    np.testing.assert_allclose(d, [[0.7, -0.05, math.log(2.0), math.log(0.5)]], rtol=1e-6)
    d = ops.convert_to_numpy(encode_boxes(anchor, box, weights=(10, 10, 5, 5)))
    np.testing.assert_allclose(d, [[7.0, -0.5, 5 * math.log(2.0), 5 * math.log(0.5)]], rtol=1e-6)


@pytest.mark.parametrize("weights", [(1, 1, 1, 1), (10, 10, 5, 5)])
def test_round_trip(weights):
    rng = np.random.default_rng(0)
    yx = rng.uniform(-20, 200, (50, 2))
    anchors = np.concatenate([yx, yx + rng.uniform(4, 64, (50, 2))], -1).astype("float32")
    yx = rng.uniform(-20, 200, (50, 2))
    boxes = np.concatenate([yx, yx + rng.uniform(2, 80, (50, 2))], -1).astype("float32")
    deltas = encode_boxes(anchors, boxes, weights)
    back = ops.convert_to_numpy(decode_boxes(anchors, deltas, weights))
    np.testing.assert_allclose(back, boxes, rtol=1e-5, atol=1e-3)


def test_decode_hand_values_and_clipping():
    anchor = np.array([[0, 0, 10, 20]], "float32")
    d = np.array([[0.7, -0.05, math.log(2.0), math.log(0.5)]], "float32")
    np.testing.assert_allclose(
        ops.convert_to_numpy(decode_boxes(anchor, d)), [[2, 4, 22, 14]], rtol=1e-5, atol=1e-5
    )
    # A huge dh is clipped at log(1000/16): height = 10 * 62.5.
    d = np.array([[0.0, 0.0, 50.0, 0.0]], "float32")
    out = ops.convert_to_numpy(decode_boxes(anchor, d))
    np.testing.assert_allclose(out[0, 2] - out[0, 0], 625.0, rtol=1e-5)
    assert np.isfinite(out).all()


def test_clip_boxes():
    boxes = np.array([[-5, 3, 40, 70], [10, -1, 20, 5]], "float32")
    out = ops.convert_to_numpy(clip_boxes(boxes, 32, ops.convert_to_tensor(64)))
    np.testing.assert_array_equal(out, [[0, 3, 32, 64], [10, 0, 20, 5]])


def test_bad_weights():
    with pytest.raises(ValueError, match="weights"):
        encode_boxes(np.zeros((1, 4)), np.zeros((1, 4)), weights=(1, 1, 0, 1))
