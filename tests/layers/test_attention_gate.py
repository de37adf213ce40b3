"""Tests for kerasnuc.layers.attention_gate (AttentionGate, resize_bilinear_like)."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kerasnuc.layers.attention_gate import AttentionGate, resize_bilinear_like

# Half-pixel bilinear weights for upsampling 2 -> 4 samples: output centres at input positions
# -0.25, 0.25, 0.75, 1.25, clamped to [0, 1].
UP_2_TO_4 = np.array([[1.0, 0.0], [0.75, 0.25], [0.25, 0.75], [0.0, 1.0]])


def _sigmoid(z):
    return 1.0 / (1.0 + np.exp(-z))


def test_resize_bilinear_hand_values():
    g = np.array([[0.0, 1.0], [2.0, 3.0]], dtype="float32").reshape(1, 2, 2, 1)
    ref = np.zeros((1, 4, 4, 1), "float32")
    got = keras.ops.convert_to_numpy(resize_bilinear_like(g, ref))[0, ..., 0]
    expected = UP_2_TO_4 @ g[0, ..., 0] @ UP_2_TO_4.T
    np.testing.assert_allclose(got, expected, atol=1e-6)
    # first row: 0, 0.25, 0.75, 1 ; first column: 0, 0.5, 1.5, 2
    np.testing.assert_allclose(got[0], [0.0, 0.25, 0.75, 1.0], atol=1e-6)
    np.testing.assert_allclose(got[:, 0], [0.0, 0.5, 1.5, 2.0], atol=1e-6)


@pytest.mark.parametrize(("size", "target"), [((3, 5), (7, 9)), ((6, 6), (6, 6)), ((5, 4), (2, 3))])
def test_resize_bilinear_matches_image_resize(rng, size, target):
    g = rng.normal(size=(2, *size, 3)).astype("float32")
    expected = keras.ops.convert_to_numpy(
        keras.ops.image.resize(g, target, interpolation="bilinear", antialias=False)
    )
    got = keras.ops.convert_to_numpy(resize_bilinear_like(g, np.zeros((2, *target, 1))))
    np.testing.assert_allclose(got, expected, atol=1e-5)


def _set_gate_weights(layer, wx, wg, bg, wpsi, bpsi):
    layer.theta_x.set_weights([wx.reshape(1, 1, *wx.shape)])
    layer.phi_g.set_weights([wg.reshape(1, 1, *wg.shape), bg])
    layer.psi.set_weights([wpsi.reshape(1, 1, *wpsi.shape), bpsi])


@pytest.mark.parametrize("factor", [1, 2])
def test_gate_matches_definition(rng, factor):
    fx, fg, fi = 3, 5, 4
    x = rng.normal(size=(2, 4, 4, fx)).astype("float32")
    g = rng.normal(size=(2, 4 // factor, 4 // factor, fg)).astype("float32")
    wx = rng.normal(size=(fx, fi)).astype("float32")
    wg = rng.normal(size=(fg, fi)).astype("float32")
    bg = rng.normal(size=(fi,)).astype("float32")
    wpsi = rng.normal(size=(fi, 1)).astype("float32")
    bpsi = rng.normal(size=(1,)).astype("float32")
    layer = AttentionGate(inter_channels=fi)
    layer.build(x.shape, g.shape)
    _set_gate_weights(layer, wx, wg, bg, wpsi, bpsi)
    gated, alpha = layer(x, g, return_attention=True)

    phi = g @ wg + bg  # (B, h, w, fi)
    if factor == 2:
        phi = np.einsum("ih,bhwc,jw->bijc", UP_2_TO_4, phi, UP_2_TO_4)
    f = np.maximum(x @ wx + phi, 0.0)
    expected_alpha = _sigmoid(f @ wpsi + bpsi)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(alpha), expected_alpha, atol=1e-5)
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(gated), x * expected_alpha, rtol=1e-5, atol=1e-5
    )


def test_output_shapes_unknown_size(rng):
    x_in = keras.Input((None, None, 6))
    g_in = keras.Input((None, None, 10))
    gate = AttentionGate(inter_channels=4)
    gated, alpha = gate(x_in, g_in, return_attention=True)
    assert tuple(gated.shape) == (None, None, None, 6)
    assert tuple(alpha.shape) == (None, None, None, 1)
    model = keras.Model([x_in, g_in], {"gated": gated, "alpha": alpha})
    for size in (8, 12):
        out = model.predict(
            [
                rng.normal(size=(2, size, size, 6)).astype("float32"),
                rng.normal(size=(2, size // 2, size // 2, 10)).astype("float32"),
            ],
            verbose=0,
        )
        assert out["gated"].shape == (2, size, size, 6)
        assert out["alpha"].shape == (2, size, size, 1)
        assert out["alpha"].min() >= 0.0 and out["alpha"].max() <= 1.0


@pytest.mark.parametrize("batch_norm", [False, True])
def test_weight_count(batch_norm):
    fx, fg, fi = 16, 32, 8
    layer = AttentionGate(inter_channels=fi, batch_norm=batch_norm)
    layer.build((None, None, None, fx), (None, None, None, fg))
    expected = fx * fi + (fg * fi + fi) + (fi * 1 + 1)  # W_x no bias, W_g and psi with bias
    if batch_norm:
        expected += 4 * fi + 4 * fi + 4 * 1  # gamma, beta, moving mean, moving variance
    assert layer.count_params() == expected


def test_config_round_trip(rng):
    layer = AttentionGate(inter_channels=4, batch_norm=True, name="ag")
    x = rng.normal(size=(2, 8, 8, 6)).astype("float32")
    g = rng.normal(size=(2, 4, 4, 10)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x, g))
    config = layer.get_config()
    clone = AttentionGate.from_config(config)
    clone.build(x.shape, g.shape)
    clone.set_weights(layer.get_weights())
    assert clone.get_config() == config
    np.testing.assert_allclose(keras.ops.convert_to_numpy(clone(x, g)), y, rtol=1e-6)


def _tiny_model():
    image = keras.Input((None, None, 3))
    skip = keras.layers.Conv2D(6, 3, padding="same")(image)
    gating = keras.layers.Conv2D(8, 3, strides=2, padding="same")(skip)
    gated = AttentionGate(inter_channels=4, batch_norm=True, name="gate")(skip, gating)
    return keras.Model(image, keras.layers.Conv2D(1, 1)(gated))


def test_fit_step(rng):
    keras.utils.set_random_seed(0)
    model = _tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="mse")
    x = rng.random((4, 8, 8, 3)).astype("float32")
    y = rng.random((4, 8, 8, 1)).astype("float32")
    psi_before = model.get_layer("gate").psi.get_weights()[0].copy()
    history = model.fit(x, y, batch_size=4, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert not np.allclose(model.get_layer("gate").psi.get_weights()[0], psi_before)


def test_keras_save_load(tmp_path, rng):
    keras.utils.set_random_seed(0)
    model = _tiny_model()
    x = rng.random((1, 12, 8, 3)).astype("float32")
    y = model.predict(x, verbose=0)
    path = tmp_path / "gate.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), y, rtol=1e-5, atol=1e-6)


def test_argument_checks():
    with pytest.raises(
        ValueError, match="`inter_channels` must be a positive int. Received: inter_channels=0"
    ):
        AttentionGate(inter_channels=0)
    with pytest.raises(ValueError, match="inter_channels=4.0"):
        AttentionGate(inter_channels=4.0)
