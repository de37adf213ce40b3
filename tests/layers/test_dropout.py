"""Tests of MCDropout and set_mc_dropout."""

import keras
import numpy as np
import pytest

from kerasnuc.layers.dropout import MCDropout, set_mc_dropout


def _ones(shape=(1, 64, 64, 16)):
    return np.ones(shape, dtype=np.float32)


def _nested_model(rate=0.5):
    inner_in = keras.Input((None, None, 4))
    inner = keras.Model(
        inner_in, MCDropout(rate, seed=1, name="inner_drop")(inner_in), name="inner"
    )
    inputs = keras.Input((None, None, 4))
    x = MCDropout(rate, seed=2, name="outer_drop")(inputs)
    return keras.Model(inputs, inner(x))


def test_off_is_identity_at_inference():
    layer = MCDropout(0.5, seed=0)
    x = _ones()
    a = keras.ops.convert_to_numpy(layer(x, training=False))
    b = keras.ops.convert_to_numpy(layer(x, training=False))
    np.testing.assert_array_equal(a, x)
    np.testing.assert_array_equal(a, b)
    assert layer.mc is False


@pytest.mark.parametrize("rate", [0.2, 0.5])
def test_on_drops_about_rate_of_units(rate):
    layer = MCDropout(rate, seed=0, mc=True)
    x = _ones()
    a = keras.ops.convert_to_numpy(layer(x, training=False))
    b = keras.ops.convert_to_numpy(layer(x, training=False))
    assert not np.array_equal(a, b)
    for out in (a, b):
        # 65536 units: the fraction's standard deviation is below 0.002.
        assert abs(np.mean(out == 0) - rate) < 0.01
        np.testing.assert_allclose(out[out != 0], 1.0 / (1.0 - rate), rtol=1e-6)


def test_training_drops_even_when_off():
    layer = MCDropout(0.5, seed=0)
    out = keras.ops.convert_to_numpy(layer(_ones(), training=True))
    assert abs(np.mean(out == 0) - 0.5) < 0.01


def test_rate_zero_is_identity_when_on():
    layer = MCDropout(0.0, mc=True)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(_ones())), _ones())


def test_noise_shape_drops_whole_channels():
    layer = MCDropout(0.5, noise_shape=(None, 1, 1, None), seed=3, mc=True)
    out = keras.ops.convert_to_numpy(layer(_ones((2, 8, 8, 64))))
    per_channel = np.moveaxis(out, -1, 1).reshape(2, 64, -1)
    assert np.all((per_channel == 0).all(-1) | (per_channel == 2.0).all(-1))
    assert 0 < np.mean(per_channel[..., 0] == 0) < 1


def test_switch_affects_already_traced_predict():
    model = _nested_model()
    x = _ones((2, 16, 16, 4))
    np.testing.assert_array_equal(model.predict(x, verbose=0), x)  # traced with the switch off
    assert set_mc_dropout(model, True) == 2
    a, b = model.predict(x, verbose=0), model.predict(x, verbose=0)
    assert not np.array_equal(a, b)
    # Two layers of rate 0.5 in a row: a unit survives with probability 0.25, scaled by 4.
    assert set(np.unique(a)) <= {0.0, 4.0}
    assert abs(np.mean(a == 4.0) - 0.25) < 0.03
    assert set_mc_dropout(model, False) == 2
    np.testing.assert_array_equal(model.predict(x, verbose=0), x)


def test_weights_and_config_round_trip():
    layer = MCDropout(0.3, noise_shape=(None, 1, 1, None), seed=7, mc=True, name="drop")
    config = layer.get_config()
    assert config["rate"] == 0.3
    assert config["noise_shape"] == (None, 1, 1, None)
    assert config["seed"] == 7
    assert config["mc"] is True
    clone = MCDropout.from_config(config)
    assert clone.get_config() == config
    assert clone.mc is True
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(layer))
    assert isinstance(restored, MCDropout)
    assert restored.get_config() == config
    # One non-trainable weight (the switch), nothing trainable.
    assert len(layer.trainable_weights) == 0
    assert [w.name for w in layer.non_trainable_weights] == ["mc_active"]


def test_keras_file_keeps_switch(tmp_path):
    model = _nested_model()
    set_mc_dropout(model, True)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.models.load_model(path)
    assert loaded.get_layer("outer_drop").mc is True
    assert loaded.get_layer("inner").get_layer("inner_drop").mc is True


def test_fit_step():
    inputs = keras.Input((8,))
    x = keras.layers.Dense(16)(inputs)
    x = MCDropout(0.5, seed=0)(x)
    model = keras.Model(inputs, keras.layers.Dense(1)(x))
    model.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    history = model.fit(rng.random((4, 8)), rng.random((4, 1)), epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"rate": 1.0}, "`rate` must be a float in"),
        ({"rate": -0.1}, "`rate` must be a float in"),
        ({"rate": 0.2, "mc": "yes"}, "`mc` must be a bool"),
        ({"rate": 0.2, "noise_shape": (None, 0)}, "`noise_shape` must be"),
    ],
)
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MCDropout(**kwargs)
