"""CSV measurement tables: header, values read back with the stdlib csv module, streaming."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest

from kerasnuc.io.table import CSVWriter, write_csv
from kerasnuc.postprocess.measure import NucleusTable, measure_instances


def two_nuclei() -> tuple[np.ndarray, np.ndarray]:
    inst = np.zeros((10, 12), dtype=np.int32)
    inst[2:6, 3:9] = 7  # 4 x 6 rectangle
    inst[8, 0:2] = 11  # 1 x 2 line
    classes = np.where(inst == 7, 2, np.where(inst == 11, 1, 0)).astype(np.int32)
    return inst, classes


def read_rows(path: Path) -> tuple[list[str], list[dict[str, str]]]:
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def test_write_and_read_back(tmp_path: Path) -> None:
    inst, classes = two_nuclei()
    table = measure_instances(
        inst,
        classes=classes,
        probabilities=np.array([[0.1, 0.2, 0.7], [0.25, 0.5, 0.25]]),
        uncertainty=np.array([0.125, np.nan]),
        mpp=0.5,
        offset=(100, 200),
        class_names={1: "tumour", 2: "stroma, other"},
    )
    path = tmp_path / "nuclei.csv"
    assert write_csv(path, table) == 2
    header, rows = read_rows(path)
    assert header[:3] == ["id", "class", "class_name"]
    assert header[-3:] == ["prob_background", "prob_tumour", "prob_stroma, other"]
    for name in ("centroid_x_px", "centroid_y_um", "bbox_x1", "area_um2", "perimeter_um"):
        assert name in header
    first, second = rows
    assert first["id"] == "7" and first["class"] == "2"
    assert first["class_name"] == "stroma, other"  # quoted, survives the comma
    assert float(first["centroid_x_px"]) == 205.5  # cols 3..8 -> 5.5, + 200
    assert float(first["centroid_y_um"]) == pytest.approx(103.5 * 0.5)
    assert [first[k] for k in ("bbox_x0", "bbox_y0", "bbox_x1", "bbox_y1")] == [
        "203",
        "102",
        "209",
        "106",
    ]
    assert first["area_px"] == "24" and float(first["area_um2"]) == 6.0
    assert float(first["solidity"]) == 1.0
    assert float(first["class_probability"]) == 0.7
    assert float(first["prob_stroma, other"]) == 0.7
    assert float(first["uncertainty"]) == 0.125
    assert second["id"] == "11" and second["class_name"] == "tumour"
    assert second["uncertainty"] == ""  # NaN -> empty cell
    assert float(second["eccentricity"]) == 1.0  # a line


def test_decimals(tmp_path: Path) -> None:
    table = NucleusTable({"id": np.array([1]), "value": np.array([1 / 3])})
    path = tmp_path / "t.csv"
    write_csv(path, table, decimals=3)
    assert path.read_text() == "id,value\n1,0.333\n"


def test_streaming_tiles(tmp_path: Path) -> None:
    inst, _ = two_nuclei()
    path = tmp_path / "slide.csv"
    with CSVWriter(path) as writer:
        writer.add(measure_instances(inst, offset=(0, 0)))
        writer.add(measure_instances(np.zeros((4, 4), np.int32), offset=(10, 0)))
        writer.add(measure_instances(inst, offset=(0, 12)))
        assert not path.exists()
    header, rows = read_rows(path)
    assert writer.count == 4 and len(rows) == 4
    assert [r["id"] for r in rows] == ["7", "11", "7", "11"]
    assert [float(r["centroid_x_px"]) for r in rows] == [5.5, 0.5, 17.5, 12.5]


def test_column_mismatch_and_failure_cleanup(tmp_path: Path) -> None:
    inst, classes = two_nuclei()
    path = tmp_path / "x.csv"
    with pytest.raises(ValueError, match="must have the columns"):
        with CSVWriter(path) as writer:
            writer.add(measure_instances(inst))
            writer.add(measure_instances(inst, classes=classes))
    assert list(tmp_path.iterdir()) == []


def test_header_up_front(tmp_path: Path) -> None:
    path = tmp_path / "empty.csv"
    with CSVWriter(path, columns=["id", "area_px"]):
        pass
    assert path.read_text() == "id,area_px\n"
