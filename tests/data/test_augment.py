"""Tests for kerasnuc.data.augment: geometry, label integrity, colour ops, determinism, tf.data."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import tensorflow as tf
from scipy import ndimage

from kerasnuc.data.augment import AugmentConfig, augment, warp
from kerasnuc.fileutil import KerasnucError

NONE = AugmentConfig.none()
SEED = tf.constant([3, 5])


def only(**kwargs) -> AugmentConfig:
    """A config where only the named ops are active."""
    return dataclasses.replace(NONE, **kwargs)


def run(image, labels, config, seed=SEED):
    out_image, out_labels = augment(tf.constant(image), tf.constant(labels), seed, config)
    return out_image.numpy(), out_labels.numpy()


@pytest.fixture
def pair(rng):
    """64x64 random image and a 2-channel label stack with a unique id per pixel."""
    image = rng.uniform(0.0, 1.0, (64, 64, 3)).astype(np.float32)
    ids = np.arange(1, 64 * 64 + 1, dtype=np.int32).reshape(64, 64)
    return image, np.stack([ids, ids % 5], axis=-1)


def discs(size: int = 96) -> np.ndarray:
    """Instance map of separated discs (radius ~6.3) on a 16-pixel lattice, ids 1..N."""
    rows, cols = np.mgrid[:size, :size]
    inst = np.zeros((size, size), np.int32)
    n = 0
    for cy in range(12, size - 8, 16):
        for cx in range(12, size - 8, 16):
            n += 1
            inst[(rows - cy) ** 2 + (cols - cx) ** 2 <= 40] = n
    return inst


# ----------------------------------------------------------------------------- geometry


def test_none_preset_is_identity(pair):
    image, labels = pair
    out_image, out_labels = run(image, labels, NONE)
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_labels, labels)


def test_flip_matches_numpy_and_twice_is_identity(pair):
    image, labels = pair
    config = only(flip_prob=1.0)  # both flips fire
    once = run(image, labels, config)
    np.testing.assert_array_equal(once[1], labels[::-1, ::-1])
    np.testing.assert_array_equal(once[0], image[::-1, ::-1])
    twice = run(*once, config)
    np.testing.assert_array_equal(twice[1], labels)
    np.testing.assert_array_equal(twice[0], image)


def test_rot90_is_a_numpy_rotation_and_four_times_identity(pair):
    image, labels = pair
    config = only(rot90_prob=1.0)
    out = run(image, labels, config)
    matches = [k for k in (1, 2, 3) if np.array_equal(out[1], np.rot90(labels, k))]
    assert len(matches) == 1
    np.testing.assert_array_equal(out[0], np.rot90(image, matches[0]))
    for _ in range(3):  # same seed -> same k each time; 4 * k quarter turns
        out = run(*out, config)
    np.testing.assert_array_equal(out[1], labels)
    np.testing.assert_array_equal(out[0], image)


def test_known_translation_moves_marked_pixel(pair):
    image, labels = pair
    config = only(translate_prob=1.0, translate=(0.125, 0.125), fill_value=0.25)
    out_image, out_labels = run(image, labels, config)
    # 0.125 * 64 = 8 pixels down and right.
    assert out_labels[18, 28, 0] == labels[10, 20, 0]
    np.testing.assert_array_equal(out_labels[8:, 8:], labels[:-8, :-8])
    np.testing.assert_array_equal(out_image[8:, 8:], image[:-8, :-8])
    assert (out_labels[:8] == 0).all() and (out_labels[:, :8] == 0).all()
    np.testing.assert_array_equal(out_image[:8], 0.25)


def test_reflect_fill_mirrors_image_but_not_labels(pair):
    image, labels = pair
    config = only(translate_prob=1.0, translate=(0.125, 0.125), fill_mode="reflect")
    out_image, out_labels = run(image, labels, config)
    # Shift by 8: output row i < 8 reads source row i - 8, mirrored with the edge repeated to
    # row 7 - i.
    np.testing.assert_array_equal(out_image[:8, 8:], image[7::-1, :-8])
    np.testing.assert_array_equal(out_image[8:, :8], image[:-8, 7::-1])
    assert (out_labels[:8] == 0).all() and (out_labels[:, :8] == 0).all()


def test_affine_rotation_by_90_equals_rot90(pair):
    image, labels = pair
    out_image, out_labels = run(image, labels, only(rotate_prob=1.0, rotate=(90.0, 90.0)))
    np.testing.assert_array_equal(out_labels, np.rot90(labels, 1))
    np.testing.assert_allclose(out_image, np.rot90(image, 1), atol=1e-5)


def test_zoom_of_two_maps_known_pixels(rng):
    size, centre = 65, 32  # odd size: the centre is a pixel
    image = rng.uniform(0.0, 1.0, (size, size, 3)).astype(np.float32)
    ids = np.arange(1, size * size + 1, dtype=np.int32).reshape(size, size, 1)
    out_image, out_labels = run(image, ids, only(scale_prob=1.0, scale=(2.0, 2.0)))
    # Output pixel centre + 2 * m reads source pixel centre + m.
    m = np.arange(-16, 17)
    np.testing.assert_array_equal(out_labels[32 + 2 * m][:, 32 + 2 * m], ids[32 + m][:, 32 + m])
    np.testing.assert_array_equal(out_image[32 + 2 * m][:, 32 + 2 * m], image[32 + m][:, 32 + m])
    assert out_labels[centre + 10, centre - 6, 0] == ids[centre + 5, centre - 3, 0]


def test_labels_never_interpolated_under_all_geometric_ops(rng):
    labels = np.zeros((64, 64, 2), np.int32)
    labels[5:30, 5:30] = [7, 2]
    labels[30:60, 20:50] = [100000, 3]
    image = rng.uniform(0.0, 1.0, (64, 64, 3)).astype(np.float32)
    config = AugmentConfig(rotate=(-30.0, 30.0), elastic_prob=1.0, rotate_prob=1.0, scale_prob=1.0)
    for k in range(4):
        out_image, out_labels = run(image, labels, config, tf.constant([k, 11]))
        assert set(np.unique(out_labels[..., 0])) <= {0, 7, 100000}
        pairs = {tuple(p) for p in out_labels.reshape(-1, 2)}
        assert pairs <= {(0, 0), (7, 2), (100000, 3)}
        assert out_image.min() >= 0.0 and out_image.max() <= 1.0


def test_elastic_keeps_instances_whole(rng):
    inst = discs()
    labels = inst[..., None]
    image = np.repeat((inst > 0).astype(np.float32)[..., None], 3, axis=-1)
    config = only(elastic_prob=1.0, elastic_alpha=(2.0, 2.0), elastic_sigma=8.0)
    for k in range(3):
        out_image, out_labels = run(image, labels, config, tf.constant([k, 1]))
        out = out_labels[..., 0]
        assert not np.array_equal(out, inst)  # it did move
        assert set(np.unique(out)) <= set(np.unique(inst))
        # Nearest resampling may leave a boundary pixel touching its nucleus only diagonally,
        # so connectivity is 8-connectivity.
        for i in np.unique(out)[1:]:
            _, n = ndimage.label(out == i, structure=np.ones((3, 3)))
            assert n == 1, f"instance {i} split into {n} parts"
        # Discs far from the border all survive a displacement of ~2 px.
        assert len(np.unique(out)) == len(np.unique(inst))


def test_elastic_displacement_has_requested_size(rng):
    # A horizontal ramp image reads its own column coordinate: the displacement is readable.
    size = 128
    ramp = np.tile(np.arange(size, dtype=np.float32)[None, :, None], (size, 1, 3)) / size
    labels = np.zeros((size, size, 1), np.int32)
    out, _ = run(ramp, labels, only(elastic_prob=1.0, elastic_alpha=(3.0, 3.0)))
    shift = (out[..., 0] - ramp[..., 0]) * size
    inner = shift[8:-8, 8:-8]
    assert 2.2 < inner.std() < 3.8


# ----------------------------------------------------------------------------- warp


def test_warp_bilinear_and_nearest_rules():
    image = np.arange(16, dtype=np.float32).reshape(4, 4, 1)
    labels = np.arange(16, dtype=np.int32).reshape(4, 4, 1)
    coords = tf.constant([[[0.5, 0.0], [1.25, 2.0], [-3.0, 0.0]]], tf.float32)
    out_image, out_labels = warp(image, labels, coords, fill_value=-1.0)
    # (0.5, 0): halfway between 0 and 4; (1.25, 2): 0.75 * 6 + 0.25 * 10; outside: the fill.
    np.testing.assert_allclose(out_image.numpy()[0, :, 0], [2.0, 7.0, -1.0])
    # Halves round up; outside the image labels read 0.
    np.testing.assert_array_equal(out_labels.numpy()[0, :, 0], [4, 6, 0])


# ----------------------------------------------------------------------------- colour


@pytest.mark.parametrize(
    "config",
    [
        only(hed_prob=1.0, hed_alpha=0.3, hed_beta=0.1),
        only(jitter_prob=1.0),
        only(blur_prob=1.0),
        only(noise_prob=1.0),
    ],
    ids=["hed", "jitter", "blur", "noise"],
)
def test_colour_ops_change_image_only(pair, config):
    image, labels = pair
    out_image, out_labels = run(image, labels, config)
    np.testing.assert_array_equal(out_labels, labels)
    assert np.abs(out_image - image).max() > 1e-3
    assert out_image.min() >= 0.0 and out_image.max() <= 1.0


def test_brightness_shift_from_definition(pair):
    image, labels = pair
    config = only(
        jitter_prob=1.0,
        brightness=(0.1, 0.1),
        contrast=(1.0, 1.0),
        saturation=(1.0, 1.0),
        hue=(0.0, 0.0),
    )
    out_image, _ = run(image, labels, config)
    np.testing.assert_allclose(out_image, np.clip(image + 0.1, 0.0, 1.0), atol=1e-5)


def test_blur_of_constant_is_constant_and_matches_scipy(pair):
    image, labels = pair
    config = only(blur_prob=1.0, blur_sigma=(1.0, 1.0))
    flat, _ = run(np.full_like(image, 0.3), labels, config)
    np.testing.assert_allclose(flat, 0.3, atol=1e-6)
    out_image, _ = run(image, labels, config)
    # scipy "reflect" repeats the edge pixel, radius int(3 * sigma + 0.5) = 3, as ours.
    expected = ndimage.gaussian_filter(image, sigma=(1.0, 1.0, 0.0), mode="reflect", truncate=3.0)
    np.testing.assert_allclose(out_image, expected, atol=1e-5)


def test_noise_has_requested_std(pair):
    image, labels = pair
    grey = np.full_like(image, 0.5)
    out_image, _ = run(grey, labels, only(noise_prob=1.0, noise_std=(0.05, 0.05)))
    residual = out_image - 0.5
    assert abs(residual.mean()) < 0.003
    assert abs(residual.std() - 0.05) < 0.0025


# ----------------------------------------------------------------------------- determinism


def test_same_seed_same_output_different_seed_different(pair):
    image, labels = pair
    config = AugmentConfig(elastic_prob=1.0, rotate_prob=1.0)
    a = run(image, labels, config, tf.constant([1, 2]))
    b = run(image, labels, config, tf.constant([1, 2], tf.int64))
    c = run(image, labels, config, tf.constant([1, 3]))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[1], c[1])
    assert np.abs(a[0] - c[0]).max() > 1e-3


def test_probabilities_are_respected(pair):
    image, labels = pair
    config = only(flip_prob=0.5)
    flipped = 0
    for k in range(40):
        _, out = run(image, labels, config, tf.constant([k, 0]))
        flipped += not np.array_equal(out, labels)
    # P(at least one of two flips) = 0.75; 40 draws -> 30 expected.
    assert 20 <= flipped <= 38


def test_works_in_tf_data_graph_mode(pair):
    image, labels = pair
    images = np.stack([image, image[::-1]])
    stacks = np.stack([labels, labels[:, ::-1]])
    config = AugmentConfig()

    def fn(i, xy):
        return augment(xy[0], xy[1], tf.stack([tf.constant(9, tf.int64), i]), config)

    ds = tf.data.Dataset.from_tensor_slices((images, stacks)).enumerate().map(fn)
    assert ds.element_spec[0].shape == (64, 64, 3)
    assert ds.element_spec[1].shape == (64, 64, 2)
    assert ds.element_spec[1].dtype == tf.int32
    outputs = list(ds.as_numpy_iterator())
    assert len(outputs) == 2
    for i, (out_image, out_labels) in enumerate(outputs):
        eager = run(images[i], stacks[i], config, tf.constant([9, i], tf.int64))
        np.testing.assert_allclose(out_image, eager[0], atol=1e-6)
        np.testing.assert_array_equal(out_labels, eager[1])


def test_non_square_shapes_preserved(rng):
    image = rng.uniform(0.0, 1.0, (32, 48, 3)).astype(np.float32)
    labels = np.ones((32, 48, 2), np.int32)
    out_image, out_labels = run(image, labels, AugmentConfig(rot90_prob=1.0))
    assert out_image.shape == (32, 48, 3) and out_labels.shape == (32, 48, 2)


def test_rejects_bad_inputs(pair):
    image, labels = pair
    with pytest.raises(ValueError, match="float32"):
        augment(tf.constant(image.astype(np.float64)), tf.constant(labels), SEED, NONE)
    with pytest.raises(ValueError, match="integer"):
        augment(tf.constant(image), tf.constant(labels[..., 0]), SEED, NONE)
    with pytest.raises(ValueError, match="seed"):
        augment(tf.constant(image), tf.constant(labels), tf.constant([1, 2, 3]), NONE)
    with pytest.raises(ValueError, match="same height"):
        augment(tf.constant(image), tf.constant(labels[:10]), SEED, NONE)


# ----------------------------------------------------------------------------- config


def test_config_json_round_trip():
    config = AugmentConfig(rotate=(-10.0, 20.0), fill_mode="reflect", hed_beta=0.05)
    data = json.loads(json.dumps(config.to_dict()))
    assert data["rotate"] == [-10.0, 20.0]
    assert AugmentConfig.from_dict(data) == config
    assert AugmentConfig.from_dict({}) == AugmentConfig()
    assert (
        AugmentConfig.preset("none") == NONE and AugmentConfig.preset("default") == AugmentConfig()
    )
    assert not NONE.geometric and AugmentConfig().geometric


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"flip_prob": 1.5}, "flip_prob"),
        ({"scale": (1.2, 0.8)}, "scale"),
        ({"scale": (0.0, 1.0)}, "scale"),
        ({"shear": (-50.0, 5.0)}, "shear"),
        ({"hue": (-0.6, 0.0)}, "hue"),
        ({"fill_mode": "wrap"}, "fill_mode"),
        ({"elastic_sigma": 0.0}, "elastic_sigma"),
    ],
)
def test_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        AugmentConfig(**kwargs)


def test_config_from_dict_errors():
    with pytest.raises(KerasnucError, match="unknown"):
        AugmentConfig.from_dict({"flip": 0.5})
    with pytest.raises(KerasnucError, match="rotate"):
        AugmentConfig.from_dict({"rotate": [10]})
    with pytest.raises(ValueError, match="name"):
        AugmentConfig.preset("strong")


def test_stain_preset_round_trip_and_pipeline_name():
    from kerasnuc.data.pipeline import PipelineConfig

    stain = AugmentConfig.preset("stain")
    assert stain.stain_prob > 0 and stain.jpeg_prob > 0
    assert stain.stain_scale[0] <= 0.5 and stain.stain_scale[1] >= 2.0  # beyond +-10 %
    assert AugmentConfig.from_dict(stain.to_dict()) == stain
    assert PipelineConfig.from_dict({"augment": "stain"}).augment == stain
    with pytest.raises(KerasnucError, match="augment"):
        PipelineConfig.from_dict({"augment": "strong"})
    # the defaults do not change existing runs
    assert AugmentConfig().stain_prob == 0.0 and AugmentConfig().jpeg_prob == 0.0


def test_jpeg_compression_changes_the_image_deterministically(rng):
    config = dataclasses.replace(AugmentConfig.none(), jpeg_prob=1.0, jpeg_quality=(10.0, 10.0))
    image = tf.constant(rng.random((32, 32, 3), dtype=np.float32))
    labels = tf.zeros((32, 32, 1), tf.int32)
    a, _ = augment(image, labels, tf.constant([1, 2]), config)
    b, _ = augment(image, labels, tf.constant([1, 2]), config)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    # quality 10 on white noise: 8x8 blocks lose most detail (compare with a hand bound)
    assert float(tf.reduce_mean(tf.abs(a - image))) > 0.05
    assert (
        a.shape == image.shape and 0.0 <= float(tf.reduce_min(a)) <= float(tf.reduce_max(a)) <= 1.0
    )
    with pytest.raises(ValueError, match="jpeg_quality"):
        AugmentConfig(jpeg_quality=(0.0, 50.0))
