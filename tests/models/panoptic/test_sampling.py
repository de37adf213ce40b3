"""Anchor matching, balanced sampling, proposal targets and mask targets on hand-made cases."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from kerasnuc.models.panoptic.sampling import (
    mask_targets,
    match_boxes,
    rpn_targets,
    sample_balanced,
    sample_proposals,
)


def _np(x):
    return ops.convert_to_numpy(x)


ANCHORS = np.array(
    [
        [0, 0, 10, 10],  # IoU 1 with gt 0
        [0, 0, 10, 8],  # IoU 0.8 with gt 0 -> positive
        [0, 5, 10, 15],  # IoU 50/150 = 0.333 with gt 0 -> ignored
        [0, 7, 10, 17],  # IoU 30/170 = 0.176 -> negative
        [50, 50, 60, 60],  # IoU 25/175 = 0.143 with gt 1: its best -> low-quality positive
        [100, 100, 110, 110],  # nothing -> negative
    ],
    "float32",
)
GT = np.array([[[0, 0, 10, 10], [55, 55, 65, 65], [0, 0, 10, 10]]], "float32")


def test_match_boxes_hand_case():
    valid = np.array([[True, True, False]])
    labels, matched = match_boxes(ANCHORS, GT, valid)
    np.testing.assert_array_equal(_np(labels), [[1, 1, -1, 0, 1, 0]])
    np.testing.assert_array_equal(_np(matched)[0, [0, 1, 4]], [0, 0, 1])
    for chunk in (1, 2, 4):  # chunked IoU passes give the same labels
        chunked, matched_c = match_boxes(ANCHORS, GT, valid, chunk_size=chunk)
        np.testing.assert_array_equal(_np(chunked), [[1, 1, -1, 0, 1, 0]])
        np.testing.assert_array_equal(_np(matched_c)[0, [0, 1, 4]], [0, 0, 1])
    labels, _ = match_boxes(ANCHORS, GT, valid, allow_low_quality=False)
    np.testing.assert_array_equal(_np(labels), [[1, 1, -1, 0, 0, 0]])
    # Unbatched inputs, and an image without valid gt: all negative.
    labels, _ = match_boxes(ANCHORS, GT[0], np.array([False, False, False]))
    np.testing.assert_array_equal(_np(labels), [0] * 6)
    # The padded box (index 2, identical to gt 0) is never the match.
    _, matched = match_boxes(ANCHORS, GT[0][::-1], np.array([False, True, True]))
    assert _np(matched)[0] == 2


def test_sample_balanced_counts():
    rng = np.random.default_rng(0)
    labels = rng.choice([1, 0, -1], size=(3, 2000), p=[0.05, 0.8, 0.15]).astype("int32")
    labels[1, :] = np.where(labels[1] == 1, 0, labels[1])  # row 1: no positive
    labels[2, :] = np.where(np.arange(2000) < 300, 1, -1)  # row 2: many positives, no negative
    out = _np(sample_balanced(labels, 256, 0.5, seed=1))
    n_pos0 = (labels[0] == 1).sum()
    assert (out[0] == 1).sum() == min(n_pos0, 128)
    assert (out[0] == 0).sum() == 256 - min(n_pos0, 128)
    assert (out[1] == 1).sum() == 0 and (out[1] == 0).sum() == 256
    assert (out[2] == 1).sum() == 128 and (out[2] == 0).sum() == 0
    # Only labelled entries are kept, with their labels.
    kept = out >= 0
    np.testing.assert_array_equal(out[kept], labels[kept])
    # A SeedGenerator gives new draws; an int seed reproduces them.
    gen = keras.random.SeedGenerator(3)
    a, b = _np(sample_balanced(labels, 256, 0.5, gen)), _np(sample_balanced(labels, 256, 0.5, gen))
    assert (a != b).any()
    np.testing.assert_array_equal(out, _np(sample_balanced(labels, 256, 0.5, seed=1)))


def test_sample_balanced_dynamic_length():
    @tf.function(input_signature=[tf.TensorSpec((None, None), tf.int32)])
    def f(labels):
        return sample_balanced(labels, 16, 0.25, seed=0)

    for n in (10, 300):
        labels = np.where(np.arange(n) % 3 == 0, 1, 0)[None].astype("int32")
        out = f(labels).numpy()
        assert out.shape == (1, n)
        n_pos = min((labels == 1).sum(), 4)
        assert (out == 1).sum() == n_pos
        assert (out == 0).sum() == min(16 - n_pos, (labels == 0).sum())
        kept = out >= 0
        np.testing.assert_array_equal(out[kept], labels[kept])


def test_sample_balanced_small():
    labels = np.array([1, 1, 1, 0, 0, -1, 0, 1], "int32")
    out = _np(sample_balanced(labels, 4, 0.5, seed=0))
    assert (out == 1).sum() == 2 and (out == 0).sum() == 2
    out = _np(sample_balanced(labels, 20, 0.25, seed=0))  # 5 positive slots, 4 positives
    np.testing.assert_array_equal(out, labels)


def test_rpn_targets_deltas():
    valid = np.array([[True, True, False]])
    labels, deltas = rpn_targets(ANCHORS, GT, valid, num_samples=6, positive_fraction=0.5, seed=0)
    labels, deltas = _np(labels)[0], _np(deltas)[0]
    np.testing.assert_array_equal(labels, [1, 1, -1, 0, 1, 0])
    # Anchor 1 (0, 0, 10, 8) -> gt (0, 0, 10, 10): dx = (5 - 4) / 8, dw = log(10 / 8).
    np.testing.assert_allclose(deltas[1], [0, 1 / 8, 0, math.log(10 / 8)], atol=1e-6)
    # Anchor 4 (50, 50, 60, 60) -> gt 1 (55, 55, 65, 65): dy = dx = 0.5.
    np.testing.assert_allclose(deltas[4], [0.5, 0.5, 0, 0], atol=1e-6)
    np.testing.assert_array_equal(deltas[[0, 2, 3, 5]], 0.0)


def test_sample_proposals_hand_case():
    proposals = np.array(
        [
            [
                [0, 0, 10, 9],  # IoU 0.9 with gt 0 -> fg
                [20, 20, 30, 30],  # IoU 1 with gt 1 -> fg
                [0, 6, 10, 16],  # IoU 40/160 = 0.25 -> bg
                [80, 80, 90, 90],  # IoU 0 -> bg
                [0, 3, 10, 13],  # IoU 70/130 = 0.538 -> fg
                [1, 1, 2, 2],  # padding (invalid)
            ]
        ],
        "float32",
    )
    gt = np.array([[[0, 0, 10, 10], [20, 20, 30, 30], [0, 0, 0, 0]]], "float32")
    classes = np.array([[1, 2, 0]], "int32")
    valid = np.array([[True, True, False]])
    pvalid = np.array([[True] * 5 + [False]])
    out = sample_proposals(
        proposals,
        gt,
        classes,
        valid,
        num_samples=8,
        positive_fraction=0.5,
        seed=0,
        proposal_valid=pvalid,
    )
    out = {k: _np(v)[0] for k, v in out.items()}
    # Candidates: 5 valid proposals + 2 valid gt boxes = 5 fg (3 + 2 gt), 2 bg. 4 fg slots.
    assert out["positive"].sum() == 4
    assert out["valid"].sum() == 6  # 4 fg + 2 bg (fewer than the 4 negative slots)
    np.testing.assert_array_equal(out["positive"], [1, 1, 1, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(out["valid"], [1, 1, 1, 1, 1, 1, 0, 0])
    np.testing.assert_array_equal(out["class_targets"][4:], [0, 0, -1, -1])
    # Every positive targets its matched gt: class and deltas from the definition.
    for i in range(4):
        m = out["matched_gt_index"][i]
        assert out["class_targets"][i] == classes[0, m]
        roi, g = out["rois"][i], gt[0, m]
        rh, rw = roi[2] - roi[0], roi[3] - roi[1]
        expected = [
            10 * ((g[0] + g[2]) / 2 - (roi[0] + roi[2]) / 2) / rh,
            10 * ((g[1] + g[3]) / 2 - (roi[1] + roi[3]) / 2) / rw,
            5 * np.log((g[2] - g[0]) / rh),
            5 * np.log((g[3] - g[1]) / rw),
        ]
        np.testing.assert_allclose(out["box_targets"][i], expected, atol=1e-5)
    # Backgrounds are the two bg proposals.
    bg = sorted(map(tuple, out["rois"][4:6].tolist()))
    assert bg == sorted([(0.0, 6.0, 10.0, 16.0), (80.0, 80.0, 90.0, 90.0)])
    np.testing.assert_array_equal(out["box_targets"][4:], 0.0)


def test_sample_proposals_no_gt_and_graph():
    rng = np.random.default_rng(0)
    yx = rng.uniform(0, 100, (2, 40, 2))
    proposals = np.concatenate([yx, yx + 10], -1).astype("float32")
    gt = np.zeros((2, 4, 4), "float32")
    gt[0, 0] = proposals[0, 0]
    valid = np.zeros((2, 4), bool)
    valid[0, 0] = True

    @tf.function
    def f(p, g, v):
        return sample_proposals(p, g, np.ones((2, 4), "int32"), v, num_samples=16, seed=2)

    out = {k: v.numpy() for k, v in f(proposals, gt, valid).items()}
    assert out["rois"].shape == (2, 16, 4)
    # Image 1 has no valid gt: only background; image 0 has >= 2 positives (gt and its copy).
    assert out["positive"][1].sum() == 0 and out["valid"][1].all()
    assert out["positive"][0].sum() >= 2
    assert (out["class_targets"][0][out["positive"][0]] == 1).all()


def test_mask_targets_hand_case():
    inst = np.zeros((1, 16, 16), "int32")
    inst[0, 4:8, 4:12] = 3  # a 4 x 8 rectangle
    inst[0, 8:12, 0:4] = 5
    rois = np.array(
        [
            [
                [4, 4, 8, 12],  # exactly instance 3 -> all ones
                [4, 4, 12, 12],  # top half is instance 3
                [0, 0, 16, 16],  # whole image, instance 5 in its quarter (8:12, 0:4)
                [4, 4, 8, 12],  # id 0 (negative ROI) -> empty
            ]
        ],
        "float32",
    )
    ids = np.array([[3, 3, 5, 0]], "int32")
    m = _np(mask_targets(inst, rois, ids, size=4))
    assert m.shape == (1, 4, 4, 4)
    np.testing.assert_array_equal(m[0, 0], 1.0)
    np.testing.assert_array_equal(m[0, 1], [[1] * 4, [1] * 4, [0] * 4, [0] * 4])
    expected = np.zeros((4, 4))
    expected[2, 0] = 1  # 16 px image, 4 px bins: rows 8:12 -> bin 2, cols 0:4 -> bin 0
    np.testing.assert_array_equal(m[0, 2], expected)
    np.testing.assert_array_equal(m[0, 3], 0.0)


def test_mask_targets_size28_reference():
    # A disc; each output pixel is 1 when the bin's sampled coverage is >= 0.5.
    yy, xx = np.mgrid[0:40, 0:40]
    inst = ((yy - 20) ** 2 + (xx - 18) ** 2 < 100).astype("int32")[None] * 7
    roi = np.array([[[9.0, 7.0, 31.0, 29.0]]], "float32")
    m = _np(mask_targets(inst, roi, np.array([[7]]), size=28, sampling_ratio=2))[0, 0]
    # Reference: nearest-pixel lookup at the 2 x 2 sample points of each bin (the map is
    # piecewise constant and samples falling exactly between pixels are rare).
    ref = np.zeros((28, 28))
    b = 22 / 28
    for i in range(28):
        for j in range(28):
            vals = []
            for sy in range(2):
                for sx in range(2):
                    y = 9 + (i + (sy + 0.5) / 2) * b
                    x = 7 + (j + (sx + 0.5) / 2) * b
                    # bilinear of the 0/1 mask at (y - 0.5, x - 0.5)
                    yc, xc = y - 0.5, x - 0.5
                    y0, x0 = int(np.floor(yc)), int(np.floor(xc))
                    ly, lx = yc - y0, xc - x0
                    mk = inst[0] > 0
                    vals.append(
                        (1 - ly) * (1 - lx) * mk[y0, x0]
                        + (1 - ly) * lx * mk[y0, x0 + 1]
                        + ly * (1 - lx) * mk[y0 + 1, x0]
                        + ly * lx * mk[y0 + 1, x0 + 1]
                    )
            ref[i, j] = float(np.mean(vals) >= 0.5)
    np.testing.assert_array_equal(m, ref)
    assert 0.5 < m.mean() < 0.75  # disc of radius 10 in a 22 px box: pi 100 / 484 = 0.65


def test_bad_args():
    with pytest.raises(ValueError, match="num_samples"):
        sample_balanced(np.zeros(5, "int32"), 0)
    with pytest.raises(ValueError, match="positive_fraction"):
        sample_balanced(np.zeros(5, "int32"), 4, 1.5)
