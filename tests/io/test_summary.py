"""Run summary JSON: counts, fractions and densities computed by hand."""

from __future__ import annotations

import datetime
import json
from pathlib import Path

import numpy as np
import pytest

from kerasnuc.io.summary import build_summary, class_counts, write_summary
from kerasnuc.postprocess.measure import NucleusTable


def test_counts_and_densities_by_hand(tmp_path: Path) -> None:
    table = NucleusTable(
        {"id": np.arange(1, 6), "class": np.array([1, 2, 2, 2, 0])}, class_names={1: "tumour"}
    )
    assert class_counts(table) == {0: 1, 1: 1, 2: 3}
    when = datetime.datetime(2025, 1, 2, 3, 4, 5, tzinfo=datetime.UTC)
    summary = build_summary(
        table,
        class_names={1: "tumour", 2: "immune", 3: "stroma"},
        tissue_area_px=1_000_000,
        mpp=0.5,
        runtime_s=12.5,
        model_id="conic-b0",
        settings={"tile": np.int64(512), "thresholds": (0.5, 0.25), "nan": float("nan")},
        created=when,
        slide="s1.svs",
    )
    # 1e6 px * 0.25 um^2 = 250000 um^2 = 0.25 mm^2 -> density = 4 x count
    assert summary["tissue_area_mm2"] == pytest.approx(0.25)
    assert summary["total"] == 5
    assert summary["density_per_mm2"] == pytest.approx(20.0)
    assert summary["counts"] == {"tumour": 1, "immune": 3, "stroma": 0, "unclassified": 1}
    assert summary["fractions"] == pytest.approx(
        {"tumour": 0.2, "immune": 0.6, "stroma": 0.0, "unclassified": 0.2}
    )
    assert summary["densities_per_mm2"] == pytest.approx(
        {"tumour": 4.0, "immune": 12.0, "stroma": 0.0, "unclassified": 4.0}
    )
    assert summary["runtime_s"] == 12.5 and summary["model_id"] == "conic-b0"
    assert summary["settings"] == {"tile": 512, "thresholds": [0.5, 0.25], "nan": None}
    assert summary["created"] == "2025-01-02T03:04:05+00:00"
    assert summary["slide"] == "s1.svs"
    path = write_summary(tmp_path / "sub" / "summary.json", summary)
    assert json.loads(path.read_text()) == summary


def test_without_area_or_classes() -> None:
    summary = build_summary({1: 2, 2: 6}, mpp=0.25)
    assert summary["counts"] == {"1": 2, "2": 6}
    assert summary["density_per_mm2"] is None
    assert summary["densities_per_mm2"] == {"1": None, "2": None}
    plain = build_summary(7, tissue_area_px=4_000_000, mpp=0.25)
    # 4e6 * 0.0625 um^2 = 0.25 mm^2
    assert plain["counts"] == {} and plain["density_per_mm2"] == pytest.approx(28.0)
    empty = build_summary({}, tissue_area_px=100, mpp=1.0)
    assert empty["total"] == 0 and empty["density_per_mm2"] == 0.0


def test_errors() -> None:
    with pytest.raises(ValueError, match="mpp"):
        build_summary(3, mpp=-1.0)
    with pytest.raises(ValueError, match="tissue_area_px"):
        build_summary(3, tissue_area_px=-5)
    with pytest.raises(ValueError, match="collides"):
        build_summary(3, total=4)
