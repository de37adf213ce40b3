"""Tests for kerasnuc.losses.focal_tversky against hand-computed values."""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasnuc.losses.focal_tversky import FocalTversky, focal_tversky_loss, tversky_index

# One 2x2 image, 2 classes. Labels [[0, 1], [1, 0]]; P(class 1) = [[0.1, 0.8], [0.4, 0.3]].
LABELS = np.array([[[0, 1], [1, 0]]])
P1 = np.array([[[0.1, 0.8], [0.4, 0.3]]])
Y_TRUE = np.stack([1 - LABELS, LABELS], axis=-1).astype("float32")
Y_PRED = np.stack([1 - P1, P1], axis=-1).astype("float32")
# Soft counts by hand:
# class 1: TP = 0.8 + 0.4 = 1.2, FN = 0.2 + 0.6 = 0.8, FP = 0.1 + 0.3 = 0.4
# class 0: TP = 0.9 + 0.7 = 1.6, FN = 0.1 + 0.3 = 0.4, FP = 0.2 + 0.6 = 0.8
TP = {0: 1.6, 1: 1.2}
FN = {0: 0.4, 1: 0.8}
FP = {0: 0.8, 1: 0.4}


def _ti(c, beta, smooth):
    return (TP[c] + smooth) / (TP[c] + beta * FN[c] + (1 - beta) * FP[c] + smooth)


def _np(x):
    return keras.ops.convert_to_numpy(x)


@pytest.mark.parametrize("smooth", [0.0, 1.0])
def test_tversky_index_hand_values(smooth):
    ti = _np(tversky_index(Y_TRUE, Y_PRED, beta=0.7, smooth=smooth))
    # smooth 0: class 0 -> 1.6 / 2.12, class 1 -> 1.2 / 1.88
    np.testing.assert_allclose(ti, [_ti(0, 0.7, smooth), _ti(1, 0.7, smooth)], rtol=1e-6)
    if smooth == 0.0:
        np.testing.assert_allclose(ti, [1.6 / 2.12, 1.2 / 1.88], rtol=1e-6)


def test_focal_tversky_hand_values():
    loss = FocalTversky(beta=0.7, gamma=4 / 3, smooth=0.0)
    expected = (1 - 1.6 / 2.12) ** 0.75 + (1 - 1.2 / 1.88) ** 0.75
    np.testing.assert_allclose(_np(loss(Y_TRUE, Y_PRED)), expected, rtol=1e-5)


def test_exclude_background_and_mean():
    fg_only = FocalTversky(smooth=0.0, include_background=False)
    np.testing.assert_allclose(_np(fg_only(Y_TRUE, Y_PRED)), (1 - 1.2 / 1.88) ** 0.75, rtol=1e-5)
    mean = FocalTversky(smooth=0.0, class_reduction="mean")
    expected = ((1 - 1.6 / 2.12) ** 0.75 + (1 - 1.2 / 1.88) ** 0.75) / 2
    np.testing.assert_allclose(_np(mean(Y_TRUE, Y_PRED)), expected, rtol=1e-5)


def test_beta_weights_false_negatives():
    # Foreground truth [1, 1, 0, 0]. Missing one pixel (FN = 1) vs one extra pixel (FP = 1).
    y_true = np.array([1.0, 1.0, 0.0, 0.0], "float32").reshape(1, 2, 2, 1)
    missed = np.array([1.0, 0.0, 0.0, 0.0], "float32").reshape(1, 2, 2, 1)
    extra = np.array([1.0, 1.0, 1.0, 0.0], "float32").reshape(1, 2, 2, 1)
    np.testing.assert_allclose(
        _np(tversky_index(y_true, missed, beta=0.7, smooth=0.0)), [1 / (1 + 0.7)], rtol=1e-6
    )
    np.testing.assert_allclose(
        _np(tversky_index(y_true, extra, beta=0.7, smooth=0.0)), [2 / (2 + 0.3)], rtol=1e-6
    )


def test_beta_half_is_dice(rng):
    labels = rng.integers(0, 3, size=(2, 5, 6))
    y_true = np.eye(3, dtype="float32")[labels]
    logits = rng.normal(size=(2, 5, 6, 3))
    y_pred = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype("float32")
    dice = 2 * (y_true * y_pred).sum((0, 1, 2)) / (y_true.sum((0, 1, 2)) + y_pred.sum((0, 1, 2)))
    ti = _np(tversky_index(y_true, y_pred, beta=0.5, smooth=0.0))
    np.testing.assert_allclose(ti, dice, rtol=1e-5)
    loss = FocalTversky(beta=0.5, gamma=1.0, smooth=0.0, class_reduction="mean")
    np.testing.assert_allclose(_np(loss(y_true, y_pred)), np.mean(1 - dice), rtol=1e-5)


