"""The classical colour-deconvolution + watershed baseline on drawn images with known nuclei."""

from __future__ import annotations

import numpy as np
import pytest

from kerasnuc.postprocess.classical import ClassicalConfig, classical_nuclei, haematoxylin

PINK = (235, 170, 210)  # eosin-like background
PURPLE = (70, 40, 140)  # haematoxylin-like nucleus


def _disc(shape, centre, radius):
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def _image(discs, shape=(96, 96)):
    image = np.empty(shape + (3,), np.uint8)
    image[:] = PINK
    truth = np.zeros(shape, np.int32)
    for k, (centre, radius) in enumerate(discs, start=1):
        mask = _disc(shape, centre, radius)
        image[mask] = PURPLE
        truth[mask] = k
    return image, truth


def test_haematoxylin_is_higher_in_purple_than_pink():
    image, truth = _image([((48, 48), 10)])
    h = haematoxylin(image)
    assert h[truth > 0].min() > h[truth == 0].max()


def test_separate_discs_become_one_instance_each():
    discs = [((20, 20), 8), ((20, 70), 9), ((70, 45), 10)]
    image, truth = _image(discs)
    labels = classical_nuclei(image, mpp=0.25)
    assert labels.max() == 3
    for k in range(1, 4):
        ids, counts = np.unique(labels[truth == k], return_counts=True)
        best = ids[np.argmax(counts)]
        assert best > 0
        iou = (
            np.logical_and(labels == best, truth == k).sum()
            / np.logical_or(labels == best, truth == k).sum()
        )
        assert iou > 0.85


def test_touching_discs_are_split_by_the_watershed():
    # Two r=10 discs whose centres are 16 px apart overlap: one connected component.
    image, truth = _image([((48, 38), 10), ((48, 54), 10)])
    labels = classical_nuclei(image, mpp=0.25, config=ClassicalConfig(min_distance_um=2.0))
    assert labels.max() == 2
    # The split runs between the centres: each centre pixel gets a different label.
    assert labels[48, 38] != labels[48, 54]
    assert labels[48, 38] > 0 and labels[48, 54] > 0


def test_small_objects_are_removed_by_area_in_um2():
    # r=2 disc: ~13 px = 0.8 um^2 at 0.25 um/px, below the 6 um^2 minimum; r=8 disc kept.
    image, _ = _image([((20, 20), 2), ((60, 60), 8)])
    labels = classical_nuclei(image, mpp=0.25)
    assert labels.max() == 1
    assert labels[60, 60] == 1 and labels[20, 20] == 0


def test_blank_image_gives_no_nuclei_and_bad_arguments_fail():
    blank = np.full((32, 32, 3), 200, np.uint8)
    assert classical_nuclei(blank).max() == 0
    with pytest.raises(ValueError, match="mpp"):
        classical_nuclei(blank, mpp=0)
    with pytest.raises(ValueError, match="shape"):
        classical_nuclei(blank[..., 0])
    with pytest.raises(ValueError, match="min_area_um2"):
        ClassicalConfig(min_area_um2=-1)
