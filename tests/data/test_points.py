"""Point labels and their encodings: values computed by hand or from the definitions."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kerasnuc.data import points_cache
from kerasnuc.data.points import (
    IGNORE,
    cluster_label,
    encode_points,
    nearest_two_distances,
    points_from_instances,
    repel_code,
    snap_points,
    voronoi_cells,
    voronoi_label,
    voronoi_lines,
)
from kerasnuc.data.points_cache import cache_path, cached_encode_points, encoding_params
from kerasnuc.fileutil import KerasnucError
from kerasnuc.io.points import read_points_csv, read_points_geojson

THREE = np.array([[4, 4], [4, 15], [15, 4]])


def _disc(shape, centre, radius):
    rows, cols = np.indices(shape)
    return (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= radius**2


# ---------------------------------------------------------------------------------------------
# Voronoi


def test_voronoi_cells_match_nearest_point_definition():
    cells, d1 = voronoi_cells((20, 20), THREE)
    rows, cols = np.indices((20, 20))
    dist = np.stack([np.hypot(rows - r, cols - c) for r, c in THREE])
    srt = np.sort(dist, axis=0)
    no_tie = srt[0] < srt[1]
    np.testing.assert_array_equal(cells[no_tie], dist.argmin(axis=0)[no_tie] + 1)
    np.testing.assert_allclose(d1, srt[0])
    # Bisector of points 1 and 2 (cols 4 and 15) is col 9.5: cols <= 9 cell 1, >= 10 cell 2.
    assert np.all(cells[:8, :10] == 1) and np.all(cells[:8, 10:] == 2)
    # Bisector of points 1 and 3 (rows 4 and 15) is row 9.5.
    assert np.all(cells[10:, :8] == 3)


def test_voronoi_lines_and_label_by_hand():
    cells, d1 = voronoi_cells((20, 20), THREE)
    lines = voronoi_lines(cells)
    # Away from the junction, the line between cells 1 and 2 is cols 9 and 10 (both sides),
    # the line between cells 1 and 3 rows 9 and 10.
    for r in range(8):
        np.testing.assert_array_equal(np.flatnonzero(lines[r]), [9, 10])
    for c in range(8):
        np.testing.assert_array_equal(np.flatnonzero(lines[:, c]), [9, 10])
    label = voronoi_label(cells, d1, disc_radius=2)
    assert label.dtype == np.uint8
    discs = np.zeros((20, 20), bool)
    for p in THREE:
        discs |= _disc((20, 20), p, 2)
    assert discs.sum() == 3 * 13  # 13 pixels within distance 2 of a pixel centre
    expected = np.full((20, 20), IGNORE, dtype=np.uint8)
    expected[discs] = 1
    expected[lines] = 0
    np.testing.assert_array_equal(label, expected)
    assert label[4, 4] == 1 and label[0, 9] == 0 and label[0, 0] == IGNORE


def test_voronoi_lines_win_over_discs_for_close_points():
    cells, d1 = voronoi_cells((9, 9), np.array([[4, 3], [4, 5]]))
    label = voronoi_label(cells, d1, disc_radius=3)
    # The two cells meet between cols 3 and 5; col 4 is equidistant and goes to one side, so
    # the line is cols {3, 4} or {4, 5}: column 4 is background on every row.
    assert np.all(label[:, 4] == 0)
    assert label[4, 3] == 0 or label[4, 5] == 0


def test_no_points_and_one_point():
    img = np.full((12, 10, 3), 200, np.uint8)
    out = encode_points(img, np.zeros((0, 2)))
    assert np.all(out["voronoi"] == IGNORE)
    assert np.all(out["cluster"] == 0)
    assert np.all(out["repel"] == 0) and np.all(out["filtered_repel"] == 0)
    out = encode_points(img, np.array([[5.2, 4.7]]), r=3.0)
    assert not np.any(out["voronoi"] == 0)  # a single cell has no line
    # D = d1 for a single point: 1 / (1 + 0.05 d) within d <= 3 of pixel (5, 5).
    assert out["repel"][5, 5] == 1.0
    np.testing.assert_allclose(out["repel"][5, 8], 1 / (1 + 0.05 * 3), rtol=1e-6)
    np.testing.assert_allclose(out["repel"][8, 5], 1 / (1 + 0.05 * 3), rtol=1e-6)
    assert out["repel"][9, 5] == 0


# ---------------------------------------------------------------------------------------------
# Snapping and points from instances


def test_snap_points_rounds_clips_and_dedupes():
    # Half-up rounding; (4.5, 2.5) rounds to (5, 3) and is clipped to the last row.
    pts = np.array([[0.4, 9.4], [-0.5, 0.2], [0.2, 9.2], [4.5, 2.5]])
    np.testing.assert_array_equal(snap_points(pts, (5, 10)), [[0, 9], [0, 0], [4, 3]])
    with pytest.raises(ValueError, match="inside the 5x10 image"):
        snap_points(np.array([[5.0, 1.0]]), (5, 10))
    with pytest.raises(ValueError, match="shape \\(K, 2\\)"):
        snap_points(np.zeros((3, 3)), (5, 10))


def test_points_from_instances_by_hand():
    inst = np.zeros((8, 8), dtype=np.int32)
    inst[1:4, 1:4] = 3  # centroid (2, 2)
    inst[6, 2:6] = 8  # centroid (6, 3.5)
    inst[0, 6] = 5  # centroid (0, 6)
    cls = np.zeros_like(inst)
    cls[1:4, 1:4] = 2
    cls[1, 1] = 4  # minority pixel of nucleus 3
    cls[6, 2:6] = [1, 3, 3, 1]  # tie 1 vs 3 -> smallest id
    cls[0, 6] = 4
    pts, pc = points_from_instances(inst, cls)
    np.testing.assert_allclose(pts, [[2, 2], [0, 6], [6, 3.5]])
    np.testing.assert_array_equal(pc, [2, 4, 1])
    assert pc.dtype == np.int32
    pts, pc = points_from_instances(inst)
    assert pc is None and pts.shape == (3, 2)
    pts, pc = points_from_instances(np.zeros((4, 4), np.int32), np.zeros((4, 4), np.int32))
    assert pts.shape == (0, 2) and pc.shape == (0,)


# ---------------------------------------------------------------------------------------------
# Local pixel clustering


def test_cluster_recovers_dark_discs(rng):
    shape = (64, 64)
    centres = [(12, 12), (12, 48), (48, 12), (48, 50), (30, 30)]
    truth = np.zeros(shape, bool)
    for c in centres:
        truth |= _disc(shape, c, 5)
    img = np.empty(shape + (3,), np.float64)
    img[:] = (225, 200, 225)
    img[truth] = (100, 60, 140)
    img += rng.normal(0, 8, img.shape)
    img = np.clip(np.rint(img), 0, 255).astype(np.uint8)
    out = encode_points(img, np.array(centres, float))
    pred = out["cluster"] == 1
    iou = (pred & truth).sum() / (pred | truth).sum()
    assert iou > 0.9, iou
    # Voronoi lines are background in the clustering label (lines_background=True).
    assert not np.any(pred & (out["voronoi"] == 0))


def test_cluster_nucleus_is_the_cluster_near_the_point():
    # One cell, a bright disc around the point on a dark background: colour alone does not say
    # which cluster is the nucleus; the one with the smaller distance to the point is.
    shape = (31, 31)
    truth = _disc(shape, (15, 15), 4)
    img = np.zeros(shape + (3,), np.uint8)
    img[truth] = 255
    cells, d1 = voronoi_cells(shape, np.array([[15, 15]]))
    np.testing.assert_array_equal(cluster_label(img, cells, d1) == 1, truth)


def test_cluster_argument_checks():
    cells, d1 = voronoi_cells((5, 5), np.array([[2, 2]]))
    with pytest.raises(ValueError, match="`image` must be \\(H, W, 3\\)"):
        cluster_label(np.zeros((5, 4, 3)), cells, d1)
    with pytest.raises(ValueError, match="`dist_clip` and `dist_weight` must be > 0"):
        cluster_label(np.zeros((5, 5, 3)), cells, d1, dist_clip=0)
    with pytest.raises(ValueError, match="`max_iter` must be a positive int"):
        cluster_label(np.zeros((5, 5, 3)), cells, d1, max_iter=0)


# ---------------------------------------------------------------------------------------------
# Repel code


def test_repel_values_from_formula_by_hand():
    pts = np.array([[10, 10], [10, 30]])
    d1, d2 = nearest_two_distances((21, 41), pts)
    assert d1[10, 15] == 5 and d2[10, 15] == 15
    code = repel_code(d1, d2, alpha=0.05, r=70)
    assert code.dtype == np.float32
    # At a point: D = 0 -> 1.
    assert code[10, 10] == 1.0 and code[10, 30] == 1.0
    # (10, 15): d1 = 5, d2 = 15 -> D = 5 * (1 + 1/3) = 20/3 -> 1 / (1 + 1/3) = 0.75.
    np.testing.assert_allclose(code[10, 15], 0.75, rtol=1e-6)
    # (10, 20): d1 = d2 = 10 -> D = 20 -> 1 / (1 + 1) = 0.5.
    np.testing.assert_allclose(code[10, 20], 0.5, rtol=1e-6)
    # (10, 5): d1 = 5, d2 = 25 -> D = 6 -> 1 / 1.3.
    np.testing.assert_allclose(code[10, 5], 1 / 1.3, rtol=1e-6)
    # (13, 14): d1 = 5 (3-4-5), d2 = hypot(3, 16) -> D = 5 (1 + 5 / sqrt(265)).
    big_d = 5 * (1 + 5 / np.sqrt(265))
    np.testing.assert_allclose(code[13, 14], 1 / (1 + 0.05 * big_d), rtol=1e-6)
    # Cut-off on D: r = 10 keeps (10, 15) (D = 6.67) and drops (10, 18) (D = 8 * 5/3 = 13.3).
    small = repel_code(d1, d2, alpha=0.05, r=10)
    np.testing.assert_allclose(small[10, 15], 0.75, rtol=1e-6)
    assert small[10, 18] == 0
    # Closer neighbour -> faster decay: same d1 = 5, the side facing the neighbour is lower.
    assert code[10, 15] < code[10, 5]
    with pytest.raises(ValueError, match="`alpha` and `r` must be > 0"):
        repel_code(d1, d2, alpha=0)


def test_nearest_two_distances_match_brute_force():
    pts = np.array([[1, 1], [6, 2], [3, 7], [7, 8]])
    d1, d2 = nearest_two_distances((9, 10), pts)
    rows, cols = np.indices((9, 10))
    dist = np.sort(np.stack([np.hypot(rows - r, cols - c) for r, c in pts]), axis=0)
    np.testing.assert_allclose(d1, dist[0])
    np.testing.assert_allclose(d2, dist[1])


def test_encode_points_outputs_and_filtered_repel(rng):
    img = rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    pts = np.array([[5.0, 5.0], [20.0, 25.0], [35.0, 10.0], [10.0, 44.0]])
    out = encode_points(img, pts)
    assert set(out) == {"voronoi", "cluster", "repel", "filtered_repel"}
    assert out["voronoi"].dtype == np.uint8 and out["cluster"].dtype == np.uint8
    assert out["repel"].dtype == np.float32 and out["filtered_repel"].dtype == np.float32
    assert set(np.unique(out["voronoi"])) <= {0, 1, IGNORE}
    assert set(np.unique(out["cluster"])) <= {0, 1}
    np.testing.assert_array_equal(out["filtered_repel"], out["repel"] * out["cluster"])
    d1, d2 = nearest_two_distances((40, 50), pts.astype(int))
    np.testing.assert_allclose(out["repel"], repel_code(d1, d2))


# ---------------------------------------------------------------------------------------------
# Readers


def test_csv_round_trip_xy_with_classes(tmp_path):
    pts = np.array([[3.0, 10.5], [7.25, 0.0], [1.0, 2.0]])
    cls = [2, 0, 1]
    path = tmp_path / "pts.csv"
    lines = ["id, X ,Y,Class"] + [
        f"{i},{c},{r},{k or ''}" for i, ((r, c), k) in enumerate(zip(pts, cls, strict=True))
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    got, got_cls = read_points_csv(path)
    np.testing.assert_allclose(got, pts)
    np.testing.assert_array_equal(got_cls, cls)


def test_csv_row_col_without_class_and_names(tmp_path):
    path = tmp_path / "rc.csv"
    path.write_text("\ufeffrow,col\n4,5\n\n6.5,7\n", encoding="utf-8")
    got, got_cls = read_points_csv(path)
    np.testing.assert_allclose(got, [[4, 5], [6.5, 7]])
    assert got_cls is None
    named = tmp_path / "named.csv"
    named.write_text("x,y,type\n1,2,Tumor\n3,4,lymphocyte\n", encoding="utf-8")
    _, got_cls = read_points_csv(named, class_names={1: "tumor", 2: "Lymphocyte"})
    np.testing.assert_array_equal(got_cls, [1, 2])
    with pytest.raises(KerasnucError, match="named.csv: line 2: class 'Tumor' is a name"):
        read_points_csv(named)
    with pytest.raises(KerasnucError, match="unknown class 'Tumor'"):
        read_points_csv(named, class_names={1: "stroma"})


@pytest.mark.parametrize(
    "text, message",
    [
        ("", "empty file"),
        ("a,b\n1,2\n", "no coordinate columns"),
        ("x,y\n1,two\n", "line 2: bad coordinates"),
        ("x,y\n1\n", "line 2: bad coordinates"),
        ("x,y\n1,nan\n", "line 2: non-finite"),
    ],
)
def test_csv_bad_files_name_the_file(tmp_path, text, message):
    path = tmp_path / "bad_points.csv"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(KerasnucError, match=message) as err:
        read_points_csv(path)
    assert "bad_points.csv" in str(err.value)
    with pytest.raises(KerasnucError, match="missing.csv: file not found"):
        read_points_csv(tmp_path / "missing.csv")


def _feature(geometry, name=None):
    props = {"objectType": "annotation"}
    if name is not None:
        props["classification"] = {"name": name, "color": [255, 0, 0]}
    return {"type": "Feature", "geometry": geometry, "properties": props}


def test_geojson_round_trip_qupath_points(tmp_path):
    features = [
        _feature({"type": "Point", "coordinates": [10.5, 3.0]}, "Tumor"),
        _feature({"type": "MultiPoint", "coordinates": [[1.0, 2.0], [4.0, 8.0]]}, "Stroma"),
        _feature({"type": "Polygon", "coordinates": [[[0, 0], [5, 0], [5, 5], [0, 0]]]}),
        _feature({"type": "Point", "coordinates": [7.0, 7.0]}),
    ]
    names = {1: "tumor", 2: "stroma"}
    path = tmp_path / "pts.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": features}))
    pts, cls = read_points_geojson(path, class_names=names, corner_origin=False)
    np.testing.assert_allclose(pts, [[3, 10.5], [2, 1], [8, 4], [7, 7]])
    np.testing.assert_array_equal(cls, [1, 2, 2, 0])
    # QuPath's default corner origin: (x, y) = (c + 0.5, r + 0.5) is the centre of pixel (r, c).
    pts, _ = read_points_geojson(path, class_names=names)
    np.testing.assert_allclose(pts, [[2.5, 10], [1.5, 0.5], [7.5, 3.5], [6.5, 6.5]])
    # The older QuPath export: a bare list of features.
    listed = tmp_path / "list.json"
    listed.write_text(json.dumps(features[3:]))
    pts, cls = read_points_geojson(listed)
    np.testing.assert_allclose(pts, [[6.5, 6.5]])
    assert cls is None


@pytest.mark.parametrize(
    "content, message",
    [
        ("{not json", "invalid JSON"),
        ('{"type": "Polygon"}', "not a GeoJSON"),
        ('{"type": "FeatureCollection", "features": [{"type": "Feature"}]}', "no geometry"),
        (
            '[{"type": "Feature", "geometry": {"type": "Point", "coordinates": ["a"]}}]',
            "bad Point coordinates",
        ),
        (
            '[{"type": "Feature", "geometry": {"type": "Point", "coordinates": [1]}}]',
            "bad Point coordinates",
        ),
    ],
)
def test_geojson_bad_files_name_the_file(tmp_path, content, message):
    path = tmp_path / "bad.geojson"
    path.write_text(content)
    with pytest.raises(KerasnucError, match=message) as err:
        read_points_geojson(path)
    assert "bad.geojson" in str(err.value)


# ---------------------------------------------------------------------------------------------
# Cache


def test_cache_writes_once_and_reloads(tmp_path, rng, monkeypatch):
    img = rng.integers(0, 256, (24, 30, 3), dtype=np.uint8)
    pts = np.array([[5.0, 5.0], [15.0, 20.0]])
    first = cached_encode_points(tmp_path, "img/01", img, pts, disc_radius=3)
    files = list(tmp_path.glob("*.npz"))
    assert len(files) == 1 and files[0].name.startswith("img_01.")
    fresh = encode_points(img, pts, disc_radius=3)
    for key in fresh:
        np.testing.assert_array_equal(first[key], fresh[key])

    def fail(*args, **kwargs):
        raise AssertionError("encode_points called although the result is cached")

    monkeypatch.setattr(points_cache, "encode_points", fail)
    again = cached_encode_points(tmp_path, "img/01", img, pts, disc_radius=3)
    for key in fresh:
        np.testing.assert_array_equal(again[key], fresh[key])
    monkeypatch.undo()
    # Other parameters or other points -> another file.
    cached_encode_points(tmp_path, "img/01", img, pts, disc_radius=2)
    cached_encode_points(tmp_path, "img/01", img, pts + 1, disc_radius=3)
    assert len(list(tmp_path.glob("*.npz"))) == 3
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    # A corrupt cache file is recomputed and replaced.
    path = cache_path(tmp_path, "img/01", img, pts, encoding_params(disc_radius=3))
    assert path.is_file()
    path.write_bytes(b"garbage")
    repaired = cached_encode_points(tmp_path, "img/01", img, pts, disc_radius=3)
    np.testing.assert_array_equal(repaired["cluster"], fresh["cluster"])
    with np.load(path) as data:
        np.testing.assert_array_equal(data["repel"], fresh["repel"])
    with pytest.raises(ValueError, match="Unknown encoding parameters"):
        cached_encode_points(tmp_path, "x", img, pts, radius=3)


# ---------------------------------------------------------------------------------------------
# Real data


def test_encodings_on_real_crop(shared_data):
    from kerasnuc.data.dataset import Dataset

    ds = Dataset(shared_data / "monuseg_kumar")
    sample = ds.sample(ds.ids[0])
    img, inst = sample.image[:200, :200], sample.instances[:200, :200]
    pts, _ = points_from_instances(inst)
    out = encode_points(img, pts)
    px = snap_points(pts, inst.shape)
    # Definitions: each point is foreground in the Voronoi label and the repel code peaks there.
    assert np.all(out["voronoi"][px[:, 0], px[:, 1]] == 1)
    assert np.all(out["repel"][px[:, 0], px[:, 1]] == 1.0)
    # Quality floor of the clustering label against the true nuclei (about 0.7 Dice on full
    # MoNuSeg images with the default settings).
    fg, pred = inst > 0, out["cluster"] == 1
    dice = 2 * (fg & pred).sum() / (fg.sum() + pred.sum())
    assert dice > 0.5, dice
