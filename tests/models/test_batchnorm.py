"""Tests for kerasnuc.models.batchnorm: the re-estimated moving statistics are the averages over
the batches of each layer's per-channel batch mean and (biased) variance, computed here by hand
in numpy from the definition of a training-mode batch norm; frozen and unselected layers keep
theirs.

The model: ``x (B, 4, 4, 3) -> 1x1 conv W1 -> BN1 -> ReLU -> 1x1 conv W2 -> BN2`` (no biases),
so the input of BN1 is ``x @ W1`` and that of BN2 is ``relu(bn1_train(x @ W1)) @ W2``.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kerasnuc.models.batchnorm import reestimate_batch_norm, reestimated_layers

EPS = 1e-3  # Keras' default BatchNormalization epsilon


def _model(seed: int = 0) -> keras.Model:
    init = keras.initializers.RandomNormal(stddev=1.0, seed=seed)
    inputs = keras.Input((4, 4, 3))
    x = keras.layers.Conv2D(5, 1, use_bias=False, kernel_initializer=init, name="c1")(inputs)
    x = keras.layers.BatchNormalization(
        gamma_initializer=keras.initializers.Constant(1.5),
        beta_initializer=keras.initializers.Constant(0.2),
        name="bn1",
    )(x)
    x = keras.layers.ReLU()(x)
    init2 = keras.initializers.RandomNormal(stddev=1.0, seed=seed + 1)
    x = keras.layers.Conv2D(2, 1, use_bias=False, kernel_initializer=init2, name="c2")(x)
    x = keras.layers.BatchNormalization(name="bn2")(x)
    return keras.Model(inputs, x)


def _batches(rng, n=3, size=2):
    # Different offsets per batch, so that the batch statistics differ between batches.
    return [(rng.normal(size=(size, 4, 4, 3)) + k).astype(np.float32) for k in range(n)]


def _hand_statistics(model, batches):
    """Per batch: per-channel mean and biased variance of the inputs of bn1 and bn2."""
    w1 = model.get_layer("c1").kernel.numpy()[0, 0].astype(np.float64)  # (3, 5)
    w2 = model.get_layer("c2").kernel.numpy()[0, 0].astype(np.float64)  # (5, 2)
    stats = {"bn1": [], "bn2": []}
    for x in batches:
        h1 = x.astype(np.float64).reshape(-1, 3) @ w1
        m1, v1 = h1.mean(0), h1.var(0)
        stats["bn1"].append((m1, v1))
        a1 = np.maximum((h1 - m1) / np.sqrt(v1 + EPS) * 1.5 + 0.2, 0.0)
        h2 = a1 @ w2
        stats["bn2"].append((h2.mean(0), h2.var(0)))
    return {
        k: (np.mean([m for m, _ in v], 0), np.mean([s for _, s in v], 0)) for k, v in stats.items()
    }


def test_moving_statistics_are_batch_averages(rng):
    model = _model()
    batches = _batches(rng)
    expected = _hand_statistics(model, batches)
    kernels = [model.get_layer(n).kernel.numpy() for n in ("c1", "c2")]
    assert reestimate_batch_norm(model, iter(batches)) == 3
    for name in ("bn1", "bn2"):
        bn = model.get_layer(name)
        np.testing.assert_allclose(bn.moving_mean.numpy(), expected[name][0], rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(
            bn.moving_variance.numpy(), expected[name][1], rtol=1e-4, atol=1e-5
        )
        assert bn.momentum == 0.99  # restored
    # The weights themselves did not move.
    np.testing.assert_array_equal(model.get_layer("bn1").gamma.numpy(), np.full(5, 1.5, np.float32))
    np.testing.assert_array_equal(model.get_layer("bn1").beta.numpy(), np.full(5, 0.2, np.float32))
    for name, kernel in zip(("c1", "c2"), kernels, strict=True):
        np.testing.assert_array_equal(model.get_layer(name).kernel.numpy(), kernel)


def test_one_batch_makes_inference_mode_equal_training_mode(rng):
    model = _model()
    x = _batches(rng, n=1, size=4)[0]
    reestimate_batch_norm(model, [x])
    train = np.asarray(model(x, training=True))
    infer = np.asarray(model(x, training=False))
    # Equal up to the epsilon handling: both normalise by (var + eps) with the same statistics.
    np.testing.assert_allclose(infer, train, atol=1e-4)


def test_frozen_and_unselected_layers_keep_their_statistics(rng):
    model = _model()
    bn1, bn2 = model.get_layer("bn1"), model.get_layer("bn2")
    bn1.moving_mean.assign(np.full(5, 7.0, np.float32))
    bn1.trainable = False
    assert reestimated_layers(model) == [bn2]
    batches = _batches(rng)
    reestimate_batch_norm(model, batches)
    np.testing.assert_array_equal(bn1.moving_mean.numpy(), np.full(5, 7.0))
    assert not np.allclose(bn2.moving_mean.numpy(), 0.0)

    # Selected explicitly, a frozen layer is calibrated (and stays frozen); bn2, trainable but
    # not selected, keeps its statistics although the forward passes run in training mode.
    before = bn2.moving_mean.numpy().copy(), bn2.moving_variance.numpy().copy()
    fresh = _model()
    expected = _hand_statistics(fresh, batches)["bn1"]
    reestimate_batch_norm(model, batches, layers=[bn1])
    assert bn1.trainable is False
    np.testing.assert_allclose(bn1.moving_mean.numpy(), expected[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(bn1.moving_variance.numpy(), expected[1], rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(bn2.moving_mean.numpy(), before[0])
    np.testing.assert_array_equal(bn2.moving_variance.numpy(), before[1])


def test_bad_input():
    model = _model()
    with pytest.raises(ValueError, match="`batches` is empty"):
        reestimate_batch_norm(model, [])
    assert model.get_layer("bn1").momentum == 0.99
    with pytest.raises(ValueError, match="must be BatchNormalization layers. Received: Conv2D"):
        reestimate_batch_norm(model, [np.zeros((1, 4, 4, 3))], layers=[model.get_layer("c1")])
