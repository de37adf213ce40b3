"""Hand-computed tests of the conic losses on 2x2 images."""

import keras
import numpy as np
import pytest

from kerasnuc.losses.conic import (
    CentreVectorLoss,
    WeightedSemanticLoss,
    conic_losses,
    initial_class_frequency,
)

# One 2x2 image, K = 3 classes (background + 2 cell types).
LABELS = np.array([[[0, 1], [2, 0]]])
PROBS = np.array(
    [
        [
            [[0.7, 0.2, 0.1], [0.1, 0.6, 0.3]],
            [[0.2, 0.2, 0.6], [0.5, 0.25, 0.25]],
        ]
    ],
    dtype=np.float32,
)


def _expected_weighted_ce(labels, probs, weights, smoothing):
    """sum_n sum_c w_c y~_nc (-log p_nc) / sum_n w_{y_n}, written out pixel by pixel."""
    k = probs.shape[-1]
    numerator = 0.0
    denominator = 0.0
    for index in np.ndindex(labels.shape):
        y = labels[index]
        for c in range(k):
            smoothed = (1 - smoothing) * (c == y) + smoothing / k
            numerator += weights[c] * smoothed * -np.log(probs[index][c])
        denominator += weights[y]
    return numerator / denominator


def _value(x):
    return float(keras.ops.convert_to_numpy(x))


def test_initial_prior_is_uniform():
    np.testing.assert_allclose(initial_class_frequency(2), [1 / 3, 1 / 3, 1 / 3])
    loss = WeightedSemanticLoss(num_classes=2)
    np.testing.assert_allclose(loss.class_frequency.numpy(), [1 / 3, 1 / 3, 1 / 3])


def test_weighted_semantic_loss_two_steps():
    loss = WeightedSemanticLoss(num_classes=2, rho=3.0, label_smoothing=0.05, momentum=0.9)

    # Step 1: batch frequency (2/4, 1/4, 1/4); X = 0.9 * 1/3 + 0.1 * batch.
    value = _value(loss(LABELS, PROBS))
    prior_1 = np.array([0.35, 0.325, 0.325])
    np.testing.assert_allclose(loss.class_frequency.numpy(), prior_1, rtol=1e-6)
    weights_1 = (1 - prior_1) ** 3  # 0.274625, 0.307547, 0.307547
    expected = _expected_weighted_ce(LABELS, PROBS, weights_1, 0.05)
    assert value == pytest.approx(expected, rel=1e-5)

    # Step 2: labels (1, 1; 1, 0), batch frequency (1/4, 3/4, 0).
    labels_2 = np.array([[[1, 1], [1, 0]]])
    value = _value(loss(labels_2, PROBS))
    prior_2 = np.array([0.9 * 0.35 + 0.1 * 0.25, 0.9 * 0.325 + 0.1 * 0.75, 0.9 * 0.325])
    np.testing.assert_allclose(prior_2, [0.34, 0.3675, 0.2925])
    np.testing.assert_allclose(loss.class_frequency.numpy(), prior_2, rtol=1e-6)
    expected = _expected_weighted_ce(labels_2, PROBS, (1 - prior_2) ** 3, 0.05)
    assert value == pytest.approx(expected, rel=1e-5)


def test_unknown_class_pixels_are_ignored():
    loss = WeightedSemanticLoss(num_classes=2, rho=3.0, label_smoothing=0.05, momentum=0.9)
    labels = np.array([[[0, -1], [2, 0]]])  # pixel (0, 1): a nucleus of unknown type
    value = _value(loss(labels, PROBS))
    # prior update from the 3 known pixels only: batch frequency (2/3, 0, 1/3)
    prior = 0.9 / 3 + 0.1 * np.array([2 / 3, 0.0, 1 / 3])
    np.testing.assert_allclose(loss.class_frequency.numpy(), prior, rtol=1e-6)
    known = [(0, 0, 0), (0, 1, 0), (0, 1, 1)]
    weights = (1 - prior) ** 3
    numerator = sum(
        weights[c] * ((1 - 0.05) * (c == labels[i]) + 0.05 / 3) * -np.log(PROBS[i][c])
        for i in known
        for c in range(3)
    )
    expected = numerator / sum(weights[labels[i]] for i in known)
    assert value == pytest.approx(expected, rel=1e-5)


def test_all_unknown_batch_gives_zero_and_keeps_prior():
    loss = WeightedSemanticLoss(num_classes=2, momentum=0.9)
    value = _value(loss(np.full((1, 2, 2), -1), PROBS))
    assert value == 0.0
    np.testing.assert_allclose(loss.class_frequency.numpy(), [1 / 3] * 3)


def test_no_update_uses_current_prior():
    loss = WeightedSemanticLoss(num_classes=2)
    loss.update_frequency = False
    value = _value(loss(LABELS, PROBS))
    np.testing.assert_allclose(loss.class_frequency.numpy(), [1 / 3] * 3)
    # Equal weights: the mean smoothed cross-entropy over the 4 pixels.
    expected = 0.0
    for index in np.ndindex(LABELS.shape):
        smoothed = np.full(3, 0.05 / 3)
        smoothed[LABELS[index]] += 0.95
        expected += -np.sum(smoothed * np.log(PROBS[index])) / 4
    assert value == pytest.approx(expected, rel=1e-5)


