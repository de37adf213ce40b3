"""``kerasnuc data import`` / ``kerasnuc data info`` end to end through click's CliRunner."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.io
from click.testing import CliRunner

from kerasnuc.cli import main
from kerasnuc.cli.data import IMPORT_FORMATS
from kerasnuc.data import Dataset
from kerasnuc.data.importers import FORMATS
from kerasnuc.fileutil import write_png
from tests.data.test_importers import (
    make_conic,
    make_consep,
    make_geojson,
    make_masks,
    make_monuseg,
    make_pannuke,
    monuseg_expected,
)


def run(*args: str):
    return CliRunner().invoke(main, [str(a) for a in args])


def assert_one_line_error(result, path, dst):
    """Exit code 1, exactly one ``Error: <path>: ...`` line, no traceback, no DST."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error:")]
    assert len(errors) == 1, result.stderr
    assert errors[0].startswith(f"Error: {path}: "), errors[0]
    assert not dst.exists()
    assert not [p for p in dst.parent.iterdir() if p.name.startswith(f".{dst.name}")]


def test_cli_formats_match_library():
    assert set(IMPORT_FORMATS) == set(FORMATS)


def test_import_then_info(tmp_path):
    src = make_masks(tmp_path / "src")
    dst = tmp_path / "out"
    result = run("data", "import", "masks", src, dst, "--mpp", "0.5", "--name", "tiny")
    assert result.exit_code == 0, result.output
    assert f"Imported 3 images (6 nuclei) from masks into {dst}" in result.stdout
    assert "Warning: " in result.stderr and "unlabelled.png: image without mask" in result.stderr
    ds = Dataset(dst)
    assert ds.name == "tiny" and ds.mpp == 0.5

    result = run("data", "info", dst)
    assert result.exit_code == 0, result.output
    assert "tiny" in result.stdout and "3 images, 6 nuclei, mpp 0.5" in result.stdout
    assert "area (um^2)" in result.stdout and "problems: none" in result.stdout

    result = run("data", "info", dst, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.stdout)
    # inst.png: 4 + 6 px; bin.png: 1 + 1 + 6 px; tif.tif: 2 px -> 6 nuclei, 20 px.
    assert info["n_nuclei"] == 6
    assert info["nucleus_size"]["area_px"]["mean"] == pytest.approx(20 / 6)
    assert info["nucleus_size"]["area_um2"]["max"] == pytest.approx(6 * 0.25)


