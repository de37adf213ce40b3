"""Point annotations of several images: one CSV / GeoJSON file per image id."""

from __future__ import annotations

import json

import numpy as np
import pytest

from kerasnuc.fileutil import KerasnucError
from kerasnuc.io.points import read_points_file, read_points_path


def _write(folder):
    folder.mkdir()
    (folder / "a.csv").write_text("x,y\n3,1\n5.5,2\n")
    features = [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [4.5, 8.5]}},
        {"type": "Feature", "geometry": {"type": "Polygon", "coordinates": [[[0, 0], [1, 0]]]}},
    ]
    (folder / "b.geojson").write_text(
        json.dumps({"type": "FeatureCollection", "features": features})
    )
    (folder / "notes.txt").write_text("ignored")
    return folder


def test_folder_of_files_named_by_image_id(tmp_path):
    points = read_points_path(_write(tmp_path / "pts"))
    assert sorted(points) == ["a", "b"]
    # CSV: x = column, y = row. QuPath GeoJSON: pixel corners at integers, so minus 0.5.
    np.testing.assert_array_equal(points["a"], [[1, 3], [2, 5.5]])
    np.testing.assert_array_equal(points["b"], [[8, 4]])
    only = read_points_path(tmp_path / "pts", ids=["b", "zzz"])
    assert sorted(only) == ["b"]


def test_single_file_is_one_image(tmp_path):
    folder = _write(tmp_path / "pts")
    points = read_points_path(folder / "a.csv")
    assert list(points) == ["a"] and points["a"].shape == (2, 2)
    np.testing.assert_array_equal(read_points_file(folder / "b.geojson")[0], [[8, 4]])


def test_errors(tmp_path):
    folder = _write(tmp_path / "pts")
    (folder / "a.json").write_text("[]")
    with pytest.raises(KerasnucError, match="second point file for image 'a'"):
        read_points_path(folder)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(KerasnucError, match="no point files"):
        read_points_path(empty)
    with pytest.raises(KerasnucError, match="point annotations not found"):
        read_points_path(tmp_path / "missing")
    with pytest.raises(KerasnucError, match="not a point file"):
        read_points_file(folder / "notes.txt")
    (folder / "a.json").unlink()
    (folder / "c.csv").write_text("x,y\n1,oops\n")
    with pytest.raises(KerasnucError, match="c.csv: line 2: bad coordinates"):
        read_points_path(folder)
