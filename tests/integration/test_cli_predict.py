"""``kerasnuc predict`` end to end with a tiny random-init conic model on real image crops."""

from __future__ import annotations

import csv
import json
from collections import Counter

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from kerasnuc.cli import main
from kerasnuc.fileutil import read_image, write_png
from kerasnuc.runs import save_config

CLASS_NAMES = {1: "other", 2: "inflammatory", 3: "epithelial", 4: "spindle"}
FAST = ["--tile", "256", "--margin", "32", "--batch-size", "4"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A random-init conic run directory (EfficientNet-B0, 8-filter decoder, 4 classes)."""
    import keras

    from kerasnuc.config import DataConfig, RunConfig
    from kerasnuc.runs import build_model

    config = RunConfig(
        method="conic",
        model={"encoder": "efficientnet_b0", "num_classes": 4, "decoder_filters": [8] * 5},
        data=DataConfig(mpp=0.25, class_names=CLASS_NAMES),
    )
    keras.utils.set_random_seed(0)
    model = build_model(config)
    path = tmp_path_factory.mktemp("run")
    model.save_weights(path / "model.weights.h5")
    save_config(config, path)
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, shared_data):
    """Real crops, a corrupt file, an RGBA PNG, a 16-bit TIFF, a greyscale PNG and a slide."""
    folder = tmp_path_factory.mktemp("inputs")
    consep = read_image(shared_data / "consep" / "images" / "train_10_000.png")
    monuseg = read_image(sorted((shared_data / "monuseg_kumar" / "images").glob("*.png"))[0])
    write_png(folder / "consep.png", consep)
    write_png(folder / "monuseg.png", monuseg[100:400, 200:600])
    (folder / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    rgba = np.concatenate([consep[:96, :128], np.full((96, 128, 1), 255, np.uint8)], axis=2)
    write_png(folder / "rgba.png", rgba)
    tifffile.imwrite(folder / "deep.tif", consep[:96, :128].astype(np.uint16) * 257)
    write_png(folder / "grey.png", consep[:64, :64, 0])
    # A 1500 x 1500 pyramidal TIFF at 0.125 um/px (level 1 = the model's 0.25 um/px): the
    # MoNuSeg image in the top-left corner of white glass.
    canvas = np.full((1500, 1500, 3), 255, np.uint8)
    canvas[:1000, :1000] = monuseg
    slides = folder / "slides"
    slides.mkdir()
    with tifffile.TiffWriter(slides / "slide.ome.tif") as tif:
        for level, mpp in ((0, 0.125), (1, 0.25)):
            tif.write(
                canvas[:: 2**level, :: 2**level],
                tile=(256, 256),
                photometric="rgb",
                resolution=(1e4 / mpp, 1e4 / mpp),
                resolutionunit="CENTIMETER",
                **({"subifds": 1} if level == 0 else {"subfiletype": 1}),
            )
    return folder


def invoke(*args):
    return CliRunner().invoke(main, ["predict", *map(str, args)])


def read_rows(path):
    with open(path, newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


@pytest.fixture(scope="module")
def first_run(run_dir, inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("out")
    images = [inputs / n for n in ("consep.png", "monuseg.png", "corrupt.png", "rgba.png")]
    result = invoke(*images, inputs / "deep.tif", inputs / "grey.png", "--model", run_dir,
                    "--out", out, "--mpp", "0.25", *FAST)  # fmt: skip
    return result, out


@pytest.mark.slow
def test_outputs_exist_and_read_back(first_run):
    result, out = first_run
    assert result.exit_code == 1, result.output
    for name, shape in (("consep", (256, 256)), ("monuseg", (300, 400))):
        folder = out / name
        collection = json.loads((folder / f"{name}.geojson").read_text())
        assert collection["type"] == "FeatureCollection"
        rows = read_rows(folder / f"{name}.csv")
        inst = tifffile.imread(folder / f"{name}.instances.ome.tif")
        cls = tifffile.imread(folder / f"{name}.classes.ome.tif")
        assert inst.shape == cls.shape == shape
        ids = np.unique(inst[inst > 0])
        assert len(rows) == ids.size == len(collection["features"])
        assert sorted(int(r["id"]) for r in rows) == ids.tolist()
        for feature in collection["features"]:
            assert feature["properties"]["objectType"] == "detection"
        summary = json.loads((folder / f"{name}.summary.json").read_text())
        assert summary["total"] == len(rows)
        per_class = Counter(r["class_name"] for r in rows)
        assert {k: v for k, v in summary["counts"].items() if v} == dict(per_class)
        area_mm2 = shape[0] * shape[1] * 0.25**2 / 1e6
        assert summary["tissue_area_mm2"] == pytest.approx(area_mm2)
        assert summary["mode"] == "in-memory" and summary["mpp"] == 0.25
        overlay = read_image(folder / f"{name}.overlay.png")
        # The image, then a white legend strip naming the class colours.
        assert overlay.shape[1:] == (shape[1], 3) and overlay.shape[0] % 20 == shape[0] % 20
        assert overlay.shape[0] > shape[0] and (overlay[shape[0] :, :3] == 255).all()
    assert not any(p.name.startswith(".") for p in out.iterdir())


@pytest.mark.slow
def test_bad_inputs_are_reported_and_skipped(first_run):
    result, out = first_run
    assert sorted(p.name for p in out.iterdir()) == ["consep", "deep", "monuseg", "rgba"]
    assert "corrupt.png" in result.output and "cannot decode image" in result.output
    assert "grey.png" in result.output and "greyscale" in result.output
    assert "alpha channel removed" in result.output
    assert "rescaled to uint8" in result.output
    assert "4 predicted, 0 already complete (--resume), 2 failed" in result.output


@pytest.mark.slow
def test_resume_skips_finished_inputs(first_run, run_dir, inputs):
    _, out = first_run
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    result = invoke(inputs / "consep.png", inputs / "monuseg.png", "--model", run_dir,
                    "--out", out, "--mpp", "0.25", "--resume", *FAST)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "0 predicted, 2 already complete" in result.output
    after = {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file()}
    assert after == before
    # Other results with --tta: predicted again, not the old folder returned (issue 20).
    result = invoke(inputs / "consep.png", "--model", run_dir, "--out", out, "--mpp", "0.25",
                    "--resume", "--tta", "2", *FAST)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "1 predicted, 0 already complete" in result.output
    assert "holds the results of another model; predicting it again" in result.output
    summary = json.loads((out / "consep" / "consep.summary.json").read_text())
    assert summary["fingerprint"]["predictor"]["tta"] == 2


def test_views_reach_the_predictor_and_exclude_tta(run_dir, inputs, tmp_path):
    out = tmp_path / "out"
    result = invoke(inputs / "rgba.png", "--model", run_dir, "--out", out, "--views", "2",
                    "--format", "summary", *FAST)  # fmt: skip
    assert result.exit_code == 0, result.output
    summary = json.loads((out / "rgba" / "rgba.summary.json").read_text())
    assert summary["fingerprint"]["predictor"]["views"] == 2
    result = invoke(inputs / "rgba.png", "--model", run_dir, "--out", tmp_path / "other",
                    "--views", "2", "--tta", "4")  # fmt: skip
    assert result.exit_code == 1
    assert "--views 2 and --tta 4 exclude each other" in result.output
    result = invoke(inputs / "rgba.png", "--model", run_dir, "--out", out, "--views", "3")
    assert result.exit_code == 2 and "'3' is not one of '1', '2', '4', '8'" in result.output


@pytest.mark.slow
def test_grey_convert_and_pyramidal_slide_streams(run_dir, inputs, tmp_path):
    out = tmp_path / "out"
    result = invoke(inputs / "grey.png", inputs / "slides", "--model", run_dir, "--out", out,
                    "--grey", "convert", "--format", "geojson,csv,summary", *FAST)  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "converted to RGB" in result.output
    summary = json.loads((out / "slide" / "slide.summary.json").read_text())
    assert summary["mode"] == "streaming" and summary["image_shape"] == [1500, 1500]
    assert summary["tiles"]["level"] == 1 and summary["mpp"] == 0.125
    # Level 1 is 750 x 750 px: 4 x 4 cores of 192 px; the tissue fills the top-left 500 x 500.
    assert summary["tiles"]["total"] == 16 and 0 < summary["tiles"]["predicted"] < 16
    assert 0.9 * 1e6 < summary["tissue_area_px"] < 1.2e6
    rows = read_rows(out / "slide" / "slide.csv")
    features = json.loads((out / "slide" / "slide.geojson").read_text())["features"]
    assert summary["total"] == len(rows) == len(features)
    assert sorted(p.name for p in (out / "slide").iterdir()) == [
        "slide.csv",
        "slide.geojson",
        "slide.summary.json",
    ]
    assert sorted(p.name for p in out.iterdir()) == ["grey", "slide"]


def test_missing_model_and_bad_format_fail_with_one_line(tmp_path, monkeypatch):
    from kerasnuc import model_dirs

    monkeypatch.setattr(model_dirs, "BUNDLED_DIR", tmp_path / "none")
    result = invoke(tmp_path, "--out", tmp_path / "out")
    assert result.exit_code == 1 and "pass --model" in result.output
    result = invoke(tmp_path, "--out", tmp_path / "out", "--format", "geojson,pdf")
    assert result.exit_code == 2 and "pdf" in result.output


@pytest.mark.slow
def test_cluster_of_two_workers_equals_the_serial_run(run_dir, inputs, shared_data, tmp_path):
    """--cluster local:2 on 6 real images and a corrupt one: the serial run's instance maps."""
    pytest.importorskip("distributed", reason="needs kerasnuc[cluster] (dask)")
    folder = tmp_path / "six"
    folder.mkdir()
    consep = sorted((shared_data / "consep" / "images").glob("train_*.png"))[:3]
    kumar = read_image(sorted((shared_data / "monuseg_kumar" / "images").glob("*.png"))[1])
    for k, path in enumerate(consep):
        write_png(folder / f"consep{k}.png", read_image(path)[:192, :224])
    for k in range(3):
        write_png(folder / f"kumar{k}.png", kumar[k * 300 : k * 300 + 200, 100:360])
    (folder / "zcorrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    common = ["--model", run_dir, "--mpp", "0.25", "--format", "tiff,summary", *FAST]
    serial = invoke(folder, "--out", tmp_path / "serial", *common)
    cluster = invoke(folder, "--out", tmp_path / "cluster", "--cluster", "local:2", *common)
    for result in (serial, cluster):
        assert result.exit_code == 1, result.output
        assert "6 predicted, 0 already complete (--resume), 1 failed" in result.output
        assert "zcorrupt.png" in result.output.split("Failed inputs:")[1]
    names = sorted(p.stem for p in folder.glob("[ck]*.png"))
    assert sorted(p.name for p in (tmp_path / "cluster").iterdir()) == names
    counts = []
    for name in names:
        a = tifffile.imread(tmp_path / "serial" / name / f"{name}.instances.ome.tif")
        b = tifffile.imread(tmp_path / "cluster" / name / f"{name}.instances.ome.tif")
        np.testing.assert_array_equal(a, b)
        counts.append(np.unique(a[a > 0]).size)
    assert min(counts) > 0, counts  # the comparison is not between empty maps


def test_cluster_spec_errors_are_one_line(tmp_path):
    for spec, says in (("local:0", "positive integer"), ("nowhere", "scheduler address")):
        result = invoke(tmp_path, "--out", tmp_path / "o", "--cluster", spec)
        assert result.exit_code == 1
        assert f"--cluster {spec}: " in result.output and says in result.output
        assert not (tmp_path / "o").exists()
