"""GeoJSON detections: exact pixel-corner polygons, RFC 7946 structure, QuPath fields."""

from __future__ import annotations

import json
import uuid
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.segmentation import watershed

from kerasnuc.io.geojson import (
    GeoJSONWriter,
    mask_polygons,
    read_geojson_instances,
    write_geojson,
)
from kerasnuc.postprocess.measure import measure_instances


def shoelace2(ring: list[list[float]]) -> float:
    """Twice the signed area of a closed ring (positive = counter-clockwise in the numbers)."""
    return sum(x0 * y1 - x1 * y0 for (x0, y0), (x1, y1) in zip(ring[:-1], ring[1:], strict=True))


def check_rfc7946(doc: dict) -> list[dict]:
    """Validate the structure GeoJSON (RFC 7946) requires; return the features."""
    assert doc["type"] == "FeatureCollection"
    assert isinstance(doc["features"], list)
    for feature in doc["features"]:
        assert feature["type"] == "Feature"
        assert isinstance(feature["properties"], dict)
        assert isinstance(feature["id"], (str, int))
        geometry = feature["geometry"]
        assert geometry["type"] in ("Polygon", "MultiPolygon")
        polygons = (
            [geometry["coordinates"]] if geometry["type"] == "Polygon" else geometry["coordinates"]
        )
        assert polygons
        for polygon in polygons:
            assert polygon, "a polygon needs an exterior ring"
            for k, ring in enumerate(polygon):
                assert len(ring) >= 4
                assert ring[0] == ring[-1], "linear rings are closed"
                for position in ring:
                    assert len(position) == 2
                    assert all(isinstance(v, (int, float)) for v in position)
                area2 = shoelace2(ring)
                # exterior counter-clockwise, holes clockwise (right-hand rule)
                assert (area2 > 0) if k == 0 else (area2 < 0)
    return doc["features"]


def blobs(rng: np.random.Generator, size: int = 80, n: int = 20) -> np.ndarray:
    pts = rng.integers(0, size, (n, 2))
    markers = np.zeros((size, size), dtype=np.int32)
    markers[pts[:, 0], pts[:, 1]] = np.arange(1, n + 1) * 3
    dist = ndi.distance_transform_edt(markers == 0)
    return watershed(dist, markers, mask=dist < 6).astype(np.int32)


def test_single_pixel_is_unit_square_at_corners() -> None:
    mask = np.zeros((5, 6), dtype=bool)
    mask[2, 3] = True  # row 2, col 3 -> square (3, 2)-(4, 3)
    (polygon,) = mask_polygons(mask)
    (ring,) = polygon
    assert ring.tolist()[0] == ring.tolist()[-1]
    assert sorted(map(tuple, ring[:-1].tolist())) == [(3, 2), (3, 3), (4, 2), (4, 3)]
    assert shoelace2(ring.tolist()) == 2  # area 1, counter-clockwise


def test_rectangle_with_hole_and_origin() -> None:
    mask = np.zeros((6, 7), dtype=bool)
    mask[1:5, 1:6] = True  # 4 x 5 block
    mask[2, 3] = False  # one-pixel hole
    (polygon,) = mask_polygons(mask, origin=(10, 20))
    outer, hole = polygon
    assert sorted(map(tuple, outer[:-1].tolist())) == [(21, 11), (21, 15), (26, 11), (26, 15)]
    assert sorted(map(tuple, hole[:-1].tolist())) == [(23, 12), (23, 13), (24, 12), (24, 13)]
    assert shoelace2(outer.tolist()) == 2 * 20 and shoelace2(hole.tolist()) == -2


def test_concave_and_diagonal_shapes_have_exact_area(rng: np.random.Generator) -> None:
    # L-shape: OpenCV cuts the concave corner diagonally; the outline must go through it.
    mask = np.array([[1, 0], [1, 1]], dtype=bool)
    (polygon,) = mask_polygons(mask)
    assert sorted(map(tuple, polygon[0][:-1].tolist())) == [
        (0, 0),
        (0, 2),
        (1, 0),
        (1, 1),
        (2, 1),
        (2, 2),
    ]
    # Pixels touching at a corner: two squares sharing the vertex (1, 1), not a pinched ring.
    diagonal = mask_polygons(np.eye(2, dtype=bool))
    assert [sorted(map(tuple, p[0][:-1].tolist())) for p in diagonal] == [
        [(0, 0), (0, 1), (1, 0), (1, 1)],
        [(1, 1), (1, 2), (2, 1), (2, 2)],
    ]
    # Random masks (pinches, holes, islands): pixel-edge outlines, area = pixel count.
    for _ in range(300):
        mask = rng.random((7, 8)) < 0.55
        polygons = mask_polygons(mask)
        area2 = 0
        for polygon in polygons:
            for ring in polygon:
                steps = np.diff(ring, axis=0)
                assert np.all((steps[:, 0] == 0) | (steps[:, 1] == 0))
                area2 += shoelace2(ring.tolist())
        assert area2 == 2 * mask.sum()


