"""Losses of the `weak` method against values computed by hand from Eq. 1-3 of the paper."""

from __future__ import annotations

import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasnuc.losses.weak import (
    BACKGROUND,
    IGNORE,
    NUCLEUS,
    ClusterLoss,
    RepelLoss,
    VoronoiLoss,
)


def seg_from_nucleus(p):
    """(B, H, W) nucleus probabilities -> (B, H, W, 2) softmax output [background, nucleus]."""
    p = np.asarray(p, dtype=np.float32)
    return np.stack([1.0 - p, p], axis=-1)


# One 2x2 image; nucleus probabilities and Voronoi labels (0 line, 1 point, 255 ignored).
P1 = [[[0.2, 0.9], [0.5, 0.6]]]
VOR1 = [[[0, 1], [IGNORE, 1]]]


def test_constants():
    assert (IGNORE, BACKGROUND, NUCLEUS) == (255, 0, 1)


def test_voronoi_by_hand():
    # Labelled pixels: (0,0) bg with p_bg 0.8; (0,1) nucleus 0.9; (1,1) nucleus 0.6.
    expected = -(math.log(0.8) + math.log(0.9) + math.log(0.6)) / 3
    loss = VoronoiLoss()(np.array(VOR1, np.uint8), seg_from_nucleus(P1))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_voronoi_mean_is_over_labelled_pixels_of_the_whole_batch():
    # Image 1: 3 labelled pixels (above); image 2: 1 labelled pixel (nucleus, p 0.25).
    p = P1 + [[[0.25, 0.5], [0.5, 0.5]]]
    labels = VOR1 + [[[1, IGNORE], [IGNORE, IGNORE]]]
    expected = -(math.log(0.8) + math.log(0.9) + math.log(0.6) + math.log(0.25)) / 4
    loss = VoronoiLoss()(np.array(labels, np.int32), seg_from_nucleus(p))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_voronoi_accepts_channel_axis_and_float_labels():
    labels = np.array(VOR1, np.float32)[..., None]
    expected = -(math.log(0.8) + math.log(0.9) + math.log(0.6)) / 3
    assert float(VoronoiLoss()(labels, seg_from_nucleus(P1))) == pytest.approx(expected, rel=1e-6)


def test_voronoi_sample_weight():
    weights = np.array([[[2.0, 1.0], [5.0, 0.5]]], np.float32)  # the 5.0 is on an ignored pixel
    expected = -(2.0 * math.log(0.8) + 1.0 * math.log(0.9) + 0.5 * math.log(0.6)) / 3
    loss = VoronoiLoss()(np.array(VOR1), seg_from_nucleus(P1), sample_weight=weights)
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_all_ignored_batch_gives_zero_loss_and_zero_gradients():
    labels = np.full((2, 3, 3), IGNORE, np.uint8)
    logits = keras.Variable(np.random.default_rng(0).normal(size=(2, 3, 3, 2)), dtype="float32")
    for loss_fn in (VoronoiLoss(), ClusterLoss()):
        with tf.GradientTape() as tape:
            loss = loss_fn(labels, keras.ops.softmax(logits, axis=-1))
        grad = tape.gradient(loss, logits.value)
        assert float(loss) == 0.0
        assert np.all(np.isfinite(grad.numpy()))
        np.testing.assert_array_equal(grad.numpy(), 0.0)


def test_voronoi_gradient_by_hand():
    # d/dp of -log(p) at a nucleus pixel is -1/p / n_labelled; ignored pixels get 0.
    seg = keras.Variable(seg_from_nucleus(P1))
    with tf.GradientTape() as tape:
        loss = VoronoiLoss()(np.array(VOR1), seg)
    grad = tape.gradient(loss, seg.value).numpy()[0]
    expected = np.zeros((2, 2, 2))
    expected[0, 0, BACKGROUND] = -1 / 0.8 / 3
    expected[0, 1, NUCLEUS] = -1 / 0.9 / 3
    expected[1, 1, NUCLEUS] = -1 / 0.6 / 3
    np.testing.assert_allclose(grad, expected, rtol=1e-5)


