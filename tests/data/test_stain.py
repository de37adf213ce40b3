"""Tests for kerasnuc.data.stain: HED deconvolution, HED augmentation, Macenko normalisation."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tensorflow as tf
from skimage.color import hed2rgb, rgb2hed

from kerasnuc.data.stain import (
    RGB_FROM_HED,
    MacenkoNormalizer,
    hed_augment,
    hed_to_rgb,
    rgb_to_hed,
    stain_augment,
)
from kerasnuc.fileutil import KerasnucError, read_image

OD_UNIT = -math.log(1e-6)


def _random_rgb(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    rgb = rng.uniform(0.0, 1.0, shape).astype(np.float32)
    rgb.reshape(-1, 3)[:3] = [[0.0, 0.0, 0.0], [1.0, 1.0, 1.0], [1.0, 0.0, 0.5]]
    return rgb


# ----------------------------------------------------------------------------- HED conversion


@pytest.mark.parametrize("shape", [(16, 16, 3), (2, 8, 8, 3)])
def test_rgb_to_hed_matches_skimage(rng, shape):
    rgb = _random_rgb(rng, shape)
    np.testing.assert_allclose(rgb_to_hed(rgb).numpy(), rgb2hed(rgb), atol=1e-5)


@pytest.mark.parametrize("shape", [(16, 16, 3), (2, 8, 8, 3)])
def test_hed_to_rgb_matches_skimage(rng, shape):
    hed = rng.uniform(-0.05, 0.3, shape).astype(np.float32)
    np.testing.assert_allclose(hed_to_rgb(hed).numpy(), hed2rgb(hed), atol=1e-5)


def test_hed_of_pure_stain_from_definition():
    # A pixel holding only haematoxylin h has OD = h * 13.8 * [0.65, 0.70, 0.29] (Beer-Lambert).
    h = 0.05
    rgb = np.exp(-h * OD_UNIT * np.array([0.65, 0.70, 0.29]))[None, None].astype(np.float32)
    np.testing.assert_allclose(rgb_to_hed(rgb).numpy()[0, 0], [h, 0.0, 0.0], atol=1e-6)
    np.testing.assert_allclose(rgb_to_hed(np.ones((1, 1, 3), np.float32)).numpy(), 0.0, atol=0)


def test_round_trip_exact_without_clipping(rng):
    rgb = rng.uniform(1e-3, 1.0, (4, 16, 16, 3)).astype(np.float32)
    back = hed_to_rgb(rgb_to_hed(rgb, clip_negative=False)).numpy()
    np.testing.assert_allclose(back, rgb, atol=1e-5)


def test_round_trip_on_stain_images(rng):
    # Images made of non-negative stain amounts survive the clipping skimage applies.
    hed = rng.uniform(0.0, 0.15, (16, 16, 3)).astype(np.float32)
    rgb = hed_to_rgb(hed)
    np.testing.assert_allclose(rgb_to_hed(rgb).numpy(), hed, atol=1e-5)
    np.testing.assert_allclose(hed_to_rgb(rgb_to_hed(rgb)).numpy(), rgb.numpy(), atol=1e-5)


def test_rgb_to_hed_rejects_integer_images():
    with pytest.raises(ValueError, match="float"):
        rgb_to_hed(np.zeros((4, 4, 3), np.uint8))


# ----------------------------------------------------------------------------- HED augmentation


def test_hed_augment_identity_when_ranges_are_zero(rng):
    rgb = rng.uniform(0.05, 1.0, (16, 16, 3)).astype(np.float32)
    out = hed_augment(rgb, tf.constant([1, 2]), alpha=0.0, beta=0.0).numpy()
    np.testing.assert_allclose(out, rgb, atol=1e-5)


def test_hed_augment_is_affine_per_stain_within_ranges(rng):
    alpha, beta = 0.2, 0.1
    hed = rng.uniform(0.02, 0.06, (32, 32, 3)).astype(np.float32)
    rgb = hed_to_rgb(hed)
    out = hed_augment(rgb, tf.constant([3, 4]), alpha=alpha, beta=beta)
    h_in = rgb_to_hed(rgb, clip_negative=False).numpy().reshape(-1, 3)
    h_out = rgb_to_hed(out, clip_negative=False).numpy().reshape(-1, 3)
    for c in range(3):
        slope, intercept = np.polyfit(h_in[:, c], h_out[:, c], 1)
        residual = h_out[:, c] - (slope * h_in[:, c] + intercept)
        assert np.abs(residual).max() < 1e-4
        assert 1 - alpha <= slope <= 1 + alpha
        assert -beta <= intercept * OD_UNIT <= beta


def test_hed_augment_seeded_and_batched(rng):
    batch = rng.uniform(0.1, 0.9, (3, 8, 8, 3)).astype(np.float32)
    a = hed_augment(batch, tf.constant([7, 7])).numpy()
    b = hed_augment(batch, tf.constant([7, 7])).numpy()
    c = hed_augment(batch, tf.constant([7, 8])).numpy()
    assert a.shape == batch.shape and a.min() >= 0 and a.max() <= 1
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    # Each image of a batch gets its own factors: the same image twice is changed differently.
    twice = np.stack([batch[0], batch[0]])
    out = hed_augment(twice, tf.constant([1, 1])).numpy()
    assert np.abs(out[0] - out[1]).max() > 1e-3


def test_hed_augment_checks_arguments():
    with pytest.raises(ValueError, match="alpha"):
        hed_augment(np.zeros((4, 4, 3), np.float32), tf.constant([0, 0]), alpha=1.5)
    with pytest.raises(ValueError, match="shape"):
        hed_augment(np.zeros((4, 3), np.float32), tf.constant([0, 0]))


# ----------------------------------------------------------------------------- Macenko


def _unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v, axis=-1, keepdims=True)


def _synthetic_stained(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Float image made of two known stains: pure-H, pure-E and mixed pixels plus background."""
    stains = _unit(RGB_FROM_HED[:2])
    n = 64 * 64
    # Eosin absorbs little red: its amounts must be high enough for every channel to pass the
    # transparency threshold (OD >= 0.15 in R, G and B).
    conc = rng.uniform([0.3, 2.2], [1.5, 3.0], (n, 2))
    kind = rng.integers(0, 4, n)  # 0: pure H, 1: pure E, 2: mixed, 3: background
    conc[kind == 0, 1] = 0.0
    conc[kind == 1, 0] = 0.0
    conc[kind == 3] = 0.0
    rgb = np.exp(-conc @ stains).reshape(64, 64, 3)
    return rgb, stains, conc


