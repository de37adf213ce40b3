"""Tests for kerasnuc.backbones.resnext."""

from __future__ import annotations

import keras
import numpy as np
import pytest

from kerasnuc.backbones.resnext import build_resnext_encoder
from kerasnuc.fileutil import KerasnucError
from kerasnuc.layers.group_conv import GroupConv2D

TINY = {"groups": 4, "width_per_group": 4, "width_scale": 0.25, "blocks": (1, 2, 1, 1)}


def expected_param_counts(blocks, groups=32, width_per_group=4, scale=1.0, in_channels=3):
    """(trainable, non-trainable) parameters of a torchvision-layout ResNeXt without classifier.

    Conv k x k from c to f channels in g groups: k*k*(c/g)*f weights (no bias).
    BatchNorm on f channels: 2f trainable (gamma, beta) + 2f non-trainable (moving mean, var).
    """
    trainable = non_trainable = 0

    def conv(k, c, f, g=1):
        nonlocal trainable
        trainable += k * k * (c // g) * f

    def bn(f):
        nonlocal trainable, non_trainable
        trainable += 2 * f
        non_trainable += 2 * f

    stem = round(64 * scale)
    conv(7, in_channels, stem)
    bn(stem)
    channels = stem
    for stage, num_blocks in enumerate(blocks):
        planes = round(64 * 2**stage * scale)
        width = int(planes * width_per_group / 64) * groups
        out = 4 * planes
        for block in range(num_blocks):
            conv(1, channels, width)
            bn(width)
            conv(3, width, width, groups)
            bn(width)
            conv(1, width, out)
            bn(out)
            if block == 0:
                conv(1, channels, out)
                bn(out)
            channels = out
    return trainable, non_trainable


def _counts(model):
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    non_trainable = sum(int(np.prod(w.shape)) for w in model.non_trainable_weights)
    return trainable, non_trainable


@pytest.fixture(scope="module")
def resnext101():
    return build_resnext_encoder(depth=101, input_shape=(None, None, 3))


@pytest.mark.slow
def test_resnext101_parameter_count(resnext101):
    trainable, non_trainable = _counts(resnext101)
    assert (trainable, non_trainable) == expected_param_counts((3, 4, 23, 3))
    # torchvision/timm resnext101_32x4d: 44.18 M incl. the 2048*1000 + 1000 classifier.
    assert abs(trainable - 42.13e6) / 42.13e6 < 1e-3
    assert trainable + 2048 * 1000 + 1000 == 44_177_704


@pytest.mark.slow
def test_resnext101_structure(resnext101):
    assert {k: tuple(v.shape) for k, v in resnext101.output.items()} == {
        "P1": (None, None, None, 64),
        "P2": (None, None, None, 256),
        "P3": (None, None, None, 512),
        "P4": (None, None, None, 1024),
        "P5": (None, None, None, 2048),
    }
    grouped = [layer for layer in resnext101.layers if isinstance(layer, GroupConv2D)]
    assert len(grouped) == 3 + 4 + 23 + 3
    assert {layer.groups for layer in grouped} == {32}
    assert {layer.filters for layer in grouped} == {128, 256, 512, 1024}
    # No native grouped convolutions anywhere (slow on CPU, XLA-only for TF Serving).
    for layer in resnext101._flatten_layers(include_self=False, recursive=True):
        if isinstance(layer, keras.layers.Conv2D):
            assert layer.groups == 1, layer.name


@pytest.mark.slow
def test_resnext50_parameter_count():
    model = build_resnext_encoder(depth=50)
    assert _counts(model) == expected_param_counts((3, 4, 6, 3))
    # torchvision resnext50_32x4d: 25,028,904 incl. the classifier.
    assert _counts(model)[0] + 2048 * 1000 + 1000 == 25_028_904


def test_tiny_parameter_count():
    model = build_resnext_encoder(**TINY)
    assert _counts(model) == expected_param_counts(
        TINY["blocks"], groups=4, width_per_group=4, scale=0.25
    )


@pytest.mark.parametrize(("height", "width"), [(64, 64), (96, 64), (65, 33)])
def test_feature_shapes(rng, height, width):
    model = build_resnext_encoder(**TINY, seed=0)
    x = rng.random((2, height, width, 3)).astype("float32")
    features = model(x, training=False)
    assert sorted(features) == ["P1", "P2", "P3", "P4", "P5"]
    channels = {"P1": 16, "P2": 64, "P3": 128, "P4": 256, "P5": 512}
    for level in range(1, 6):
        stride = 2**level
        size = (-(-height // stride), -(-width // stride))  # ceil, as in PyTorch with padding
        assert tuple(features[f"P{level}"].shape) == (2, *size, channels[f"P{level}"])


def test_imagenet_normalization(rng):
    # Feeding (x - mean) / std without normalization equals feeding x with it.
    with_norm = build_resnext_encoder(**TINY, seed=0)
    without = build_resnext_encoder(**TINY, seed=0, input_normalization=None)
    without.set_weights(with_norm.get_weights())
    x = rng.random((1, 32, 32, 3)).astype("float32")
    mean = np.array([0.485, 0.456, 0.406], "float32")
    std = np.array([0.229, 0.224, 0.225], "float32")
    a = with_norm(x, training=False)["P5"]
    b = without((x - mean) / std, training=False)["P5"]
    np.testing.assert_allclose(
        keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), rtol=1e-4, atol=1e-4
    )


def test_seed_reproducible():
    a = build_resnext_encoder(**TINY, seed=3).get_weights()
    b = build_resnext_encoder(**TINY, seed=3).get_weights()
    for wa, wb in zip(a, b, strict=True):
        np.testing.assert_array_equal(wa, wb)


def test_load_weights_file(tmp_path, rng):
    source = build_resnext_encoder(**TINY, seed=1)
    path = tmp_path / "tiny.weights.h5"
    source.save_weights(path)
    loaded = build_resnext_encoder(**TINY, seed=2, weights=str(path))
    x = rng.random((1, 32, 32, 3)).astype("float32")
    for level in ("P1", "P5"):
        np.testing.assert_array_equal(
            keras.ops.convert_to_numpy(loaded(x)[level]),
            keras.ops.convert_to_numpy(source(x)[level]),
        )
    with pytest.raises(KerasnucError, match="weights file not found"):
        build_resnext_encoder(**TINY, weights=str(tmp_path / "missing.weights.h5"))


def test_argument_checks():
    with pytest.raises(ValueError, match=r"`depth` must be one of \[50, 101\]. Received: depth=34"):
        build_resnext_encoder(depth=34)
    with pytest.raises(ValueError, match="`blocks` must be a list of 4 positive ints"):
        build_resnext_encoder(blocks=(1, 0, 1, 1))
    with pytest.raises(ValueError, match="give an empty layer"):
        build_resnext_encoder(width_scale=0.1)
    with pytest.raises(ValueError, match="needs 3 input channels"):
        build_resnext_encoder(**TINY, input_shape=(None, None, 4))
