"""Tests for kerasnuc.layers.group_conv.GroupConv2D."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kerasnuc.layers.group_conv import GroupConv2D


def _copy_grouped_weights(grouped: keras.layers.Conv2D, layer: GroupConv2D) -> None:
    """Gives ``layer`` the weights of ``grouped`` (kernel ``(kh, kw, C_in/g, F)``, group-major)."""
    kernel = keras.ops.convert_to_numpy(grouped.kernel)
    bias = keras.ops.convert_to_numpy(grouped.bias) if grouped.use_bias else None
    per_group = kernel.shape[-1] // layer.groups
    for i, conv in enumerate(layer.convs):
        part = slice(i * per_group, (i + 1) * per_group)
        weights = [kernel[..., part]]
        if bias is not None:
            weights.append(bias[part])
        conv.set_weights(weights)


@pytest.mark.parametrize(
    ("groups", "kernel_size", "strides", "padding", "dilation_rate", "use_bias"),
    [
        (4, 3, 1, "same", 1, True),
        (2, 3, 2, "valid", 1, False),
        (8, 1, 1, "valid", 1, True),
        (4, 3, 1, "same", 2, False),
    ],
)
def test_matches_conv2d_groups(rng, groups, kernel_size, strides, padding, dilation_rate, use_bias):
    x = rng.normal(size=(2, 9, 10, 8)).astype("float32")
    reference = keras.layers.Conv2D(
        16,
        kernel_size,
        strides=strides,
        padding=padding,
        dilation_rate=dilation_rate,
        groups=groups,
        use_bias=use_bias,
        kernel_initializer=keras.initializers.RandomNormal(seed=1),
        bias_initializer=keras.initializers.RandomNormal(seed=2),
    )
    expected = keras.ops.convert_to_numpy(reference(x))
    layer = GroupConv2D(
        16,
        kernel_size,
        groups=groups,
        strides=strides,
        padding=padding,
        dilation_rate=dilation_rate,
        use_bias=use_bias,
    )
    layer.build(x.shape)
    _copy_grouped_weights(reference, layer)
    got = keras.ops.convert_to_numpy(layer(x))
    assert got.shape == expected.shape
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_group_isolation(rng):
    # Changing input group 1 must only change output group 1 (definition of a grouped conv).
    layer = GroupConv2D(6, 3, groups=3, padding="same")
    x = rng.normal(size=(1, 5, 5, 6)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x))
    x2 = x.copy()
    x2[..., 2:4] += 1.0
    y2 = keras.ops.convert_to_numpy(layer(x2))
    np.testing.assert_array_equal(y2[..., :2], y[..., :2])
    np.testing.assert_array_equal(y2[..., 4:], y[..., 4:])
    assert np.abs(y2[..., 2:4] - y[..., 2:4]).max() > 1e-3


def test_weight_count():
    layer = GroupConv2D(32, 3, groups=4, use_bias=True)
    layer.build((None, None, None, 16))
    # per group: 3*3*(16/4)*(32/4) kernel + 32/4 bias
    assert layer.count_params() == 4 * (3 * 3 * 4 * 8 + 8)
    assert len(layer.weights) == 8
    no_bias = GroupConv2D(32, 3, groups=4, use_bias=False)
    no_bias.build((None, None, None, 16))
    assert no_bias.count_params() == 3 * 3 * 16 * 32 // 4


def test_seeded_groups_differ():
    layer = GroupConv2D(4, 1, groups=2, kernel_initializer=keras.initializers.RandomNormal(seed=3))
    layer.build((None, 4, 4, 4))
    k0, k1 = (keras.ops.convert_to_numpy(c.kernel) for c in layer.convs)
    assert not np.allclose(k0, k1)


def test_config_round_trip(rng):
    layer = GroupConv2D(12, 3, groups=3, strides=2, padding="same", name="gc")
    x = rng.normal(size=(2, 8, 8, 6)).astype("float32")
    y = keras.ops.convert_to_numpy(layer(x))
    config = layer.get_config()
    clone = GroupConv2D.from_config(config)
    clone.build(x.shape)
    clone.set_weights(layer.get_weights())
    assert clone.get_config() == config
    np.testing.assert_allclose(keras.ops.convert_to_numpy(clone(x)), y, rtol=1e-6)


def test_unknown_spatial_size_and_keras_save(tmp_path, rng):
    inputs = keras.Input((None, None, 4))
    outputs = GroupConv2D(8, 3, groups=2, padding="same")(inputs)
    model = keras.Model(inputs, outputs)
    assert model.output_shape == (None, None, None, 8)
    x = rng.normal(size=(1, 7, 5, 4)).astype("float32")
    y = model.predict(x, verbose=0)
    assert y.shape == (1, 7, 5, 8)
    path = tmp_path / "gc.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(loaded.predict(x, verbose=0), y, rtol=1e-6)


def test_argument_checks():
    with pytest.raises(ValueError, match="`filters` must be divisible by `groups`"):
        GroupConv2D(10, 3, groups=4)
    with pytest.raises(ValueError, match="`groups` must be a positive int. Received: groups=0"):
        GroupConv2D(8, 3, groups=0)
    with pytest.raises(ValueError, match="divisible by `groups`"):
        GroupConv2D(8, 3, groups=4).build((None, 5, 5, 6))