def test_info_on_bundled_example():
    result = run("data", "info", "demo", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["n_images"] == 2


def test_import_every_format(tmp_path):
    geojson_opts = [
        "--classes",
        "Tumor,Stroma,Immune",
        "--object-types",
        "annotation,detection,cell",
    ]
    cases = [
        ("monuseg", make_monuseg(tmp_path / "monuseg"), [], 1, 2),
        ("consep", make_consep(tmp_path / "consep"), ["--no-merge-classes"], 1, 3),
        ("conic", make_conic(tmp_path / "conic"), [], 2, 4),
        ("pannuke", make_pannuke(tmp_path / "pannuke"), [], 2, 5),
        ("geojson", make_geojson(tmp_path / "geojson"), geojson_opts, 1, 3),
    ]
    for fmt, src, extra, n_images, n_nuclei in cases:
        dst = tmp_path / f"{fmt}_out"
        result = run("data", "import", fmt, src, dst, *extra)
        assert result.exit_code == 0, (fmt, result.output)
        assert f"Imported {n_images} images ({n_nuclei} nuclei)" in result.stdout, fmt
        assert Dataset(dst).meta["n_nuclei"] == n_nuclei
    np.testing.assert_array_equal(
        Dataset(tmp_path / "monuseg_out").instances("TCGA-XX"), monuseg_expected()
    )
    assert Dataset(tmp_path / "consep_out").num_classes == 7
    assert Dataset(tmp_path / "geojson_out").class_names[1] == "Tumor"
    assert (
        "counts.csv row 2"
        in run("data", "import", "conic", tmp_path / "conic", tmp_path / "c2").stderr
    )


def test_val_fraction_and_overwrite(tmp_path):
    src = make_masks(tmp_path / "src")
    dst = tmp_path / "out"
    assert run("data", "import", "masks", src, dst).exit_code == 0
    result = run("data", "import", "masks", src, dst, "--val-fraction", "0.34", "--seed", "3")
    assert result.exit_code == 1 and "already exists" in result.stderr
    result = run(
        "data", "import", "masks", src, dst, "--val-fraction", "0.34", "--seed", "3", "--overwrite"
    )
    assert result.exit_code == 0, result.output
    assert "splits: train 2, val 1" in result.stdout
    assert sorted(Dataset(dst).splits.values()) == ["train", "train", "val"]


def test_option_for_another_format_is_a_usage_error(tmp_path):
    src = make_monuseg(tmp_path / "src")
    result = run("data", "import", "monuseg", src, tmp_path / "out", "--classes", "a,b")
    assert result.exit_code == 2
    assert "--classes does not apply to format 'monuseg'" in result.stderr
    assert not (tmp_path / "out").exists()


# Error paths: each must give one line naming the file, exit code 1, no traceback, no DST. -------


def test_error_missing_image_for_label(tmp_path):
    src = make_masks(tmp_path / "src")
    (src / "images" / "inst.png").unlink()
    dst = tmp_path / "out"
    assert_one_line_error(run("data", "import", "masks", src, dst), src / "masks" / "inst.png", dst)


def test_error_shape_mismatch(tmp_path):
    src = make_masks(tmp_path / "src")
    write_png(src / "masks" / "tif.png", np.zeros((4, 6), np.uint16))  # png wins over tif
    dst = tmp_path / "out"
    result = run("data", "import", "masks", src, dst)
    assert_one_line_error(result, src / "masks" / "tif.png", dst)
    assert "does not match image" in result.stderr


def test_error_wrong_dtype(tmp_path):
    src = make_masks(tmp_path / "src")
    write_png(src / "images" / "bin.png", np.zeros((5, 6, 3), np.uint16))
    dst = tmp_path / "out"
    result = run("data", "import", "masks", src, dst)
    assert_one_line_error(result, src / "images" / "bin.png", dst)
    assert "must be uint8" in result.stderr


def test_error_non_integer_mask(tmp_path):
    import tifffile

    src = make_masks(tmp_path / "src")
    tifffile.imwrite(src / "masks" / "tif.tif", np.full((5, 6), 0.5, np.float32))
    dst = tmp_path / "out"
    result = run("data", "import", "masks", src, dst)
    assert_one_line_error(result, src / "masks" / "tif.tif", dst)
    assert "whole numbers" in result.stderr


def test_error_class_id_not_in_meta(tmp_path):
    src = make_masks(tmp_path / "src")
    (src / "classes").mkdir()
    for stem in ("bin", "inst", "tif"):
        write_png(src / "classes" / f"{stem}.png", np.full((5, 6), 3, np.uint8))
    dst = tmp_path / "out"
    result = run("data", "import", "masks", src, dst, "--classes", "tumour,stroma")
    assert_one_line_error(result, src / "classes" / "bin.png", dst)
    assert "class id(s) [3]" in result.stderr


def test_error_corrupt_image(tmp_path):
    src = make_masks(tmp_path / "src")
    (src / "images" / "tif.tif").write_bytes(b"\x00\x01 not a tiff")
    dst = tmp_path / "out"
    assert_one_line_error(run("data", "import", "masks", src, dst), src / "images" / "tif.tif", dst)


def test_error_corrupt_xml(tmp_path):
    src = make_monuseg(tmp_path / "src")
    xml = src / "Annotations" / "TCGA-XX.xml"
    xml.write_text("<Annotations MicronsPerPixel='0.25'><Region><Vertices>")
    dst = tmp_path / "out"
    assert_one_line_error(run("data", "import", "monuseg", src, dst), xml, dst)


def test_error_corrupt_mat(tmp_path):
    src = make_consep(tmp_path / "src")
    mat = src / "Labels" / "train_1.mat"
    mat.write_bytes(b"MATLAB 5.0 MAT-file, garbage" * 3)
    dst = tmp_path / "out"
    assert_one_line_error(run("data", "import", "consep", src, dst), mat, dst)


def test_error_mat_with_wrong_shape(tmp_path):
    src = make_consep(tmp_path / "src")
    mat = src / "Labels" / "train_1.mat"
    scipy.io.savemat(mat, {"inst_map": np.zeros((5, 6)), "type_map": np.zeros((5, 6))})
    dst = tmp_path / "out"
    result = run("data", "import", "consep", src, dst)
    assert_one_line_error(result, mat, dst)
    assert "inst_map shape (5, 6) does not match image" in result.stderr


def test_error_corrupt_npy(tmp_path):
    src = make_pannuke(tmp_path / "src")
    masks = src / "masks" / "fold2" / "masks.npy"
    masks.write_bytes(masks.read_bytes()[:200])  # truncated
    dst = tmp_path / "out"
    assert_one_line_error(run("data", "import", "pannuke", src, dst), masks, dst)


def test_error_corrupt_geojson(tmp_path):
    src = make_geojson(tmp_path / "src")
    ann = src / "annotations" / "slide_tile.geojson"
    ann.write_text('{"type": "FeatureCollection", "features": [')
    dst = tmp_path / "out"
    assert_one_line_error(run("data", "import", "geojson", src, dst), ann, dst)


def test_info_on_missing_folder_is_one_line(tmp_path):
    result = run("data", "info", tmp_path / "nope")
    assert result.exit_code == 1
    assert result.stderr.strip().startswith("Error: ") and "\n" not in result.stderr.strip()
