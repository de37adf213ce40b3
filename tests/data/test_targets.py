"""Targets from instance maps: values computed by hand or from the definitions."""

from __future__ import annotations

import numpy as np
import pytest

from kerasnuc.data.targets import (
    centre_vectors,
    conic_targets_numpy,
    label_boundaries,
    three_label_map,
)
from kerasnuc.instances import instance_centroids


def _grid(text: str) -> np.ndarray:
    """Parse a picture of digits (one row per line) into an int array."""
    rows = [line.strip() for line in text.strip().splitlines()]
    return np.array([[int(ch) for ch in row] for row in rows])


def _two_touching_squares() -> np.ndarray:
    inst = np.zeros((10, 16), dtype=np.int32)
    inst[1:9, 1:7] = 1  # A: rows 1..8, cols 1..6
    inst[1:9, 7:13] = 5  # B: rows 1..8, cols 7..12 (non-consecutive id on purpose)
    return inst


def test_three_label_touching_squares_width1():
    expected = _grid(
        """
        0000000000000000
        0222222222222000
        0211112211112000
        0211112211112000
        0211112211112000
        0211112211112000
        0211112211112000
        0211112211112000
        0222222222222000
        0000000000000000
        """
    )
    out = three_label_map(_two_touching_squares(), boundary_width=1)
    assert out.dtype == np.uint8
    np.testing.assert_array_equal(out, expected)


def test_three_label_touching_squares_width2():
    expected = _grid(
        """
        0000000000000000
        0222222222222000
        0222222222222000
        0221122221122000
        0221122221122000
        0221122221122000
        0221122221122000
        0222222222222000
        0222222222222000
        0000000000000000
        """
    )
    out = three_label_map(_two_touching_squares(), boundary_width=2)
    np.testing.assert_array_equal(out, expected)


def test_three_label_connectivity2_marks_diagonal_neighbours():
    inst = np.zeros((8, 8), dtype=np.int32)
    inst[1:6, 1:6] = 1
    inst[5:7, 5:7] = 2  # takes pixel (5, 5) from nucleus 1
    four = three_label_map(inst, connectivity=1)
    eight = three_label_map(inst, connectivity=2)
    # (4, 4): its 4-neighbours are all nucleus 1, its diagonal neighbour (5, 5) is nucleus 2.
    assert four[4, 4] == 1
    assert eight[4, 4] == 2
    # (3, 3): all 8 neighbours are nucleus 1.
    assert four[3, 3] == 1 and eight[3, 3] == 1


def test_three_label_image_border_is_not_boundary():
    inst = np.zeros((6, 6), dtype=np.int32)
    inst[0:4, 0:4] = 3
    expected = _grid(
        """
        111200
        111200
        111200
        222200
        000000
        000000
        """
    )
    np.testing.assert_array_equal(three_label_map(inst), expected)


def test_three_label_tiny_nucleus_keeps_one_seed():
    inst = np.zeros((7, 7), dtype=np.int32)
    inst[2:5, 2:5] = 1  # 3x3: all boundary at width 2
    with_seed = three_label_map(inst, boundary_width=2)
    without = three_label_map(inst, boundary_width=2, keep_seed=False)
    expected = np.where(inst > 0, 2, 0)
    np.testing.assert_array_equal(without, expected)
    expected[3, 3] = 1  # the centre pixel is the deepest one
    np.testing.assert_array_equal(with_seed, expected)


def test_three_label_seed_tie_break_by_centroid_then_raster_order():
    inst = np.zeros((6, 8), dtype=np.int32)
    inst[2:4, 1:3] = 1  # 2x2: all pixels equally deep and equally far from the centroid
    inst[2, 4:7] = 2  # 1x3 bar: the middle pixel is nearest the centroid
    out = three_label_map(inst)
    assert out[2, 1] == 1 and out[2, 2] == 2 and out[3, 1] == 2 and out[3, 2] == 2
    np.testing.assert_array_equal(out[2, 4:7], [2, 1, 2])
    assert (out == 1).sum() == 2


