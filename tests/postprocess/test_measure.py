"""Per-nucleus measurements against hand-computed values and the regionprops definitions."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.measure import perimeter, regionprops
from skimage.segmentation import watershed

from kerasnuc.instances import compact_ids
from kerasnuc.postprocess.common import PostprocResult
from kerasnuc.postprocess.measure import NucleusTable, measure_instances

# Ruifrok & Johnston stain OD vectors (rows H, E, DAB) as in scikit-image.
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])


def rectangle_map() -> np.ndarray:
    """A 4 x 6 nucleus (rows 2..5, cols 3..8) with id 7 in a 10 x 12 map."""
    inst = np.zeros((10, 12), dtype=np.int32)
    inst[2:6, 3:9] = 7
    return inst


def blobs(rng: np.random.Generator, size: int = 96, n: int = 25) -> np.ndarray:
    pts = rng.integers(0, size, (n, 2))
    markers = np.zeros((size, size), dtype=np.int32)
    markers[pts[:, 0], pts[:, 1]] = np.arange(1, n + 1) * 5
    dist = ndi.distance_transform_edt(markers == 0)
    return watershed(dist, markers, mask=dist < 7).astype(np.int32)


def test_rectangle_hand_values() -> None:
    table = measure_instances(rectangle_map(), mpp=0.5, offset=(100, 200))
    assert len(table) == 1
    assert table["id"].tolist() == [7]
    # Centroid: mean row of 2..5 = 3.5, mean col of 3..8 = 5.5, plus the offset.
    assert table["centroid_x_px"][0] == pytest.approx(205.5)
    assert table["centroid_y_px"][0] == pytest.approx(103.5)
    assert table["centroid_x_um"][0] == pytest.approx(102.75)
    assert table["centroid_y_um"][0] == pytest.approx(51.75)
    bbox = [table[k][0] for k in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")]
    assert bbox == [203, 102, 209, 106]
    assert table["area_px"][0] == 24
    assert table["area_um2"][0] == pytest.approx(6.0)
    # Central moments by hand: rows 2..5 around 3.5 -> (2.25 + 0.25 + 0.25 + 2.25) / 4;
    # cols 3..8 around 5.5 -> (6.25 + 2.25 + 0.25) * 2 / 6; mixed moment 0 (axis-aligned).
    mu_rr = (2.25 + 0.25 + 0.25 + 2.25) / 4
    mu_cc = (6.25 + 2.25 + 0.25) * 2 / 6
    l1, l2 = mu_cc, mu_rr
    assert table["eccentricity"][0] == pytest.approx(math.sqrt(1 - l2 / l1))
    assert table["eccentricity"][0] == pytest.approx(math.sqrt(4 / 7))
    assert table["major_axis_px"][0] == pytest.approx(4 * math.sqrt(l1))
    assert table["minor_axis_px"][0] == pytest.approx(4 * math.sqrt(l2))
    assert table["major_axis_um"][0] == pytest.approx(2 * math.sqrt(l1))
    # Perimeter (Benkrid-Crookes, as skimage): the 16 border pixels all have weight-1 codes
    # (corners 1 + 2*2 = 5; edge pixels 5 or 15) -> 16, the loop through the border centres.
    assert table["perimeter_px"][0] == pytest.approx(16.0)
    assert table["perimeter_um"][0] == pytest.approx(8.0)
    assert table["solidity"][0] == pytest.approx(1.0)
    assert "class" not in table and "hematoxylin_od_mean" not in table


def test_small_shapes_hand_values() -> None:
    inst = np.zeros((8, 8), dtype=np.int32)
    inst[1:3, 1:3] = 1  # 2 x 2 square: 4 corner pixels, code 1 + 2*2 + 10 = 15 -> 4 x 1
    inst[5, 1:6] = 2  # horizontal line: l2 = 0 -> eccentricity 1, minor axis 0
    inst[7, 7] = 3  # single pixel: no second moment, eccentricity 0 by convention
    table = measure_instances(inst)
    assert table["perimeter_px"][0] == pytest.approx(4.0)
    assert table["eccentricity"].tolist() == pytest.approx([0.0, 1.0, 0.0])
    assert table["minor_axis_px"][1] == pytest.approx(0.0)
    # Line of 5: cols 1..5 around 3 -> (4 + 1 + 0 + 1 + 4) / 5 = 2.
    assert table["major_axis_px"][1] == pytest.approx(4 * math.sqrt(2.0))
    assert table["area_px"].tolist() == [4, 5, 1]


def test_hematoxylin_of_constant_colour() -> None:
    inst = rectangle_map()
    image = np.full((10, 12, 3), 255, dtype=np.uint8)
    colour = np.array([120, 60, 160])
    image[inst == 7] = colour
    table = measure_instances(inst, image=image)
    # HED formula: (ln(rgb) / ln(1e-6)) @ inv(RGB_FROM_HED), channel 0, clipped at 0.
    rgb = np.maximum(colour / 255.0, 1e-6)
    expected = max(0.0, float((np.log(rgb) / np.log(1e-6)) @ np.linalg.inv(RGB_FROM_HED)[:, 0]))
    assert expected > 0.01
    assert table["hematoxylin_od_mean"][0] == pytest.approx(expected, rel=1e-9)


def test_classes_probabilities_uncertainty_non_consecutive_ids() -> None:
    inst = np.zeros((6, 10), dtype=np.int32)
    inst[0:3, 0:3] = 3
    inst[3:6, 5:9] = 10
    classes = np.zeros_like(inst)
    classes[inst == 3] = 2
    classes[0, 0] = 1  # minority pixel: the majority class 2 wins
    classes[inst == 10] = 1
    probs = np.array([[0.1, 0.2, 0.7], [0.2, 0.5, 0.3]])
    table = measure_instances(
        inst,
        classes=classes,
        probabilities=probs,
        uncertainty=np.array([0.05, 0.5]),
        class_names={1: "tumour", 2: "lymphocyte"},
    )
    assert table["id"].tolist() == [3, 10]
    assert table["class"].tolist() == [2, 1]
    assert table["class_name"].tolist() == ["lymphocyte", "tumour"]
    assert table["class_probability"].tolist() == pytest.approx([0.7, 0.5])
    assert table["uncertainty"].tolist() == pytest.approx([0.05, 0.5])
    flat = table.flat_columns()
    assert [k for k in flat if k.startswith("prob_")] == [
        "prob_background",
        "prob_tumour",
        "prob_lymphocyte",
    ]
    assert flat["prob_lymphocyte"].tolist() == pytest.approx([0.7, 0.3])
    rows = list(table.rows())
    assert rows[1]["id"] == 10 and rows[1]["class_name"] == "tumour"


def test_class_from_probabilities_without_class_map() -> None:
    inst = np.zeros((4, 4), dtype=np.int32)
    inst[0, 0], inst[3, 3] = 1, 2
    probs = np.array([[0.5, 0.2, 0.3], [0.1, 0.6, 0.3]])
    table = measure_instances(inst, probabilities=probs)
    # argmax over the foreground classes only, even where background is larger
    assert table["class"].tolist() == [2, 1]
    assert table["class_name"].tolist() == ["2", "1"]


def test_measure_uses_the_post_processing_probabilities() -> None:
    inst = np.zeros((5, 5), dtype=np.int32)
    inst[1:3, 1:3] = 1
    inst[4, 4] = 2
    classes = np.where(inst == 1, 1, np.where(inst == 2, 2, 0)).astype(np.int32)
    probs = np.array([[0.0, 0.9, 0.1], [0.2, 0.2, 0.6]], dtype=np.float32)
    result = PostprocResult(inst, classes, {"id": np.array([1, 2]), "probabilities": probs})
    table = measure_instances(
        result.instances,
        classes=result.classes,
        probabilities=result.table["probabilities"],
        mpp=0.25,
    )
    assert table["class"].tolist() == [1, 2]
    assert table["class_probability"].tolist() == pytest.approx([0.9, 0.6])
    assert table["area_um2"].tolist() == pytest.approx([4 * 0.0625, 0.0625])


def test_matches_regionprops_on_blobs(rng: np.random.Generator) -> None:
    inst = blobs(rng)
    table = measure_instances(inst)
    props = regionprops(inst)
    assert table["id"].tolist() == [p.label for p in props]
    for p, ecc, major, minor, per, cx, cy in zip(
        props,
        table["eccentricity"],
        table["major_axis_px"],
        table["minor_axis_px"],
        table["perimeter_px"],
        table["centroid_x_px"],
        table["centroid_y_px"],
        strict=True,
    ):
        assert ecc == pytest.approx(p.eccentricity, abs=1e-9)
        assert major == pytest.approx(p.axis_major_length, abs=1e-9)
        assert minor == pytest.approx(p.axis_minor_length, abs=1e-9)
        # neighbours of other nuclei must not count: compare with the nucleus alone
        assert per == pytest.approx(perimeter(inst == p.label, 4), abs=1e-9)
        assert (cy, cx) == pytest.approx(p.centroid)
    boxes = np.stack([table[k] for k in ("bbox_y0", "bbox_x0", "bbox_y1", "bbox_x1")], axis=1)
    assert boxes.tolist() == [list(p.bbox) for p in props]


def test_empty_map_has_all_columns() -> None:
    inst = np.zeros((5, 5), dtype=np.int32)
    table = measure_instances(
        inst,
        image=np.zeros((5, 5, 3), np.uint8),
        classes=inst,
        probabilities=np.zeros((0, 3)),
        uncertainty=np.zeros(0),
        mpp=0.5,
    )
    full = measure_instances(
        np.ones((5, 5), np.int32),
        image=np.zeros((5, 5, 3), np.uint8),
        classes=np.ones((5, 5), np.int32),
        probabilities=np.array([[0.1, 0.3, 0.6]]),
        uncertainty=np.zeros(1),
        mpp=0.5,
    )
    assert len(table) == 0
    assert list(table.flat_columns()) == list(full.flat_columns())


def test_concat_and_compact_ids() -> None:
    inst = np.array([[0, 9, 9], [4, 0, 1_000_000]], dtype=np.int64)
    labels, ids = compact_ids(inst)
    assert ids.tolist() == [4, 9, 1_000_000]
    assert labels.tolist() == [[0, 2, 2], [1, 0, 3]]
    a = measure_instances(inst[:1])
    b = measure_instances(inst[1:], offset=(1, 0))
    both = NucleusTable.concat([a, b])
    assert both["id"].tolist() == [9, 4, 1_000_000]
    assert both["centroid_y_px"].tolist() == pytest.approx([0.0, 1.0, 1.0])


def test_argument_errors() -> None:
    inst = rectangle_map()
    with pytest.raises(ValueError, match="probabilities"):
        measure_instances(inst, probabilities=np.ones((2, 3)))
    with pytest.raises(ValueError, match="uncertainty"):
        measure_instances(inst, uncertainty=np.ones(3))
    with pytest.raises(ValueError, match="image"):
        measure_instances(inst, image=np.zeros((10, 12), np.uint8))
    with pytest.raises(ValueError, match="instances"):
        measure_instances(inst.astype(np.float32))
    with pytest.raises(ValueError, match="mpp"):
        measure_instances(inst, mpp=0.0)
    with pytest.raises(ValueError, match="classes"):
        measure_instances(inst, classes=np.zeros((3, 3), np.int32))