def test_plain_cross_entropy_without_weighting_and_smoothing():
    loss = WeightedSemanticLoss(num_classes=2, rho=0.0, label_smoothing=0.0)
    expected = -(np.log(0.7) + np.log(0.6) + np.log(0.6) + np.log(0.5)) / 4
    assert _value(loss(LABELS, PROBS)) == pytest.approx(expected, rel=1e-5)


def test_trailing_channel_in_targets():
    a = WeightedSemanticLoss(num_classes=2)
    b = WeightedSemanticLoss(num_classes=2)
    assert _value(a(LABELS[..., None], PROBS)) == pytest.approx(_value(b(LABELS, PROBS)))


def test_bind_class_frequency():
    loss = WeightedSemanticLoss(num_classes=2, momentum=0.5)
    prior = keras.Variable(np.array([0.5, 0.25, 0.25], dtype=np.float32), trainable=False)
    loss.bind_class_frequency(prior)
    loss(LABELS, PROBS)
    # Batch frequency equals the prior: unchanged.
    np.testing.assert_allclose(prior.numpy(), [0.5, 0.25, 0.25])
    loss(np.zeros_like(LABELS), PROBS)
    np.testing.assert_allclose(prior.numpy(), [0.75, 0.125, 0.125])
    with pytest.raises(ValueError, match=r"must have shape \(3,\)"):
        loss.bind_class_frequency(keras.Variable(np.zeros(4, dtype=np.float32)))


def test_semantic_config_round_trip():
    loss = WeightedSemanticLoss(num_classes=6, rho=2.0, label_smoothing=0.1, momentum=0.95)
    config = loss.get_config()
    assert {k: config[k] for k in ("num_classes", "rho", "label_smoothing", "momentum")} == {
        "num_classes": 6,
        "rho": 2.0,
        "label_smoothing": 0.1,
        "momentum": 0.95,
    }
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, WeightedSemanticLoss)
    assert restored.get_config() == config


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_classes": 0}, "`num_classes` must be a positive int"),
        ({"num_classes": 2, "momentum": 1.0}, "`momentum` must be in"),
        ({"num_classes": 2, "label_smoothing": -0.1}, "`label_smoothing` must be in"),
        ({"num_classes": 2, "rho": -1.0}, "`rho` must be >= 0"),
    ],
)
def test_semantic_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        WeightedSemanticLoss(**kwargs)


def test_three_label_cross_entropy():
    loss = conic_losses(num_classes=2)["three_label"]
    labels = np.array([[[0, 1], [2, 1]]])
    expected = -(np.log(0.7) + np.log(0.6) + np.log(0.6) + np.log(0.25)) / 4
    assert _value(loss(labels, PROBS)) == pytest.approx(expected, rel=1e-5)


def test_conic_losses_keys():
    losses = conic_losses(num_classes=6)
    assert sorted(losses) == ["semantic", "three_label", "vectors"]
    assert isinstance(losses["semantic"], WeightedSemanticLoss)
    assert losses["semantic"].num_classes == 6
    assert isinstance(losses["vectors"], CentreVectorLoss)


def _vector_target():
    target = np.zeros((1, 2, 2, 3), dtype=np.float32)
    target[0, 0, 0] = (1.0, -2.0, 1.0)
    target[0, 1, 0] = (0.0, 3.0, 1.0)
    target[0, 0, 1] = (5.0, 5.0, 0.0)  # background: ignored
    pred = np.zeros((1, 2, 2, 2), dtype=np.float32)
    pred[0, 0, 0] = (0.5, -1.0)  # squared errors 0.25, 1.0 -> 0.625
    pred[0, 1, 0] = (1.0, 1.0)  # squared errors 1.0, 4.0 -> 2.5
    pred[0, 0, 1] = (10.0, -10.0)
    pred[0, 1, 1] = (-7.0, 3.0)
    return target, pred


def test_centre_vector_loss_foreground_only():
    target, pred = _vector_target()
    assert _value(CentreVectorLoss()(target, pred)) == pytest.approx((0.625 + 2.5) / 2)


def test_centre_vector_loss_mean_over_batch_foreground():
    target, pred = _vector_target()
    empty = target.copy()
    empty[..., 2] = 0.0
    batch_target = np.concatenate([empty, target])
    batch_pred = np.concatenate([pred, pred])
    # Two foreground pixels in the whole batch.
    assert _value(CentreVectorLoss()(batch_target, batch_pred)) == pytest.approx(1.5625)


def test_centre_vector_loss_all_background_is_zero():
    target, pred = _vector_target()
    target[..., 2] = 0.0
    value = _value(CentreVectorLoss()(target, pred))
    assert value == 0.0
    assert np.isfinite(value)


def test_centre_vector_config_round_trip():
    loss = CentreVectorLoss(name="vec")
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(loss))
    assert isinstance(restored, CentreVectorLoss)
    assert restored.get_config() == loss.get_config()
