"""Anchors against hand-computed positions, counts and a dynamic-shape trace."""

from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf
from keras import ops

from kerasnuc.models.panoptic.anchors import (
    AnchorConfig,
    anchors_per_location,
    generate_anchors,
    level_anchor_counts,
)


def test_config_round_trip_and_checks():
    cfg = AnchorConfig(sizes=(6, 12, 24, 48, 96), scales_per_octave=3)
    assert AnchorConfig.from_dict(cfg.to_dict()) == cfg
    assert AnchorConfig.from_dict(AnchorConfig().to_dict()) == AnchorConfig()
    assert cfg.scales == pytest.approx((1.0, 2 ** (1 / 3), 2 ** (2 / 3)))
    with pytest.raises(ValueError, match="sizes"):
        AnchorConfig(sizes=(8, 16))
    with pytest.raises(ValueError, match="scales_per_octave"):
        AnchorConfig(scales_per_octave=0)
    with pytest.raises(ValueError, match="Unknown"):
        AnchorConfig.from_dict({"bogus": 1})


def test_counts_default():
    cfg = AnchorConfig()
    assert anchors_per_location(cfg) == 6
    counts = level_anchor_counts(512, 512, cfg)
    assert counts == [128 * 128 * 6, 64 * 64 * 6, 32 * 32 * 6, 16 * 16 * 6, 8 * 8 * 6]
    # Non-divisible sizes: ceil(100 / s) x ceil(70 / s).
    assert level_anchor_counts(100, 70, cfg) == [
        25 * 18 * 6,
        13 * 9 * 6,
        7 * 5 * 6,
        4 * 3 * 6,
        2 * 2 * 6,
    ]
    anchors = ops.convert_to_numpy(generate_anchors(100, 70, cfg))
    assert anchors.shape == (sum(level_anchor_counts(100, 70, cfg)), 4)


def test_positions_and_shapes_by_hand():
    cfg = AnchorConfig(
        levels=("P2", "P3"),
        strides=(4, 8),
        sizes=(8, 16),
        aspect_ratios=(1.0, 2.0),
        scales_per_octave=1,
    )
    a = ops.convert_to_numpy(generate_anchors(16, 8, cfg))
    # P2: 4 x 2 positions x 2 anchors = 16; P3: 2 x 1 x 2 = 4.
    assert a.shape == (20, 4)
    r2 = math.sqrt(2.0)
    # First position (0, 0) of P2: centre (2, 2); ratio 1 -> 8 x 8, ratio 2 -> h 8 r2, w 8 / r2.
    np.testing.assert_allclose(a[0], [-2, -2, 6, 6], atol=1e-5)
    np.testing.assert_allclose(a[1], [2 - 4 * r2, 2 - 4 / r2, 2 + 4 * r2, 2 + 4 / r2], atol=1e-5)
    # Row-major: index 2 is position (0, 1) (centre (2, 6)), index 4 is position (1, 0).
    np.testing.assert_allclose(a[2], [-2, 2, 6, 10], atol=1e-5)
    np.testing.assert_allclose(a[4], [2, -2, 10, 6], atol=1e-5)
    # Last P2 position (3, 1): centre (14, 6).
    np.testing.assert_allclose(a[14], [10, 2, 18, 10], atol=1e-5)
    # P3 starts at 16: position (0, 0), centre (4, 4), size 16; position (1, 0), centre (12, 4).
    np.testing.assert_allclose(a[16], [-4, -4, 12, 12], atol=1e-5)
    np.testing.assert_allclose(a[18], [4, -4, 20, 12], atol=1e-5)


def test_scales_per_octave_areas():
    cfg = AnchorConfig()
    a = ops.convert_to_numpy(generate_anchors(64, 64, cfg))[:6]
    areas = (a[:, 2] - a[:, 0]) * (a[:, 3] - a[:, 1])
    np.testing.assert_allclose(areas, [64, 64, 64, 128, 128, 128], rtol=1e-5)
    ratios = (a[:, 2] - a[:, 0]) / (a[:, 3] - a[:, 1])
    np.testing.assert_allclose(ratios, [0.5, 1, 2, 0.5, 1, 2], rtol=1e-5)


def test_dynamic_shape_trace():
    cfg = AnchorConfig()

    @tf.function(input_signature=[tf.TensorSpec((None, None, 3), tf.float32)])
    def f(image):
        shape = tf.shape(image)
        return generate_anchors(shape[0], shape[1], cfg)

    for h, w in [(64, 64), (100, 70)]:
        got = f(tf.zeros((h, w, 3))).numpy()
        np.testing.assert_allclose(got, ops.convert_to_numpy(generate_anchors(h, w, cfg)))


def test_explicit_sizes():
    cfg = AnchorConfig()
    sizes = [(3, 2), (2, 1), (1, 1), (1, 1), (1, 1)]
    a = ops.convert_to_numpy(generate_anchors(0, 0, cfg, sizes=sizes))
    assert a.shape == ((6 + 2 + 1 + 1 + 1) * 6, 4)
