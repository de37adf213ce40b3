"""Tests for kerasnuc.layers.aspp.ASPP."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kerasnuc.layers.aspp import ASPP

BN_EPS = 1e-3  # Keras BatchNormalization default


def _mish(z):
    return z * np.tanh(np.log1p(np.exp(z)))


def _bn_inference_fresh(z):
    # Freshly built BN in inference: mean 0, variance 1, gamma 1, beta 0.
    return z / np.sqrt(1.0 + BN_EPS)


def test_matches_definition_when_rates_exceed_image(rng):
    """On a 4x4 image a 3x3 conv with dilation >= 4 only sees its centre tap (the other taps
    fall into the zero padding), so every branch reduces to a 1x1 conv and the whole layer can
    be written in a few lines of NumPy."""
    c, f = 3, 2
    layer = ASPP(filters=f, rates=[4, 7], activation="mish", dropout=0.5)
    x = rng.normal(size=(2, 4, 4, c)).astype("float32")
    layer.build(x.shape)
    kernels = []
    for conv in layer.branch_convs:
        k = rng.normal(size=tuple(conv.kernel.shape)).astype("float32")
        conv.set_weights([k])
        kernels.append(k)
    proj = rng.normal(size=(1, 1, 4 * f, f)).astype("float32")
    layer.project_conv.set_weights([proj])
    got = keras.ops.convert_to_numpy(layer(x, training=False))

    def branch(z, kernel):
        return _mish(_bn_inference_fresh(z @ kernel))

    b_1x1 = branch(x, kernels[0][0, 0])
    b_r4 = branch(x, kernels[1][1, 1])  # centre tap of the 3x3 kernel
    b_r7 = branch(x, kernels[2][1, 1])
    pooled = branch(x.mean(axis=(1, 2), keepdims=True), kernels[3][0, 0])
    b_pool = np.broadcast_to(pooled, b_1x1.shape)
    concat = np.concatenate([b_1x1, b_r4, b_r7, b_pool], axis=-1)
    expected = _mish(_bn_inference_fresh(concat @ proj[0, 0]))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_dilation_reaches_far_pixels():
    # With rate 2 on a 5x5 image, a delta at (0, 0) reaches (2, 2) through the (0, 0) tap.
    layer = ASPP(filters=1, rates=[2], activation="linear", dropout=0.0)
    x = np.zeros((1, 5, 5, 1), "float32")
    x[0, 0, 0, 0] = 1.0
    layer.build(x.shape)
    w = np.zeros((3, 3, 1, 1), "float32")
    w[0, 0] = 1.0
    layer.branch_convs[0].set_weights([np.zeros((1, 1, 1, 1), "float32")])
    layer.branch_convs[1].set_weights([w])
    layer.branch_convs[2].set_weights([np.zeros((1, 1, 1, 1), "float32")])
    proj = np.array([0.0, 1.0, 0.0], "float32").reshape(1, 1, 3, 1)
    layer.project_conv.set_weights([proj])
    got = keras.ops.convert_to_numpy(layer(x, training=False))[0, ..., 0]
    expected = np.zeros((5, 5))
    expected[2, 2] = 1.0 / (1.0 + BN_EPS)  # through two fresh inference BNs
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_output_shape_unknown_size(rng):
    inputs = keras.Input((None, None, 5))
    outputs = ASPP(filters=4, rates=(1, 2, 3))(inputs)
    assert tuple(outputs.shape) == (None, None, None, 4)
    model = keras.Model(inputs, outputs)
    for shape in ((1, 6, 6, 5), (2, 9, 4, 5)):
        y = model.predict(rng.normal(size=shape).astype("float32"), verbose=0)
        assert y.shape == (*shape[:-1], 4)


@pytest.mark.parametrize(("c", "f", "rates"), [(8, 4, (6, 12, 18)), (3, 5, (2,))])
def test_weight_count(c, f, rates):
    layer = ASPP(filters=f, rates=rates)
    layer.build((None, None, None, c))
    n = len(rates)
    bn = 4 * f  # gamma, beta, moving mean, moving variance
    expected = (c * f + bn) + n * (9 * c * f + bn) + (c * f + bn) + ((2 + n) * f * f + bn)
    assert layer.count_params() == expected
    trainable = sum(int(np.prod(w.shape)) for w in layer.trainable_weights)
    assert trainable == expected - (3 + n) * 2 * f


def test_config_round_trip(rng):
    layer = ASPP(filters=4, rates=[1, 2], activation="relu", dropout=0.2, name="aspp")
    x = rng.normal(size=(2, 6, 6, 3)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x, training=False))
    config = layer.get_config()
    clone = ASPP.from_config(config)
    clone.build(x.shape)
    clone.set_weights(layer.get_weights())
    assert clone.get_config() == config
    np.testing.assert_allclose(keras.ops.convert_to_numpy(clone(x, training=False)), y, rtol=1e-6)


def _tiny_model():
    inputs = keras.Input((None, None, 3))
    x = keras.layers.Conv2D(4, 3, padding="same")(inputs)
    x = ASPP(filters=4, rates=(1, 2, 3), name="aspp")(x)
    return keras.Model(inputs, keras.layers.Conv2D(1, 1)(x))


def test_fit_step(rng):
    keras.utils.set_random_seed(0)
    model = _tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = rng.random((4, 8, 8, 3)).astype("float32")
    y = rng.random((4, 8, 8, 1)).astype("float32")
    aspp = model.get_layer("aspp")
    before = keras.ops.convert_to_numpy(aspp.project_conv.kernel).copy()
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.allclose(keras.ops.convert_to_numpy(aspp.project_conv.kernel), before)


def test_keras_save_load(tmp_path, rng):
    keras.utils.set_random_seed(0)
    model = _tiny_model()
    x = rng.random((1, 10, 6, 3)).astype("float32")
    y = model.predict(x, verbose=0)
    path = tmp_path / "aspp.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), y, rtol=1e-5, atol=1e-6)


def test_argument_checks():
    with pytest.raises(
        ValueError, match=r"`rates` must be a list of positive ints. Received: rates=\[6, -1\]"
    ):
        ASPP(rates=[6, -1])
    with pytest.raises(ValueError, match="`rates` must be a list of positive ints"):
        ASPP(rates=6)
    with pytest.raises(ValueError, match="`filters` must be a positive int. Received: filters=0"):
        ASPP(filters=0)
    with pytest.raises(ValueError, match="`activation` must be the name of a Keras activation"):
        ASPP(activation="nope")
    with pytest.raises(ValueError, match=r"`dropout` must be a float in \[0, 1\)"):
        ASPP(dropout=1.0)