def test_macenko_recovers_known_stains(rng):
    rgb, stains, conc = _synthetic_stained(rng)
    norm = MacenkoNormalizer().fit(rgb)
    cosine = np.sum(norm.stain_matrix * stains, axis=1)
    assert cosine.min() > 0.999
    np.testing.assert_allclose(norm.max_concentrations, np.percentile(conc, 99, axis=0), rtol=1e-3)


def test_macenko_transform_of_reference_is_identity(rng):
    rgb, _, _ = _synthetic_stained(rng)
    norm = MacenkoNormalizer().fit(rgb)
    np.testing.assert_allclose(norm.transform(rgb), rgb, atol=1e-6)


def _crop(shared_data, name: str) -> np.ndarray:
    return read_image(shared_data / "monuseg_kumar" / "images" / f"{name}.png")[300:556, 300:556]


def test_macenko_normalises_real_image(shared_data):
    reference = _crop(shared_data, "TCGA-HT-8564-01Z-00-DX1")
    source = _crop(shared_data, "TCGA-A7-A13E-01Z-00-DX1")
    norm = MacenkoNormalizer().fit(reference)
    before, before_max = MacenkoNormalizer().stains_and_maxima(source)
    # The two images really differ in stain.
    assert np.sum(before * norm.stain_matrix, axis=1).min() < 0.99
    assert np.abs(before_max / norm.max_concentrations - 1).max() > 0.2

    out = norm.transform(source)
    assert out.dtype == np.uint8 and out.shape == source.shape
    after, after_max = MacenkoNormalizer().stains_and_maxima(out)
    assert np.sum(after * norm.stain_matrix, axis=1).min() > 0.99
    np.testing.assert_allclose(after_max, norm.max_concentrations, rtol=0.05)
    # Unmixed with the reference stains, the output's 99th percentiles are the reference's.
    conc = norm._concentrations(norm.optical_density(out), norm.stain_matrix)
    np.testing.assert_allclose(np.percentile(conc, 99, axis=0), norm.max_concentrations, rtol=0.01)


def test_macenko_json_round_trip(shared_data, tmp_path):
    norm = MacenkoNormalizer(beta=0.2).fit(_crop(shared_data, "TCGA-HT-8564-01Z-00-DX1"))
    source = _crop(shared_data, "TCGA-A7-A13E-01Z-00-DX1")
    path = tmp_path / "stain.json"
    norm.save(path)
    loaded = MacenkoNormalizer.load(path)
    assert loaded.to_dict() == norm.to_dict() == json.loads(path.read_text())
    np.testing.assert_array_equal(loaded.transform(source), norm.transform(source))
    assert MacenkoNormalizer.from_dict(norm.to_dict()).beta == 0.2


def test_macenko_degenerate_inputs(rng):
    white = np.full((32, 32, 3), 255, np.uint8)
    with pytest.raises(KerasnucError, match="tissue pixels"):
        MacenkoNormalizer().fit(white)
    rgb, _, _ = _synthetic_stained(rng)
    norm = MacenkoNormalizer().fit(rgb)
    np.testing.assert_array_equal(norm.transform(white), white)
    with pytest.raises(KerasnucError, match="fit"):
        MacenkoNormalizer().transform(rgb)


