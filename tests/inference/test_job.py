"""The predict job (kerasnuc.inference.job) with a fake, TensorFlow-free predictor."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
import pytest
import tifffile
from scipy import ndimage as ndi

from kerasnuc.config import DataConfig
from kerasnuc.fileutil import write_png
from kerasnuc.inference import job as job_module
from kerasnuc.inference.inputs import find_inputs, output_names
from kerasnuc.inference.job import PredictOptions, is_complete, predict_input, predict_inputs
from kerasnuc.io.geojson import read_geojson_instances
from kerasnuc.io.masks import read_label_tiff
from tests.inference.test_tiling import glass_sensitive_label, seam_image

BLUE, RED = (40, 40, 200), (200, 40, 40)
# (row, col, class) of the nuclei of the synthetic image: discs of radius 5, class 1 blue,
# class 2 red; several sit across the tile borders of a 64 / 16 tiling (core 32).
DISCS = [(20, 30, 1), (31, 95, 2), (60, 64, 1), (95, 20, 2), (100, 150, 2), (150, 33, 1)]
SHAPE = (180, 200)


def disc_image() -> np.ndarray:
    img = np.full((*SHAPE, 3), 235, np.uint8)
    rr, cc = np.mgrid[: SHAPE[0], : SHAPE[1]]
    for r, c, k in DISCS:
        img[(rr - r) ** 2 + (cc - c) ** 2 <= 25] = BLUE if k == 1 else RED
    return img


class FakePredictor:
    """Dark pixels are nuclei (connected components), blue ones class 1, red ones class 2."""

    def __init__(
        self, fail_after: int | None = None, mpp: float | None = 0.5, version: str = "v1"
    ) -> None:
        self.data_config = DataConfig(mpp=mpp, class_names={1: "blue", 2: "red"})
        self.calls = 0
        self.fail_after = fail_after
        self.version = version

    def fingerprint(self) -> dict:
        return {"fake": self.version}

    def predict_instances_batch(self, tiles: np.ndarray) -> list:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("simulated crash")
        self.calls += 1
        out = []
        for tile in tiles:
            tile = tile.astype(np.int64)
            inst, n = ndi.label(tile.min(axis=2) < 100)
            cls = np.where(inst > 0, np.where(tile[..., 2] > tile[..., 0], 1, 2), 0)
            ids = np.arange(1, n + 1)
            blue = ndi.mean(cls == 1, inst, ids) > 0.5 if n else np.zeros(0, bool)
            k = np.where(blue, 1, 2)
            probs = np.zeros((n, 3))
            probs[np.arange(n), k] = 1.0
            out.append((inst.astype(np.int32), cls.astype(np.int32), {"probabilities": probs}))
        return out


@pytest.fixture
def disc_png(tmp_path):
    path = tmp_path / "in" / "discs.png"
    write_png(path, disc_image())
    return path


def read_csv(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


OPTIONS = PredictOptions(tile_size=64, margin=16, batch_size=2, mpp=0.5)


def test_in_memory_outputs_match_the_discs(tmp_path, disc_png):
    out = tmp_path / "out"
    report = predict_input(disc_png, FakePredictor(), out, options=OPTIONS, model_id="fake")
    folder = out / "discs"
    assert report.status == "done" and report.mode == "in-memory" and report.n_nuclei == 6
    assert sorted(p.name for p in folder.iterdir()) == sorted(
        f"discs{ext}"
        for ext in (
            ".geojson",
            ".csv",
            ".instances.ome.tif",
            ".classes.ome.tif",
            ".overlay.png",
            ".summary.json",
        )
    )
    rows = read_csv(folder / "discs.csv")
    # A disc of radius 5 has 81 pixels; its centroid is its centre.
    found = sorted(
        (float(r["centroid_y_px"]), float(r["centroid_x_px"]), r["class_name"]) for r in rows
    )
    expected = sorted((r, c, "blue" if k == 1 else "red") for r, c, k in DISCS)
    assert found == [(float(r), float(c), n) for r, c, n in expected]
    assert {int(r["area_px"]) for r in rows} == {81}
    inst = read_label_tiff(folder / "discs.instances.ome.tif")
    assert inst.shape == SHAPE and len(np.unique(inst)) == 7
    cls = read_label_tiff(folder / "discs.classes.ome.tif")
    for r, c, k in DISCS:
        assert cls[r, c] == k
    drawn = read_geojson_instances(folder / "discs.geojson", SHAPE)
    np.testing.assert_array_equal(drawn, inst)
    summary = json.loads((folder / "discs.summary.json").read_text())
    area_mm2 = SHAPE[0] * SHAPE[1] * 0.5**2 / 1e6
    assert summary["total"] == 6 and summary["counts"] == {"blue": 3, "red": 3}
    assert summary["tissue_area_mm2"] == pytest.approx(area_mm2)
    assert summary["densities_per_mm2"]["red"] == pytest.approx(3 / area_mm2)
    assert summary["model_id"] == "fake" and summary["mode"] == "in-memory"
    assert not list(out.glob(".*"))


def test_streaming_gives_the_same_nuclei(tmp_path, disc_png):
    small = predict_input(disc_png, FakePredictor(), tmp_path / "a", options=OPTIONS)
    opts = PredictOptions(tile_size=64, margin=16, batch_size=2, mpp=0.5, tissue=False)
    opts = PredictOptions(**{**opts.__dict__, "small_max_pixels": 0})
    big = predict_input(disc_png, FakePredictor(), tmp_path / "b", options=opts)
    assert (small.mode, big.mode) == ("in-memory", "streaming")
    a, b = tmp_path / "a" / "discs", tmp_path / "b" / "discs"

    def key(rows):
        return sorted(
            (r["centroid_x_px"], r["centroid_y_px"], r["area_px"], r["class"]) for r in rows
        )

    assert key(read_csv(a / "discs.csv")) == key(read_csv(b / "discs.csv"))
    np.testing.assert_array_equal(
        read_label_tiff(a / "discs.classes.ome.tif"), read_label_tiff(b / "discs.classes.ome.tif")
    )
    inst_b = read_label_tiff(b / "discs.instances.ome.tif")
    np.testing.assert_array_equal(read_geojson_instances(b / "discs.geojson", SHAPE), inst_b)
    summary = json.loads((b / "discs.summary.json").read_text())
    assert summary["counts"] == {"blue": 3, "red": 3}
    assert summary["tiles"]["total"] == 6 * 7  # ceil(180 / 32) x ceil(200 / 32)
    assert not (tmp_path / "b" / job_module.WORK_DIR).exists()


def test_interrupted_slide_resumes_where_it_stopped(tmp_path, disc_png):
    opts = PredictOptions(tile_size=64, margin=16, batch_size=4, mpp=0.5, tissue=False)
    opts = PredictOptions(**{**opts.__dict__, "small_max_pixels": 0})
    with pytest.raises(RuntimeError, match="simulated crash"):
        predict_input(disc_png, FakePredictor(fail_after=3), tmp_path / "out", options=opts)
    assert not (tmp_path / "out" / "discs").exists()
    assert not list((tmp_path / "out").glob(".discs.*"))
    assert (tmp_path / "out" / job_module.WORK_DIR / "discs" / "checkpoint.json").is_file()
    resumed = FakePredictor()
    resume = PredictOptions(**{**opts.__dict__, "resume": True})
    report = predict_input(disc_png, resumed, tmp_path / "out", options=resume)
    # 42 tiles in batches of 4 = 11 calls; 3 were done before the crash.
    assert report.status == "done" and resumed.calls == 11 - 3
    fresh = predict_input(disc_png, FakePredictor(), tmp_path / "ref", options=opts)
    assert fresh.n_nuclei == report.n_nuclei == 6
    for ext in (".csv", ".geojson"):
        text = (tmp_path / "out" / "discs" / f"discs{ext}").read_text()
        assert text == (tmp_path / "ref" / "discs" / f"discs{ext}").read_text()
    assert not (tmp_path / "out" / job_module.WORK_DIR).exists()


def test_resume_skips_complete_inputs_only(tmp_path, disc_png):
    out = tmp_path / "out"
    opts = PredictOptions(tile_size=64, margin=16, formats=frozenset({"csv"}), resume=True)
    predict_input(disc_png, FakePredictor(), out, options=opts)
    assert sorted(p.name for p in (out / "discs").iterdir()) == ["discs.csv", "discs.summary.json"]
    again = FakePredictor()
    assert predict_input(disc_png, again, out, options=opts).status == "complete"
    assert again.calls == 0
    assert is_complete(out / "discs", "discs", frozenset({"csv", "summary"}))
    # More formats than last time: redone.
    more = PredictOptions(**{**opts.__dict__, "formats": frozenset({"csv", "geojson"})})
    assert predict_input(disc_png, again, out, options=more).status == "done"
    assert again.calls > 0 and (out / "discs" / "discs.geojson").is_file()
    (out / "discs" / "discs.csv").unlink()
    assert not is_complete(out / "discs", "discs", frozenset({"csv"}))


def test_failures_leave_nothing_and_do_not_stop_the_batch(tmp_path, disc_png):
    bad = tmp_path / "in" / "bad.png"
    bad.write_bytes(b"not an image")
    grey = tmp_path / "in" / "grey.png"
    write_png(grey, np.full((40, 40), 200, np.uint8))
    out = tmp_path / "out"
    reports = predict_inputs(
        [bad, grey, tmp_path / "missing.png", disc_png], FakePredictor(), out, OPTIONS
    )
    assert [r.status for r in reports] == ["failed", "failed", "failed", "done"]
    assert "cannot decode" in reports[0].reason and "greyscale" in reports[1].reason
    assert "not found" in reports[2].reason
    assert sorted(p.name for p in out.iterdir()) == ["discs"]
    crash = predict_inputs([disc_png], FakePredictor(fail_after=0), tmp_path / "o2", OPTIONS)
    assert crash[0].status == "failed" and "RuntimeError" in crash[0].reason
    assert list((tmp_path / "o2").iterdir()) == []


def test_conversions_and_unknown_pixel_size_are_reported(tmp_path):
    rgba = np.zeros((40, 50, 4), np.uint8)
    rgba[..., :3] = disc_image()[:40, :50]
    rgba[..., 3] = 255
    write_png(tmp_path / "rgba.png", rgba)
    tifffile.imwrite(tmp_path / "deep.tif", disc_image()[:40, :50].astype(np.uint16) * 257)
    opts = PredictOptions(tile_size=64, margin=16, formats=frozenset({"summary"}))
    reports = predict_inputs(
        [tmp_path / "rgba.png", tmp_path / "deep.tif"], FakePredictor(), tmp_path / "out", opts
    )
    assert all(r.status == "done" for r in reports)
    assert any("alpha" in w for w in reports[0].warnings)
    assert any("rescaled to uint8" in w for w in reports[1].warnings)
    assert all(any("pixel size unknown" in w for w in r.warnings) for r in reports)
    summary = json.loads((tmp_path / "out" / "rgba" / "rgba.summary.json").read_text())
    assert summary["mpp"] is None and summary["density_per_mm2"] is None


def test_find_inputs_and_output_names(tmp_path):
    folder = tmp_path / "in"
    for name in ("b.jpg", "a.tif", "a.png", "notes.txt", ".hidden.png", "sub/c.png", "x.ome.tif"):
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(b"")
    (folder / "out").mkdir()
    (folder / "out" / "overlay.png").write_bytes(b"")
    found = find_inputs([folder], exclude=folder / "out")
    assert [p.name for p in found] == ["a.png", "a.tif", "b.jpg", "x.ome.tif"]
    deep = find_inputs([folder, folder / "a.png"], recursive=True, exclude=folder / "out")
    assert [p.relative_to(folder).as_posix() for p in deep] == [
        "a.png",
        "a.tif",
        "b.jpg",
        "sub/c.png",
        "x.ome.tif",
    ]
    assert output_names(found) == ["a_png", "a_tif", "b", "x"]
    assert output_names([folder / "a.png", tmp_path / "a.png"]) == ["a_png", "a_png_2"]


def test_options_are_checked():
    with pytest.raises(ValueError, match="formats"):
        PredictOptions(formats=frozenset({"pdf"}))


class GlassSensitivePredictor:
    """:func:`tests.inference.test_tiling.glass_sensitive_label` as a job predictor, 1 class."""

    def __init__(self) -> None:
        self.data_config = DataConfig(mpp=0.5, class_names={1: "nucleus"})

    def predict_instances_batch(self, tiles: np.ndarray) -> list:
        out = []
        for inst in glass_sensitive_label(tiles):
            n = int(inst.max())
            probs = np.zeros((n, 2))
            probs[:, 1] = 1.0
            out.append((inst, (inst > 0).astype(np.int32), {"probabilities": probs}))
        return out


def test_streamed_slide_counts_each_nucleus_once_on_glass_seams(tmp_path):
    """Issue 20 item 3: tissue on glass, streamed, gave some nuclei twice in GeoJSON/CSV/counts."""
    image, centres = seam_image()
    path = tmp_path / "in" / "seams.png"
    write_png(path, image)
    opts = PredictOptions(tile_size=96, margin=16, batch_size=4, mpp=0.5)
    memory = predict_input(path, GlassSensitivePredictor(), tmp_path / "a", options=opts)
    streamed_opts = PredictOptions(**{**opts.__dict__, "small_max_pixels": 0})
    streamed = predict_input(path, GlassSensitivePredictor(), tmp_path / "b", options=streamed_opts)
    assert (memory.mode, streamed.mode) == ("in-memory", "streaming")
    assert memory.n_nuclei == streamed.n_nuclei == len(centres)
    a, b = tmp_path / "a" / "seams", tmp_path / "b" / "seams"

    def key(rows):
        return sorted((r["centroid_x_px"], r["centroid_y_px"], r["area_px"]) for r in rows)

    assert key(read_csv(a / "seams.csv")) == key(read_csv(b / "seams.csv"))
    inst = read_label_tiff(b / "seams.instances.ome.tif")
    assert len(np.unique(inst)) - 1 == len(centres)
    np.testing.assert_array_equal(
        read_geojson_instances(b / "seams.geojson", image.shape[:2]), inst
    )
    summary = json.loads((b / "seams.summary.json").read_text())
    assert summary["counts"] == {"nucleus": len(centres)}
    assert summary["tiles"]["predicted"] < summary["tiles"]["total"]  # glass skipped


def test_resume_reuses_a_folder_only_for_the_same_input_model_and_settings(tmp_path):
    """Issue 20 item 2: another input with the same stem, another model or other settings used
    to get the old results back from ``--resume``."""
    a, b = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png"
    write_png(a, disc_image())
    write_png(b, np.ascontiguousarray(disc_image()[:90]))  # 3 of the 6 discs
    out = tmp_path / "out"
    opts = PredictOptions(tile_size=64, margin=16, mpp=0.5, resume=True)

    def run(path, predictor=None, options=opts):
        report = predict_input(path, predictor or FakePredictor(), out, options=options)
        summary = json.loads((out / "x" / "x.summary.json").read_text())
        return report, summary

    report, _ = run(a)
    assert (report.status, report.n_nuclei) == ("done", 6)
    assert run(a)[0].status == "complete"
    report, summary = run(b)
    assert (report.status, report.n_nuclei) == ("done", 3)
    assert summary["input"] == str(b) and summary["total"] == 3
    assert any("another input" in w for w in report.warnings), report.warnings
    assert run(b)[0].status == "complete"
    # Another model, other settings (--mpp), a changed input file: predicted again.
    report, summary = run(b, FakePredictor(version="v2"))
    assert report.status == "done" and any("another model" in w for w in report.warnings)
    assert summary["fingerprint"]["predictor"] == {"fake": "v2"}
    other_mpp = PredictOptions(**{**opts.__dict__, "mpp": 0.25})
    report, _ = run(b, FakePredictor(version="v2"), other_mpp)
    assert report.status == "done" and any("other settings" in w for w in report.warnings)
    assert run(b, FakePredictor(version="v2"), other_mpp)[0].status == "complete"
    stat = b.stat()
    os.utime(b, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    assert run(b, FakePredictor(version="v2"), other_mpp)[0].status == "done"


def test_same_stem_inputs_of_one_batch_get_their_own_folders(tmp_path):
    a, b, c = tmp_path / "a" / "x.png", tmp_path / "b" / "x.png", tmp_path / "c" / "X.png"
    write_png(a, disc_image())
    write_png(b, np.ascontiguousarray(disc_image()[:90]))
    write_png(c, np.ascontiguousarray(disc_image()[:, :50]))
    # Names differ also without regard to case (folders on macOS and Windows).
    assert output_names([a, b, c]) == ["x_png", "x_png_2", "X_png_3"]
    out = tmp_path / "out"
    reports = predict_inputs([a, b, c], FakePredictor(), out, OPTIONS)
    assert [(r.name, r.n_nuclei) for r in reports] == [("x_png", 6), ("x_png_2", 3), ("X_png_3", 3)]
    for r, path in zip(reports, (a, b, c), strict=True):
        summary = json.loads((out / r.name / f"{r.name}.summary.json").read_text())
        assert Path(summary["input"]) == path
