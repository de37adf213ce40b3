"""Tests for kerasnuc.layers.macenko.MacenkoNormalization and kerasnuc.layers.resize.ResizeLike.

The layer is compared with the numpy MacenkoNormalizer (the reference implementation of the
algorithm, itself tested against known stain vectors in tests/data/test_stain.py), on real
H&E crops and on images made of two known stains.
"""

from __future__ import annotations

import keras
import numpy as np
import pytest
import tensorflow as tf

from kerasnuc.data.stain import RGB_FROM_HED, MacenkoNormalizer
from kerasnuc.fileutil import read_image
from kerasnuc.layers.macenko import MacenkoNormalization
from kerasnuc.layers.resize import ResizeLike


def _stained(rng, h_vec, e_vec, size=48):
    """Float image of two known stains (pure H, pure E, mixed and glass pixels)."""
    stains = np.stack([h_vec, e_vec])
    stains = stains / np.linalg.norm(stains, axis=1, keepdims=True)
    n = size * size
    conc = rng.uniform([0.3, 2.2], [1.5, 3.0], (n, 2))
    kind = rng.integers(0, 4, n)
    conc[kind == 0, 1] = 0.0
    conc[kind == 1, 0] = 0.0
    conc[kind == 3] = 0.0
    return np.exp(-conc @ stains).reshape(size, size, 3)


@pytest.fixture(scope="module")
def consep(shared_data):
    folder = shared_data / "consep" / "images"
    names = sorted(p.name for p in folder.glob("*.png"))
    return [read_image(folder / names[k]) for k in (0, 7, 40, 120)]


def test_matches_numpy_normalizer_on_real_images(consep):
    reference = MacenkoNormalizer().fit(consep[0])
    layer = MacenkoNormalization.from_normalizer(reference)
    x = np.stack(consep[1:]).astype(np.float32) / 255.0
    out = np.asarray(layer(x))
    assert out.shape == x.shape and out.dtype == np.float32
    for image, got in zip(consep[1:], out, strict=True):
        expected = reference.transform(image.astype(np.float64) / 255.0)
        np.testing.assert_allclose(got, expected, atol=1e-4)
        # The normalisation changes the image (the test is not trivially identity).
        assert np.abs(expected - image / 255.0).mean() > 0.01


def test_maps_known_stains_onto_reference(rng):
    source = _stained(rng, RGB_FROM_HED[0] + [0.1, -0.1, 0.1], RGB_FROM_HED[1] + [0.1, 0, 0.2])
    target = _stained(np.random.default_rng(1), RGB_FROM_HED[0], RGB_FROM_HED[1])
    reference = MacenkoNormalizer().fit(target)
    layer = MacenkoNormalization.from_normalizer(reference)
    out = np.asarray(layer(source[None].astype(np.float32)))[0]
    np.testing.assert_allclose(out, reference.transform(source), atol=1e-4)
    # The stains of the output are the reference's.
    fitted = MacenkoNormalizer().fit(out)
    cosine = np.sum(fitted.stain_matrix * reference.stain_matrix, axis=1)
    assert cosine.min() > 0.999


def test_images_without_tissue_pass_unchanged(rng):
    target = _stained(rng, RGB_FROM_HED[0], RGB_FROM_HED[1])
    layer = MacenkoNormalization.from_normalizer(MacenkoNormalizer().fit(target))
    glass = np.full((1, 32, 32, 3), 0.97, np.float32)
    glass[0, :5, :5] = 0.2  # 25 dark pixels < min_tissue_pixels = 100
    np.testing.assert_array_equal(np.asarray(layer(glass)), glass)
    # One tissue image and one glass image in the same batch: handled per image.
    batch = np.concatenate(
        [target[None].astype(np.float32), np.full((1, 48, 48, 3), 0.97, np.float32)]
    )
    out = np.asarray(layer(batch))
    np.testing.assert_allclose(out[0], target, atol=1e-4)  # the reference maps onto itself
    np.testing.assert_array_equal(out[1], batch[1])


