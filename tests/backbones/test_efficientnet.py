"""Tests of the EfficientNet encoder: feature strides, input scaling and local weight files."""

import keras
import numpy as np
import pytest

from kerasnuc.backbones.efficientnet import (
    EFFICIENTNET_NAMES,
    IMAGENET_MEAN_RGB,
    IMAGENET_STD_RGB,
    build_efficientnet_encoder,
)
from kerasnuc.fileutil import KerasnucError

LEVELS = ("P1", "P2", "P3", "P4", "P5")


@pytest.fixture(scope="module")
def b0_encoder():
    return build_efficientnet_encoder("efficientnet_b0", input_shape=(None, None, 3))


def _normalization(model):
    (layer,) = [x for x in model.layers if isinstance(x, keras.layers.Normalization)]
    return layer


def test_names():
    assert EFFICIENTNET_NAMES == tuple(f"efficientnet_b{i}" for i in range(8))


@pytest.mark.parametrize("size", [64, 96])
def test_feature_sizes_unknown_input_size(b0_encoder, size, rng):
    images = rng.random((2, size, size, 3), dtype=np.float32)
    features = b0_encoder.predict(images, verbose=0)
    assert sorted(features) == list(LEVELS)
    # B0 (Tan & Le 2019, table 1): the expanded activation (6 x the block input width 16, 24,
    # 40, 112) in front of each stride-2 stage, then the 1280-wide top convolution.
    channels = {"P1": 6 * 16, "P2": 6 * 24, "P3": 6 * 40, "P4": 6 * 112, "P5": 1280}
    for level, stride in zip(LEVELS, (2, 4, 8, 16, 32), strict=True):
        assert features[level].shape == (2, size // stride, size // stride, channels[level])
        assert np.all(np.isfinite(features[level]))


def test_feature_layers_are_last_layer_of_each_stride(b0_encoder):
    expected = {
        "P1": "block2a_expand_activation",
        "P2": "block3a_expand_activation",
        "P3": "block4a_expand_activation",
        "P4": "block6a_expand_activation",
        "P5": "top_activation",
    }
    for level, name in expected.items():
        assert b0_encoder.output[level] is b0_encoder.get_layer(name).output


def test_fixed_input_shape_b1():
    encoder = build_efficientnet_encoder("efficientnet_b1", input_shape=(64, 64, 3))
    shapes = {k: tuple(v.shape) for k, v in encoder.output.items()}
    # B1 keeps B0's widths (width coefficient 1.0) and is deeper.
    assert shapes == {
        "P1": (None, 32, 32, 96),
        "P2": (None, 16, 16, 144),
        "P3": (None, 8, 8, 240),
        "P4": (None, 4, 4, 672),
        "P5": (None, 2, 2, 1280),
    }


def test_input_in_unit_range_is_imagenet_normalised(b0_encoder, rng):
    stem = keras.Model(b0_encoder.input, _normalization(b0_encoder).output)
    images = rng.random((1, 32, 32, 3), dtype=np.float32)
    expected = (images - np.array(IMAGENET_MEAN_RGB)) / np.array(IMAGENET_STD_RGB)
    np.testing.assert_allclose(stem.predict(images, verbose=0), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("suffix", ["_notop.h5", "_notop.weights.h5"])
def test_local_weights_file(tmp_path, suffix):
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    reference = keras.applications.EfficientNetB0(
        include_top=False, weights=None, input_shape=(64, 64, 3)
    )
    # As in the Keras ImageNet files: the std stored as the Normalization *variance*.
    norm = _normalization(reference)
    norm.adapt_mean.assign(np.array(IMAGENET_MEAN_RGB, dtype=np.float32))
    norm.adapt_variance.assign(np.array(IMAGENET_STD_RGB, dtype=np.float32))
    path = tmp_path / f"efficientnetb0{suffix}"
    if suffix.endswith(".weights.h5"):
        reference.save_weights(path)
    else:
        with h5py.File(path, "w") as f:
            legacy_h5_format.save_weights_to_hdf5_group(f, reference)

    encoder = build_efficientnet_encoder("efficientnet_b0", weights=path)
    loaded = {layer.name: layer for layer in encoder.layers}
    compared = 0
    for layer in reference.layers:
        if layer.weights and not isinstance(layer, keras.layers.Normalization):
            for a, b in zip(layer.get_weights(), loaded[layer.name].get_weights(), strict=True):
                np.testing.assert_array_equal(a, b)
            compared += 1
    assert compared > 100
    np.testing.assert_allclose(
        _normalization(encoder).adapt_variance.numpy(), np.square(IMAGENET_STD_RGB), rtol=1e-6
    )


def test_bad_arguments(tmp_path):
    with pytest.raises(ValueError, match="`name` must be one of"):
        build_efficientnet_encoder("efficientnet_b9")
    with pytest.raises(ValueError, match="`input_shape` must be"):
        build_efficientnet_encoder(input_shape=(64, 64, 1))
    with pytest.raises(KerasnucError, match="not found"):
        build_efficientnet_encoder(weights=tmp_path / "missing.h5")
    with pytest.raises(KerasnucError, match=r"must be a \.h5 file"):
        build_efficientnet_encoder(weights=tmp_path / "weights.pt")


def test_block_output_features_have_the_stage_widths_of_b0():
    """EfficientNet-B0 stage outputs (Tan & Le 2019, Table 1): 16, 24, 40, 112 and 320 channels."""
    from kerasnuc.backbones.efficientnet import build_efficientnet_encoder

    enc = build_efficientnet_encoder("efficientnet_b0", features="blocks")
    feats = enc(np.zeros((1, 64, 64, 3), "float32"))
    assert {k: tuple(v.shape) for k, v in feats.items()} == {
        "P1": (1, 32, 32, 16),
        "P2": (1, 16, 16, 24),
        "P3": (1, 8, 8, 40),
        "P4": (1, 4, 4, 112),
        "P5": (1, 2, 2, 320),
    }
    with pytest.raises(ValueError, match="`features` must be one of"):
        build_efficientnet_encoder("efficientnet_b0", features="wide")


def test_same_seed_gives_same_weights_from_the_first_build():
    """Building an encoder draws no random numbers besides its own weights."""
    from kerasnuc.backbones.efficientnet import build_efficientnet_encoder

    keras.utils.set_random_seed(5)
    first = build_efficientnet_encoder("efficientnet_b1", features="blocks").get_weights()
    keras.utils.set_random_seed(5)
    second = build_efficientnet_encoder("efficientnet_b1", features="blocks").get_weights()
    for a, b in zip(first, second, strict=True):
        np.testing.assert_array_equal(a, b)