def test_write_validates_and_carries_qupath_fields(tmp_path: Path) -> None:
    inst = np.zeros((12, 14), dtype=np.int32)
    inst[1:4, 1:5] = 5
    inst[6:10, 6:9] = 8
    inst[7, 7] = 0  # hole
    inst[0, 12] = 9  # two pieces -> MultiPolygon
    inst[3, 12] = 9
    classes = np.where(inst == 5, 1, np.where(inst > 0, 2, 0)).astype(np.int32)
    table = measure_instances(
        inst, classes=classes, mpp=0.5, class_names={1: "tumour", 2: "immune"}
    )
    path = tmp_path / "nuclei.geojson"
    n = write_geojson(path, inst, table, class_colors={1: (255, 0, 0)})
    assert n == 3
    features = check_rfc7946(json.loads(path.read_text()))
    assert [f["geometry"]["type"] for f in features] == ["Polygon", "Polygon", "MultiPolygon"]
    assert len(features[1]["geometry"]["coordinates"]) == 2  # exterior + hole
    first = features[0]["properties"]
    assert first["objectType"] == "detection"
    assert first["classification"] == {"name": "tumour", "color": [255, 0, 0]}
    assert features[1]["properties"]["classification"] == {"name": "immune"}
    measurements = first["measurements"]
    assert all(isinstance(v, (int, float)) for v in measurements.values())
    assert measurements["id"] == 5 and measurements["area_px"] == 12
    assert measurements["area_um2"] == pytest.approx(3.0)
    assert "class_name" not in measurements
    ids = [uuid.UUID(f["id"]) for f in features]  # QuPath keeps ids that parse as UUIDs
    assert len(set(ids)) == 3
    # deterministic: the same content gives the same file
    again = tmp_path / "again" / "nuclei.geojson"
    write_geojson(again, inst, table, class_colors={1: (255, 0, 0)})
    assert again.read_text() == path.read_text()


def test_round_trip_is_exact(tmp_path: Path, rng: np.random.Generator) -> None:
    inst = blobs(rng)
    assert len(np.unique(inst)) > 10
    path = tmp_path / "blobs.geojson"
    write_geojson(path, inst, measure_instances(inst))
    np.testing.assert_array_equal(read_geojson_instances(path, inst.shape), inst)
    # without a table: every nucleus, ids by position (consecutive here)
    write_geojson(path, inst)
    back = read_geojson_instances(path, inst.shape)
    ids = np.unique(inst)[1:]
    lut = np.zeros(inst.max() + 1, dtype=np.int32)
    lut[ids] = np.arange(1, ids.size + 1)
    np.testing.assert_array_equal(back, lut[inst])


def test_streaming_tiles_with_offsets(tmp_path: Path, rng: np.random.Generator) -> None:
    slide = blobs(rng, size=64, n=16)
    # each nucleus is owned by the 32 x 32 tile holding its first pixel, and keeps its part
    # inside that tile (what a stitcher hands over)
    owned = np.zeros_like(slide)
    for nid in np.unique(slide)[1:]:
        rr, cc = np.nonzero(slide == nid)
        r0, c0 = (rr[0] // 32) * 32, (cc[0] // 32) * 32
        keep = (rr >= r0) & (rr < r0 + 32) & (cc >= c0) & (cc < c0 + 32)
        owned[rr[keep], cc[keep]] = nid
    path = tmp_path / "slide.geojson"
    with GeoJSONWriter(path) as writer:
        for r0 in (0, 32):
            for c0 in (0, 32):
                tile = owned[r0 : r0 + 32, c0 : c0 + 32]
                writer.add(tile, measure_instances(tile, offset=(r0, c0)), offset=(r0, c0))
        assert not path.exists(), "renamed only at the end"
    features = check_rfc7946(json.loads(path.read_text()))
    assert len(features) == writer.count == len(np.unique(owned)) - 1
    np.testing.assert_array_equal(read_geojson_instances(path, slide.shape), owned)
    # reading a window with an offset
    window = read_geojson_instances(path, (20, 30), offset=(10, 20))
    np.testing.assert_array_equal(window, owned[10:30, 20:50])


def test_failure_leaves_no_file(tmp_path: Path) -> None:
    path = tmp_path / "out.geojson"
    path.write_text("old")
    inst = np.zeros((4, 4), dtype=np.int32)
    inst[1, 1] = 2
    other = measure_instances(np.full((4, 4), 3, dtype=np.int32))
    with pytest.raises(ValueError, match="not in `instances`"):
        with GeoJSONWriter(path) as writer:
            writer.add(inst, other)
    assert path.read_text() == "old"
    assert list(tmp_path.iterdir()) == [path]


def test_empty_collection(tmp_path: Path) -> None:
    path = tmp_path / "empty.geojson"
    assert write_geojson(path, np.zeros((3, 3), np.int32)) == 0
    assert json.loads(path.read_text()) == {"type": "FeatureCollection", "features": []}


def test_round_trip_real_nuclei(tmp_path: Path, shared_data: Path) -> None:
    from kerasnuc.data import Dataset

    ds = Dataset(shared_data / "monuseg_kumar")
    inst = ds.instances(ds.ids[0])[:256, :256]
    path = tmp_path / "real.geojson"
    n = write_geojson(path, inst, measure_instances(inst, mpp=ds.mpp), offset=(0, 0))
    assert n == len(np.unique(inst)) - 1 > 20
    check_rfc7946(json.loads(path.read_text()))
    np.testing.assert_array_equal(read_geojson_instances(path, inst.shape), inst)