@pytest.mark.parametrize("smooth", [0.0, 1.0])
def test_perfect_prediction_zero_loss_finite_gradient(smooth):
    y_true = Y_TRUE
    y_pred = keras.Variable(Y_TRUE.copy())
    loss = FocalTversky(smooth=smooth)
    assert float(_np(loss(y_true, y_pred))) == 0.0
    with tf.GradientTape() as tape:
        value = loss(y_true, y_pred)
    grad = _np(tape.gradient(value, y_pred.value))
    assert np.all(np.isfinite(grad))


def test_absent_class_costs_nothing_with_smooth():
    # Class 2 is in neither truth nor prediction: TI = (0 + 1) / (0 + 1) = 1.
    y_true = np.concatenate([Y_TRUE, np.zeros_like(Y_TRUE[..., :1])], axis=-1)
    y_pred = np.concatenate([Y_PRED, np.zeros_like(Y_PRED[..., :1])], axis=-1)
    with_absent = _np(FocalTversky(smooth=1.0)(y_true, y_pred))
    without = _np(FocalTversky(smooth=1.0)(Y_TRUE, Y_PRED))
    expected = (1 - _ti(0, 0.7, 1.0)) ** 0.75 + (1 - _ti(1, 0.7, 1.0)) ** 0.75
    np.testing.assert_allclose([with_absent, without], [expected, expected], rtol=1e-5)


def test_per_image():
    # Image 0 as above; image 1 a perfect prediction of all-background.
    background = np.stack([np.ones((1, 2, 2)), np.zeros((1, 2, 2))], axis=-1)
    y_true = np.concatenate([Y_TRUE, background]).astype("float32")
    y_pred = np.concatenate([Y_PRED, background]).astype("float32")
    # smooth 1, image 1: class 0 TI = (4 + 1) / (4 + 1), class 1 TI = (0 + 1) / (0 + 1): no loss
    first = (1 - _ti(0, 0.7, 1.0)) ** 0.75 + (1 - _ti(1, 0.7, 1.0)) ** 0.75
    per_image = _np(focal_tversky_loss(y_true, y_pred, smooth=1.0, per_image=True))
    np.testing.assert_allclose(per_image, [first, 0.0], rtol=1e-5, atol=1e-7)
    keras_loss = FocalTversky(smooth=1.0, per_image=True)  # Keras averages over images
    np.testing.assert_allclose(_np(keras_loss(y_true, y_pred)), first / 2, rtol=1e-5)
    # Pooled over the batch: class 1 unchanged, class 0 gains TP = 4.
    pooled = _np(FocalTversky(smooth=0.0)(y_true, y_pred))
    expected = (1 - 5.6 / (5.6 + 0.7 * 0.4 + 0.3 * 0.8)) ** 0.75 + (1 - 1.2 / 1.88) ** 0.75
    np.testing.assert_allclose(pooled, expected, rtol=1e-5)


def test_sparse_and_logits_match_one_hot():
    logits = np.log(Y_PRED)
    dense = _np(FocalTversky()(Y_TRUE, Y_PRED))
    sparse = _np(FocalTversky(sparse=True)(LABELS, Y_PRED))
    sparse_4d = _np(FocalTversky(sparse=True)(LABELS[..., None], Y_PRED))
    from_logits = _np(FocalTversky(from_logits=True)(Y_TRUE, logits))
    np.testing.assert_allclose([sparse, sparse_4d, from_logits], [dense] * 3, rtol=1e-5)


def test_serialization_round_trip():
    loss = FocalTversky(beta=0.6, gamma=2.0, include_background=False, class_reduction="mean")
    restored = keras.losses.deserialize(keras.losses.serialize(loss))
    assert isinstance(restored, FocalTversky)
    assert restored.get_config() == loss.get_config()


def test_trains_in_model(rng):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((None, None, 3))
    outputs = keras.layers.Conv2D(3, 1, activation="softmax")(inputs)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer=keras.optimizers.Adam(0.05), loss=FocalTversky(sparse=True))
    x = rng.random((4, 8, 8, 3)).astype("float32")
    y = np.argmax(x, axis=-1)  # learnable: the class is the brightest channel
    history = model.fit(x, y, batch_size=4, epochs=15, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses))
    assert losses[-1] < losses[0]


def test_argument_checks():
    with pytest.raises(ValueError, match=r"`beta` must be a float in \[0, 1\]. Received: beta=1.5"):
        FocalTversky(beta=1.5)
    with pytest.raises(ValueError, match="`gamma` must be a float > 0"):
        FocalTversky(gamma=0)
    with pytest.raises(ValueError, match="`class_reduction` must be one of"):
        FocalTversky(class_reduction="max")
    with pytest.raises(ValueError, match="needs at least 2 classes"):
        FocalTversky(include_background=False)(Y_TRUE[..., 1:], Y_PRED[..., 1:])