def test_macenko_checks_state_and_arguments(tmp_path):
    with pytest.raises(ValueError, match="beta"):
        MacenkoNormalizer(beta=-1)
    with pytest.raises(KerasnucError, match="macenko"):
        MacenkoNormalizer.from_dict({"method": "vahadane"})
    state = MacenkoNormalizer().to_dict() | {"stain_matrix": [[1, 0, 0]], "max_concentrations": [1]}
    with pytest.raises(KerasnucError, match="2x3"):
        MacenkoNormalizer.from_dict(state)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(KerasnucError, match="JSON"):
        MacenkoNormalizer.load(bad)
    with pytest.raises(KerasnucError, match="not found"):
        MacenkoNormalizer.load(tmp_path / "missing.json")


# ----------------------------------------------------------------------------- stain_augment


def _pure_stain_image(stain_row: int, amounts: np.ndarray) -> np.ndarray:
    """RGB of pixels holding only one stain: OD = amount * RGB_FROM_HED[row] (natural log)."""
    od = amounts[..., None] * RGB_FROM_HED[stain_row]
    return np.exp(-od).astype(np.float32)


def test_stain_augment_identity_settings(rng):
    image = rng.uniform(0.05, 1.0, (2, 16, 16, 3)).astype(np.float32)
    out = stain_augment(image, tf.constant([1, 2]), scale=(1.0, 1.0), shift=0.0, rotation=0.0)
    np.testing.assert_allclose(out.numpy(), image, atol=2e-5)


def test_stain_augment_scales_optical_density_of_a_pure_stain():
    amounts = np.linspace(0.1, 0.8, 64).reshape(8, 8)
    image = _pure_stain_image(0, amounts)  # haematoxylin only
    out = stain_augment(image, tf.constant([3, 4]), scale=(1.7, 1.7), shift=0.0, rotation=0.0)
    od_in = -np.log(image)
    od_out = -np.log(out.numpy())
    # A pure-H pixel's OD is proportional to its H amount: scaling H by 1.7 scales its OD by 1.7
    # (until RGB saturates at the 1e-6 floor, far from these amounts).
    np.testing.assert_allclose(od_out, 1.7 * od_in, rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("row", [0, 1])  # haematoxylin, eosin (whose red OD of 0.07 may clip)
def test_stain_augment_rotation_turns_the_stain_vector_by_at_most_the_angle(row):
    amounts = np.full((4, 4), 0.5)
    image = _pure_stain_image(row, amounts)
    v = RGB_FROM_HED[row] / np.linalg.norm(RGB_FROM_HED[row])
    angles = []
    for seed in range(20):
        out = stain_augment(image, tf.constant([seed, 0]), (1.0, 1.0), 0.0, rotation=12.0)
        od = -np.log(out.numpy()[0, 0])
        # same stain amount, same vector length: the OD keeps its norm, only its direction turns
        assert od.min() >= 0
        np.testing.assert_allclose(
            np.linalg.norm(od), 0.5 * np.linalg.norm(RGB_FROM_HED[row]), rtol=1e-3
        )
        angles.append(math.degrees(math.acos(np.clip(od @ v / np.linalg.norm(od), -1, 1))))
    assert max(angles) <= 12.0 + 0.05
    assert max(angles) > 3.0  # it does turn


def test_stain_augment_factors_are_log_uniform_and_per_image():
    image = np.broadcast_to(_pure_stain_image(0, np.full((2, 2), 0.3)), (200, 2, 2, 3)).copy()
    out = stain_augment(image, tf.constant([5, 6]), scale=(0.5, 2.0), shift=0.0, rotation=0.0)
    od_in = -np.log(image[:, 0, 0]).sum(-1)
    factors = -np.log(out.numpy()[:, 0, 0]).sum(-1) / od_in
    assert factors.min() >= 0.5 - 1e-3 and factors.max() <= 2.0 + 1e-3
    # log-uniform on [0.5, 2]: half the factors below 1, the log factors' mean near 0
    assert 0.35 < np.mean(factors < 1.0) < 0.65
    assert abs(np.mean(np.log(factors))) < 0.15


def test_stain_augment_bad_arguments():
    image = np.ones((4, 4, 3), np.float32)
    with pytest.raises(ValueError, match="scale"):
        stain_augment(image, tf.constant([0, 0]), scale=(0.0, 2.0))
    with pytest.raises(ValueError, match="shift"):
        stain_augment(image, tf.constant([0, 0]), shift=-0.1)
    with pytest.raises(ValueError, match="rotation"):
        stain_augment(image, tf.constant([0, 0]), rotation=60.0)