def test_unknown_size_and_float32_under_mixed_precision(consep):
    reference = MacenkoNormalizer().fit(consep[0])
    inputs = keras.Input((None, None, 3))
    outputs = MacenkoNormalization.from_normalizer(reference)(inputs)
    model = keras.Model(inputs, outputs)
    for size in ((64, 96), (128, 64)):
        x = consep[1][None, : size[0], : size[1]].astype(np.float32) / 255.0
        expected = reference.transform(consep[1][: size[0], : size[1]].astype(np.float64) / 255.0)
        np.testing.assert_allclose(np.asarray(model(x))[0], expected, atol=1e-4)
    f = tf.function(lambda t: model(t), input_signature=[tf.TensorSpec((None, None, None, 3))])
    x = consep[2][None, :64, :64].astype(np.float32) / 255.0
    np.testing.assert_allclose(np.asarray(f(x)), np.asarray(model(x)), atol=1e-6)
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        layer = MacenkoNormalization.from_normalizer(reference)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert layer.compute_dtype == "float32"
    assert np.asarray(layer(x)).dtype == np.float32


def test_config_round_trip_weights_and_save(tmp_path, consep):
    reference = MacenkoNormalizer(beta=0.2, alpha=2.0).fit(consep[0])
    layer = MacenkoNormalization.from_normalizer(reference, name="stain")
    config = layer.get_config()
    assert config["stain_matrix"] == reference.stain_matrix.tolist()
    assert config["beta"] == 0.2 and config["alpha"] == 2.0
    clone = MacenkoNormalization.from_config(config)
    x = consep[3][None, :64, :64].astype(np.float32) / 255.0
    np.testing.assert_array_equal(np.asarray(clone(x)), np.asarray(layer(x)))
    assert layer.count_params() == 0 and not layer.weights

    inputs = keras.Input((None, None, 3))
    x_norm = layer(inputs)
    outputs = keras.layers.Conv2D(2, 1, name="conv")(x_norm)
    model = keras.Model(inputs, outputs)
    model.compile(optimizer="sgd", loss="mse")
    model.fit(x, np.zeros((1, 64, 64, 2), np.float32), epochs=1, verbose=0)
    path = tmp_path / "m.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    np.testing.assert_allclose(np.asarray(loaded(x)), np.asarray(model(x)), atol=1e-6)


def test_argument_checks():
    stains = [[0.65, 0.7, 0.29], [0.07, 0.99, 0.11]]
    with pytest.raises(ValueError, match="`stain_matrix` must be a finite 2x3"):
        MacenkoNormalization([[1.0, 0.0, 0.0]], [1.0, 1.0])
    with pytest.raises(ValueError, match="`max_concentrations` must be 2 positive"):
        MacenkoNormalization(stains, [1.0, 0.0])
    with pytest.raises(ValueError, match="`alpha` must be a float in"):
        MacenkoNormalization(stains, [1.0, 1.0], alpha=50)
    with pytest.raises(ValueError, match="`min_tissue_pixels` must be an int >= 2"):
        MacenkoNormalization(stains, [1.0, 1.0], min_tissue_pixels=1)
    with pytest.raises(ValueError, match="must be fitted"):
        MacenkoNormalization.from_normalizer(MacenkoNormalizer())


@pytest.mark.parametrize(
    ("size", "target"), [((4, 6), (8, 12)), ((8, 8), (32, 32)), ((6, 4), (6, 4))]
)
def test_resize_like_matches_image_resize(rng, size, target):
    x = rng.normal(size=(2, *size, 3)).astype(np.float32)
    ref = np.zeros((2, *target, 1), np.float32)
    got = np.asarray(ResizeLike()(x, ref))
    expected = tf.image.resize(x, target, method="bilinear", antialias=False).numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    layer = ResizeLike(name="r")
    assert ResizeLike.from_config(layer.get_config()).name == "r"
    a, b = keras.Input((None, None, 3)), keras.Input((None, None, 1))
    assert tuple(ResizeLike()(a, b).shape) == (None, None, None, 3)


def test_resize_like_float16_positions_in_float32(rng):
    x = rng.normal(size=(1, 150, 4, 2)).astype(np.float32)
    ref = np.zeros((1, 600, 4, 1), np.float32)
    expected = tf.image.resize(x, (600, 4), method="bilinear", antialias=False).numpy()
    got = np.asarray(ResizeLike(dtype="mixed_float16")(x.astype(np.float16), ref))
    assert got.dtype == np.float16
    np.testing.assert_allclose(got.astype(np.float32), expected, atol=1e-2)
