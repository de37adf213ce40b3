"""tools/accelerator: the TensorFlow-free training feed and weights of the lent-GPU trainer."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import h5py
import keras
import numpy as np
import pytest

from kerasnuc.data.stain import rgb_to_hed
from kerasnuc.data.targets import UNKNOWN_CLASS, conic_targets_numpy

pytest.importorskip("cv2", reason="tools/accelerator needs opencv-python-headless")

TOOLS = Path(__file__).resolve().parents[2] / "tools" / "accelerator"


def _load(name: str):
    spec = importlib.util.spec_from_file_location(f"accelerator_{name}", TOOLS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


train_jax = _load("train_jax")
pack_data = _load("pack_data")

# Every augmentation off: the probabilities of kerasnuc.data.augment.AugmentConfig.none().
NO_AUG = {
    "flip_prob": 0.0,
    "rot90_prob": 0.0,
    "scale_prob": 0.0,
    "scale": (1.0, 1.0),
    "rotate_prob": 0.0,
    "rotate": (0.0, 0.0),
    "shear_prob": 0.0,
    "shear": (0.0, 0.0),
    "translate_prob": 0.0,
    "translate": (0.0, 0.0),
    "elastic_prob": 0.0,
    "elastic_alpha": (1.0, 2.0),
    "elastic_sigma": 8.0,
    "fill_value": 0.0,
    "stain_prob": 0.0,
    "stain_scale": (0.5, 2.0),
    "stain_shift": 0.05,
    "stain_rotation": 10.0,
    "hed_prob": 0.0,
    "hed_alpha": 0.1,
    "hed_beta": 0.02,
    "jitter_prob": 0.0,
    "brightness": (0.0, 0.0),
    "contrast": (1.0, 1.0),
    "saturation": (1.0, 1.0),
    "hue": (0.0, 0.0),
    "blur_prob": 0.0,
    "blur_sigma": (0.5, 2.0),
    "noise_prob": 0.0,
    "noise_std": (0.01, 0.03),
    "jpeg_prob": 0.0,
    "jpeg_quality": (30.0, 95.0),
}


def _scene(size: int = 40) -> tuple[np.ndarray, np.ndarray]:
    """A float image with a gradient and two labelled squares (instance, class maps)."""
    image = np.zeros((size, size, 3), np.float32)
    image[..., 0] = np.linspace(0, 1, size)[None, :]
    image[..., 1] = np.linspace(0, 1, size)[:, None]
    labels = np.zeros((size, size, 2), np.int32)
    labels[5:12, 6:15] = (3, 2)
    labels[20:30, 22:28] = (7, 4)
    return image, labels


def test_optical_density_matches_kerasnuc_stain(rng):
    pixels = rng.uniform(0.02, 1.0, size=(8, 8, 3)).astype(np.float32)
    expected = np.asarray(rgb_to_hed(pixels, clip_negative=False))
    np.testing.assert_allclose(train_jax._rgb_to_hed(pixels), expected, atol=1e-5)
    # hed -> rgb inverts rgb -> hed (every pixel above the 1e-6 floor).
    round_trip = train_jax._hed_to_rgb(train_jax._rgb_to_hed(pixels))
    np.testing.assert_allclose(round_trip, pixels, atol=1e-5)


def test_geometry_off_returns_the_input_and_rot90_matches_numpy():
    image, labels = _scene()
    rng = np.random.default_rng(0)
    out_image, out_labels = train_jax._geometric(rng, image, labels, NO_AUG)
    np.testing.assert_array_equal(out_image, image)
    np.testing.assert_array_equal(out_labels, labels)

    aug = dict(NO_AUG, rot90_prob=1.0)
    rng = np.random.default_rng(3)
    rng_copy = np.random.default_rng(3)
    rng_copy.random(3)  # the coins: left-right flip, up-down flip, rotation
    k = int(rng_copy.integers(1, 4))
    out_image, out_labels = train_jax._geometric(rng, image, labels, aug)
    np.testing.assert_array_equal(out_image, np.rot90(image, k))
    np.testing.assert_array_equal(out_labels, np.rot90(labels, k))


def test_translation_moves_image_and_labels_together():
    # translate (0.1, 0.1) of a 40-px crop: content moves 4 px down and 4 px right; labels are
    # copied (nearest), never blended, and read 0 where the source lies outside.
    image, labels = _scene()
    aug = dict(NO_AUG, translate_prob=1.0, translate=(0.1, 0.1))
    out_image, out_labels = train_jax._geometric(np.random.default_rng(0), image, labels, aug)
    np.testing.assert_array_equal(out_labels[4:, 4:], labels[:-4, :-4])
    assert (out_labels[:4] == 0).all() and (out_labels[:, :4] == 0).all()
    np.testing.assert_allclose(out_image[4:, 4:], image[:-4, :-4], atol=1e-3)
    assert set(np.unique(out_labels[..., 0])) <= {0, 3, 7}


def test_rotation_keeps_instance_ids():
    image, labels = _scene()
    aug = dict(NO_AUG, rotate_prob=1.0, rotate=(30.0, 30.0))
    _, out_labels = train_jax._geometric(np.random.default_rng(0), image, labels, aug)
    ids = set(np.unique(out_labels[..., 0]).tolist())
    assert ids == {0, 3, 7}
    # Each id keeps its class; areas of a 30-degree rotation about the centre stay within 15 %.
    for inst, cls in ((3, 2), (7, 4)):
        assert (out_labels[..., 1][out_labels[..., 0] == inst] == cls).all()
        area_in, area_out = (labels[..., 0] == inst).sum(), (out_labels[..., 0] == inst).sum()
        assert abs(area_out - area_in) <= 0.15 * area_in


def _pack(typed: bool) -> dict:
    image, labels = _scene(48)
    if not typed:
        labels[..., 1] = np.where(labels[..., 0] > 0, UNKNOWN_CLASS, 0)
    return {
        "images": [np.round(image * 255).astype(np.uint8)],
        "labels": [labels],
        "sources": np.array([0]),
        "probs": np.array([1.0]),
        "num_classes": 4,
    }


@pytest.mark.parametrize("typed", [True, False])
def test_batch_targets_follow_the_pipeline_conventions(typed):
    pipeline = {
        "crop_size": 48,
        "context": 0.0,
        "batch_size": 2,
        "dataset_weights": [1.0],
        "boundary_width": 1,
        "vector_units": "scale",
        "vector_scale": 10.0,
        "augment": NO_AUG,
    }
    data = _pack(typed)
    train_jax._init_worker(data, pipeline)
    images, semantic, three, vectors = train_jax.make_batch((0, 0))
    assert images.shape == (2, 48, 48, 3) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[0], data["images"][0])
    expected_three, expected_vec = conic_targets_numpy(data["labels"][0][..., 0], 1, "scale", 10.0)
    np.testing.assert_array_equal(three[1], expected_three)
    np.testing.assert_allclose(vectors[1], expected_vec, atol=2e-3)  # float16 transport
    if typed:
        np.testing.assert_array_equal(semantic[0], data["labels"][0][..., 1])
    else:  # a crop with nuclei of unknown type leaves the semantic loss entirely
        assert (semantic == UNKNOWN_CLASS).all()


def _nuclei(size: int = 24) -> np.ndarray:
    """An instance map with asymmetric nuclei (an L, a bar at the edge, a single pixel)."""
    inst = np.zeros((size, size), np.int32)
    inst[2:9, 3:5] = 1
    inst[7:9, 3:10] = 1
    inst[12:15, 15:24] = 2
    inst[19, 4] = 3
    return inst


@pytest.mark.parametrize("code", range(8))
def test_dihedral_targets_equal_the_targets_of_the_moved_crop(code):
    inst = _nuclei()
    # The symmetry written out by hand: transpose, then flip rows, then flip columns.
    moved = inst.T if code & 1 else inst
    moved = moved[::-1] if code & 2 else moved
    moved = moved[:, ::-1] if code & 4 else moved
    three, vec = conic_targets_numpy(inst, 1, "scale", 10.0)
    want_three, want_vec = conic_targets_numpy(np.ascontiguousarray(moved), 1, "scale", 10.0)
    image = np.arange(24 * 24 * 3, dtype=np.uint8).reshape(24, 24, 3)
    img, sem, got_three, got_vec = train_jax.dihedral(image, inst, three, vec, code)
    np.testing.assert_array_equal(sem, moved)
    np.testing.assert_array_equal(got_three, want_three)
    np.testing.assert_allclose(got_vec, want_vec, atol=1e-6)
    # The image moves like the labels: pixel (r, c) of the moved crop holds the source pixel.
    r, c = 2, 17
    src_r, src_c = r, c
    if code & 4:
        src_c = 23 - src_c
    if code & 2:
        src_r = 23 - src_r
    if code & 1:
        src_r, src_c = src_c, src_r
    np.testing.assert_array_equal(img[r, c], image[src_r, src_c])


class _Done:
    def __init__(self, value):
        self.value = value

    def get(self):
        return self.value


class _FakePool:
    """Hands out batches whose images carry the batch index, so the yields can be traced."""

    def apply_async(self, fn, args):
        index = args[0][1]
        images = np.full((2, 4, 4, 3), index, np.uint8)
        labels = np.zeros((2, 4, 4), np.int8)
        vectors = np.zeros((2, 4, 4, 3), np.float16)
        return _Done((images, labels, labels, vectors))


@pytest.mark.parametrize("echo", [1, 2, 3])
def test_echo_uses_every_worker_batch_echo_times(echo):
    stream = train_jax.batches(_FakePool(), base_seed=0, ahead=2, echo=echo)
    seen = [int(round(float(next(stream)[0][0, 0, 0, 0]) * 255)) for _ in range(60 * echo)]
    counts = np.bincount(seen)
    # The first 40 worker batches have all left the small buffer by then, each `echo` times.
    assert (counts[:40] == echo).all(), counts
    assert max(seen) < 60 + 2 * echo


def test_learning_rate_schedule_values():
    peak, warmup, lo = 1e-3, 0.1, 0.01
    assert train_jax.learning_rate(0.0, peak, warmup, lo) == pytest.approx(0.05 * peak)
    assert train_jax.learning_rate(0.05, peak, warmup, lo) == pytest.approx(0.5 * peak)
    assert train_jax.learning_rate(0.1, peak, warmup, lo) == pytest.approx(peak)
    # Half-way through the decay: cos(pi / 2) = 0, so lo + (1 - lo) / 2.
    assert train_jax.learning_rate(0.55, peak, warmup, lo) == pytest.approx(peak * 0.505)
    assert train_jax.learning_rate(1.0, peak, warmup, lo) == pytest.approx(lo * peak)
    assert train_jax.learning_rate(1.5, peak, warmup, lo) == pytest.approx(lo * peak)
    assert not math.isnan(train_jax.learning_rate(0.0, peak, 0.0, lo))


def test_float16_weights_hold_the_model_variables_only(tmp_path):
    keras.utils.set_random_seed(0)
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.Dense(3, name="dense")(inputs))
    model.compile(optimizer="adam", loss="mse")
    model.fit(np.ones((4, 4)), np.zeros((4, 3)), epochs=1, verbose=0)  # optimizer state exists
    path = tmp_path / "model.weights.h5"
    train_jax.save_float16(model, path)
    with h5py.File(path, "r") as f:
        assert "optimizer" not in f
        stored = []
        f.visititems(lambda n, o: stored.append(o.dtype) if isinstance(o, h5py.Dataset) else None)
    assert stored and all(d == np.float16 for d in stored)
    clone = keras.Model.from_config(model.get_config())
    clone.load_weights(path)
    for a, b in zip(model.get_weights(), clone.get_weights(), strict=True):
        np.testing.assert_allclose(b, a.astype(np.float16).astype(np.float32), rtol=0, atol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.weights.h5"]


def test_packed_sampling_probabilities_balance_slides_per_dataset():
    from kerasnuc.data.pipeline import _Item

    lab = np.zeros((4, 4, 2), np.int32)
    ids = ["c/train_1_000", "c/train_1_001", "c/train_1_002", "c/train_2_000", "k/TCGA-1"]
    items = [_Item(i, np.zeros((4, 4, 3), np.uint8), lab, source=int(i[0] == "k")) for i in ids]
    freqs = np.tile([0.5, 0.5], (5, 1))
    # no groups: the consep images share their dataset equally, the Kumar image has its own
    np.testing.assert_allclose(
        pack_data.sampling_probabilities(items, freqs), [0.25, 0.25, 0.25, 0.25, 1.0]
    )
    # alpha 0: slide 1 (three patches) and slide 2 (one) get 1/2 each
    p = pack_data.sampling_probabilities(items, freqs, "^train_[0-9]+", 0.0)
    np.testing.assert_allclose(p, [1 / 6, 1 / 6, 1 / 6, 1 / 2, 1.0])
