"""Points as first-class annotations: QuPath points -> data import points -> train --method weak
-> tune --points -> predict, as the README's journey, on a tiny budget."""

from __future__ import annotations

import csv
import json
import shlex

import numpy as np
import pytest
from click.testing import CliRunner

from kerasnuc.cli import main
from kerasnuc.data.dataset import Dataset
from kerasnuc.data.info import dataset_info
from kerasnuc.fileutil import KerasnucError, write_png
from kerasnuc.runs import load_config
from tests.test_api import readme_block

TINY_WEAK = {
    "model": {"encoder_width": 4, "decoder_filters": [8, 8, 8, 8, 8]},
    "pipeline": {"deterministic": True},
}


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def qupath_points(root, n_images=3, size=64, seed=0):
    """Images with dark discs and a QuPath point export per image (MultiPoint per class, one
    region polygon); returns the discs' centres ``{name: [(row, col, class name)]}``."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True)
    (root / "points").mkdir()
    yy, xx = np.mgrid[:size, :size]
    truth = {}
    for k in range(n_images):
        image = np.full((size, size, 3), 225.0)
        centres = []
        for i in range(4):
            cy, cx = 10 + 14 * i, int(rng.integers(10, size - 10))
            image[(yy - cy) ** 2 + (xx - cx) ** 2 <= 20] = (80, 30, 130)
            centres.append((cy, cx, "Tumor" if i % 2 else "Lymphocyte"))
        image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        write_png(root / "images" / f"tile{k}.png", image)
        features = [
            {
                "type": "Feature",
                "geometry": {
                    "type": "MultiPoint",
                    # QuPath's corner origin: the centre of pixel (r, c) is (c + 0.5, r + 0.5).
                    "coordinates": [[c + 0.5, r + 0.5] for r, c, n in centres if n == name],
                },
                "properties": {"objectType": "annotation", "classification": {"name": name}},
            }
            for name in ("Tumor", "Lymphocyte")
        ]
        features.append(
            {
                "type": "Feature",
                "geometry": {
                    "type": "Polygon",
                    "coordinates": [[[0, 0], [size, 0], [size, size], [0, size], [0, 0]]],
                },
                "properties": {"objectType": "annotation", "classification": {"name": "Region"}},
            }
        )
        collection = {"type": "FeatureCollection", "features": features}
        (root / "points" / f"tile{k}.geojson").write_text(json.dumps(collection))
        truth[f"tile{k}"] = centres
    return truth


def test_import_qupath_points_and_csv(tmp_path):
    truth = qupath_points(tmp_path / "src")
    dst = tmp_path / "pts"
    result = invoke("data", "import", "points", tmp_path / "src", dst, "--mpp", "0.5",
                    "--class-map", "Lymphocyte=inflammatory,Tumor=epithelial")  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "Imported 3 images (12 points) from points" in result.output
    assert "skipped non-point features {'Polygon': 1}" in result.output  # the region
    ds = Dataset(dst)
    assert ds.is_points and ds.meta["annotations"] == "points" and ds.mpp == 0.5
    assert ds.class_names == {1: "epithelial", 2: "inflammatory"}  # renamed, then sorted
    assert not (dst / "instances").exists() and (dst / "splits.csv").is_file()
    ids = {"epithelial": 1, "inflammatory": 2}
    for name, centres in truth.items():
        points, classes = ds.points(name)
        # The pixel-centre convention: QuPath's (c + 0.5, r + 0.5) is pixel (r, c).
        got = sorted(zip(points[:, 0], points[:, 1], classes, strict=True))
        mapped = {"Tumor": ids["epithelial"], "Lymphocyte": ids["inflammatory"]}
        want = sorted((float(r), float(c), mapped[n]) for r, c, n in centres)
        assert got == want
        with open(ds.points_path(name), newline="") as fh:
            assert next(csv.reader(fh)) == ["x", "y", "class"]
    with pytest.raises(KerasnucError, match="a points dataset"):
        ds.instances("tile0")
    info = dataset_info(dst)
    assert info["annotations"] == "points" and info["n_nuclei"] == 12
    assert [c["nuclei"] for c in info["class_counts"]] == [6, 6] and not info["problems"]
    result = invoke("data", "info", dst)
    assert result.exit_code == 0 and "12 points (a points dataset)" in result.output
    assert "classes: 1 epithelial, 2 inflammatory" in result.output

    # CSV points (x, y pixel indices, class names) with the classes of a model; a point off
    # the image is dropped and reported; an unknown class is one line naming the file.
    src = tmp_path / "csv"
    (src / "images").mkdir(parents=True)
    (src / "points").mkdir()
    write_png(src / "images" / "a.png", np.zeros((20, 30, 3), np.uint8))
    (src / "points" / "a.csv").write_text("x,y,class\n3,4,spindle\n29,19,\n31,2,other\n")
    result = invoke("data", "import", "points", src, tmp_path / "c", "--classes-from", "default")
    assert result.exit_code == 0, result.output
    assert "1 point(s) off the 20x30 image dropped" in result.output
    points, classes = Dataset(tmp_path / "c").points("a")
    np.testing.assert_array_equal(points, [[4, 3], [19, 29]])
    assert classes.tolist() == [4, 0]  # the default's id of spindle; unclassified
    (src / "points" / "a.csv").write_text("x,y,class\n3,4,mitosis\n")
    result = invoke("data", "import", "points", src, tmp_path / "d", "--classes-from", "default")
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "a.csv: class 'mitosis' is not one of the class names" in result.output
    assert not (tmp_path / "d").exists()


def test_train_points_from_qupath_with_classes_needs_no_mapping(tmp_path):
    # `train --points` with classified QuPath points: the classes are not needed (weak is
    # class-agnostic), so their names are no error.
    from kerasnuc.io.points import read_points_path

    qupath_points(tmp_path / "src", n_images=1)
    points = read_points_path(tmp_path / "src" / "points")
    assert points["tile0"].shape == (4, 2)


@pytest.mark.slow
def test_readme_points_journey(tmp_path):
    """The README's points-only journey, its commands as written plus a tiny budget."""
    src = tmp_path / "qupath_points"
    qupath_points(src, n_images=4)
    cfg = tmp_path / "tiny.json"
    cfg.write_text(json.dumps(TINY_WEAK))
    paths = {
        "qupath_points": src,
        "data/my_points": tmp_path / "data",
        "runs/weak_points": tmp_path / "run",
        "slides/": src / "images" / "tile0.png",
        "results/": tmp_path / "results",
    }
    tiny = ["--config", cfg, "--epochs", "1", "--steps-per-epoch", "1", "--batch-size", "2",
            "--crop", "64", "--no-importance-sampling"]  # fmt: skip
    block = readme_block("### Your own point annotations (QuPath points)", "bash")
    commands = [shlex.split(c) for c in block.replace("\\\n", " ").splitlines() if c.strip()]
    assert [c[:2] for c in commands] == [
        ["kerasnuc", "data"],
        ["kerasnuc", "train"],
        ["kerasnuc", "tune"],
        ["kerasnuc", "predict"],
    ]
    for command in commands:
        args = [paths.get(a, a) for a in command[1:]]
        if args[0] == "train":
            args += tiny
        result = invoke(*args)
        assert result.exit_code == 0, (command, result.output)
        assert "\x1b[" not in result.output  # no terminal colour codes when not on a terminal
        if args[0] == "tune":
            assert "det_F1" in result.output
    config = load_config(tmp_path / "run")
    assert config.method == "weak" and config.data.mpp == 0.25 and config.data.points is None
    out = tmp_path / "results" / "tile0"
    assert (out / "tile0.csv").is_file() and (out / "tile0.summary.json").is_file()
    # With nothing to score against, tune says so in one line.
    empty = tmp_path / "empty"
    empty.mkdir()
    for name in Dataset(tmp_path / "data").ids:
        (empty / f"{name}.csv").write_text("x,y\n")
    result = invoke("tune", tmp_path / "run", "--data", tmp_path / "data", "--points", empty)
    assert result.exit_code == 1 and len(result.output.strip().splitlines()) == 1
    assert "nothing can be scored" in result.output and "no point annotations" in result.output