def test_label_boundaries_argument_checks():
    with pytest.raises(ValueError, match="`width` must be a positive int"):
        label_boundaries(np.zeros((3, 3), int), width=0)
    with pytest.raises(ValueError, match="`connectivity` must be 1 or 2"):
        label_boundaries(np.zeros((3, 3), int), connectivity=3)
    with pytest.raises(ValueError, match="2-D integer"):
        three_label_map(np.zeros((3, 3), np.float32))


def test_centre_vectors_5x5_square_by_hand():
    inst = np.zeros((10, 10), dtype=np.int32)
    inst[2:7, 3:8] = 4  # centroid (4, 5)
    vec = centre_vectors(inst)
    assert vec.shape == (10, 10, 2) and vec.dtype == np.float32
    np.testing.assert_allclose(vec[2, 3], [2, 2])
    np.testing.assert_allclose(vec[6, 7], [-2, -2])
    np.testing.assert_allclose(vec[4, 5], [0, 0])
    np.testing.assert_allclose(vec[2, 7], [2, -2])
    np.testing.assert_allclose(vec[5, 4], [-1, 1])
    assert np.all(vec[inst == 0] == 0)
    np.testing.assert_allclose(centre_vectors(inst, "scale", 4.0)[2, 3], [0.5, 0.5])
    np.testing.assert_allclose(
        centre_vectors(inst, "instance")[2, 3], [2 / np.sqrt(8), 2 / np.sqrt(8)], rtol=1e-6
    )
    with pytest.raises(ValueError, match="`units`"):
        centre_vectors(inst, "mm")
    with pytest.raises(ValueError, match="`scale` must be > 0"):
        centre_vectors(inst, "scale", 0.0)


def test_centre_vectors_two_nuclei_use_their_own_centroid():
    inst = np.zeros((4, 9), dtype=np.int32)
    inst[1, 0:3] = 1  # centroid (1, 1)
    inst[0:3, 6] = 2  # centroid (1, 6)
    vec = centre_vectors(inst)
    np.testing.assert_allclose(vec[1, 0], [0, 1])
    np.testing.assert_allclose(vec[1, 2], [0, -1])
    np.testing.assert_allclose(vec[0, 6], [1, 0])
    np.testing.assert_allclose(vec[2, 6], [-1, 0])


def test_instance_centroids_by_hand():
    inst = np.zeros((6, 6), dtype=np.int32)
    inst[0:2, 0:2] = 9  # centroid (0.5, 0.5)
    inst[3, 2:5] = 4  # centroid (3, 3)
    ids, cen = instance_centroids(inst)
    np.testing.assert_array_equal(ids, [4, 9])
    np.testing.assert_allclose(cen, [[3, 3], [0.5, 0.5]])
    ids, cen = instance_centroids(np.zeros((3, 3), np.int32))
    assert ids.shape == (0,) and cen.shape == (0, 2)


def test_huge_ids_are_handled():
    inst = np.zeros((4, 4), dtype=np.int64)
    inst[0, 0:2] = 2**40
    inst[3, 3] = 7
    ids, cen = instance_centroids(inst)
    np.testing.assert_array_equal(ids, [7, 2**40])
    np.testing.assert_allclose(cen, [[3, 3], [0, 0.5]])


def test_targets_on_real_crop(shared_data):
    from kerasnuc.data.dataset import Dataset

    ds = Dataset(shared_data / "consep")
    sample = ds.sample(ds.ids[0])
    inst = sample.instances[:96, :96]
    three, vectors = conic_targets_numpy(inst, 1, "scale", 10.0)  # the training targets
    t = {"three_label": three, "vectors": vectors}
    fg = inst > 0
    # Definitions: three-label is 0 exactly on background; vectors vanish on background;
    # every nucleus of the crop has at least one interior pixel (keep_seed).
    np.testing.assert_array_equal(t["three_label"] == 0, ~fg)
    assert np.all(t["vectors"][~fg] == 0)
    ids = np.unique(inst[fg])
    assert set(np.unique(inst[t["three_label"] == 1])) == set(ids.tolist())