def test_cluster_matches_paper_eq1_binary_form():
    # Eq. 1: -mean(t log o + (1 - t) log(1 - o)), o = nucleus probability, no ignored pixel.
    rng = np.random.default_rng(0)
    o = rng.uniform(0.05, 0.95, size=(2, 4, 5))
    t = rng.integers(0, 2, size=(2, 4, 5))
    expected = -np.mean(t * np.log(o) + (1 - t) * np.log(1 - o))
    loss = ClusterLoss()(t.astype(np.uint8), seg_from_nucleus(o))
    assert float(loss) == pytest.approx(expected, rel=1e-5)


def test_cluster_excludes_ignored_pixels():
    labels = [[[1, 0], [IGNORE, IGNORE]]]
    expected = -(math.log(0.2) + math.log(0.1)) / 2  # nucleus p 0.2; background p_bg 0.1
    loss = ClusterLoss()(np.array(labels), seg_from_nucleus(P1))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_zero_probability_is_clipped_not_infinite():
    labels = np.array([[[1]]], np.uint8)
    seg = np.array([[[[1.0, 0.0]]]], np.float32)
    loss = float(ClusterLoss()(labels, seg))
    assert loss == pytest.approx(-math.log(keras.config.epsilon()), rel=1e-3)


def test_repel_by_hand():
    repel = [[[0.0, 1.0], [0.25, 0.5]]]
    expected = (0.2**2 + 0.1**2 + 0.25**2 + 0.1**2) / 4
    loss = RepelLoss()(np.array(repel, np.float32), seg_from_nucleus(P1))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_repel_batch_mean_and_channel_axis():
    repel = np.array([[[0.0, 1.0], [0.25, 0.5]], [[1.0, 1.0], [1.0, 1.0]]], np.float32)
    p = P1 + [[[0.5, 0.5], [0.5, 0.5]]]
    expected = (0.2**2 + 0.1**2 + 0.25**2 + 0.1**2 + 4 * 0.5**2) / 8
    loss = RepelLoss()(repel[..., None], seg_from_nucleus(p))
    assert float(loss) == pytest.approx(expected, rel=1e-6)


def test_losses_in_a_compiled_function_with_unknown_shapes():
    spec_y = tf.TensorSpec((None, None, None), tf.float32)
    spec_p = tf.TensorSpec((None, None, None, 2), tf.float32)

    @tf.function(input_signature=[spec_y, spec_y, spec_p])
    def both(vor, repel, seg):
        return VoronoiLoss()(vor, seg), RepelLoss()(repel, seg)

    vor, repel = both(
        np.array(VOR1, np.float32),
        np.array([[[0.0, 1.0], [0.25, 0.5]]], np.float32),
        seg_from_nucleus(P1),
    )
    assert float(vor) == pytest.approx(-(math.log(0.8) + math.log(0.9) + math.log(0.6)) / 3)
    assert float(repel) == pytest.approx((0.2**2 + 0.1**2 + 0.25**2 + 0.1**2) / 4)


@pytest.mark.parametrize("cls", [VoronoiLoss, ClusterLoss, RepelLoss])
def test_config_round_trip(cls):
    loss = cls(name="custom", reduction="sum")
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert type(restored) is cls
    assert restored.name == "custom"
    assert restored.reduction == "sum"
    assert keras.saving.get_registered_name(cls) == f"kerasnuc>{cls.__name__}"


@pytest.mark.parametrize("cls", [VoronoiLoss, RepelLoss])
def test_shape_checks(cls):
    with pytest.raises(ValueError, match=r"`y_pred` must be \(B, H, W, 2\)"):
        cls()(np.zeros((1, 2, 2)), np.zeros((1, 2, 2, 3)))
    with pytest.raises(ValueError, match=r"`y_true` must be \(B, H, W\) or \(B, H, W, 1\)"):
        cls()(np.zeros((1, 2, 2, 2)), np.zeros((1, 2, 2, 2)))
