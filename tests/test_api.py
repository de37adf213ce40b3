"""The Python API of the README: runs as written and finds the nuclei ``kerasnuc predict`` finds."""

from __future__ import annotations

import csv
import importlib.util
import json
import re

import numpy as np
import pytest
import tifffile
from click.testing import CliRunner

from kerasnuc.cli import main
from kerasnuc.fileutil import KerasnucError, read_image
from tests.conftest import REPO


def readme_block(heading: str, language: str) -> str:
    """The first ``language`` code block after the README heading ``heading``."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    section = text[text.index(f"\n{heading}\n") :]
    match = re.search(rf"```{language}\n(.*?)```", section, re.S)
    assert match, f"no {language} block under {heading}"
    return match.group(1)


@pytest.mark.slow
def test_readme_python_example_gives_the_nuclei_of_kerasnuc_predict(tmp_path):
    namespace: dict = {}
    exec(compile(readme_block("## Python", "python"), "README.md", "exec"), namespace)
    result, image = namespace["result"], namespace["image"]
    labels = namespace["labels"]

    out = tmp_path / "out"
    cli = CliRunner().invoke(main, ["predict", str(image), "--out", str(out)])
    assert cli.exit_code == 0, cli.output
    folder = out / image.stem
    # The same nuclei, pixel for pixel, with the same ids.
    np.testing.assert_array_equal(
        labels, tifffile.imread(folder / f"{image.stem}.instances.ome.tif")
    )
    np.testing.assert_array_equal(
        result.classes, tifffile.imread(folder / f"{image.stem}.classes.ome.tif")
    )
    assert len(result) == int(labels.max()) > 50
    # The table is the CSV: same columns (the input's name first), same rows.
    with open(folder / f"{image.stem}.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    columns = result.measurements.flat_columns()
    assert list(rows[0]) == list(columns) and next(iter(rows[0])) == "image"
    assert {r["image"] for r in rows} == {image.name}
    assert [int(r["id"]) for r in rows] == columns["id"].tolist()
    assert [r["class_name"] for r in rows] == columns["class_name"].tolist()
    np.testing.assert_allclose([float(r["area_px"]) for r in rows], np.bincount(labels.ravel())[1:])
    if importlib.util.find_spec("pandas") is not None:
        assert list(result.table.columns) == list(columns)
        assert result.table["area_px"].tolist() == columns["area_px"].tolist()
    else:
        assert list(result.table) == list(columns)
    # Counts per cell type, every type of the model listed.
    names = ["other", "inflammatory", "epithelial", "spindle"]
    assert list(result.counts) == names
    assert result.counts == {n: sum(r["class_name"] == n for r in rows) for n in names}
    # The summary lists every format written, summary included, and that no tissue detection
    # was applied to an image predicted in memory (all of it counts as tissue).
    summary = json.loads((folder / f"{image.stem}.summary.json").read_text())
    assert summary["formats"] == ["csv", "geojson", "overlay", "summary", "tiff"]
    assert summary["settings"]["tissue_detection"] is False and summary["mode"] == "in-memory"
    # The overlay: the image's rows, then a legend strip.
    overlay = read_image(folder / f"{image.stem}.overlay.png")
    assert overlay.shape[0] > labels.shape[0] and overlay.shape[1] == labels.shape[1]


@pytest.mark.slow
def test_segment_an_array_with_a_pixel_size_and_errors(tmp_path):
    import kerasnuc
    from kerasnuc.examples import example_images

    image = read_image(example_images("demo")[1])
    result = kerasnuc.segment(image, mpp=0.25, name="tile_7")
    assert result.mpp == 0.25 and result.labels.shape == image.shape[:2]
    assert set(result.measurements["image"].tolist()) == {"tile_7"}
    assert "area_um2" in result.measurements.flat_columns()
    np.testing.assert_allclose(
        result.measurements["area_um2"], result.measurements["area_px"] * 0.0625
    )
    with pytest.raises(KerasnucError, match="no such run directory, nor a bundled model"):
        kerasnuc.segment(image, model=tmp_path / "nowhere")
    with pytest.raises(KerasnucError, match="greyscale"):
        kerasnuc.segment(image[..., 0])


def test_import_kerasnuc_does_not_load_tensorflow():
    import subprocess
    import sys

    code = "import kerasnuc, sys; print('tensorflow' in sys.modules, 'segment' in dir(kerasnuc))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]


def test_both_engines_find_the_same_nuclei_and_auto_needs_no_tensorflow():
    import subprocess
    import sys

    import kerasnuc
    from kerasnuc.examples import example_images

    image = read_image(example_images("demo")[0])
    fast = kerasnuc.segment(image, engine="onnx", precision="float32")
    slow = kerasnuc.segment(image, engine="keras")
    np.testing.assert_array_equal(fast.labels, slow.labels)
    np.testing.assert_array_equal(fast.classes, slow.classes)
    assert fast.counts == slow.counts and len(fast) > 50
    with pytest.raises(KerasnucError, match="augmentation"):
        kerasnuc.segment(image, engine="onnx", tta=4)
    with pytest.raises(ValueError, match="engine"):
        kerasnuc.load_predictor("default", 0, 4, "gpu")
    code = (
        "import sys, kerasnuc\n"
        "from kerasnuc.examples import example_images\n"
        "r = kerasnuc.segment(example_images('demo')[0])\n"
        "print(len(r) > 50, 'tensorflow' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split()[-2:] == ["True", "False"]
